//! What a revocation does, the same whichever store it came from (or a SIGHUP reload): cached
//! decisions are dropped first, so whatever the device does next is asked again; then the
//! subscriptions that are no longer granted are removed and the live sessions that held them (or,
//! for a revoked client, all its sessions) end with `Kick::Revoked` (MQTT 5: DISCONNECT 0x87, the
//! will is published, the `disconnect` event says `revoked`).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use prometheus::IntCounterVec;

use super::event::{PlatformEvent, Revocation};
use crate::broker::{Broker, Kick, SessionKey};

/// Caches of auth decisions that a revocation must empty (the platform backend's).
#[async_trait]
pub trait DecisionCaches: Send + Sync {
    /// Drops the client's cached authentication and all its authorizations.
    async fn forget_client(&self, client_id: &str);
    /// Drops every cached authorization on the channel.
    async fn forget_channel(&self, channel_id: &str);
    /// Drops the cached authorizations of one client on one channel.
    async fn forget_access(&self, client_id: &str, channel_id: &str);
}

/// Receives every event the consumer read, in store order.
#[async_trait]
pub trait EventHandler: Send + Sync {
    async fn handle(&self, event: PlatformEvent);
}

/// Bumped on every revocation: a connection's own memory of topic decisions is stale once it
/// changes (see the relay).
#[derive(Debug, Default)]
pub struct RightsEpoch(AtomicU64);

impl RightsEpoch {
    pub fn current(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    fn advance(&self) {
        self.0.fetch_add(1, Ordering::AcqRel);
    }
}

/// Operations counted under their own name; anything else is counted as `other`, so a
/// misbehaving producer cannot grow the metric without bound.
const KNOWN_OPERATIONS: [&str; 4] = [
    "client.remove",
    "client.update_secret",
    "channel.remove",
    "policies.delete",
];

fn operation_label(operation: &str) -> &str {
    KNOWN_OPERATIONS
        .iter()
        .find(|o| **o == operation)
        .copied()
        .unwrap_or("other")
}

/// Applies revocations to the broker core and the auth caches.
pub struct Reactions {
    broker: Arc<Broker>,
    caches: Option<Arc<dyn DecisionCaches>>,
    epoch: Arc<RightsEpoch>,
    revocations: IntCounterVec,
    seen: IntCounterVec,
}

impl Reactions {
    pub fn new(
        broker: Arc<Broker>,
        caches: Option<Arc<dyn DecisionCaches>>,
        epoch: Arc<RightsEpoch>,
        revocations: IntCounterVec,
        seen: IntCounterVec,
    ) -> Reactions {
        Reactions {
            broker,
            caches,
            epoch,
            revocations,
            seen,
        }
    }

    /// Makes every connection forget the topic decisions it keeps for itself (after a reload
    /// that may have narrowed grants no revocation describes, such as plain-topic ACLs).
    pub fn forget_session_decisions(&self) {
        self.epoch.advance();
    }

    /// Applies one revocation; returns how many live sessions were told to end.
    pub async fn apply(&self, revocation: &Revocation) -> usize {
        if let Some(caches) = &self.caches {
            match revocation {
                Revocation::Client { client_id } => caches.forget_client(client_id).await,
                Revocation::Channel { channel_id } => caches.forget_channel(channel_id).await,
                Revocation::Access {
                    client_id,
                    channel_id,
                } => caches.forget_access(client_id, channel_id).await,
            }
        }
        self.epoch.advance();
        let ending: HashSet<SessionKey> = match revocation {
            Revocation::Client { client_id } => self
                .broker
                .live_keys(|key| key.client_id == *client_id)
                .into_iter()
                .collect(),
            Revocation::Channel { channel_id } => self.drop_subscriptions(None, channel_id),
            Revocation::Access {
                client_id,
                channel_id,
            } => self.drop_subscriptions(Some(client_id), channel_id),
        };
        if ending.is_empty() {
            return 0;
        }
        self.broker
            .kick(|key| ending.contains(key), Kick::Revoked)
            .len()
    }

