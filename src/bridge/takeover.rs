//! Cluster-wide takeover (MQTT 3.1.4-3 across instances): every accepted CONNECT is announced
//! on the bus, and any other instance holding a live connection of the same session (same
//! client id and MQTT client identifier) ends it as a takeover, so a device that reconnects
//! through another instance while its old TCP connection is half-open is online once.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, Kick};
use crate::hooks::{SessionInfo, SessionObserver};

/// The bus subject of session announcements.
pub const SUBJECT: &str = "mqtt-adapter.sessions.connected";

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Announcement {
    instance: String,
    client_id: String,
    mqtt_client_id: String,
}

/// Counters of the takeover channel.
#[derive(Debug, Default)]
pub struct TakeoverMetrics {
    pub announced: AtomicU64,
    /// Announcements not sent because the queue to the bus was full.
    pub dropped: AtomicU64,
    /// Local connections ended because another instance accepted their session.
    pub taken_over: AtomicU64,
}

/// The session hook that announces accepted sessions.
pub struct TakeoverAnnouncer {
    instance: String,
    queue: mpsc::Sender<Bytes>,
    metrics: Arc<TakeoverMetrics>,
}

impl SessionObserver for TakeoverAnnouncer {
    fn on_connected(&self, session: &SessionInfo) {
        let announcement = Announcement {
            instance: self.instance.clone(),
            client_id: session.identity.client_id.clone(),
            mqtt_client_id: session.mqtt_client_id.clone(),
        };
        let Ok(body) = serde_json::to_vec(&announcement) else {
            return;
        };
        if self.queue.try_send(Bytes::from(body)).is_err() {
            let dropped = self.metrics.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(
                    dropped,
                    "cluster takeover: bus queue full, announcement not sent"
                );
            }
        }
    }
}

/// Starts announcing and listening; returns the hook for the sessions.
pub(super) async fn start(
    client: &async_nats::Client,
    instance: &str,
    broker: Arc<Broker>,
    buffer: usize,
    shutdown: &CancellationToken,
) -> Result<(Arc<TakeoverAnnouncer>, Arc<TakeoverMetrics>), async_nats::SubscribeError> {
    let subscriber = client.subscribe(SUBJECT).await?;
    let metrics = Arc::new(TakeoverMetrics::default());
    let (tx, rx) = mpsc::channel(buffer.max(1));
    tokio::spawn(announce(
        client.clone(),
        rx,
        metrics.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(listen(
        subscriber,
        instance.to_owned(),
        broker,
        metrics.clone(),
        shutdown.clone(),
    ));
    let announcer = TakeoverAnnouncer {
        instance: instance.to_owned(),
        queue: tx,
        metrics: metrics.clone(),
    };
    Ok((Arc::new(announcer), metrics))
}

async fn announce(
    client: async_nats::Client,
    mut queue: mpsc::Receiver<Bytes>,
    metrics: Arc<TakeoverMetrics>,
    shutdown: CancellationToken,
) {
    loop {
        let body = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = queue.recv() => match next {
                Some(b) => b,
                None => return,
            },
        };
        match client.publish(SUBJECT, body).await {
            Ok(()) => {
                metrics.announced.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(error = %e, "cluster takeover: announcement not published"),
        }
    }
}

async fn listen(
    mut subscriber: async_nats::Subscriber,
    instance: String,
    broker: Arc<Broker>,
    metrics: Arc<TakeoverMetrics>,
    shutdown: CancellationToken,
) {
    loop {
        let Some(message) = super::next_message(&mut subscriber, &shutdown).await else {
            break;
        };
        let Ok(a) = serde_json::from_slice::<Announcement>(&message.payload) else {
            tracing::warn!(
                subject = SUBJECT,
                "cluster takeover: unreadable announcement skipped"
            );
            continue;
        };
        if a.instance == instance {
            continue;
        }
        let ended = broker.kick(
            |k| k.client_id == a.client_id && k.mqtt_client_id == a.mqtt_client_id,
            Kick::Takeover,
        );
        if !ended.is_empty() {
            metrics
                .taken_over
                .fetch_add(ended.len() as u64, Ordering::Relaxed);
            tracing::info!(client_id = %a.client_id.escape_debug(), mqtt_client_id = %a.mqtt_client_id.escape_debug(),
                by = %a.instance.escape_debug(), "session taken over by another instance");
        }
    }
    let _ = subscriber.unsubscribe().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn announcement_round_trips_as_json() {
        let a = Announcement {
            instance: "i".into(),
            client_id: "c1".into(),
            mqtt_client_id: "dev/1".into(),
        };
        let text = serde_json::to_string(&a).expect("encodes");
        assert_eq!(
            text,
            r#"{"instance":"i","client_id":"c1","mqtt_client_id":"dev/1"}"#
        );
        assert_eq!(
            serde_json::from_str::<Announcement>(&text).expect("decodes"),
            a
        );
    }
}
