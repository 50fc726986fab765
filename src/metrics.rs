//! The adapter's Prometheus metrics (SPEC §7): one registry, the session lifecycle counted
//! through a `SessionObserver`, authentication timed by an `Authenticator` layer, and the event
//! log (or outbox) and the bus bridge read at scrape time. Per-packet counters are plain atomic
//! increments.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};

use crate::auth::{AuthError, Authenticator, Credentials, Identity};
use crate::bridge::BridgeMetrics;
use crate::broker::{Broker, BrokerGauges, BrokerStats};
use crate::events::OutboxStats;
use crate::hooks::{DisconnectReason, SessionInfo, SessionObserver};
use crate::state::StateStore;

/// Every metric the adapter exports.
pub struct Metrics {
    registry: Registry,
    /// Accepted sessions open now.
    pub connections: IntGauge,
    /// CONNECT outcomes: `accepted`, or why it was refused.
    pub connects: IntCounterVec,
    pub disconnects: IntCounter,
    pub disconnect_reasons: IntCounterVec,
    /// Device PUBLISH packets received.
    pub messages_in: IntCounter,
    /// PUBLISH packets written to devices.
    pub messages_out: IntCounter,
    pub auth_duration: Histogram,
    /// Open sockets per listener (`tcp`, `tls`, `ws`, `wss`), before and after CONNECT.
    pub listener_connections: IntGaugeVec,
    /// Failed TLS/WebSocket handshakes per listener.
    pub handshake_errors: IntCounterVec,
    /// Sessions closed for a bad packet, by kind (`too_large`, `malformed`, `protocol`, …).
    pub packet_errors: IntCounterVec,
    /// Times a limit refused or closed a connection, by limit.
    pub limit_hits: IntCounterVec,
    /// Platform events that took rights away, by operation.
    pub revocations: IntCounterVec,
    /// Platform events read from `supermq.clients`, by operation (acted on or not).
    pub platform_events: IntCounterVec,
    /// Deliveries a subscriber did not get, by reason.
    messages_dropped: IntCounterVec,
    /// Retained PUBLISHes not retained because the store was full.
    retained_refused: IntCounter,
    broker: Mutex<Option<Arc<BrokerStats>>>,
    /// The core whose state the gauges below report (weak: the metrics never keep it alive).
    broker_state: Mutex<std::sync::Weak<Broker>>,
    /// Sessions by state (`online`, `offline`).
    sessions: IntGaugeVec,
    subscriptions: IntGauge,
    retained_messages: IntGauge,
    retained_bytes: IntGauge,
    queued_bytes: IntGauge,
    /// Commits of the state store that failed (their changes are in memory only).
    state_write_errors: IntCounter,
    state: Mutex<Option<Arc<dyn StateStore>>>,
    events_pending: IntGauge,
    events_published: IntCounterVec,
    events_dropped: IntCounter,
    events_log_bytes: IntGauge,
    events_oldest_undelivered: Gauge,
    outbox: Mutex<Option<(&'static str, Arc<OutboxStats>)>>,
    bridge_messages: IntCounterVec,
    bridge_log_bytes: IntGauge,
    bridge_pending: IntGauge,
    bridge_oldest_undelivered: Gauge,
    bridge_pushback: IntGauge,
    bridge_pushbacks: IntCounter,
    bridge_subjects: IntGauge,
    bridge: Mutex<Option<Arc<BridgeMetrics>>>,
}

type BridgeCounter = (&'static str, &'static str, fn(&BridgeMetrics) -> u64);

/// The bridge's counters as exported: (direction, result, reading). One line per counter, so a
/// counter that goes away is one line less.
const BRIDGE_COUNTERS: [BridgeCounter; 5] = [
    ("out", "published", |m| m.out_published.load(Relaxed)),
    ("out", "failed", |m| m.out_failed.load(Relaxed)),
    ("out", "duplicate", |m| m.out_duplicate.load(Relaxed)),
    ("in", "delivered", |m| m.in_delivered.load(Relaxed)),
    ("in", "invalid", |m| m.in_invalid.load(Relaxed)),
];

/// Seconds since a Unix-ns time; 0 for none.
fn age_seconds(since_ns: i64) -> f64 {
    if since_ns > 0 {
        (crate::clock::unix_nanos() - since_ns).max(0) as f64 / 1e9
    } else {
        0.0
    }
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let registry = Registry::new();
        // Names and labels are constants: registration cannot fail except on a programming error.
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone()))
                .expect("metric names are unique constants");
            c
        }
        let counter = |name: &str, help: &str| {
            reg(
                &registry,
                IntCounter::new(name, help).expect("valid metric name"),
            )
        };
        let counter_vec = |name: &str, help: &str, label: &str| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric name"),
            )
        };
        let gauge = |name: &str, help: &str| {
            reg(
                &registry,
                IntGauge::new(name, help).expect("valid metric name"),
            )
        };
        let messages = counter_vec(
            "mqtt_adapter_messages_total",
            "MQTT PUBLISH packets: in = received from devices, out = written to devices",
            "direction",
        );
        Arc::new(Metrics {
            connections: gauge(
                "mqtt_adapter_connections",
                "Accepted MQTT sessions open now",
            ),
            connects: counter_vec(
                "mqtt_adapter_connects_total",
                "CONNECT packets by outcome",
                "result",
            ),
            disconnects: counter(
                "mqtt_adapter_disconnects_total",
                "Accepted sessions that ended",
            ),
            disconnect_reasons: counter_vec(
                "mqtt_adapter_disconnect_reasons_total",
                "Ended sessions by reason",
                "reason",
            ),
            messages_in: messages.with_label_values(&["in"]),
            messages_out: messages.with_label_values(&["out"]),
            auth_duration: reg(
                &registry,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "mqtt_adapter_auth_duration_seconds",
                        "Time to authenticate a CONNECT",
                    )
                    .buckets(vec![
                        0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                        5.0,
                    ]),
                )
                .expect("valid metric name"),
            ),
            listener_connections: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "mqtt_adapter_listener_connections",
                        "Open sockets per listener",
                    ),
                    &["listener"],
                )
                .expect("valid metric name"),
            ),
            handshake_errors: counter_vec(
                "mqtt_adapter_handshake_errors_total",
                "Failed or timed-out TLS/WebSocket handshakes",
                "listener",
            ),
            packet_errors: counter_vec(
                "mqtt_adapter_packet_errors_total",
                "Sessions closed for a bad packet, by kind",
                "kind",
            ),
            revocations: counter_vec(
                "mqtt_adapter_revocations_total",
                "Platform events (or SIGHUP reloads) that revoked rights, by operation",
                "operation",
            ),
            platform_events: counter_vec(
                "mqtt_adapter_platform_events_total",
                "Events read from supermq.clients, by operation",
                "operation",
            ),
            limit_hits: counter_vec(
                "mqtt_adapter_limit_hits_total",
                "Connections refused or closed by a limit",
                "limit",
            ),
            messages_dropped: counter_vec(
                "mqtt_adapter_messages_dropped_total",
                "Deliveries a subscriber did not get, by reason (queue_full, session_ended, ...)",
                "reason",
            ),
            retained_refused: counter(
                "mqtt_adapter_retained_refused_total",
                "Retained PUBLISHes not retained because the retained store was full (MQTT 5 QoS 1/2: refused with 0x97; otherwise delivered)",
            ),
            broker: Mutex::new(None),
            broker_state: Mutex::new(std::sync::Weak::new()),
            sessions: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "mqtt_adapter_sessions",
                        "Broker sessions: online (a connection attached), offline (persistent, kept without one)",
                    ),
                    &["state"],
                )
                .expect("valid metric name"),
            ),
            subscriptions: gauge(
                "mqtt_adapter_subscriptions",
                "Subscriptions held by all sessions, online and offline",
            ),
            retained_messages: gauge(
                "mqtt_adapter_retained_messages",
                "Retained messages kept",
            ),
            retained_bytes: gauge(
                "mqtt_adapter_retained_bytes",
                "Bytes of retained messages kept (topic, payload, MQTT 5 properties)",
            ),
            queued_bytes: gauge(
                "mqtt_adapter_queued_bytes",
                "Bytes queued for all sessions, online and offline",
            ),
            state_write_errors: counter(
                "mqtt_adapter_state_write_errors_total",
                "Writes of the state store (SMQ_MQTT_ADAPTER_STATE) that failed: those retained changes are kept in memory only",
            ),
            state: Mutex::new(None),
            events_pending: gauge(
                "mqtt_adapter_events_pending",
                "Connection events accepted but not yet acknowledged by the event store",
            ),
            events_published: counter_vec(
                "mqtt_adapter_events_published_total",
                "Connection events acknowledged by the event store",
                "store",
            ),
            events_dropped: counter(
                "mqtt_adapter_events_dropped_total",
                "Connection events lost because the event buffer was full",
            ),
            events_log_bytes: gauge(
                "mqtt_adapter_events_log_bytes",
                "Bytes of the durable event log on disk",
            ),
            events_oldest_undelivered: reg(
                &registry,
                Gauge::new(
                    "mqtt_adapter_events_oldest_undelivered_seconds",
                    "Age of the oldest connection event handed to the store and not yet acknowledged (0: none)",
                )
                .expect("valid metric name"),
            ),
            outbox: Mutex::new(None),
            bridge_messages: reg(
                &registry,
                IntCounterVec::new(
                    Opts::new(
                        "mqtt_adapter_bridge_messages_total",
                        "Messages through the NATS bridge: out = device to bus, in = bus to devices",
                    ),
                    &["direction", "result"],
                )
                .expect("valid metric name"),
            ),
            bridge_log_bytes: gauge(
                "mqtt_adapter_bridge_log_bytes",
                "Bytes of the bridge's message log on disk (device messages kept for the bus)",
            ),
            bridge_pending: gauge(
                "mqtt_adapter_bridge_pending",
                "Device messages kept in the message log and not yet acknowledged by the bus",
            ),
            bridge_oldest_undelivered: reg(
                &registry,
                Gauge::new(
                    "mqtt_adapter_bridge_oldest_undelivered_seconds",
                    "Age of the oldest device message in the log not yet acknowledged by the bus (0: none)",
                )
                .expect("valid metric name"),
            ),
            bridge_pushback: gauge(
                "mqtt_adapter_bridge_pushback",
                "1 while the message log is full and publishing sessions are pushed back",
            ),
            bridge_pushbacks: counter(
                "mqtt_adapter_bridge_pushback_episodes_total",
                "Times the message log filled up and pushed publishing sessions back",
            ),
            bridge_subjects: gauge(
                "mqtt_adapter_bridge_subscriptions",
                "NATS subjects subscribed for the local subscriptions",
            ),
            bridge: Mutex::new(None),
            registry,
        })
    }

    /// Reports the outbox's counters (read at every scrape) under the store's name.
    pub fn watch_outbox(&self, store: &'static str, stats: Arc<OutboxStats>) {
        *self.outbox.lock().unwrap_or_else(|p| p.into_inner()) = Some((store, stats));
    }

    /// Reports the broker core's counters (read at every scrape).
    pub fn watch_broker_stats(&self, stats: Arc<BrokerStats>) {
        *self.broker.lock().unwrap_or_else(|p| p.into_inner()) = Some(stats);
    }

    /// Reports the broker core's counters and state (sessions, subscriptions, retained and
    /// queued bytes), read at every scrape.
    pub fn watch_broker(&self, broker: &Arc<Broker>) {
        self.watch_broker_stats(broker.stats());
        *self.broker_state.lock().unwrap_or_else(|p| p.into_inner()) = Arc::downgrade(broker);
    }

    fn set_broker_gauges(&self, g: BrokerGauges) {
        let set =
            |gauge: &IntGauge, value: usize| gauge.set(i64::try_from(value).unwrap_or(i64::MAX));
        set(
            &self.sessions.with_label_values(&["online"]),
            g.sessions_online,
        );
        set(
            &self.sessions.with_label_values(&["offline"]),
            g.sessions_offline,
        );
        set(&self.subscriptions, g.subscriptions);
        set(&self.retained_messages, g.retained_messages);
        set(&self.retained_bytes, g.retained_bytes);
        set(&self.queued_bytes, g.queued_bytes);
    }

    /// Reports the state store's failed writes (read at every scrape).
    pub fn watch_state(&self, state: Arc<dyn StateStore>) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = Some(state);
    }

    /// Reports the bus bridge's counters (read at every scrape).
    pub fn watch_bridge(&self, bridge: Arc<BridgeMetrics>) {
        *self.bridge.lock().unwrap_or_else(|p| p.into_inner()) = Some(bridge);
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let broker = self
            .broker_state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .upgrade();
        if let Some(broker) = broker {
            self.set_broker_gauges(broker.gauges());
        }
        {
            let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(state) = state.as_ref() {
                let failed = state.failed_writes();
                let counted = self.state_write_errors.get();
                self.state_write_errors
                    .inc_by(failed.saturating_sub(counted));
            }
        }
        {
            // Counters follow the core's atomics; the lock keeps two scrapes from adding twice.
            let broker = self.broker.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(stats) = broker.as_ref() {
                let follow = |counter: &IntCounter, total: u64| {
                    counter.inc_by(total.saturating_sub(counter.get()));
                };
                for (reason, total) in [
                    ("queue_full", &stats.dropped_queue_full),
                    ("session_ended", &stats.dropped_session_ended),
                    ("expired", &stats.dropped_expired),
                    ("too_large", &stats.dropped_too_large),
                ] {
                    follow(
                        &self.messages_dropped.with_label_values(&[reason]),
                        total.load(Relaxed),
                    );
                }
                let retained_refused = stats.retained_refused.load(Relaxed);
                follow(&self.retained_refused, retained_refused);
                follow(
                    &self.limit_hits.with_label_values(&["retained"]),
                    retained_refused,
                );
                follow(
                    &self.limit_hits.with_label_values(&["offline_sessions"]),
                    stats.sessions_evicted.load(Relaxed),
                );
            }
        }
        {
            // The lock also keeps two scrapes from adding the same outbox delta twice.
            let outbox = self.outbox.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((store, stats)) = outbox.as_ref() {
                self.events_pending
                    .set(i64::try_from(stats.pending.load(Relaxed)).unwrap_or(i64::MAX));
                let published = self.events_published.with_label_values(&[store]);
                let total = stats.published.load(Relaxed);
                published.inc_by(total.saturating_sub(published.get()));
                let dropped = stats.dropped.load(Relaxed);
                self.events_dropped
                    .inc_by(dropped.saturating_sub(self.events_dropped.get()));
                self.events_log_bytes
                    .set(i64::try_from(stats.log_bytes.load(Relaxed)).unwrap_or(i64::MAX));
                self.events_oldest_undelivered
                    .set(age_seconds(stats.oldest_undelivered_ns.load(Relaxed)));
            }
        }
        {
            let bridge = self.bridge.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(bridge) = bridge.as_ref() {
                for (direction, result, read) in BRIDGE_COUNTERS {
                    let counter = self.bridge_messages.with_label_values(&[direction, result]);
                    counter.inc_by(read(bridge).saturating_sub(counter.get()));
                }
                let log = &bridge.log;
                let gauge = |g: &IntGauge, v: u64| g.set(i64::try_from(v).unwrap_or(i64::MAX));
                gauge(&self.bridge_log_bytes, log.log_bytes.load(Relaxed));
                gauge(&self.bridge_pending, log.pending.load(Relaxed));
                gauge(&self.bridge_subjects, bridge.in_subjects.load(Relaxed));
                gauge(&self.bridge_pushback, u64::from(log.full.load(Relaxed)));
                let episodes = log.pushback_episodes.load(Relaxed);
                self.bridge_pushbacks
                    .inc_by(episodes.saturating_sub(self.bridge_pushbacks.get()));
                self.bridge_oldest_undelivered
                    .set(age_seconds(log.oldest_undelivered_ns.load(Relaxed)));
            }
        }
        let mut out = Vec::new();
        // Encoding into a Vec only fails on a malformed family, which the registry rules out.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    /// Counts a connection, packet or subscription refused by the limit `limit`.
    pub fn limit_hit(&self, limit: &str) {
        self.limit_hits.with_label_values(&[limit]).inc();
    }

    /// Counts a CONNECT refused before authentication (e.g. by a limit).
    pub fn refused(&self, result: &str) {
        self.connects.with_label_values(&[result]).inc();
    }
}

