//! Per-connection limits applied by the session: the concurrent connection cap (reserved at
//! CONNECT, released when the session ends), the QoS 1/2 PUBLISHes a device may have unacknowledged
//! (MQTT 5 receive maximum), the per-session publish rate (a token bucket), and the
//! client-certificate rule for TLS connections, the brute-force bans of peer IPs, and the
//! per-session bounds on subscriptions and topic size.

use std::num::NonZeroU32;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use governor::clock::DefaultClock;
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use rumqttd::protocol::{DisconnectReasonCode, Login};

use crate::auth::ban::AuthBans;
use crate::metrics::Metrics;
use crate::topic::{TopicBounds, TopicError};

/// What the transport learned about a connection before its CONNECT.
#[derive(Debug, Clone, Default)]
pub struct ConnectionInfo {
    /// The listener the socket came in on (`tcp`, `tls`, `ws`, `wss`).
    pub listener: &'static str,
    /// The common name of a verified client certificate (mTLS).
    pub cert_common_name: Option<String>,
    /// Whether a verified client certificate was presented.
    pub client_certificate: bool,
    /// When the CONNECT must be complete: the listener sets it at accept, so the TLS and
    /// WebSocket handshakes count against the same connect timeout. `None`: the connect timeout
    /// from the session's start.
    pub connect_deadline: Option<tokio::time::Instant>,
    /// The transport's bound on bytes read before the CONNECT is accepted (WebSocket, whose
    /// messages are buffered whole below the session); lifted once authenticated.
    pub connect_budget: Option<crate::listener::budget::ConnectBudget>,
}

/// The limits every session shares.
#[derive(Debug)]
pub struct Limits {
    max_connections: usize,
    max_inflight: u16,
    open: Arc<AtomicUsize>,
    publish_rate: Option<NonZeroU32>,
    cert_cn_as_username: bool,
    auth_bans: Option<Arc<AuthBans>>,
    session: SessionBounds,
    /// One clock for every session's token bucket: creating one reads the CPU's timer
    /// capabilities (CPUID, slow in a VM), which cost a fifth of a connect storm's CPU when each
    /// session made its own.
    clock: DefaultClock,
}

/// What one session may hold and send.
#[derive(Debug, Clone, Copy)]
pub struct SessionBounds {
    /// Subscriptions a session holds at most.
    pub max_subscriptions: usize,
    /// Length and levels of a PUBLISH topic or SUBSCRIBE filter.
    pub topic: TopicBounds,
}

impl SessionBounds {
    /// No bounds beyond MQTT's own.
    pub const UNLIMITED: SessionBounds = SessionBounds {
        max_subscriptions: usize::MAX,
        topic: TopicBounds::UNLIMITED,
    };
}

impl Limits {
    /// `publish_rate` is PUBLISH packets per second per session (burst of the same size);
    /// `None` is unlimited.
    pub fn new(
        max_connections: usize,
        max_inflight: u16,
        publish_rate: Option<NonZeroU32>,
        cert_cn_as_username: bool,
    ) -> Self {
        Limits {
            max_connections,
            max_inflight,
            open: Arc::default(),
            publish_rate,
            cert_cn_as_username,
            auth_bans: None,
            session: SessionBounds::UNLIMITED,
            clock: DefaultClock::default(),
        }
    }

    /// Bans peer IPs after too many failed CONNECTs (see [`AuthBans`]).
    pub fn with_auth_bans(mut self, bans: AuthBans) -> Self {
        self.auth_bans = Some(Arc::new(bans));
        self
    }

    /// Bounds every session's subscriptions and topics.
    pub fn with_session_bounds(mut self, bounds: SessionBounds) -> Self {
        self.session = bounds;
        self
    }

    /// The brute-force bans, when enabled.
    pub fn auth_bans(&self) -> Option<&AuthBans> {
        self.auth_bans.as_deref()
    }

    /// What one session may hold and send.
    pub fn session(&self) -> &SessionBounds {
        &self.session
    }

    /// Checks a PUBLISH topic, will topic or SUBSCRIBE filter against the topic bounds; a
    /// refusal is counted in `mqtt_adapter_limit_hits_total`.
    pub fn check_topic(&self, topic: &[u8], metrics: &Metrics) -> Result<(), TopicError> {
        self.session.topic.check(topic).inspect_err(|e| {
            if let Some(limit) = TopicBounds::limit_name(e) {
                metrics.limit_hit(limit);
            }
        })
    }

