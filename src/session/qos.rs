//! Delivery at min(publish QoS, subscription QoS). rumqttd's router delivers at the subscriber's
//! QoS, so each PUBLISH entering the router carries its own QoS in a marker, and the session
//! caps what it writes to the device, answering the router's side of the acknowledgement itself.
//!
//! The marker lives in the high bits of the payload-format-indicator property (a device's own
//! value, 0 or 1, is kept in the low bits and restored before the PUBLISH leaves): it costs no
//! allocation, and rumqttd passes the property through untouched.

use rumqttd::protocol::PublishProperties;

const MARKED: u8 = 0x80;
const NO_INDICATOR: u8 = 0x0F;

/// Records the QoS a PUBLISH was sent with (only 0 and 1 can need a cap).
pub(crate) fn mark_origin(props: &mut Option<PublishProperties>, qos: u8) {
    if qos >= 2 {
        return;
    }
    let p = props.get_or_insert_with(Default::default);
    let indicator = p
        .payload_format_indicator
        .map_or(NO_INDICATOR, |v| v & 0x0F);
    p.payload_format_indicator = Some(MARKED | (qos << 4) | indicator);
}

/// Removes the marker, restoring the device's own properties; returns the origin QoS if marked.
pub(crate) fn take_origin(props: &mut Option<PublishProperties>) -> Option<u8> {
    let p = props.as_mut()?;
    let value = p.payload_format_indicator.filter(|v| v & MARKED != 0)?;
    p.payload_format_indicator = match value & 0x0F {
        NO_INDICATOR => None,
        v => Some(v),
    };
    if *p == PublishProperties::default() {
        *props = None;
    }
    Some((value >> 4) & 0b11)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_round_trips_and_restores_properties() {
        let mut none = None;
        mark_origin(&mut none, 0);
        assert_eq!(take_origin(&mut none), Some(0));
        assert_eq!(none, None);

        let mut with_indicator = Some(PublishProperties {
            payload_format_indicator: Some(1),
            content_type: Some("text/plain".into()),
            ..Default::default()
        });
        let original = with_indicator.clone();
        mark_origin(&mut with_indicator, 1);
        assert_eq!(take_origin(&mut with_indicator), Some(1));
        assert_eq!(with_indicator, original);
    }

    #[test]
    fn qos2_and_unmarked_publishes_are_left_alone() {
        let mut props = None;
        mark_origin(&mut props, 2);
        assert_eq!(props, None);
        let mut device = Some(PublishProperties {
            payload_format_indicator: Some(1),
            ..Default::default()
        });
        assert_eq!(take_origin(&mut device), None);
        assert_eq!(device.and_then(|p| p.payload_format_indicator), Some(1));
    }
}