impl SessionObserver for Metrics {
    fn on_connected(&self, _session: &SessionInfo) {
        self.connections.inc();
        self.connects.with_label_values(&["accepted"]).inc();
    }

    fn on_disconnected(&self, _session: &SessionInfo, reason: DisconnectReason) {
        self.connections.dec();
        self.disconnects.inc();
        self.disconnect_reasons
            .with_label_values(&[reason.as_str()])
            .inc();
    }
}

/// Times every authentication and counts its refusals; wraps the configured authenticator.
pub struct TimedAuthenticator {
    inner: Arc<dyn Authenticator>,
    metrics: Arc<Metrics>,
}

impl TimedAuthenticator {
    pub fn new(inner: Arc<dyn Authenticator>, metrics: Arc<Metrics>) -> Self {
        TimedAuthenticator { inner, metrics }
    }
}

#[async_trait]
impl Authenticator for TimedAuthenticator {
    async fn authenticate(&self, credentials: Credentials<'_>) -> Result<Identity, AuthError> {
        let started = Instant::now();
        let result = self.inner.authenticate(credentials).await;
        self.metrics
            .auth_duration
            .observe(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            self.metrics.refused(match e {
                AuthError::BadCredentials => "bad_credentials",
                AuthError::MissingCredentials => "missing_credentials",
                AuthError::Unavailable(_) => "auth_unavailable",
            });
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_the_spec_names() {
        let metrics = Metrics::new();
        metrics.messages_in.inc();
        metrics.connects.with_label_values(&["accepted"]).inc();
        let stats = Arc::new(OutboxStats::default());
        stats
            .published
            .store(3, std::sync::atomic::Ordering::Relaxed);
        metrics.watch_outbox("stdout", stats);
        let broker = Arc::new(BrokerStats::default());
        broker
            .dropped_queue_full
            .store(7, std::sync::atomic::Ordering::Relaxed);
        metrics.watch_broker_stats(broker);
        let text = metrics.render();
        for line in [
            "mqtt_adapter_messages_dropped_total{reason=\"queue_full\"} 7",
            "mqtt_adapter_messages_dropped_total{reason=\"session_ended\"} 0",
            "mqtt_adapter_connections 0",
            "mqtt_adapter_connects_total{result=\"accepted\"} 1",
            "mqtt_adapter_disconnects_total 0",
            "mqtt_adapter_messages_total{direction=\"in\"} 1",
            "mqtt_adapter_messages_total{direction=\"out\"} 0",
            "mqtt_adapter_auth_duration_seconds_count 0",
            "mqtt_adapter_events_pending 0",
            "mqtt_adapter_events_published_total{store=\"stdout\"} 3",
            "mqtt_adapter_events_dropped_total 0",
            "mqtt_adapter_events_log_bytes 0",
            "mqtt_adapter_events_oldest_undelivered_seconds 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
        // A second scrape does not add the outbox delta again.
        assert!(metrics
            .render()
            .contains("mqtt_adapter_events_published_total{store=\"stdout\"} 3"));
    }

    #[test]
    fn bridge_counters_are_read_at_scrape_time() {
        let metrics = Metrics::new();
        let bridge = Arc::new(BridgeMetrics::default());
        metrics.watch_bridge(bridge.clone());
        bridge.out_published.store(5, Relaxed);
        bridge.in_invalid.store(2, Relaxed);
        let text = metrics.render();
        for line in [
            "mqtt_adapter_bridge_messages_total{direction=\"out\",result=\"published\"} 5",
            "mqtt_adapter_bridge_messages_total{direction=\"out\",result=\"failed\"} 0",
            "mqtt_adapter_bridge_messages_total{direction=\"in\",result=\"invalid\"} 2",
            "mqtt_adapter_bridge_pending 0",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing in\n{text}"
            );
        }
        bridge.out_published.store(7, Relaxed);
        assert!(metrics.render().contains(
            "mqtt_adapter_bridge_messages_total{direction=\"out\",result=\"published\"} 7"
        ));
    }
}
