//! The message bus bridge (SPEC §5): device messages on channel topics go to NATS as
//! `messaging.Message` on `m.<domain>.c.<channel>[.<subtopic>]`, through the durable outbound
//! message log ([`log`]) so that an acknowledged message is never lost; bus messages published
//! by anyone else (other adapter instances, the HTTP adapter) reach local MQTT subscribers, on
//! the subjects those subscribers need only. The connection is `no_echo`: an instance never
//! receives its own messages, so with several instances sharing one NATS every device message
//! reaches every subscriber exactly once.

pub mod inbound;
pub mod log;
pub mod message;
pub mod outbound;
pub mod takeover;

use std::str::FromStr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{ConnectOptions, ServerAddr};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::log::{DataDir, DataDirError, Log, LogSettings, LogStats};
pub use outbound::BusPublisher;

/// NATS header naming the adapter process that published a message.
pub const INSTANCE_HEADER: &str = "Smq-Mqtt-Adapter-Instance";
/// NATS header carrying the QoS (`0`, `1`, `2`) the device published with.
pub const QOS_HEADER: &str = "Smq-Mqtt-Qos";
/// The oldest nats-server the bridge runs against (what SuperMQ deploys).
pub const MIN_SERVER: (u64, u64) = (2, 10);

/// Counters of the bridge, for the metrics endpoint.
#[derive(Debug, Default)]
pub struct BridgeMetrics {
    /// Device messages the bus acknowledged (JetStream) or took (core NATS, flushed).
    pub out_published: AtomicU64,
    /// Device messages whose delivery failed and is retried from the log.
    pub out_failed: AtomicU64,
    /// Device messages JetStream already had (a retry or a replay after a restart), by id.
    pub out_duplicate: AtomicU64,
    /// Bus messages published into the broker core.
    pub in_delivered: AtomicU64,
    /// Bus messages on `m.>` that are not a channel subject or not a `messaging.Message`.
    pub in_invalid: AtomicU64,
    /// NATS subjects subscribed for the local subscriptions.
    pub in_subjects: AtomicU64,
    /// The outbound message log.
    pub log: Arc<LogStats>,
}

/// How the bridge connects, keeps and delivers.
#[derive(Debug, Clone)]
pub struct BridgeSettings {
    /// `nats://host:port` (comma-separated for a cluster).
    pub url: String,
    /// JetStream publishes in flight at most, and takeover announcements queued.
    pub buffer: usize,
    /// This process's UUID, written into [`INSTANCE_HEADER`].
    pub instance_id: String,
    /// The outbound message log.
    pub log: LogSettings,
}

/// A bridge setting the adapter cannot start with.
#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error(
        "SMQ_MESSAGE_BROKER_URL: {0:?} is not a NATS URL ({1}); use e.g. nats://localhost:4222"
    )]
    Url(String, String),
    #[error("SMQ_MESSAGE_BROKER_URL: {0}")]
    Client(String),
    #[error("SMQ_MESSAGE_BROKER_URL: nats-server {0} is too old: the bridge needs 2.10 or newer (what SuperMQ deploys); upgrade NATS")]
    OldServer(String),
    #[error("SMQ_MQTT_ADAPTER_DATA_DIR: {0}")]
    DataDir(#[from] DataDirError),
}

/// Whether a nats-server version (`2.10.4`, `v2.9.10`) is at least [`MIN_SERVER`]; an
/// unreadable one is let through.
pub fn server_supported(version: &str) -> bool {
    let mut parts = version
        .trim_start_matches('v')
        .split(['.', '-'])
        .map(|p| p.parse::<u64>());
    match (parts.next(), parts.next()) {
        (Some(Ok(major)), Some(Ok(minor))) => (major, minor) >= MIN_SERVER,
        _ => true,
    }
}

/// The running bridge.
pub struct Bridge {
    publisher: Arc<BusPublisher>,
    takeover: Arc<takeover::TakeoverAnnouncer>,
    takeover_metrics: Arc<takeover::TakeoverMetrics>,
    metrics: Arc<BridgeMetrics>,
    log: Log<log::Messages>,
    client: async_nats::Client,
    shutdown: CancellationToken,
    delivery: JoinHandle<()>,
    inbound: JoinHandle<()>,
}

/// How long start-up waits to learn the server's version before going on without it.
const FIRST_CONNECT_WAIT: Duration = Duration::from_secs(3);

