//! Connection events (`connect`/`disconnect`, and `subscribe` in the `supermq` layout) for the
//! event stream `supermq.mqtt`: the event itself, how each [`layout`] writes it, the `EventSink` trait every store implements, and what sits in front of the sink so
//! that sessions never wait on the store: the durable [`EventLog`] for external stores, the
//! memory [`Outbox`] for stdout. [`EventQueue`] is the one door sessions hand events through.

pub mod amqp;
pub mod layout;
pub mod log;
pub mod nats;
pub mod outbox;
pub mod pipeline;
pub mod redis_stream;
pub mod stdout;
pub mod store;

use std::future::{Future, IntoFuture};
use std::pin::Pin;
use std::sync::atomic::{AtomicI64, Ordering};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

pub use crate::log::data_dir::{DataDir, DataDirError};
pub use crate::log::LogStats as OutboxStats;
pub use amqp::AmqpSink;
pub use layout::EventLayout;
pub use log::{EventLog, FsyncMode, LogSettings, LogTicket, OpenSession, Recovery};
pub use nats::JetStreamSink;
pub use outbox::Outbox;
pub use pipeline::{EventPipeline, EventSettings, EventStartError};
pub use redis_stream::RedisStreamSink;
pub use stdout::StdoutSink;
pub use store::{event_sink, StoreUrlError};

/// The name of the event stream, and the subject/routing-key suffix in the stores.
pub const STREAM: &str = "supermq.mqtt";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventType {
    Connect,
    Disconnect,
    /// A granted SuperMQ channel filter (emitted in the `supermq` layout only).
    Subscribe,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Connect => "connect",
            EventType::Disconnect => "disconnect",
            EventType::Subscribe => "subscribe",
        }
    }
}

/// One connection event: the seed's four fields, plus optional details that are left out of
/// every format when absent (they are only set with `SMQ_MQTT_ADAPTER_EVENT_DETAILS=true`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectionEvent {
    pub client_id: String,
    pub event_type: EventType,
    pub instance: String,
    /// Unix time in nanoseconds.
    pub occurred_at: i64,
    #[serde(flatten)]
    pub details: EventDetails,
}

/// Extra fields an operator may opt into; `None` fields are not written.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventDetails {
    /// Why a session ended (`disconnect` only), e.g. `keepalive_timeout`, `crash_recovery`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The device's address (`connect` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_addr: Option<String>,
    /// `3.1.1` or `5` (`connect` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol_version: Option<String>,
    /// The MQTT client identifier (`connect` only; every event in the `supermq` layout, where
    /// it is `subscriber_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mqtt_client_id: Option<String>,
    /// What was subscribed (`subscribe` only); boxed, as most events have none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscription: Option<Box<Subscription>>,
}

/// The channel filter a `subscribe` event reports, with resolved ids.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subscription {
    pub domain_id: String,
    pub channel_id: String,
    /// The subtopic as SuperMQ writes it: `.` between levels, `*` and `>` for the MQTT
    /// wildcards, empty when none.
    pub subtopic: String,
}

impl EventDetails {
    /// The present details as field/value pairs, in a fixed order.
    pub fn pairs(&self) -> impl Iterator<Item = (&'static str, &str)> {
        [
            ("reason", &self.reason),
            ("remote_addr", &self.remote_addr),
            ("protocol_version", &self.protocol_version),
            ("mqtt_client_id", &self.mqtt_client_id),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
    }
}

impl ConnectionEvent {
    /// The JSON body used on stdout, NATS and RabbitMQ.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a struct of strings and integers always serializes")
    }

    /// The flat field/value pairs of the Redis stream entry: the four seed fields, then details.
    pub fn fields(&self) -> Vec<(&'static str, String)> {
        let mut fields = vec![
            ("client_id", self.client_id.clone()),
            ("event_type", self.event_type.as_str().to_owned()),
            ("instance", self.instance.clone()),
            ("occurred_at", self.occurred_at.to_string()),
        ];
        fields.extend(self.details.pairs().map(|(k, v)| (k, v.to_owned())));
        fields
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
    /// Writes the events the sink's layout carries (the seed layout skips `subscribe`).
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
        let wall = crate::clock::unix_nanos();
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

impl EventClock {
    /// Makes every later reading greater than `t` (e.g. the latest time in the event log).
    pub fn advance_past(&self, t: i64) {
        self.last.fetch_max(t, Ordering::Relaxed);
    }
}

/// Where sessions hand their events: the durable log (external stores) or the memory outbox
/// (stdout, which has no one to redeliver to after a restart).
pub enum EventQueue {
    Log(EventLog),
    Memory { outbox: Outbox, clock: EventClock },
}

impl EventQueue {
    pub fn memory(outbox: Outbox) -> Self {
        EventQueue::Memory {
            outbox,
            clock: EventClock::default(),
        }
    }

    /// Queues `event` (its `occurred_at` is stamped here, strictly increasing) for the session
    /// keyed `session`; never waits. The returned commit resolves once the event is in the log.
    pub fn push(&self, session: String, mut event: ConnectionEvent) -> EventCommit {
        match self {
            EventQueue::Log(log) => EventCommit(Some(log.append(session, event))),
            EventQueue::Memory { outbox, clock } => {
                event.occurred_at = clock.now();
                outbox.emit(event);
                EventCommit(None)
            }
        }
    }
}

/// An event handed over: awaiting it returns once the event is in the durable log (written;
/// fsynced too with `SMQ_MQTT_ADAPTER_EVENT_FSYNC=always`), at once for stdout. Dropping it
/// does not cancel the event.
#[derive(Debug, Default)]
pub struct EventCommit(Option<LogTicket>);

impl EventCommit {
    /// A commit with nothing to wait for.
    pub fn done() -> Self {
        EventCommit(None)
    }
}

impl IntoFuture for EventCommit {
    type Output = ();
    type IntoFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

    fn into_future(self) -> Self::IntoFuture {
        Box::pin(async move {
            if let Some(ticket) = self.0 {
                ticket.wait().await;
            }
        })
    }
}

/// A numbered `connect` event for unit tests; `occurred_at` is the number.
#[cfg(test)]
pub(crate) fn test_event(i: i64) -> ConnectionEvent {
    ConnectionEvent {
        client_id: format!("c{i}"),
        event_type: EventType::Connect,
        instance: String::new(),
        occurred_at: i,
        details: EventDetails::default(),
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
            details: EventDetails::default(),
        };
        assert_eq!(
            event.to_json(),
            r#"{"client_id":"c1","event_type":"connect","instance":"","occurred_at":1696852656381976408}"#
        );
    }

    #[test]
    fn details_are_written_only_when_present_and_read_back() {
        let event = ConnectionEvent {
            client_id: "c1".into(),
            event_type: EventType::Disconnect,
            instance: "i".into(),
            occurred_at: 7,
            details: EventDetails {
                reason: Some("takeover".into()),
                ..EventDetails::default()
            },
        };
        let json = event.to_json();
        assert_eq!(
            json,
            r#"{"client_id":"c1","event_type":"disconnect","instance":"i","occurred_at":7,"reason":"takeover"}"#
        );
        let back: ConnectionEvent = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, event);
        let names: Vec<&str> = event.fields().iter().map(|(k, _)| *k).collect();
        assert_eq!(
            names,
            [
                "client_id",
                "event_type",
                "instance",
                "occurred_at",
                "reason"
            ]
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
