//! Connection events (`connect`/`disconnect`) for the event stream `supermq.mqtt`: the event
//! itself, the `EventSink` trait every store implements, and the `Outbox` that sits in front of
//! the sink so that sessions never wait on the store.

pub mod outbox;
pub mod stdout;

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use serde::Serialize;

pub use outbox::{Outbox, OutboxStats};
pub use stdout::StdoutSink;

/// The name of the event stream, and the subject/routing-key suffix in the stores.
pub const STREAM: &str = "supermq.mqtt";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Connect,
    Disconnect,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Connect => "connect",
            EventType::Disconnect => "disconnect",
        }
    }
}

/// One connection event, exactly the seed's four fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ConnectionEvent {
    pub client_id: String,
    pub event_type: EventType,
    pub instance: String,
    /// Unix time in nanoseconds.
    pub occurred_at: i64,
}

impl ConnectionEvent {
    /// The JSON body used on stdout, NATS and RabbitMQ.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a struct of strings and integers always serializes")
    }
}

/// A failure to hand events to a store; the outbox retries.
#[derive(Debug, thiserror::Error)]
#[error("{store}: {message}")]
pub struct SinkError {
    pub store: &'static str,
    pub message: String,
}

/// A destination for connection events. `publish` returns once the store has acknowledged every
/// event of the batch, in order.
#[async_trait]
pub trait EventSink: Send + 'static {
    /// Short store name for logs and metrics (`stdout`, `redis`, `nats`, `amqp`).
    fn name(&self) -> &'static str;
    async fn publish(&mut self, batch: &[ConnectionEvent]) -> Result<(), SinkError>;
}

/// Strictly increasing Unix-nanosecond timestamps, so a session's `disconnect` is always later
/// than its `connect` even when the wall clock steps back or two reads fall in one tick.
#[derive(Debug, Default)]
pub struct EventClock {
    last: AtomicI64,
}

impl EventClock {
    pub fn now(&self) -> i64 {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        let mut prev = self.last.load(Ordering::Relaxed);
        loop {
            let next = wall.max(prev + 1);
            match self
                .last
                .compare_exchange_weak(prev, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(actual) => prev = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_has_exactly_the_seed_fields() {
        let event = ConnectionEvent {
            client_id: "c1".into(),
            event_type: EventType::Connect,
            instance: "".into(),
            occurred_at: 1696852656381976408,
        };
        assert_eq!(
            event.to_json(),
            r#"{"client_id":"c1","event_type":"connect","instance":"","occurred_at":1696852656381976408}"#
        );
    }

    #[test]
    fn clock_is_strictly_increasing() {
        let clock = EventClock::default();
        let mut prev = clock.now();
        for _ in 0..10_000 {
            let next = clock.now();
            assert!(next > prev);
            prev = next;
        }
    }
}
