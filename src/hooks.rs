//! The hook layer around every session: authentication on CONNECT, authorization of each
//! PUBLISH topic and SUBSCRIBE filter, and observers told when a session starts and ends
//! (connection events now; metrics and the bus bridge plug in the same way).

use std::net::SocketAddr;

use bytes::Bytes;
use std::sync::Arc;

use crate::auth::{
    self, AuthError, Authenticator, Authorizer, Credentials, Identity, TopicDecision,
};
use crate::broker::Message;
use crate::events::{ConnectionEvent, EventClock, EventDetails, EventType, Outbox};
use crate::session::codec::ProtocolVersion;
use crate::topic::{ChannelTopic, Usage};

/// What every hook knows about a session.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub identity: Identity,
    /// The MQTT client identifier (may differ from the platform client id).
    pub mqtt_client_id: String,
    pub version: ProtocolVersion,
    pub peer: SocketAddr,
}

/// How a session ended; each accepted session ends exactly once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisconnectReason {
    ClientDisconnect,
    ConnectionLost,
    KeepAliveTimeout,
    ProtocolError,
    Takeover,
    ServerShutdown,
    /// An operator ended it (admin API).
    Administrative,
    /// The platform revoked the client's rights.
    Revoked,
    /// The previous run died with the session open; reported by the next start.
    CrashRecovery,
}

impl DisconnectReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DisconnectReason::ClientDisconnect => "client_disconnect",
            DisconnectReason::ConnectionLost => "connection_lost",
            DisconnectReason::KeepAliveTimeout => "keepalive_timeout",
            DisconnectReason::ProtocolError => "protocol_error",
            DisconnectReason::Takeover => "takeover",
            DisconnectReason::ServerShutdown => "server_shutdown",
            DisconnectReason::Administrative => "administrative",
            DisconnectReason::Revoked => "revoked",
            DisconnectReason::CrashRecovery => "crash_recovery",
        }
    }
}

/// Where an authorized PUBLISH goes: the topic it is routed under, and the channel it names when
/// it is a SuperMQ channel topic (`None` for `hc/` and plain topics, which are not bridged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishRoute {
    pub topic: Bytes,
    pub channel: Option<ChannelTopic>,
}

/// Observes sessions. Called on the session's task: must not block.
pub trait SessionObserver: Send + Sync {
    fn on_connected(&self, _session: &SessionInfo) {}
    fn on_disconnected(&self, _session: &SessionInfo, _reason: DisconnectReason) {}
    /// An authorized device PUBLISH (or will), before it enters the broker core.
    fn on_publish(&self, _session: &SessionInfo, _route: &PublishRoute, _message: &Message) {}
}

/// The hooks every session runs through.
#[derive(Clone)]
pub struct Hooks {
    authenticator: Arc<dyn Authenticator>,
    authorizer: Arc<dyn Authorizer>,
    observers: Vec<Arc<dyn SessionObserver>>,
}

impl Hooks {
    pub fn new(authenticator: Arc<dyn Authenticator>, authorizer: Arc<dyn Authorizer>) -> Self {
        Hooks {
            authenticator,
            authorizer,
            observers: Vec::new(),
        }
    }

    pub fn with_observer(mut self, observer: Arc<dyn SessionObserver>) -> Self {
        self.observers.push(observer);
        self
    }

    pub async fn authenticate(&self, credentials: Credentials<'_>) -> Result<Identity, AuthError> {
        self.authenticator.authenticate(credentials).await
    }

    pub async fn authorize(&self, who: &Identity, topic: &str, usage: Usage) -> TopicDecision {
        auth::authorize_topic(self.authorizer.as_ref(), who, topic, usage).await
    }

    pub fn connected(&self, session: &SessionInfo) {
        for o in &self.observers {
            o.on_connected(session);
        }
    }

    pub fn published(&self, session: &SessionInfo, route: &PublishRoute, message: &Message) {
        for o in &self.observers {
            o.on_publish(session, route, message);
        }
    }

    pub fn disconnected(&self, session: &SessionInfo, reason: DisconnectReason) {
        for o in &self.observers {
            o.on_disconnected(session, reason);
        }
    }
}

/// Emits `connect`/`disconnect` events into the outbox.
pub struct ConnectionEvents {
    outbox: Outbox,
    instance: String,
    clock: EventClock,
    details: bool,
}

impl ConnectionEvents {
    pub fn new(outbox: Outbox, instance: String) -> Self {
        ConnectionEvents {
            outbox,
            instance,
            clock: EventClock::default(),
            details: false,
        }
    }

    /// Adds the optional detail fields (`SMQ_MQTT_ADAPTER_EVENT_DETAILS`).
    pub fn with_details(mut self, details: bool) -> Self {
        self.details = details;
        self
    }

    fn emit(&self, session: &SessionInfo, event_type: EventType, details: EventDetails) {
        self.outbox.emit(ConnectionEvent {
            client_id: session.identity.client_id.clone(),
            event_type,
            instance: self.instance.clone(),
            occurred_at: self.clock.now(),
            details: if self.details {
                details
            } else {
                EventDetails::default()
            },
        });
    }
}

impl SessionObserver for ConnectionEvents {
    fn on_connected(&self, session: &SessionInfo) {
        let details = EventDetails {
            remote_addr: Some(session.peer.to_string()),
            protocol_version: Some(session.version.as_str().to_owned()),
            mqtt_client_id: Some(session.mqtt_client_id.clone()),
            ..EventDetails::default()
        };
        self.emit(session, EventType::Connect, details);
    }

    fn on_disconnected(&self, session: &SessionInfo, reason: DisconnectReason) {
        let details = EventDetails {
            reason: Some(reason.as_str().to_owned()),
            ..EventDetails::default()
        };
        self.emit(session, EventType::Disconnect, details);
    }
}