impl Bridge {
    /// Opens the outbound message log (messages an earlier run left undelivered are delivered
    /// first) and starts both directions. NATS being unreachable is not an error: the client
    /// connects and reconnects in the background, and device messages wait in the log. A
    /// reachable server older than [`MIN_SERVER`] is refused.
    pub async fn start(
        settings: &BridgeSettings,
        data_dir: &DataDir,
        broker: &Arc<Broker>,
    ) -> Result<Bridge, BridgeError> {
        let addrs = settings
            .url
            .split(',')
            .map(|a| {
                ServerAddr::from_str(a.trim())
                    .map_err(|e| BridgeError::Url(settings.url.clone(), e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let client = ConnectOptions::new()
            .name(format!("mqtt-adapter {}", settings.instance_id))
            .no_echo()
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis(100 << attempts.min(4)).min(Duration::from_secs(1))
            })
            .event_callback(|event| async move {
                tracing::info!(%event, "message bus bridge");
            })
            .connect(addrs)
            .await
            .map_err(|e| BridgeError::Client(e.to_string()))?;
        let deadline = tokio::time::Instant::now() + FIRST_CONNECT_WAIT;
        while client.connection_state() != async_nats::connection::State::Connected
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let version = client.server_info().version;
        if client.connection_state() == async_nats::connection::State::Connected
            && !server_supported(&version)
        {
            return Err(BridgeError::OldServer(version));
        }
        if version.is_empty() {
            tracing::warn!(url = %settings.url, "message bus not reachable yet: device messages are kept in the message log until it is");
        }

        let (log, opened) = Log::open(log::Messages::new_run(), data_dir, settings.log.clone())?;
        if opened.undelivered > 0 || opened.cut_bytes > 0 {
            tracing::info!(
                undelivered = opened.undelivered,
                cut_bytes = opened.cut_bytes,
                "message log: messages an earlier run kept are delivered first"
            );
        }
        let metrics = Arc::new(BridgeMetrics {
            log: log.stats(),
            ..BridgeMetrics::default()
        });
        let shutdown = CancellationToken::new();
        let delivery = log.deliver(
            Box::new(outbound::BusDelivery::new(
                client.clone(),
                settings.instance_id.clone(),
                settings.buffer,
                metrics.clone(),
            )),
            shutdown.clone(),
        );
        let inbound = tokio::spawn(inbound::receive(
            client.clone(),
            broker.clone(),
            metrics.clone(),
            shutdown.clone(),
        ));
        let (takeover, takeover_metrics) = takeover::start(
            &client,
            &settings.instance_id,
            broker.clone(),
            settings.buffer,
            &shutdown,
        )
        .await
        .map_err(|e| BridgeError::Client(e.to_string()))?;
        tracing::info!(url = %settings.url, instance_id = %settings.instance_id, server = %version,
            fsync = ?settings.log.fsync,
            "message bus bridge started (message log in the data directory, subscriptions by interest, cluster takeover on {})", takeover::SUBJECT);
        Ok(Bridge {
            publisher: Arc::new(BusPublisher::new(log.clone())),
            takeover,
            takeover_metrics,
            metrics,
            log,
            client,
            shutdown,
            delivery,
            inbound,
        })
    }

    /// The session hook that bridges device messages out.
    pub fn publisher(&self) -> Arc<BusPublisher> {
        self.publisher.clone()
    }

    /// The session hook that announces accepted sessions to the other instances.
    pub fn takeover_announcer(&self) -> Arc<takeover::TakeoverAnnouncer> {
        self.takeover.clone()
    }

    pub fn takeover_metrics(&self) -> Arc<takeover::TakeoverMetrics> {
        self.takeover_metrics.clone()
    }

    pub fn metrics(&self) -> Arc<BridgeMetrics> {
        self.metrics.clone()
    }

    /// Stops receiving, delivers what the log holds (bounded by `timeout`), then stops the
    /// delivery and closes the log: what is still undelivered is delivered by the next start.
    /// Returns whether every message is delivered or kept.
    pub async fn shutdown(self, timeout: Duration) -> bool {
        // With the bus down there is nothing to wait for: the log keeps the messages.
        let connected = self.client.connection_state() == async_nats::connection::State::Connected;
        if !(connected && self.log.flush(timeout).await) {
            let pending = self
                .metrics
                .log
                .pending
                .load(std::sync::atomic::Ordering::Relaxed);
            if pending > 0 {
                tracing::info!(
                    messages = pending,
                    "message log: undelivered messages kept for the next start"
                );
            }
        }
        self.shutdown.cancel();
        let _ = self.inbound.await;
        let _ = self.delivery.await;
        let kept = self.log.close();
        if !kept {
            tracing::warn!("message log: its writer did not end cleanly");
        }
        if let Err(e) = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await {
            tracing::warn!(error = %e, "message bus bridge: flush at shutdown did not finish");
        }
        kept
    }
}

/// The subscription's next message; `None` once it ends or the server shuts down.
async fn next_message(
    subscriber: &mut async_nats::Subscriber,
    shutdown: &tokio_util::sync::CancellationToken,
) -> Option<async_nats::Message> {
    use futures_util::StreamExt;
    tokio::select! {
        _ = shutdown.cancelled() => None,
        next = subscriber.next() => next,
    }
}

#[cfg(test)]
mod tests {
    use super::server_supported;

    #[test]
    fn servers_before_2_10_are_not_supported() {
        assert!(server_supported("2.10.0"));
        assert!(server_supported("v2.15.1"));
        assert!(server_supported("3.0.0-beta"));
        assert!(!server_supported("2.9.10"));
        assert!(!server_supported("v1.4.0"));
        assert!(server_supported("unknown"));
    }
}