    /// Checks the levels of a canonical topic or filter (`%2F` decoded, a subtopic's `.` read as
    /// `/`), which may have more than the form sent; a refusal is counted as `topic_levels`.
    pub fn check_levels(&self, canonical: &[u8], metrics: &Metrics) -> Result<(), TopicError> {
        self.session.topic.check_levels(canonical).inspect_err(|e| {
            if let Some(limit) = TopicBounds::limit_name(e) {
                metrics.limit_hit(limit);
            }
        })
    }

    /// No limits: for embedding in tests and tools.
    pub fn unlimited() -> Self {
        Limits::new(usize::MAX, u16::MAX, None, false)
    }

    /// QoS 1/2 PUBLISHes a device may send before their acknowledgements; advertised to MQTT 5
    /// devices as the receive maximum.
    pub fn max_inflight(&self) -> u16 {
        self.max_inflight
    }

    /// Reserves one of the concurrent connections, or `None` when all are taken.
    pub fn connection_slot(&self) -> Option<ConnectionSlot> {
        let previous = self.open.fetch_add(1, Ordering::AcqRel);
        if previous >= self.max_connections {
            self.open.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(ConnectionSlot {
            open: self.open.clone(),
        })
    }

    /// A fresh token bucket for one session, if publishes are rate limited.
    pub fn publish_rate(&self) -> Option<PublishRate> {
        self.publish_rate.map(|rate| {
            PublishRate(RateLimiter::direct_with_clock(
                Quota::per_second(rate),
                &self.clock,
            ))
        })
    }

    /// With `SMQ_MQTT_ADAPTER_CERT_CN_AS_USERNAME`, a connection that presented a client
    /// certificate must use its common name as the MQTT username.
    pub fn check_certificate(
        &self,
        conn: &ConnectionInfo,
        login: Option<&Login>,
    ) -> Result<(), String> {
        if !self.cert_cn_as_username || !conn.client_certificate {
            return Ok(());
        }
        let username = login.map(|l| l.username.as_str()).unwrap_or("");
        match conn.cert_common_name.as_deref() {
            Some(cn) if cn == username => Ok(()),
            Some(cn) => Err(format!(
                "username {username:?} differs from the client certificate's CN {cn:?}"
            )),
            None => Err("the client certificate has no common name".into()),
        }
    }
}

/// One reserved concurrent connection; released on drop.
#[derive(Debug)]
pub struct ConnectionSlot {
    open: Arc<AtomicUsize>,
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A session's publish token bucket.
pub struct PublishRate(DefaultDirectRateLimiter);

impl PublishRate {
    /// Takes a token; `false` when the session is over its rate.
    pub fn allow(&self) -> bool {
        self.0.check().is_ok()
    }
}

/// The metric label for a session closed with `code`.
pub fn packet_error_kind(code: Option<DisconnectReasonCode>) -> &'static str {
    match code {
        Some(DisconnectReasonCode::PacketTooLarge) => "too_large",
        Some(DisconnectReasonCode::MalformedPacket) => "malformed",
        Some(DisconnectReasonCode::ProtocolError) => "protocol",
        Some(DisconnectReasonCode::TopicAliasInvalid) => "topic_alias",
        Some(DisconnectReasonCode::NotAuthorized) => "not_authorized",
        Some(DisconnectReasonCode::MessageRateTooHigh) => "publish_rate",
        Some(DisconnectReasonCode::ReceiveMaximumExceeded) => "receive_maximum",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_slots_are_capped_and_released() {
        let limits = Limits::new(2, 10, None, false);
        let a = limits.connection_slot().expect("first slot");
        let _b = limits.connection_slot().expect("second slot");
        assert!(limits.connection_slot().is_none());
        drop(a);
        assert!(limits.connection_slot().is_some());
    }

    #[test]
    fn publish_bucket_runs_dry() {
        let limits = Limits::new(1, 10, NonZeroU32::new(3), false);
        let rate = limits.publish_rate().expect("limited");
        assert!((0..3).all(|_| rate.allow()));
        assert!(!rate.allow());
    }

    #[test]
    fn certificate_rule_compares_cn_and_username() {
        let limits = Limits::new(1, 10, None, true);
        let login = |u: &str| Login {
            username: u.into(),
            password: "p".into(),
        };
        let conn = ConnectionInfo {
            listener: "tls",
            cert_common_name: Some("dev1".into()),
            client_certificate: true,
            connect_deadline: None,
            connect_budget: None,
        };
        assert!(limits
            .check_certificate(&conn, Some(&login("dev1")))
            .is_ok());
        assert!(limits
            .check_certificate(&conn, Some(&login("dev2")))
            .is_err());
        assert!(limits
            .check_certificate(&ConnectionInfo::default(), Some(&login("x")))
            .is_ok());
    }
}
