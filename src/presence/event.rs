//! One connection event as `presence` reads it back from a store: the fields pairing needs
//! (SPEC §4's four, plus the optional `reason`), decoded from a Redis stream entry's flat
//! field/value pairs or from the JSON body used on NATS, or from the `supermq` layout's JSON. Other detail fields are ignored.

use serde::Deserialize;

use crate::events::EventType;

/// The `reason` a restarted adapter gives the `disconnect`s of sessions its crash left open.
pub const CRASH_RECOVERY: &str = "crash_recovery";

/// A stored connection event.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StreamEvent {
    pub client_id: String,
    pub event_type: EventType,
    pub instance: String,
    /// Unix time in nanoseconds.
    pub occurred_at: i64,
    /// Why a session ended (`disconnect` with event details on only).
    #[serde(default)]
    pub reason: Option<String>,
}

/// A stored entry that is not a connection event; the message says what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MalformedEvent(pub String);

impl StreamEvent {
    /// Whether this is a restarted instance closing a session its crash left open.
    pub fn is_crash_recovery(&self) -> bool {
        self.event_type == EventType::Disconnect && self.reason.as_deref() == Some(CRASH_RECOVERY)
    }

    /// From a Redis stream entry: `client_id <id> event_type <t> instance <i> occurred_at <ns>`
    /// and optional details, in any order.
    pub fn from_redis_fields(fields: Vec<String>) -> Result<StreamEvent, MalformedEvent> {
        if !fields.len().is_multiple_of(2) {
            return Err(MalformedEvent(format!(
                "odd number of field/value items: {fields:?}"
            )));
        }
        Self::from_redis_pairs(
            fields
                .chunks(2)
                .map(|pair| (pair[0].as_bytes(), pair[1].as_bytes())),
        )
    }

    /// [`StreamEvent::from_redis_fields`] from (field, value) pairs borrowed from a reply:
    /// only the fields presence uses are copied.
    pub fn from_redis_pairs<'a>(
        pairs: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<StreamEvent, MalformedEvent> {
        let (mut client_id, mut event_type, mut instance, mut occurred_at, mut reason) =
            (None, None, None, None, None);
        let text = |name: &str, value: &[u8]| {
            std::str::from_utf8(value)
                .map(str::to_owned)
                .map_err(|_| MalformedEvent(format!("{name} is not UTF-8: {value:?}")))
        };
        for (name, value) in pairs {
            match name {
                b"client_id" => client_id = Some(text("client_id", value)?),
                b"event_type" => event_type = Some(parse_type(&String::from_utf8_lossy(value))?),
                b"instance" => instance = Some(text("instance", value)?),
                b"occurred_at" => {
                    occurred_at = Some(
                        std::str::from_utf8(value)
                            .ok()
                            .and_then(|v| v.parse::<i64>().ok())
                            .ok_or_else(|| {
                                MalformedEvent(format!(
                                    "occurred_at {:?} is not decimal nanoseconds",
                                    String::from_utf8_lossy(value)
                                ))
                            })?,
                    )
                }
                b"reason" => reason = Some(text("reason", value)?),
                _ => {}
            }
        }
        let missing = |name: &str| MalformedEvent(format!("the entry has no {name} field"));
        Ok(StreamEvent {
            client_id: client_id.ok_or_else(|| missing("client_id"))?,
            event_type: event_type.ok_or_else(|| missing("event_type"))?,
            instance: instance.ok_or_else(|| missing("instance"))?,
            occurred_at: occurred_at.ok_or_else(|| missing("occurred_at"))?,
            reason,
        })
    }

    /// From the JSON object of the `supermq` layout (a Redis `data` field, or a bus message's
    /// payload): `operation` gives the type; `mqtt.client_subscribe` is not a session boundary
    /// and is refused here (sources do not read that stream).
    pub fn from_supermq_json(data: &[u8]) -> Result<StreamEvent, MalformedEvent> {
        #[derive(Deserialize)]
        struct SupermqEvent {
            operation: String,
            client_id: String,
            instance: String,
            occurred_at: i64,
        }
        let event: SupermqEvent = serde_json::from_slice(data).map_err(|e| {
            MalformedEvent(format!(
                "not a SuperMQ connection event ({e}): {:?}",
                String::from_utf8_lossy(&data[..data.len().min(200)])
            ))
        })?;
        let event_type = match event.operation.as_str() {
            "mqtt.client_connect" => EventType::Connect,
            "mqtt.client_disconnect" => EventType::Disconnect,
            other => {
                return Err(MalformedEvent(format!(
                    "operation {other:?} is neither mqtt.client_connect nor mqtt.client_disconnect"
                )))
            }
        };
        Ok(StreamEvent {
            client_id: event.client_id,
            event_type,
            instance: event.instance,
            occurred_at: event.occurred_at,
            // The layout has no reason: a crash recovery reads as a plain disconnect.
            reason: None,
        })
    }

