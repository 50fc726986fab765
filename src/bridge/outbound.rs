//! Bridge out: every authorized device PUBLISH on a channel topic becomes a `messaging.Message`
//! appended to the outbound message log ([`super::log`]); the session acknowledges the device
//! once that append is written (see `session::relay`). One task delivers the log to NATS:
//! subjects a JetStream stream covers are published with JetStream, pipelined (a whole batch in
//! flight, then its acks), each with its `Nats-Msg-Id`; other subjects with core NATS, then a
//! flush. A batch is done only when every message of it is acknowledged; otherwise it is sent
//! again, whole, and the stream drops what it already has by id.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::TryStreamExt;
use prost::Message as _;

use super::log::{BusRecord, Messages};
use super::message::{subject_for, Message, PROTOCOL};
use super::{BridgeMetrics, INSTANCE_HEADER, QOS_HEADER};
use crate::broker::Message as CoreMessage;
use crate::events::nats::subject_matches;
use crate::hooks::{PublishRoute, SessionInfo};
use crate::log::{Log, LogSink, LogTicket};

/// How long the list of streams (which subjects JetStream keeps) is trusted.
const STREAMS_TTL: Duration = Duration::from_secs(10);
/// Longest wait for one batch's acks (or flush) before the batch is tried again.
const BATCH_TIMEOUT: Duration = Duration::from_secs(10);

/// The session hook of the outbound bridge: appends device messages to the log.
pub struct BusPublisher {
    log: Log<Messages>,
}

impl BusPublisher {
    pub(super) fn new(log: Log<Messages>) -> Self {
        BusPublisher { log }
    }

    /// The log record of a device message on a channel topic; `None` for topics that stay
    /// local (`hc/`, plain topics).
    pub fn record(
        &self,
        session: &SessionInfo,
        route: &PublishRoute,
        message: &CoreMessage,
    ) -> Option<BusRecord> {
        let channel = route.channel.as_ref()?;
        let body = Message {
            channel: channel.channel.clone(),
            domain: channel.domain.clone(),
            subtopic: channel.dotted_subtopic(),
            publisher: session.identity.client_id.clone(),
            protocol: PROTOCOL.to_owned(),
            payload: message.payload.clone(),
            created: crate::clock::unix_nanos(),
            client_id: session.mqtt_client_id.clone(),
        };
        Some(BusRecord::new(
            subject_for(channel),
            message.qos,
            Bytes::from(body.encode_to_vec()),
        ))
    }

    /// Appends records to the log as one group; the ticket resolves once all are kept.
    pub fn append_all(&self, records: Vec<BusRecord>) -> LogTicket {
        self.log.append_all(records)
    }

    /// Appends one device message (see [`BusPublisher::record`]).
    pub fn append(
        &self,
        session: &SessionInfo,
        route: &PublishRoute,
        message: &CoreMessage,
    ) -> Option<LogTicket> {
        Some(self.log.append(self.record(session, route, message)?))
    }

    /// Whether the log has room; a full log pushes publishing sessions back.
    pub fn has_room(&self) -> bool {
        self.log.has_room()
    }

    /// Waits until the log has room.
    pub async fn room(&self) {
        self.log.room().await
    }
}

/// Subject patterns of the JetStream streams, as last listed.
#[derive(Default)]
struct Streams {
    patterns: Vec<String>,
    listed: Option<Instant>,
}

impl Streams {
    fn covers(&self, subject: &str) -> bool {
        self.patterns.iter().any(|p| subject_matches(p, subject))
    }
}

/// Delivers the message log to NATS.
pub(super) struct BusDelivery {
    pub client: async_nats::Client,
    pub jetstream: jetstream::Context,
    pub instance: String,
    pub metrics: Arc<BridgeMetrics>,
    streams: Streams,
}

impl BusDelivery {
    pub fn new(
        client: async_nats::Client,
        instance: String,
        in_flight: usize,
        metrics: Arc<BridgeMetrics>,
    ) -> Self {
        let jetstream = jetstream::ContextBuilder::new()
            .timeout(BATCH_TIMEOUT)
            .max_ack_inflight(in_flight.max(1))
            .backpressure_on_inflight(true)
            .build(client.clone());
        BusDelivery {
            client,
            jetstream,
            instance,
            metrics,
            streams: Streams::default(),
        }
    }

