//! How connection events are laid out in the stores (`SMQ_MQTT_ADAPTER_EVENT_LAYOUT`):
//! - `seed` (SPEC §4): one stream `supermq.mqtt`, flat field/value pairs in Redis, a JSON body
//!   with `event_type` on NATS and RabbitMQ; `connect` and `disconnect` only.
//! - `supermq`: what SuperMQ's own Go MQTT adapter writes, so its consumers (e.g. the journal
//!   service) read us unchanged: one stream per action (`supermq.mqtt.client_connect`,
//!   `…client_disconnect`, `…client_subscribe`), in Redis `XADD events.<stream> … data <JSON>`, on
//!   NATS subject `events.<stream>` and on RabbitMQ routing key `events.<stream>` a protobuf
//!   `messaging.Message` whose `payload` is that JSON object.
//!
//! The event log and the outbox carry the same [`ConnectionEvent`] either way: only the sinks
//! format it, so a layout change applies to events still waiting in the log too.

use prost::Message as _;
use serde_json::{Map, Value};

use super::{ConnectionEvent, EventType, STREAM};
use crate::bridge::message::Message;

/// The layout the sinks write.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum EventLayout {
    /// The seed's format: stream `supermq.mqtt`, four fields.
    #[default]
    Seed,
    /// SuperMQ's MQTT adapter format: one stream per action, JSON `data` / protobuf body.
    Supermq,
}

impl EventLayout {
    /// Whether this layout writes the event at all: the seed has no subscribe events.
    pub fn carries(self, event: &ConnectionEvent) -> bool {
        self == EventLayout::Supermq || event.event_type != EventType::Subscribe
    }

    /// The stream name: `supermq.mqtt`, or `supermq.mqtt.client_<action>`.
    pub fn stream(self, event: &ConnectionEvent) -> &'static str {
        match (self, event.event_type) {
            (EventLayout::Seed, _) => STREAM,
            (EventLayout::Supermq, EventType::Connect) => "supermq.mqtt.client_connect",
            (EventLayout::Supermq, EventType::Disconnect) => "supermq.mqtt.client_disconnect",
            (EventLayout::Supermq, EventType::Subscribe) => "supermq.mqtt.client_subscribe",
        }
    }

    /// The NATS subject and RabbitMQ routing key: `events.<stream>` in both layouts.
    pub fn subject(self, event: &ConnectionEvent) -> String {
        format!("events.{}", self.stream(event))
    }

    /// The Redis stream key: the seed writes to `supermq.mqtt` itself, SuperMQ's publisher
    /// prefixes `events.`.
    pub fn redis_key(self, event: &ConnectionEvent) -> String {
        match self {
            EventLayout::Seed => STREAM.to_owned(),
            EventLayout::Supermq => self.subject(event),
        }
    }

    /// The field/value pairs of the Redis stream entry.
    pub fn redis_fields(self, event: &ConnectionEvent) -> Vec<(&'static str, String)> {
        match self {
            EventLayout::Seed => event.fields(),
            EventLayout::Supermq => vec![("data", supermq_json(event))],
        }
    }

    /// The message body on NATS and RabbitMQ.
    pub fn body(self, event: &ConnectionEvent) -> Vec<u8> {
        match self {
            EventLayout::Seed => event.to_json().into_bytes(),
            EventLayout::Supermq => Message {
                payload: supermq_json(event).into_bytes().into(),
                ..Message::default()
            }
            .encode_to_vec(),
        }
    }

    /// One line on stdout: the JSON object of the layout (no protobuf wrapper).
    pub fn line(self, event: &ConnectionEvent) -> String {
        match self {
            EventLayout::Seed => event.to_json(),
            EventLayout::Supermq => supermq_json(event),
        }
    }

    /// The AMQP content type of [`EventLayout::body`].
    pub fn content_type(self) -> &'static str {
        match self {
            EventLayout::Seed => "application/json",
            EventLayout::Supermq => "application/octet-stream",
        }
    }
}

