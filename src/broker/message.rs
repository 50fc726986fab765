//! A published message as the broker core holds it: one shared, immutable copy however many
//! queues, retained slots and in-flight windows refer to it. Topic and payload are owned bytes
//! (never slices of a connection's read buffer), so holding a message pins nothing else.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rumqttd::protocol::PublishProperties;

/// Who published a message: a device session, or the message bus bridge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Session(u64),
    Bus,
}

#[derive(Debug)]
pub struct Message {
    /// The canonical topic it is routed under.
    pub topic: Bytes,
    pub payload: Bytes,
    /// The QoS it was published with (0, 1 or 2): deliveries never exceed it.
    pub qos: u8,
    pub retain: bool,
    /// MQTT 5 properties passed through to MQTT 5 subscribers (never to 3.1.1 ones).
    pub properties: Option<Box<PublishProperties>>,
    pub origin: Origin,
    /// When the MQTT 5 Message Expiry Interval runs out: not delivered after that.
    pub expires_at: Option<Instant>,
}

impl Message {
    pub fn new(topic: Bytes, payload: Bytes, qos: u8, retain: bool, origin: Origin) -> Arc<Self> {
        Arc::new(Message {
            topic,
            payload,
            qos: qos.min(2),
            retain,
            properties: None,
            origin,
            expires_at: None,
        })
    }

    /// A copy of the message (topic, payload and properties shared or cloned).
    pub fn copy(&self) -> Message {
        Message {
            topic: self.topic.clone(),
            payload: self.payload.clone(),
            qos: self.qos,
            retain: self.retain,
            properties: self.properties.clone(),
            origin: self.origin,
            expires_at: self.expires_at,
        }
    }

    /// The expiry instant of a message published now with these properties.
    pub fn expiry_of(properties: Option<&PublishProperties>) -> Option<Instant> {
        let secs = properties?.message_expiry_interval?;
        Instant::now().checked_add(Duration::from_secs(u64::from(secs)))
    }

    /// Whether its expiry interval has run out.
    pub fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|at| now >= at)
    }

    /// The seconds left of its expiry interval (rounded up), to send on with a late delivery.
    pub fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        let left = self.expires_at?.saturating_duration_since(now);
        Some(u32::try_from(left.as_secs() + u64::from(left.subsec_nanos() > 0)).unwrap_or(u32::MAX))
    }

    /// Bytes charged against a queue's (and the retained store's) byte bound: topic, payload and
    /// the MQTT 5 properties passed on, which a device can make as large as its payload.
    pub fn size(&self) -> usize {
        self.topic.len()
            + self.payload.len()
            + self.properties.as_deref().map_or(0, properties_size)
    }

    /// The topic as text (topics are UTF-8 by the time they are routed).
    pub fn topic_str(&self) -> &str {
        std::str::from_utf8(&self.topic).unwrap_or("")
    }
}

/// Bytes the properties hold: their variable-length parts, plus the box and per user property
/// its two strings' headers and the allocator's smallest size class for each (a megabyte of
/// one-letter user properties holds about ten megabytes).
fn properties_size(props: &PublishProperties) -> usize {
    const FIXED: usize = std::mem::size_of::<PublishProperties>();
    const PER_PAIR: usize = 2 * (std::mem::size_of::<String>() + 16);
    let strings = [&props.content_type, &props.response_topic]
        .into_iter()
        .flatten()
        .map(String::len)
        .sum::<usize>();
    let pairs: usize = props
        .user_properties
        .iter()
        .map(|(k, v)| PER_PAIR + k.len() + v.len())
        .sum();
    FIXED + strings + props.correlation_data.as_ref().map_or(0, |d| d.len()) + pairs
}

/// Strips what only makes sense on the publisher's own connection (topic alias, subscription
/// identifiers) and keeps the rest for subscribers; `None` when nothing is left.
pub fn forwarded_properties(props: Option<PublishProperties>) -> Option<Box<PublishProperties>> {
    let mut props = props?;
    props.topic_alias = None;
    props.subscription_identifiers.clear();
    (props != PublishProperties::default()).then(|| Box::new(props))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_properties_drop_connection_scoped_ones() {
        let only_alias = PublishProperties {
            topic_alias: Some(3),
            ..Default::default()
        };
        assert!(forwarded_properties(Some(only_alias)).is_none());
        let user = PublishProperties {
            topic_alias: Some(3),
            user_properties: vec![("k".into(), "v".into())],
            ..Default::default()
        };
        let kept = forwarded_properties(Some(user)).expect("user property kept");
        assert_eq!(kept.topic_alias, None);
        assert_eq!(kept.user_properties.len(), 1);
    }

    #[test]
    fn size_counts_the_properties_passed_on() {
        let bare = Message::new("a/b".into(), "xyz".into(), 1, false, Origin::Bus);
        let mut with = Arc::try_unwrap(bare).expect("sole owner");
        with.properties = Some(Box::new(PublishProperties {
            user_properties: vec![("k".repeat(1000), "v".repeat(9000))],
            correlation_data: Some(vec![0u8; 500].into()),
            ..Default::default()
        }));
        assert!(with.size() > 6 + 10_500, "{}", with.size());
    }

    #[test]
    fn qos_is_capped_and_size_counts_topic_and_payload() {
        let m = Message::new("a/b".into(), "xyz".into(), 3, false, Origin::Bus);
        assert_eq!(m.qos, 2);
        assert_eq!(m.size(), 6);
        assert_eq!(m.topic_str(), "a/b");
    }
}
