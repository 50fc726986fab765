//! Reads the connection events from NATS JetStream (`events.supermq.mqtt`, or in the `supermq`
//! layout `events.supermq.mqtt.*` without `…client_subscribe`, protobuf bodies)
//! through an ephemeral ordered consumer that starts at the stream's first message (no acks,
//! nothing left behind on the server). The backlog ends at the message that was last when the
//! source opened.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use async_trait::async_trait;
use futures_util::{FutureExt, StreamExt};

use super::{Entry, EventSource, SourceError};
use crate::bridge::message::Message;
use crate::events::{EventLayout, STREAM};
use crate::presence::event::{MalformedEvent, StreamEvent};

const STREAM_NAME: &str = "events";
/// The `supermq` layout's subscribe events: no session boundary, not read.
const SUBSCRIBE_SUBJECT: &str = "events.supermq.mqtt.client_subscribe";
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
    layout: EventLayout,
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
    pub async fn open(url: &str, layout: EventLayout) -> Result<Self, SourceError> {
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
                // One filter (servers before 2.10 take no list); `push` skips subscribe events.
                filter_subject: match layout {
                    EventLayout::Seed => format!("events.{STREAM}"),
                    EventLayout::Supermq => format!("events.{STREAM}.*"),
                },
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
            layout,
            _client: client,
        })
    }

    /// Decodes one message; returns its stream sequence and how many messages follow it.
    fn push(
        &self,
        message: Option<Result<jetstream::Message, consumer::pull::OrderedError>>,
        out: &mut Vec<Entry>,
    ) -> Result<(u64, u64), SourceError> {
        let message = message
            .ok_or_else(|| store_error("the consumer ended"))?
            .map_err(store_error)?;
        let info = message.info().map_err(store_error)?;
        let position = (info.stream_sequence, info.pending);
        if message.subject.as_str() == SUBSCRIBE_SUBJECT {
            return Ok(position);
        }
        out.push(match self.layout {
            EventLayout::Seed => StreamEvent::from_json(&message.payload),
            EventLayout::Supermq => {
                use prost::Message as _;
                Message::decode(message.payload.clone())
                    .map_err(|e| MalformedEvent(format!("not a messaging.Message: {e}")))
                    .and_then(|m| StreamEvent::from_supermq_json(&m.payload))
            }
        });
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
            let (sequence, pending) = self.push(next, out)?;
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
        self.push(next, out)?;
        // Take what has already arrived without waiting again.
        for _ in 1..PAGE {
            match self.messages.next().now_or_never() {
                Some(next) => {
                    self.push(next, out)?;
                }
                None => break,
            }
        }
        Ok(())
    }
}