/// The JSON object SuperMQ's adapter writes: its connect/disconnect events carry `operation`,
/// `client_id`, `subscriber_id`, `instance`, `occurred_at`; its subscribe events `operation`,
/// `client_id`, `subscriber_id`, `domainID`, `channel_id`, `subtopic`, `occurred_at` (no
/// `instance`). Keys are sorted, as Go's encoding/json writes a map.
fn supermq_json(event: &ConnectionEvent) -> String {
    let details = &event.details;
    let text = |v: &Option<String>| Value::String(v.clone().unwrap_or_default());
    let mut pairs: Vec<(&str, Value)> = vec![
        ("client_id", Value::String(event.client_id.clone())),
        ("occurred_at", Value::from(event.occurred_at)),
        ("subscriber_id", text(&details.mqtt_client_id)),
    ];
    let operation = match event.event_type {
        EventType::Connect => "mqtt.client_connect",
        EventType::Disconnect => "mqtt.client_disconnect",
        EventType::Subscribe => "mqtt.client_subscribe",
    };
    pairs.push(("operation", Value::String(operation.to_owned())));
    if event.event_type == EventType::Subscribe {
        let subscription = details.subscription.as_deref().cloned().unwrap_or_default();
        pairs.push(("domainID", Value::String(subscription.domain_id)));
        pairs.push(("channel_id", Value::String(subscription.channel_id)));
        pairs.push(("subtopic", Value::String(subscription.subtopic)));
    } else {
        pairs.push(("instance", Value::String(event.instance.clone())));
    }
    pairs.sort_by(|a, b| a.0.cmp(b.0));
    let object: Map<String, Value> = pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
    Value::Object(object).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{EventDetails, Subscription};

    fn event(event_type: EventType) -> ConnectionEvent {
        ConnectionEvent {
            client_id: "c1".into(),
            event_type,
            instance: "i1".into(),
            occurred_at: 1696852656381976408,
            details: EventDetails {
                mqtt_client_id: Some("dev-1".into()),
                ..EventDetails::default()
            },
        }
    }

    #[test]
    fn supermq_connect_json_is_sorted_and_complete() {
        let e = event(EventType::Connect);
        assert_eq!(
            supermq_json(&e),
            r#"{"client_id":"c1","instance":"i1","occurred_at":1696852656381976408,"operation":"mqtt.client_connect","subscriber_id":"dev-1"}"#
        );
        assert_eq!(
            EventLayout::Supermq.redis_key(&e),
            "events.supermq.mqtt.client_connect"
        );
        assert_eq!(EventLayout::Seed.redis_key(&e), "supermq.mqtt");
        assert_eq!(EventLayout::Seed.subject(&e), "events.supermq.mqtt");
    }

    #[test]
    fn supermq_subscribe_json_has_their_spelling_and_no_instance() {
        let mut e = event(EventType::Subscribe);
        e.details.subscription = Some(Box::new(Subscription {
            domain_id: "d1".into(),
            channel_id: "ch1".into(),
            subtopic: "a.*".into(),
        }));
        assert_eq!(
            supermq_json(&e),
            r#"{"channel_id":"ch1","client_id":"c1","domainID":"d1","occurred_at":1696852656381976408,"operation":"mqtt.client_subscribe","subscriber_id":"dev-1","subtopic":"a.*"}"#
        );
        assert!(!EventLayout::Seed.carries(&e));
        assert!(EventLayout::Supermq.carries(&e));
    }

    #[test]
    fn supermq_body_is_a_message_with_the_json_as_payload() {
        let e = event(EventType::Disconnect);
        let body = EventLayout::Supermq.body(&e);
        let message = Message::decode(body.as_slice()).expect("protobuf");
        assert_eq!(message.payload.as_ref(), supermq_json(&e).as_bytes());
        assert_eq!(
            Message {
                payload: Default::default(),
                ..message
            },
            Message::default(),
            "only the payload is set"
        );
    }
}
