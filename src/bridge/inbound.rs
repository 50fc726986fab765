//! Bridge in: every bus message on `m.>` that this process did not publish itself is delivered
//! to local subscribers through one router link. A task reads NATS and queues (bounded) for a
//! dedicated thread that feeds the link, because `LinkTx`'s send to the router blocks when the
//! router is busy; another task drains the link's notifications so the router never parks it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use prost::Message as _;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish};
use rumqttd::Notification;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::message::{topic_for, Message};
use super::{BridgeMetrics, INSTANCE_HEADER};

/// Subject of every channel message on the bus.
pub(super) const SUBJECT: &str = "m.>";
/// Messages handed to the router per signal.
const BATCH: usize = 256;

/// A bus message ready for the router: topic and payload.
pub(super) type Incoming = (Bytes, Bytes);

/// Reads `m.>` until shutdown and queues every foreign channel message for the router.
pub(super) async fn receive(
    mut subscriber: async_nats::Subscriber,
    instance: String,
    queue: mpsc::Sender<Incoming>,
    metrics: Arc<BridgeMetrics>,
    shutdown: CancellationToken,
) {
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => break,
            next = subscriber.next() => match next {
                Some(m) => m,
                None => break,
            },
        };
        let own = message
            .headers
            .as_ref()
            .and_then(|h| h.get(INSTANCE_HEADER))
            .is_some_and(|v| v.as_str() == instance);
        if own {
            metrics.in_own.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let decoded = Message::decode(message.payload.clone());
        let (Some(topic), Ok(decoded)) = (topic_for(message.subject.as_str()), decoded) else {
            let invalid = metrics.in_invalid.fetch_add(1, Ordering::Relaxed) + 1;
            if invalid.is_power_of_two() {
                tracing::warn!(subject = %message.subject, invalid,
                    "message bus bridge: not a channel subject or not a messaging.Message; skipped");
            }
            continue;
        };
        if queue.try_send((topic, decoded.payload)).is_err() {
            let dropped = metrics.in_dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(
                    dropped,
                    "message bus bridge: router queue full, bus message not delivered"
                );
            }
        }
    }
    let _ = subscriber.unsubscribe().await;
}

/// Feeds queued messages to the router as QoS 0 publishes; runs on its own thread and ends when
/// the queue's senders are gone or the router is.
pub(super) fn inject(
    mut link_tx: LinkTx,
    mut queue: mpsc::Receiver<Incoming>,
    metrics: Arc<BridgeMetrics>,
) {
    while let Some(first) = queue.blocking_recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let count = batch.len() as u64;
        let Some((topic, payload)) = batch.pop() else {
            continue;
        };
        link_tx.buffer().extend(
            batch
                .into_iter()
                .map(|(t, p)| Packet::Publish(Publish::new(t, p, false), None)),
        );
        // One signal for the whole batch; this send waits while the router's inbox is full.
        if let Err(e) = link_tx.publish(topic, payload) {
            tracing::warn!(error = %e, "message bus bridge: router link closed");
            return;
        }
        metrics.in_delivered.fetch_add(count, Ordering::Relaxed);
    }
}

/// Keeps the bridge's router link scheduled: it subscribes nothing, but the router still
/// expects the link to take its notifications and to be woken after `Unschedule`.
pub(super) async fn drain_link(mut link_rx: LinkRx, shutdown: CancellationToken) {
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            next = link_rx.next() => next,
        };
        match next {
            Ok(Some(Notification::Unschedule)) => {
                if link_rx.wake().await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}
