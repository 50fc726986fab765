//! Revocation that takes effect at once: every instance follows the clients service's event
//! stream `supermq.clients` (`SMQ_MQTT_ADAPTER_PLATFORM_EVENTS_URL`: Redis Streams, NATS
//! JetStream or RabbitMQ) and, when a client is disabled or its secret rotated, a channel
//! disabled or a connection removed, drops the cached decisions and ends the affected sessions
//! (`reactions.rs`). `event.rs` reads the seed's formats; `redis.rs`, `nats.rs` and `amqp.rs` each
//! follow one store, reconnecting by themselves and resuming where they were.

pub mod amqp;
pub mod event;
pub mod nats;
pub mod reactions;
pub mod redis;

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use event::{EventError, PlatformEvent, Revocation};
pub use reactions::{DecisionCaches, EventHandler, Reactions, RightsEpoch};

/// A platform events URL the adapter cannot use.
#[derive(Debug, thiserror::Error)]
pub enum PlatformEventsError {
    #[error(
        "SMQ_MQTT_ADAPTER_PLATFORM_EVENTS_URL: {0:?} must start with redis://, nats:// or amqp://"
    )]
    Scheme(String),
    #[error("SMQ_MQTT_ADAPTER_PLATFORM_EVENTS_URL: {0}")]
    Url(String),
}

/// Reconnect pauses grow from this ...
const RETRY_MIN: Duration = Duration::from_millis(100);
/// ... to this.
const RETRY_MAX: Duration = Duration::from_secs(2);

/// Starts following the platform's events at `url`; the task ends with `shutdown`.
pub fn start(
    url: &str,
    handler: Arc<dyn EventHandler>,
    shutdown: CancellationToken,
) -> Result<JoinHandle<()>, PlatformEventsError> {
    let dispatch = Dispatch::new(handler);
    let scheme = url.split("://").next().unwrap_or_default();
    Ok(match scheme {
        "redis" | "rediss" => {
            let consumer = redis::RedisConsumer::new(url)
                .map_err(|e| PlatformEventsError::Url(e.to_string()))?;
            tokio::spawn(consumer.run(dispatch, shutdown))
        }
        "nats" | "tls" => {
            let consumer = nats::JetStreamConsumer::new(url).map_err(PlatformEventsError::Url)?;
            tokio::spawn(consumer.run(dispatch, shutdown))
        }
        "amqp" | "amqps" => {
            let consumer = amqp::AmqpConsumer::new(url).map_err(PlatformEventsError::Url)?;
            tokio::spawn(consumer.run(dispatch, shutdown))
        }
        _ => return Err(PlatformEventsError::Scheme(url.to_owned())),
    })
}

/// Hands every event a consumer read to the handler, and reports unreadable ones once per
/// episode (a run of bad events logs one warning, with how many were skipped when it ends).
pub struct Dispatch {
    handler: Arc<dyn EventHandler>,
    skipped: u64,
}

impl Dispatch {
    pub fn new(handler: Arc<dyn EventHandler>) -> Dispatch {
        Dispatch {
            handler,
            skipped: 0,
        }
    }

    /// `position` says where in the store the event was (entry id, sequence), for the logs.
    pub async fn event(
        &mut self,
        store: &str,
        position: &str,
        read: Result<PlatformEvent, EventError>,
    ) {
        match read {
            Ok(event) => {
                if self.skipped > 0 {
                    tracing::info!(
                        store,
                        skipped = self.skipped,
                        "platform events readable again"
                    );
                    self.skipped = 0;
                }
                self.handler.handle(event).await;
            }
            Err(e) => {
                if self.skipped == 0 {
                    tracing::warn!(store, position, error = %e,
                        "unreadable event on supermq.clients skipped (further ones are skipped quietly until a good one)");
                }
                self.skipped += 1;
            }
        }
    }
}

/// Doubling pauses between reconnect attempts, reset once connected.
pub(crate) struct Backoff(Duration);

impl Backoff {
    pub(crate) fn new() -> Backoff {
        Backoff(RETRY_MIN)
    }

    pub(crate) fn reset(&mut self) {
        self.0 = RETRY_MIN;
    }

    /// Waits out the next pause; false when shutdown came first.
    pub(crate) async fn wait(&mut self, shutdown: &CancellationToken) -> bool {
        let pause = self.0;
        self.0 = (self.0 * 2).min(RETRY_MAX);
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(pause) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use async_trait::async_trait;

    use super::*;

    struct Nobody;

    #[async_trait]
    impl EventHandler for Nobody {
        async fn handle(&self, _event: PlatformEvent) {}
    }

    #[tokio::test]
    async fn bad_urls_name_the_variable() {
        for url in [
            "http://127.0.0.1",
            "redis://[",
            "nats://a b",
            "amqp://h:notaport",
        ] {
            let err = start(url, Arc::new(Nobody), CancellationToken::new())
                .map(|_| ())
                .unwrap_err()
                .to_string();
            assert!(
                err.starts_with("SMQ_MQTT_ADAPTER_PLATFORM_EVENTS_URL: "),
                "{url}: {err}"
            );
        }
    }
}