    /// From the JSON body of a NATS (or RabbitMQ) message.
    pub fn from_json(body: &[u8]) -> Result<StreamEvent, MalformedEvent> {
        serde_json::from_slice(body).map_err(|e| {
            MalformedEvent(format!(
                "not a connection event ({e}): {:?}",
                String::from_utf8_lossy(&body[..body.len().min(200)])
            ))
        })
    }
}

fn parse_type(value: &str) -> Result<EventType, MalformedEvent> {
    match value {
        "connect" => Ok(EventType::Connect),
        "disconnect" => Ok(EventType::Disconnect),
        other => Err(MalformedEvent(format!(
            "event_type {other:?} is neither connect nor disconnect"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{ConnectionEvent, EventDetails};

    fn written(reason: Option<&str>) -> ConnectionEvent {
        ConnectionEvent {
            client_id: "c1".into(),
            event_type: EventType::Disconnect,
            instance: "a".into(),
            occurred_at: 1_700_000_000_000_000_001,
            details: EventDetails {
                reason: reason.map(str::to_owned),
                mqtt_client_id: Some("dev-1".into()),
                ..EventDetails::default()
            },
        }
    }

    #[test]
    fn reads_back_what_the_sinks_write() {
        let event = written(Some(CRASH_RECOVERY));
        let fields: Vec<String> = event
            .fields()
            .into_iter()
            .flat_map(|(k, v)| [k.to_owned(), v])
            .collect();
        let from_redis = StreamEvent::from_redis_fields(fields).expect("redis entry");
        let from_json = StreamEvent::from_json(event.to_json().as_bytes()).expect("json body");
        assert_eq!(from_redis, from_json);
        assert_eq!(from_redis.occurred_at, event.occurred_at);
        assert!(from_redis.is_crash_recovery());
        let plain = StreamEvent::from_json(written(None).to_json().as_bytes()).expect("json");
        assert_eq!(plain.reason, None);
        assert!(!plain.is_crash_recovery());
    }

    #[test]
    fn reads_back_the_supermq_layout() {
        use crate::events::EventLayout;
        let mut event = written(None);
        event.event_type = EventType::Connect;
        let fields = EventLayout::Supermq.redis_fields(&event);
        assert_eq!(fields[0].0, "data");
        let back = StreamEvent::from_supermq_json(fields[0].1.as_bytes()).expect("supermq json");
        assert_eq!(
            (
                back.client_id.as_str(),
                back.event_type,
                back.instance.as_str()
            ),
            ("c1", EventType::Connect, "a")
        );
        assert_eq!(back.occurred_at, event.occurred_at);
        let err = StreamEvent::from_supermq_json(
            br#"{"operation":"mqtt.client_subscribe","client_id":"c1","instance":"","occurred_at":1}"#,
        )
        .unwrap_err();
        assert!(err.0.contains("mqtt.client_subscribe"), "{err}");
    }

    #[test]
    fn bad_entries_say_what_is_wrong() {
        let strings = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let err = StreamEvent::from_redis_fields(strings(&["client_id", "c1", "event_type"]))
            .unwrap_err();
        assert!(err.0.contains("odd"), "{err}");
        let err = StreamEvent::from_redis_fields(strings(&[
            "client_id",
            "c1",
            "event_type",
            "connect",
            "instance",
            "",
            "occurred_at",
            "soon",
        ]))
        .unwrap_err();
        assert!(err.0.contains("occurred_at"), "{err}");
        let err = StreamEvent::from_redis_fields(strings(&["client_id", "c1"])).unwrap_err();
        assert!(err.0.contains("event_type"), "{err}");
        let err = StreamEvent::from_json(
            br#"{"client_id":"c1","event_type":"leave","instance":"","occurred_at":1}"#,
        )
        .unwrap_err();
        assert!(err.0.contains("leave"), "{err}");
    }
}
