//! Bridge in: every bus message on `m.>` that this process did not publish itself is published
//! into the broker core, like a device PUBLISH, at the QoS its original publisher used (the
//! [`QOS_HEADER`] set by the publishing instance; QoS 1 for a message without one, e.g. from
//! another platform adapter). Publishing into the core never waits: each subscriber's queue takes
//! the message or counts it as dropped.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use prost::Message as _;
use tokio_util::sync::CancellationToken;

use super::message::{topic_for, Message};
use super::{BridgeMetrics, INSTANCE_HEADER, QOS_HEADER};
use crate::broker::{self, Broker, Origin};

/// Subject of every channel message on the bus.
pub(super) const SUBJECT: &str = "m.>";

/// The QoS a bus message without [`QOS_HEADER`] is delivered with at most.
const DEFAULT_QOS: u8 = 1;

/// Reads `m.>` until shutdown and publishes every foreign channel message into the core.
pub(super) async fn receive(
    mut subscriber: async_nats::Subscriber,
    instance: String,
    broker: Arc<Broker>,
    metrics: Arc<BridgeMetrics>,
    shutdown: CancellationToken,
) {
    loop {
        let Some(message) = super::next_message(&mut subscriber, &shutdown).await else {
            break;
        };
        let header = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        if header(INSTANCE_HEADER).is_some_and(|v| v == instance) {
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
        let qos = header(QOS_HEADER)
            .and_then(|v| v.parse::<u8>().ok())
            .unwrap_or(DEFAULT_QOS)
            .min(2);
        broker.publish(broker::Message::new(
            topic,
            decoded.payload,
            qos,
            false,
            Origin::Bus,
        ));
        metrics.in_delivered.fetch_add(1, Ordering::Relaxed);
    }
    let _ = subscriber.unsubscribe().await;
}