    /// Removes the subscriptions on `channel_id` (of `client_id` only, if given) from every
    /// session, live or offline; returns the keys of the sessions that had one.
    fn drop_subscriptions(&self, client_id: Option<&str>, channel_id: &str) -> HashSet<SessionKey> {
        let mut affected = HashSet::new();
        for session in self.broker.sessions() {
            if client_id.is_some_and(|c| c != session.key.client_id) {
                continue;
            }
            for (filter, _) in session.subscriptions() {
                if filter_channel(crate::broker::shared::inner(&filter)) == Some(channel_id) {
                    self.broker.unsubscribe(&session, &filter);
                    affected.insert(session.key.clone());
                }
            }
        }
        affected
    }
}

#[async_trait]
impl EventHandler for Reactions {
    async fn handle(&self, event: PlatformEvent) {
        self.seen
            .with_label_values(&[operation_label(&event.operation)])
            .inc();
        let Some(revocation) = &event.revocation else {
            tracing::debug!(operation = %event.operation.escape_debug(), id = %event.id.escape_debug(), "platform event ignored");
            return;
        };
        let sessions = self.apply(revocation).await;
        self.revocations
            .with_label_values(&[operation_label(&event.operation)])
            .inc();
        tracing::info!(operation = %event.operation.escape_debug(), id = %event.id.escape_debug(), ?revocation, sessions,
            "platform revoked rights: cached decisions dropped, affected sessions ended");
    }
}

/// The channel id a canonical SuperMQ filter (`m/<domain>/c/<channel>[/...]`) names.
pub fn filter_channel(filter: &str) -> Option<&str> {
    let mut levels = filter.strip_prefix('/').unwrap_or(filter).split('/');
    match (levels.next(), levels.next(), levels.next(), levels.next()) {
        (Some("m"), Some(_), Some("c"), Some(channel)) if !channel.is_empty() => Some(channel),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::broker::{AttachRequest, BrokerConfig, ConnectionMeta, Expiry, SubOptions};

    #[derive(Default)]
    struct RecordedCaches(Mutex<Vec<String>>);

    #[async_trait]
    impl DecisionCaches for RecordedCaches {
        async fn forget_client(&self, client_id: &str) {
            self.0.lock().unwrap().push(format!("client {client_id}"));
        }
        async fn forget_channel(&self, channel_id: &str) {
            self.0.lock().unwrap().push(format!("channel {channel_id}"));
        }
        async fn forget_access(&self, client_id: &str, channel_id: &str) {
            self.0
                .lock()
                .unwrap()
                .push(format!("access {client_id} {channel_id}"));
        }
    }

    fn key(client: &str, mqtt: &str) -> SessionKey {
        SessionKey {
            client_id: client.into(),
            mqtt_client_id: mqtt.into(),
        }
    }

    fn counters() -> (IntCounterVec, IntCounterVec) {
        let make =
            |name| IntCounterVec::new(prometheus::Opts::new(name, "test"), &["operation"]).unwrap();
        (make("revocations"), make("seen"))
    }

    const CLEAN: AttachRequest = AttachRequest {
        clean_start: true,
        expiry: Expiry::WithConnection,
    };

    #[test]
    fn channel_of_canonical_filters() {
        assert_eq!(filter_channel("m/d1/c/ch1"), Some("ch1"));
        assert_eq!(filter_channel("m/d1/c/ch1/a/#"), Some("ch1"));
        assert_eq!(filter_channel("/m/d1/c/ch1/+"), Some("ch1"));
        assert_eq!(filter_channel("hc/d1"), None);
        assert_eq!(filter_channel("sensors/#"), None);
    }

    #[tokio::test]
    async fn each_revocation_ends_exactly_the_sessions_it_concerns() {
        let broker = Broker::new(BrokerConfig::default());
        let stop = CancellationToken::new();
        let meta = ConnectionMeta::default;
        let a1 = broker.attach(key("a", "a1"), CLEAN, meta(), &stop).await;
        let a2 = broker.attach(key("a", "a2"), CLEAN, meta(), &stop).await;
        let b = broker.attach(key("b", "b1"), CLEAN, meta(), &stop).await;
        let c = broker.attach(key("c", "c1"), CLEAN, meta(), &stop).await;
        let qos = SubOptions::qos(1);
        broker.subscribe(&a1.session, "m/d/c/ch1/#", qos);
        broker.subscribe(&b.session, "m/d/c/ch1/x", qos);
        broker.subscribe(&b.session, "m/d/c/ch2", qos);
        broker.subscribe(&c.session, "m/d/c/ch2/#", qos);

        let caches = Arc::new(RecordedCaches::default());
        let epoch = Arc::new(RightsEpoch::default());
        let (revocations, seen) = counters();
        let reactions = Reactions::new(
            broker.clone(),
            Some(caches.clone()),
            epoch.clone(),
            revocations.clone(),
            seen,
        );

        // Access: only b's subscription on ch1 goes; b ends, c (ch2 only) does not.
        let n = reactions
            .apply(&Revocation::Access {
                client_id: "b".into(),
                channel_id: "ch1".into(),
            })
            .await;
        assert_eq!(n, 1);
        assert_eq!(b.control.kicked(), Some(Kick::Revoked));
        assert_eq!(b.session.subscriptions().len(), 1, "ch2 stays");
        assert!(a1.control.kicked().is_none() && c.control.kicked().is_none());
        assert_eq!(a1.session.subscriptions().len(), 1);

        // Channel: everyone's subscriptions on ch2 go.
        let n = reactions
            .apply(&Revocation::Channel {
                channel_id: "ch2".into(),
            })
            .await;
        assert_eq!(n, 2, "b and c held ch2");
        assert!(c.session.subscriptions().is_empty());
        assert_eq!(c.control.kicked(), Some(Kick::Revoked));
        assert!(a1.control.kicked().is_none());

        // Client: every session of a, subscribed or not.
        let n = reactions
            .apply(&Revocation::Client {
                client_id: "a".into(),
            })
            .await;
        assert_eq!(n, 2);
        assert_eq!(a2.control.kicked(), Some(Kick::Revoked));
        assert_eq!(
            *caches.0.lock().unwrap(),
            ["access b ch1", "channel ch2", "client a"]
        );
        assert_eq!(epoch.current(), 3);
    }

    #[tokio::test]
    async fn ignored_events_are_counted_as_seen_only() {
        let broker = Broker::new(BrokerConfig::default());
        let (revocations, seen) = counters();
        let reactions = Reactions::new(
            broker,
            None,
            Arc::default(),
            revocations.clone(),
            seen.clone(),
        );
        reactions
            .handle(PlatformEvent {
                operation: "client.create".into(),
                id: "x".into(),
                revocation: None,
            })
            .await;
        reactions
            .handle(PlatformEvent {
                operation: "client.update_secret".into(),
                id: "x".into(),
                revocation: Some(Revocation::Client {
                    client_id: "x".into(),
                }),
            })
            .await;
        assert_eq!(seen.with_label_values(&["other"]).get(), 1);
        assert_eq!(seen.with_label_values(&["client.update_secret"]).get(), 1);
        assert_eq!(revocations.with_label_values(&["other"]).get(), 0);
        assert_eq!(
            revocations
                .with_label_values(&["client.update_secret"])
                .get(),
            1
        );
    }
}
