//! Follows `events.supermq.clients` on NATS JetStream with an ordered consumer of its own
//! (ephemeral, no acks) that starts after the newest message stored when it first connected. Every
//! message's stream sequence is remembered: after any error the consumer is created again from
//! the next sequence, so a server restart or a broken connection skips nothing the stream kept.

use std::time::Duration;

use async_nats::jetstream::consumer::{pull, DeliverPolicy};
use async_nats::jetstream::{self, stream};
use futures_util::StreamExt;
use tokio_util::sync::CancellationToken;

use super::event::{PlatformEvent, STREAM};
use super::{Backoff, Dispatch};

/// The stream the platform's event stores write to (created when missing, as the event sink does).
const STREAM_NAME: &str = "events";
const STREAM_SUBJECTS: &str = "events.>";
const TIMEOUT: Duration = Duration::from_secs(5);

pub struct JetStreamConsumer {
    url: String,
    subject: String,
    /// Stream sequence of the last message handled (at first: the newest when the consumer
    /// first connected); `None` until then.
    last_sequence: Option<u64>,
}

type Failure = Box<dyn std::error::Error + Send + Sync>;

impl JetStreamConsumer {
    /// Checks the URL (comma-separated server addresses); connects when run.
    pub fn new(url: &str) -> Result<Self, String> {
        for server in url.split(',') {
            server
                .trim()
                .parse::<async_nats::ServerAddr>()
                .map_err(|e| format!("{server:?} is not a NATS server address: {e}"))?;
        }
        Ok(JetStreamConsumer {
            url: url.to_owned(),
            subject: format!("events.{STREAM}"),
            last_sequence: None,
        })
    }

    pub async fn run(mut self, mut dispatch: Dispatch, shutdown: CancellationToken) {
        let mut backoff = Backoff::new();
        let mut client: Option<async_nats::Client> = None;
        loop {
            if client.is_none() {
                let connect = async_nats::ConnectOptions::new()
                    .connection_timeout(TIMEOUT)
                    .retry_on_initial_connect()
                    .connect(self.url.as_str());
                client = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    c = connect => match c {
                        Ok(c) => Some(c),
                        Err(e) => {
                            tracing::warn!(error = %e, "platform events (nats): cannot connect; retrying");
                            None
                        }
                    },
                };
            }
            if let Some(c) = &client {
                match self
                    .follow(c.clone(), &mut dispatch, &mut backoff, &shutdown)
                    .await
                {
                    Ok(()) => return,
                    Err(e) => tracing::warn!(error = %e, after = ?self.last_sequence,
                        "platform events (nats): consumer lost; creating it again"),
                }
            }
            if !backoff.wait(&shutdown).await {
                return;
            }
        }
    }

    async fn follow(
        &mut self,
        client: async_nats::Client,
        dispatch: &mut Dispatch,
        backoff: &mut Backoff,
        shutdown: &CancellationToken,
    ) -> Result<(), Failure> {
        let mut js = jetstream::new(client);
        js.set_timeout(TIMEOUT);
        let stream = js
            .get_or_create_stream(stream::Config {
                name: STREAM_NAME.to_owned(),
                subjects: vec![STREAM_SUBJECTS.to_owned()],
                ..Default::default()
            })
            .await?;
        // The first time, "new" means after the newest message stored now; from then on, after
        // the last one handled.
        let after = match self.last_sequence {
            Some(seq) => seq,
            None => {
                let mut stream = stream.clone();
                let newest = stream.info().await?.state.last_sequence;
                self.last_sequence = Some(newest);
                newest
            }
        };
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                filter_subject: self.subject.clone(),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: after + 1,
                },
                ..Default::default()
            })
            .await?;
        let mut messages = consumer.messages().await?;
        tracing::info!(subject = %self.subject, after = ?self.last_sequence,
            "platform events: following events.supermq.clients on nats");
        backoff.reset();
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                next = messages.next() => next,
            };
            let message = match next {
                None => return Err("consumer stream ended".into()),
                Some(Err(e)) => return Err(Box::new(e)),
                Some(Ok(message)) => message,
            };
            let sequence = message.info().map(|i| i.stream_sequence).ok();
            let position = sequence.map(|s| s.to_string()).unwrap_or_default();
            dispatch
                .event(
                    "nats",
                    &position,
                    PlatformEvent::from_json(&message.payload),
                )
                .await;
            if sequence.is_some() {
                self.last_sequence = sequence;
            }
        }
    }
}
