//! The message bus bridge (SPEC §5): device messages on channel topics go to NATS as
//! `messaging.Message` on `m.<domain>.c.<channel>[.<subtopic>]`, and bus messages published by
//! anyone else (other adapter instances, the HTTP adapter) reach local MQTT subscribers. Each
//! message this process publishes carries its instance UUID in a header, so it is never
//! delivered back here: with several instances sharing one NATS, every device message reaches
//! every subscriber exactly once.

pub mod inbound;
pub mod message;
pub mod outbound;
pub mod takeover;

use std::str::FromStr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use async_nats::{ConnectOptions, ServerAddr};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
pub use outbound::BusPublisher;

/// NATS header naming the adapter process that published a message.
pub const INSTANCE_HEADER: &str = "Smq-Mqtt-Adapter-Instance";
/// NATS header carrying the QoS (`0`, `1`, `2`) the device published with.
pub const QOS_HEADER: &str = "Smq-Mqtt-Qos";

/// Counters of the bridge, for the metrics endpoint.
#[derive(Debug, Default)]
pub struct BridgeMetrics {
    /// Device messages published to the bus.
    pub out_published: AtomicU64,
    /// Device messages not bridged because the outbound queue was full (bus slow or down).
    pub out_dropped: AtomicU64,
    /// Device messages the NATS client refused.
    pub out_failed: AtomicU64,
    /// Bus messages published into the broker core.
    pub in_delivered: AtomicU64,
    /// Bus messages skipped because this process published them.
    pub in_own: AtomicU64,
    /// Bus messages on `m.>` that are not a channel subject or not a `messaging.Message`.
    pub in_invalid: AtomicU64,
}

/// How the bridge connects and how much it buffers.
#[derive(Debug, Clone)]
pub struct BridgeSettings {
    /// `nats://host:port` (comma-separated for a cluster).
    pub url: String,
    /// Device messages queued for the bus while it is slow or down.
    pub buffer: usize,
    /// This process's UUID, written into [`INSTANCE_HEADER`].
    pub instance_id: String,
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
}

/// The running bridge.
pub struct Bridge {
    publisher: Arc<BusPublisher>,
    takeover: Arc<takeover::TakeoverAnnouncer>,
    takeover_metrics: Arc<takeover::TakeoverMetrics>,
    metrics: Arc<BridgeMetrics>,
    shutdown: CancellationToken,
    outbound: JoinHandle<()>,
    inbound: JoinHandle<()>,
}

impl Bridge {
    /// Starts both directions. NATS being unreachable is not an error: the client connects and
    /// reconnects in the background, and local MQTT traffic never waits for it.
    pub async fn start(
        settings: &BridgeSettings,
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
        let subscriber = client
            .subscribe(inbound::SUBJECT)
            .await
            .map_err(|e| BridgeError::Client(e.to_string()))?;

        let metrics = Arc::new(BridgeMetrics::default());
        let shutdown = CancellationToken::new();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(INSTANCE_HEADER, settings.instance_id.as_str());

        let (out_tx, out_rx) = mpsc::channel(settings.buffer.max(1));
        let outbound = tokio::spawn(outbound::drain(
            client.clone(),
            out_rx,
            headers,
            metrics.clone(),
            shutdown.clone(),
        ));

        let inbound = tokio::spawn(inbound::receive(
            subscriber,
            settings.instance_id.clone(),
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
        tracing::info!(url = %settings.url, instance_id = %settings.instance_id,
            "message bus bridge started (subject m.>, cluster takeover on {})", takeover::SUBJECT);
        Ok(Bridge {
            publisher: Arc::new(BusPublisher::new(out_tx, metrics.clone())),
            takeover,
            takeover_metrics,
            metrics,
            shutdown,
            outbound,
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

    /// Stops receiving, publishes what is still queued (bounded by `timeout`) and flushes.
    pub async fn shutdown(self, timeout: Duration) -> bool {
        self.shutdown.cancel();
        let _ = self.inbound.await;
        let mut outbound = self.outbound;
        let done = tokio::time::timeout(timeout, &mut outbound).await.is_ok();
        if !done {
            outbound.abort();
        }
        done
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
