//! MQTT 5 topic aliases of one connection (§3.3.2.3.4), in both directions: those the device
//! sets up on its PUBLISHes (up to the Topic Alias Maximum we advertise) and those we set up on
//! PUBLISHes to a device that asked for them (up to its own maximum). The maps are allocated on
//! the first alias (an idle connection carries two numbers), and die with the connection: a
//! reconnect starts afresh.

use std::collections::HashMap;

use bytes::Bytes;
use rumqttd::protocol::Packet;

/// Why a device's PUBLISH has no usable topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(super) enum AliasError {
    #[error("topic alias 0 is not allowed")]
    Zero,
    #[error("topic alias {0} is above the maximum of {1}")]
    AboveMaximum(u16, u16),
    #[error("topic alias {0} was never set up on this connection")]
    Unknown(u16),
    #[error("PUBLISH with neither a topic nor a topic alias")]
    NoTopic,
}

#[derive(Debug, Default)]
pub(super) struct TopicAliases {
    inbound_max: u16,
    outbound_max: u16,
    maps: Option<Box<AliasMaps>>,
}

#[derive(Debug, Default)]
struct AliasMaps {
    /// Aliases the device set up, 1..=`inbound_max`.
    inbound: HashMap<u16, Bytes>,
    /// Aliases set up towards the device, by topic; numbered 1..=`outbound_max` in order.
    outbound: HashMap<Bytes, u16>,
}

impl TopicAliases {
    /// `inbound_max`: what we advertise in CONNACK; `outbound_max`: the device's CONNECT value.
    pub fn new(inbound_max: u16, outbound_max: u16) -> Self {
        TopicAliases {
            inbound_max,
            outbound_max,
            maps: None,
        }
    }

    fn maps(&mut self) -> &mut AliasMaps {
        self.maps.get_or_insert_with(Box::default)
    }

    /// The topic of a device's PUBLISH: a non-empty topic with an alias (re)defines the alias;
    /// an empty one takes the alias' topic.
    pub fn resolve(&mut self, topic: &Bytes, alias: Option<u16>) -> Result<Bytes, AliasError> {
        let Some(alias) = alias else {
            return if topic.is_empty() {
                Err(AliasError::NoTopic)
            } else {
                Ok(topic.clone())
            };
        };
        if alias == 0 {
            return Err(AliasError::Zero);
        }
        if alias > self.inbound_max {
            return Err(AliasError::AboveMaximum(alias, self.inbound_max));
        }
        if topic.is_empty() {
            return self
                .maps()
                .inbound
                .get(&alias)
                .cloned()
                .ok_or(AliasError::Unknown(alias));
        }
        // A copy: the frame's bytes would pin the read buffer they came in.
        let owned = Bytes::copy_from_slice(topic);
        self.maps().inbound.insert(alias, owned.clone());
        Ok(owned)
    }

    /// Puts an alias on a PUBLISH to the device, if it asked for aliases: a topic already aliased
    /// goes as the alias with an empty topic; a new one gets the next free alias (and keeps its
    /// topic) while there is one. Returns the topic newly aliased, so an unsent packet can give
    /// it back with [`TopicAliases::unassign`].
    pub fn apply(&mut self, packet: &mut Packet) -> Option<Bytes> {
        if self.outbound_max == 0 {
            return None;
        }
        let Packet::Publish(publish, props) = packet else {
            return None;
        };
        let max = self.outbound_max;
        let outbound = &mut self.maps().outbound;
        if let Some(&alias) = outbound.get(&publish.topic) {
            props.get_or_insert_with(Default::default).topic_alias = Some(alias);
            publish.topic = Bytes::new();
            return None;
        }
        let next = u16::try_from(outbound.len() + 1).ok()?;
        if next > max {
            return None;
        }
        outbound.insert(publish.topic.clone(), next);
        props.get_or_insert_with(Default::default).topic_alias = Some(next);
        Some(publish.topic.clone())
    }

    /// Takes back the alias just assigned to `topic` (its PUBLISH was not sent).
    pub fn unassign(&mut self, topic: &Bytes) {
        if let Some(maps) = &mut self.maps {
            maps.outbound.remove(topic);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttd::protocol::Publish;

    #[test]
    fn device_aliases_are_defined_then_used_within_the_maximum() {
        let mut a = TopicAliases::new(2, 0);
        let t = Bytes::from("m/d/c/ch/x");
        assert_eq!(a.resolve(&t, Some(2)), Ok(t.clone()));
        assert_eq!(a.resolve(&Bytes::new(), Some(2)), Ok(t.clone()));
        assert_eq!(
            a.resolve(&Bytes::new(), Some(1)),
            Err(AliasError::Unknown(1))
        );
        assert_eq!(a.resolve(&t, Some(0)), Err(AliasError::Zero));
        assert_eq!(a.resolve(&t, Some(3)), Err(AliasError::AboveMaximum(3, 2)));
        assert_eq!(a.resolve(&Bytes::new(), None), Err(AliasError::NoTopic));
        assert_eq!(a.resolve(&t, None), Ok(t));
        let none = TopicAliases::new(0, 0).resolve(&Bytes::from("a"), Some(1));
        assert_eq!(none, Err(AliasError::AboveMaximum(1, 0)));
    }

    fn publish(topic: &'static str) -> Packet {
        Packet::Publish(Publish::new(topic, "p", false), None)
    }

    fn sent(p: &Packet) -> (String, Option<u16>) {
        match p {
            Packet::Publish(p, props) => (
                String::from_utf8_lossy(&p.topic).into_owned(),
                props.as_ref().and_then(|p| p.topic_alias),
            ),
            _ => unreachable!(),
        }
    }

    #[test]
    fn an_idle_connection_holds_no_alias_maps() {
        assert!(std::mem::size_of::<TopicAliases>() <= 16);
        let mut a = TopicAliases::new(64, 0);
        a.apply(&mut publish("a"));
        assert!(a.maps.is_none(), "nothing allocated without aliases in use");
    }

    #[test]
    fn outbound_aliases_only_when_asked_and_up_to_the_devices_maximum() {
        let mut off = TopicAliases::new(10, 0);
        let mut p = publish("a");
        assert_eq!(off.apply(&mut p), None);
        assert_eq!(sent(&p), ("a".into(), None));

        let mut a = TopicAliases::new(10, 1);
        let mut first = publish("a");
        assert_eq!(a.apply(&mut first), Some(Bytes::from("a")));
        assert_eq!(sent(&first), ("a".into(), Some(1)));
        let mut again = publish("a");
        assert_eq!(a.apply(&mut again), None);
        assert_eq!(sent(&again), (String::new(), Some(1)));
        let mut other = publish("b");
        a.apply(&mut other);
        assert_eq!(sent(&other), ("b".into(), None), "maximum reached");

        a.unassign(&Bytes::from("a"));
        let mut b = publish("b");
        a.apply(&mut b);
        assert_eq!(sent(&b), ("b".into(), Some(1)));
    }
}
