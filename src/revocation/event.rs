//! The clients service's events on `supermq.clients`, in the seed's formats (Redis Streams flat
//! field/value pairs; NATS and RabbitMQ one JSON object with the same keys), and which of them
//! take rights away.

use std::collections::HashMap;

/// The stream (and, prefixed with `events.`, the subject and routing key) the clients service
/// writes its events to.
pub const STREAM: &str = "supermq.clients";

/// One event as read from the store: its operation and id (for logs and metrics) and what it
/// revokes, if anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlatformEvent {
    pub operation: String,
    pub id: String,
    pub revocation: Option<Revocation>,
}

/// Rights the platform took away.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Revocation {
    /// The client was disabled or its secret changed: every session of it ends.
    Client { client_id: String },
    /// The channel was disabled: nobody may use it any more.
    Channel { channel_id: String },
    /// One client lost its connection to one channel.
    Access {
        client_id: String,
        channel_id: String,
    },
}

/// An event that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("not a JSON object: {0}")]
    NotJson(String),
    #[error("no `operation` field")]
    NoOperation,
    #[error("{operation} without `{field}`")]
    Missing {
        operation: String,
        field: &'static str,
    },
}

impl PlatformEvent {
    /// From a Redis stream entry's fields.
    pub fn from_fields(fields: &HashMap<String, String>) -> Result<PlatformEvent, EventError> {
        Self::from_lookup(|key| fields.get(key).cloned())
    }

    /// From a NATS or RabbitMQ body: one JSON object; non-string values are read as their JSON
    /// text (so a numeric id still matches).
    pub fn from_json(body: &[u8]) -> Result<PlatformEvent, EventError> {
        let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| {
            EventError::NotJson(format!("{e}: {:.80}", String::from_utf8_lossy(body)))
        })?;
        let object = value
            .as_object()
            .ok_or_else(|| EventError::NotJson(format!("{value:.80}")))?;
        Self::from_lookup(|key| {
            object.get(key).and_then(|v| match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Null => None,
                other => Some(other.to_string()),
            })
        })
    }

    fn from_lookup(get: impl Fn(&str) -> Option<String>) -> Result<PlatformEvent, EventError> {
        let operation = get("operation")
            .filter(|o| !o.is_empty())
            .ok_or(EventError::NoOperation)?;
        let id = get("id").unwrap_or_default();
        let required = |value: Option<String>, field: &'static str| {
            value.filter(|v| !v.is_empty()).ok_or(EventError::Missing {
                operation: operation.clone(),
                field,
            })
        };
        let disabled = get("status").is_some_and(|s| s == "disabled");
        let revocation = match operation.as_str() {
            "client.remove" if disabled => Some(Revocation::Client {
                client_id: required(Some(id.clone()), "id")?,
            }),
            "client.update_secret" => Some(Revocation::Client {
                client_id: required(Some(id.clone()), "id")?,
            }),
            "channel.remove" if disabled => Some(Revocation::Channel {
                channel_id: required(Some(id.clone()), "id")?,
            }),
            "policies.delete" => Some(Revocation::Access {
                client_id: required(get("subject").or_else(|| get("client_id")), "subject")?,
                channel_id: required(get("object").or_else(|| get("channel_id")), "object")?,
            }),
            _ => None,
        };
        Ok(PlatformEvent {
            operation,
            id,
            revocation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn disabling_a_client_revokes_it_and_enabling_does_not() {
        let disabled = fields(&[
            ("operation", "client.remove"),
            ("id", "c1"),
            ("status", "disabled"),
        ]);
        let event = PlatformEvent::from_fields(&disabled).unwrap();
        assert_eq!(
            event.revocation,
            Some(Revocation::Client {
                client_id: "c1".into()
            })
        );
        let enabled = fields(&[
            ("operation", "client.remove"),
            ("id", "c1"),
            ("status", "enabled"),
        ]);
        assert_eq!(
            PlatformEvent::from_fields(&enabled).unwrap().revocation,
            None
        );
    }

    #[test]
    fn json_bodies_carry_the_same_keys() {
        let secret = br#"{"operation":"client.update_secret","id":"c2","updated_by":"u"}"#;
        assert_eq!(
            PlatformEvent::from_json(secret).unwrap().revocation,
            Some(Revocation::Client {
                client_id: "c2".into()
            })
        );
        let channel = br#"{"operation":"channel.remove","id":"ch1","status":"disabled"}"#;
        assert_eq!(
            PlatformEvent::from_json(channel).unwrap().revocation,
            Some(Revocation::Channel {
                channel_id: "ch1".into()
            })
        );
        let policy = br#"{"operation":"policies.delete","subject":"c1","object":"ch1"}"#;
        assert_eq!(
            PlatformEvent::from_json(policy).unwrap().revocation,
            Some(Revocation::Access {
                client_id: "c1".into(),
                channel_id: "ch1".into()
            })
        );
        let alias = br#"{"operation":"policies.delete","client_id":"c1","channel_id":"ch1"}"#;
        assert!(PlatformEvent::from_json(alias)
            .unwrap()
            .revocation
            .is_some());
    }

    #[test]
    fn other_operations_are_seen_not_acted_on_and_bad_ones_are_errors() {
        let view = br#"{"operation":"client.view","id":"c1"}"#;
        let event = PlatformEvent::from_json(view).unwrap();
        assert_eq!(
            (event.operation.as_str(), event.revocation),
            ("client.view", None)
        );
        assert_eq!(
            PlatformEvent::from_json(b"{\"id\":\"c1\"}"),
            Err(EventError::NoOperation)
        );
        assert!(matches!(
            PlatformEvent::from_json(b"not json"),
            Err(EventError::NotJson(_))
        ));
        let no_object = br#"{"operation":"policies.delete","subject":"c1"}"#;
        assert!(matches!(
            PlatformEvent::from_json(no_object),
            Err(EventError::Missing {
                field: "object",
                ..
            })
        ));
    }
}
