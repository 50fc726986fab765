//! Bridge out: every authorized device PUBLISH on a channel topic becomes a `messaging.Message`
//! on the bus. The session hook only encodes and queues (never blocks a session); one task
//! drains the bounded queue into NATS. What does not fit in the queue is counted as dropped.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::message::{subject_for, Message, PROTOCOL};
use super::{BridgeMetrics, QOS_HEADER};
use crate::broker::Message as CoreMessage;
use crate::hooks::{PublishRoute, SessionInfo, SessionObserver};

/// One encoded message waiting for the bus.
#[derive(Debug)]
pub(super) struct Outgoing {
    subject: String,
    body: Bytes,
    /// The QoS the device published with, carried to other instances in [`QOS_HEADER`].
    qos: u8,
}

/// The session hook of the outbound bridge.
pub struct BusPublisher {
    queue: mpsc::Sender<Outgoing>,
    metrics: Arc<BridgeMetrics>,
}

impl BusPublisher {
    pub(super) fn new(queue: mpsc::Sender<Outgoing>, metrics: Arc<BridgeMetrics>) -> Self {
        BusPublisher { queue, metrics }
    }
}

impl SessionObserver for BusPublisher {
    fn on_publish(&self, session: &SessionInfo, route: &PublishRoute, message: &CoreMessage) {
        // `hc/` and plain ACL topics stay local.
        let Some(channel) = &route.channel else {
            return;
        };
        let message_qos = message.qos;
        let message = Message {
            channel: channel.channel.clone(),
            domain: channel.domain.clone(),
            subtopic: channel.dotted_subtopic(),
            publisher: session.identity.client_id.clone(),
            protocol: PROTOCOL.to_owned(),
            payload: message.payload.clone(),
            created: crate::clock::unix_nanos(),
            client_id: session.mqtt_client_id.clone(),
        };
        let outgoing = Outgoing {
            subject: subject_for(channel),
            body: Bytes::from(message.encode_to_vec()),
            qos: message_qos,
        };
        if self.queue.try_send(outgoing).is_err() {
            let dropped = self.metrics.out_dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if dropped.is_power_of_two() {
                tracing::warn!(
                    dropped,
                    "message bus bridge: queue full or closed, device message not bridged"
                );
            }
        }
    }
}

/// Publishes queued messages until shutdown, then what is still queued, then flushes.
pub(super) async fn drain(
    client: async_nats::Client,
    mut queue: mpsc::Receiver<Outgoing>,
    headers: async_nats::HeaderMap,
    metrics: Arc<BridgeMetrics>,
    shutdown: CancellationToken,
) {
    // One header set per QoS, built once.
    let headers: [async_nats::HeaderMap; 3] = [0u8, 1, 2].map(|qos| {
        let mut h = headers.clone();
        h.insert(QOS_HEADER, qos.to_string().as_str());
        h
    });
    let headers = &headers;
    loop {
        let outgoing = tokio::select! {
            biased;
            next = queue.recv() => match next {
                Some(o) => o,
                None => break,
            },
            _ = shutdown.cancelled() => break,
        };
        publish(&client, outgoing, headers, &metrics).await;
    }
    while let Ok(outgoing) = queue.try_recv() {
        publish(&client, outgoing, headers, &metrics).await;
    }
    if let Err(e) = tokio::time::timeout(Duration::from_secs(5), client.flush()).await {
        tracing::warn!(error = %e, "message bus bridge: flush at shutdown did not finish");
    }
}

async fn publish(
    client: &async_nats::Client,
    outgoing: Outgoing,
    headers: &[async_nats::HeaderMap; 3],
    metrics: &BridgeMetrics,
) {
    let headers = headers[usize::from(outgoing.qos.min(2))].clone();
    match client
        .publish_with_headers(outgoing.subject, headers, outgoing.body)
        .await
    {
        Ok(()) => {
            metrics.out_published.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => {
            let failed = metrics.out_failed.fetch_add(1, Ordering::Relaxed) + 1;
            if failed.is_power_of_two() {
                tracing::warn!(failed, error = %e, "message bus bridge: publish failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Identity;
    use crate::session::codec::ProtocolVersion;
    use crate::topic::ChannelTopic;

    fn session() -> SessionInfo {
        SessionInfo {
            identity: Identity {
                client_id: "c1".into(),
                anonymous: false,
            },
            mqtt_client_id: "dev-1".into(),
            version: ProtocolVersion::V311,
            peer: "127.0.0.1:1".parse().expect("addr"),
        }
    }

    fn core_message(qos: u8) -> CoreMessage {
        let m = CoreMessage::new(
            Bytes::from_static(b"m/d1/c/ch1"),
            Bytes::from("p"),
            qos,
            false,
            crate::broker::Origin::Bus,
        );
        std::sync::Arc::try_unwrap(m).expect("sole owner")
    }

    fn route(channel: Option<ChannelTopic>) -> PublishRoute {
        PublishRoute {
            topic: Bytes::from_static(b"m/d1/c/ch1"),
            channel,
        }
    }

    #[test]
    fn full_queue_counts_drops_and_never_blocks() {
        let (tx, mut rx) = mpsc::channel(1);
        let metrics = Arc::new(BridgeMetrics::default());
        let publisher = BusPublisher::new(tx, metrics.clone());
        let channel = ChannelTopic {
            domain: "d1".into(),
            channel: "ch1".into(),
            subtopic: "a/b".into(),
        };
        for _ in 0..3 {
            publisher.on_publish(&session(), &route(Some(channel.clone())), &core_message(1));
        }
        assert_eq!(metrics.out_dropped.load(Ordering::Relaxed), 2);
        let queued = rx.try_recv().expect("one message queued");
        assert_eq!(queued.subject, "m.d1.c.ch1.a.b");
        assert_eq!(queued.qos, 1);
        let message = Message::decode(queued.body).expect("messaging.Message");
        assert_eq!(
            (message.subtopic.as_str(), message.client_id.as_str()),
            ("a.b", "dev-1")
        );
    }

    #[test]
    fn non_channel_routes_are_not_bridged() {
        let (tx, mut rx) = mpsc::channel(4);
        let publisher = BusPublisher::new(tx, Arc::default());
        publisher.on_publish(&session(), &route(None), &core_message(0));
        assert!(rx.try_recv().is_err());
    }
}