    /// Lists the streams' subjects when the list is older than [`STREAMS_TTL`] (or was never
    /// made). A server without JetStream has none.
    async fn refresh_streams(&mut self, force: bool) {
        if !force
            && self
                .streams
                .listed
                .is_some_and(|t| t.elapsed() < STREAMS_TTL)
        {
            return;
        }
        let listed: Result<Vec<String>, _> = self
            .jetstream
            .streams()
            .map_ok(|info| info.config.subjects)
            .try_concat()
            .await;
        match listed {
            Ok(patterns) => {
                if patterns != self.streams.patterns {
                    tracing::info!(?patterns, "message bus bridge: JetStream keeps these subjects; device messages on them are published with acks");
                }
                self.streams.patterns = patterns;
            }
            Err(e) => {
                // JetStream off (or not reachable): publish with core NATS only.
                if !self.streams.patterns.is_empty() || self.streams.listed.is_none() {
                    tracing::info!(error = %e, "message bus bridge: no JetStream streams listed; device messages are published with core NATS");
                }
                self.streams.patterns.clear();
            }
        }
        self.streams.listed = Some(Instant::now());
    }

    fn headers(&self, record: &BusRecord) -> async_nats::HeaderMap {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(INSTANCE_HEADER, self.instance.as_str());
        headers.insert(QOS_HEADER, qos_text(record.qos));
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            record.message_id().as_str(),
        );
        headers
    }

    async fn send(&mut self, batch: &[BusRecord]) -> Result<(), String> {
        let mut acks = Vec::new();
        let mut core = false;
        for record in batch {
            let headers = self.headers(record);
            if self.streams.covers(&record.subject) {
                let ack = self
                    .jetstream
                    .send_publish(
                        record.subject.clone(),
                        jetstream::message::PublishMessage::build()
                            .payload(record.body.clone())
                            .headers(headers),
                    )
                    .await
                    .map_err(|e| format!("JetStream publish: {e}"))?;
                acks.push(ack);
            } else {
                core = true;
                self.client
                    .publish_with_headers(record.subject.clone(), headers, record.body.clone())
                    .await
                    .map_err(|e| format!("publish: {e}"))?;
            }
        }
        if core {
            self.client
                .flush()
                .await
                .map_err(|e| format!("flush: {e}"))?;
        }
        let mut duplicates = 0;
        for ack in acks {
            let ack = ack.await.map_err(|e| format!("JetStream ack: {e}"))?;
            duplicates += u64::from(ack.duplicate);
        }
        if duplicates > 0 {
            self.metrics
                .out_duplicate
                .fetch_add(duplicates, Ordering::Relaxed);
        }
        Ok(())
    }
}

fn qos_text(qos: u8) -> &'static str {
    match qos {
        0 => "0",
        1 => "1",
        _ => "2",
    }
}

#[async_trait]
impl LogSink<BusRecord> for BusDelivery {
    fn name(&self) -> &'static str {
        "nats"
    }

    async fn deliver(&mut self, batch: &[BusRecord]) -> Result<(), String> {
        // Without a connection the client would only queue the batch: fail it now, and try
        // again after the backoff.
        let result = if self.client.connection_state() != async_nats::connection::State::Connected {
            Err("not connected to NATS".to_owned())
        } else {
            self.refresh_streams(false).await;
            match tokio::time::timeout(BATCH_TIMEOUT, self.send(batch)).await {
                Ok(result) => result,
                Err(_) => Err(format!(
                    "no answer within {BATCH_TIMEOUT:?} (NATS down or slow)"
                )),
            }
        };
        match &result {
            Ok(()) => {
                self.metrics
                    .out_published
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            Err(_) => {
                self.metrics
                    .out_failed
                    .fetch_add(batch.len() as u64, Ordering::Relaxed);
                // A stream may have been added or removed: list them again before the retry.
                self.streams.listed = None;
            }
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subject_patterns_match_as_nats_does() {
        assert!(subject_matches("m.>", "m.d1.c.ch1"));
        assert!(subject_matches("m.*.c.*", "m.d1.c.ch1"));
        assert!(!subject_matches("m.*.c.*", "m.d1.c.ch1.a"));
        assert!(subject_matches("m.d1.c.ch1.>", "m.d1.c.ch1.a.b"));
        assert!(!subject_matches("m.d1.c.ch1.>", "m.d1.c.ch1"));
        assert!(!subject_matches("m.>", "m"));
        assert!(subject_matches("m.d1.c.ch1", "m.d1.c.ch1"));
        assert!(!subject_matches("m.d1.c.ch2", "m.d1.c.ch1"));
    }
}
