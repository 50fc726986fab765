//! Turns what the broker core hands a connection into packets for the device: a PUBLISH with
//! its delivery QoS, packet id, DUP and RETAIN flags, or a PUBREL. Topic and payload are shared
//! with the stored message, never copied.

use bytes::Bytes;
use rumqttd::protocol::{Packet, PubRel, PubRelReason, Publish, PublishProperties};

use crate::broker::{Delivery, Outgoing};

/// The packet for one outgoing item; properties only for MQTT 5 devices.
pub(super) fn packet(outgoing: Outgoing, v5: bool) -> Packet {
    match outgoing {
        Outgoing::Publish {
            delivery,
            pkid,
            dup,
        } => {
            let props = if v5 { properties(&delivery) } else { None };
            Packet::Publish(publish(&delivery, pkid, dup), props)
        }
        Outgoing::Release(pkid) => Packet::PubRel(
            PubRel {
                pkid,
                reason: PubRelReason::Success,
            },
            None,
        ),
    }
}

/// The publisher's properties, plus this delivery's subscription identifiers and what is left
/// of the message expiry interval.
fn properties(delivery: &Delivery) -> Option<PublishProperties> {
    let message = &delivery.message;
    let mut props = message.properties.as_deref().cloned();
    if !delivery.ids.is_empty() {
        props
            .get_or_insert_with(Default::default)
            .subscription_identifiers = delivery.ids.iter().map(|&id| id as usize).collect();
    }
    if let Some(left) = message.remaining_expiry(std::time::Instant::now()) {
        props
            .get_or_insert_with(Default::default)
            .message_expiry_interval = Some(left);
    }
    props
}

/// rumqttd keeps a PUBLISH's QoS, DUP and packet id crate-private; its codec-neutral form sets
/// them, on a header-only buffer, and the shared topic and payload go in afterwards.
fn publish(delivery: &Delivery, pkid: u16, dup: bool) -> Publish {
    let message = &delivery.message;
    let mut publish = if delivery.qos == 0 {
        Publish::new(Bytes::new(), Bytes::new(), delivery.retain)
    } else {
        let flags = 0x30 | u8::from(delivery.retain) | (delivery.qos << 1) | (u8::from(dup) << 3);
        let [hi, lo] = pkid.to_be_bytes();
        Publish::deserialize(Bytes::copy_from_slice(&[flags, hi, lo, 0, 0]))
    };
    publish.topic = message.topic.clone();
    publish.payload = message.payload.clone();
    publish
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{Message, Origin};
    use crate::session::codec::{Codec, ProtocolVersion};
    use bytes::BytesMut;

    fn encoded(qos: u8, pkid: u16, dup: bool, retain: bool) -> Vec<u8> {
        let delivery = Delivery {
            message: Message::new("a/b".into(), "hi".into(), 2, true, Origin::Bus),
            qos,
            retain,
            ids: Vec::new(),
            shared: None,
        };
        let outgoing = Outgoing::Publish {
            delivery,
            pkid,
            dup,
        };
        let mut buf = BytesMut::new();
        Codec::new(ProtocolVersion::V311, 1024)
            .write(packet(outgoing, false), &mut buf)
            .expect("encodes");
        buf.to_vec()
    }

    #[test]
    fn publish_carries_qos_packet_id_and_flags() {
        assert_eq!(
            encoded(0, 0, false, false),
            [0x30, 7, 0, 3, b'a', b'/', b'b', b'h', b'i']
        );
        assert_eq!(
            encoded(1, 0x0102, false, true),
            [0x33, 9, 0, 3, b'a', b'/', b'b', 1, 2, b'h', b'i']
        );
        assert_eq!(
            encoded(2, 7, true, false),
            [0x3C, 9, 0, 3, b'a', b'/', b'b', 0, 7, b'h', b'i']
        );
    }
}
