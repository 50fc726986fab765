//! Reads `events.supermq.mqtt` from NATS JetStream through an ephemeral ordered consumer that
//! starts at the stream's first message (no acks, nothing left behind on the server). The
//! backlog ends at the message that was last when the source opened.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use async_trait::async_trait;
use futures_util::{FutureExt, StreamExt};

use super::{Entry, EventSource, SourceError};
use crate::events::STREAM;
use crate::presence::event::StreamEvent;

const STREAM_NAME: &str = "events";
/// Messages handed over per call.
const PAGE: usize = 10_000;
/// How long `follow` waits for a new message.
const FOLLOW_WAIT: Duration = Duration::from_secs(1);
/// Connecting, and the next backlog message, must come within this.
const TIMEOUT: Duration = Duration::from_secs(10);

pub struct JetStreamSource {
    messages: consumer::pull::Ordered,
    /// Stream sequence of the backlog's last message; `None` once it is read (or was empty).
    backlog_end: Option<u64>,
    // Dropping the client closes the connection the consumer reads from.
    _client: async_nats::Client,
}

fn store_error(e: impl std::fmt::Display) -> SourceError {
    SourceError::Store {
        store: "nats",
        message: e.to_string(),
    }
}

impl JetStreamSource {
    pub async fn open(url: &str) -> Result<Self, SourceError> {
        for server in url.split(',') {
            server
                .trim()
                .parse::<async_nats::ServerAddr>()
                .map_err(|e| SourceError::BadUrl {
                    url: url.into(),
                    message: format!("{server:?} is not a NATS server address: {e}"),
                })?;
        }
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(TIMEOUT)
            .connect(url)
            .await
            .map_err(|e| store_error(format!("cannot connect to {url}: {e}")))?;
        let js = jetstream::new(client.clone());
        let stream = js.get_stream(STREAM_NAME).await.map_err(|e| {
            store_error(format!(
                "no JetStream stream {STREAM_NAME:?} ({e}): no adapter has written events to this NATS yet"
            ))
        })?;
        // The stream's last message now marks the end of the backlog.
        let last_sequence = stream
            .clone()
            .info()
            .await
            .map_err(store_error)?
            .state
            .last_sequence;
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: format!("events.{STREAM}"),
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| store_error(format!("cannot create a consumer: {e}")))?;
        let backlog_end = (consumer.cached_info().num_pending > 0).then_some(last_sequence);
        let messages = consumer.messages().await.map_err(store_error)?;
        Ok(JetStreamSource {
            messages,
            backlog_end,
            _client: client,
        })
    }

    /// Decodes one message; returns its stream sequence and how many messages follow it.
    fn push(
        message: Option<Result<jetstream::Message, consumer::pull::OrderedError>>,
        out: &mut Vec<Entry>,
    ) -> Result<(u64, u64), SourceError> {
        let message = message
            .ok_or_else(|| store_error("the consumer ended"))?
            .map_err(store_error)?;
        let info = message.info().map_err(store_error)?;
        let position = (info.stream_sequence, info.pending);
        out.push(StreamEvent::from_json(&message.payload));
        Ok(position)
    }
}

#[async_trait]
impl EventSource for JetStreamSource {
    async fn backlog(&mut self, out: &mut Vec<Entry>) -> Result<bool, SourceError> {
        let Some(end) = self.backlog_end else {
            return Ok(true);
        };
        for _ in 0..PAGE {
            let next = tokio::time::timeout(TIMEOUT, self.messages.next())
                .await
                .map_err(|_| store_error("no message from the consumer within 10 s"))?;
            let (sequence, pending) = Self::push(next, out)?;
            if sequence >= end || pending == 0 {
                self.backlog_end = None;
                return Ok(true);
            }
        }
        Ok(false)
    }

    async fn follow(&mut self, out: &mut Vec<Entry>) -> Result<(), SourceError> {
        let Ok(next) = tokio::time::timeout(FOLLOW_WAIT, self.messages.next()).await else {
            return Ok(());
        };
        Self::push(next, out)?;
        // Take what has already arrived without waiting again.
        for _ in 1..PAGE {
            match self.messages.next().now_or_never() {
                Some(next) => {
                    Self::push(next, out)?;
                }
                None => break,
            }
        }
        Ok(())
    }
}
