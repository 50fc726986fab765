//! NATS JetStream sink: each event is published on the [`EventLayout`]'s subject
//! (`events.supermq.mqtt`, or `events.supermq.mqtt.client_<action>`) with its body (the seed's
//! JSON, or a protobuf `messaging.Message` carrying SuperMQ's JSON), and the batch counts as delivered once JetStream acknowledged every message. The stream
//! `events` (subjects `events.>`) is created when missing; an existing stream that does not
//! cover the subject is reported once, clearly, since publishes then go nowhere.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_trait::async_trait;

use super::{ConnectionEvent, EventLayout, EventSink, SinkError, STREAM};

const STREAM_NAME: &str = "events";
const STREAM_SUBJECTS: &str = "events.>";
const TIMEOUT: Duration = Duration::from_secs(5);

pub struct JetStreamSink {
    url: String,
    /// A subject every layout's events are published on, to check the stream covers it.
    subject: String,
    layout: EventLayout,
    js: Option<jetstream::Context>,
    /// Whether the stream was checked (or created) on the current server.
    stream_ready: bool,
}

impl JetStreamSink {
    /// Checks the URL (comma-separated server addresses); connects on the first batch.
    pub fn new(url: &str, layout: EventLayout) -> Result<Self, String> {
        for server in url.split(',') {
            server
                .trim()
                .parse::<async_nats::ServerAddr>()
                .map_err(|e| format!("{server:?} is not a NATS server address: {e}"))?;
        }
        Ok(JetStreamSink {
            url: url.to_owned(),
            subject: format!("events.{STREAM}"),
            layout,
            js: None,
            stream_ready: false,
        })
    }

    fn error(message: impl std::fmt::Display) -> SinkError {
        SinkError {
            store: "nats",
            message: message.to_string(),
        }
    }

    async fn context(&mut self) -> Result<jetstream::Context, SinkError> {
        if self.js.is_none() {
            // After the first successful connect the client reconnects by itself.
            let client = async_nats::ConnectOptions::new()
                .connection_timeout(TIMEOUT)
                .connect(self.url.as_str())
                .await
                .map_err(Self::error)?;
            tracing::info!("connected to the NATS event store");
            let mut js = jetstream::new(client);
            js.set_timeout(TIMEOUT);
            self.js = Some(js);
        }
        let js = self.js.clone().expect("context set above");
        if !self.stream_ready {
            self.ensure_stream(&js).await?;
            self.stream_ready = true;
        }
        Ok(js)
    }

    async fn ensure_stream(&self, js: &jetstream::Context) -> Result<(), SinkError> {
        let mut stream = js
            .get_or_create_stream(stream::Config {
                name: STREAM_NAME.to_owned(),
                subjects: vec![STREAM_SUBJECTS.to_owned()],
                ..Default::default()
            })
            .await
            .map_err(|e| {
                Self::error(format!("cannot get or create stream {STREAM_NAME:?}: {e}"))
            })?;
        let info = stream.info().await.map_err(Self::error)?;
        let subjects = &info.config.subjects;
        if !subjects.iter().any(|s| subject_matches(s, &self.subject)) {
            tracing::error!(stream = STREAM_NAME, ?subjects, subject = %self.subject,
                "the existing JetStream stream \"events\" does not cover the events subject; \
                 add \"events.>\" to its subjects, or events cannot be stored");
        }
        Ok(())
    }
}

/// Whether a NATS subject filter (`*` one token, `>` the rest) matches a subject (also the bus
/// bridge's, for stream coverage and overlapping subscriptions).
pub(crate) fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut tokens = subject.split('.');
    for f in filter.split('.') {
        match (f, tokens.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (f, Some(t)) if f == t => {}
            _ => return false,
        }
    }
    tokens.next().is_none()
}

#[async_trait]
impl EventSink for JetStreamSink {
    fn name(&self) -> &'static str {
        "nats"
    }

    async fn publish(&mut self, batch: &[ConnectionEvent]) -> Result<(), SinkError> {
        let js = self.context().await?;
        let result = async {
            // Send the whole batch, then collect the acks: one round trip per batch.
            let mut acks = Vec::with_capacity(batch.len());
            for event in batch.iter().filter(|e| self.layout.carries(e)) {
                // A retried batch may repeat messages the server already stored (the client
                // resends its buffer after a reconnect): the message id lets JetStream drop them
                // within its duplicate window.
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(
                    "Nats-Msg-Id",
                    format!(
                        "{}/{}/{}/{}",
                        event.instance,
                        event.client_id,
                        event.event_type.as_str(),
                        event.occurred_at
                    )
                    .as_str(),
                );
                let ack = js
                    .publish_with_headers(
                        self.layout.subject(event),
                        headers,
                        self.layout.body(event).into(),
                    )
                    .await
                    .map_err(Self::error)?;
                acks.push(ack);
            }
            for ack in acks {
                ack.await.map_err(Self::error)?;
            }
            Ok(())
        }
        .await;
        if result.is_err() {
            // A restarted server may have lost the stream: check it again next time.
            self.stream_ready = false;
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::subject_matches;

    #[test]
    fn subject_filters() {
        assert!(subject_matches("events.>", "events.supermq.mqtt"));
        assert!(subject_matches(">", "events.supermq.mqtt"));
        assert!(subject_matches("events.*.mqtt", "events.supermq.mqtt"));
        assert!(subject_matches(
            "events.supermq.mqtt",
            "events.supermq.mqtt"
        ));
        assert!(!subject_matches("events.*", "events.supermq.mqtt"));
        assert!(!subject_matches("other.>", "events.supermq.mqtt"));
        assert!(!subject_matches(
            "events.supermq.mqtt.x",
            "events.supermq.mqtt"
        ));
    }
}
