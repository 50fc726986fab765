//! The hook layer around every session: authentication on CONNECT, authorization of each
//! PUBLISH topic and SUBSCRIBE filter, the connection events (whose `connect` the session
//! awaits before CONNACK, so it is in the durable event log first), and observers told when a
//! session starts and ends (metrics and the bus bridge).

use std::net::SocketAddr;

use bytes::Bytes;
use std::sync::Arc;

use crate::auth::{
    self, AuthError, Authenticator, Authorizer, Credentials, Identity, TopicDecision,
};
use crate::bridge::BusPublisher;
use crate::broker::Message;
use crate::events::{
    ConnectionEvent, EventCommit, EventDetails, EventLayout, EventQueue, EventType, Subscription,
};
use crate::log::LogTicket;
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
}

/// The hooks every session runs through.
#[derive(Clone)]
pub struct Hooks {
    authenticator: Arc<dyn Authenticator>,
    authorizer: Arc<dyn Authorizer>,
    events: Option<Arc<ConnectionEvents>>,
    observers: Vec<Arc<dyn SessionObserver>>,
    bus: Option<Arc<BusPublisher>>,
}

impl Hooks {
    pub fn new(authenticator: Arc<dyn Authenticator>, authorizer: Arc<dyn Authorizer>) -> Self {
        Hooks {
            authenticator,
            authorizer,
            events: None,
            observers: Vec::new(),
            bus: None,
        }
    }

    /// Emits the connection events of every session.
    pub fn with_events(mut self, events: Arc<ConnectionEvents>) -> Self {
        self.events = Some(events);
        self
    }

    /// Bridges device messages on channel topics to the bus, through its message log.
    pub fn with_bus(mut self, bus: Arc<BusPublisher>) -> Self {
        self.bus = Some(bus);
        self
    }

    /// The bus bridge's publisher, when the bridge is on.
    pub fn bus(&self) -> Option<&BusPublisher> {
        self.bus.as_deref()
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

    /// The stored form of a filter being unsubscribed (routes resolved to ids).
    pub async fn canonical_filter(&self, filter: &str) -> String {
        auth::canonical_filter(self.authorizer.as_ref(), filter).await
    }

    /// The session is accepted: emits `connect` and tells the observers. Await the result
    /// before writing CONNACK: it resolves once the `connect` is in the event log.
    pub fn connected(&self, session: &SessionInfo) -> EventCommit {
        let commit = self
            .events
            .as_ref()
            .map_or_else(EventCommit::done, |e| e.connected(session));
        for o in &self.observers {
            o.on_connected(session);
        }
        commit
    }

    /// SUBACK granted these SuperMQ channel filters (resolved ids): emits one `subscribe` event
    /// each in the `supermq` layout.
    pub fn subscribed(&self, session: &SessionInfo, channels: &[ChannelTopic]) {
        if let Some(events) = &self.events {
            for channel in channels {
                events.subscribed(session, channel);
            }
        }
    }

    /// An authorized device PUBLISH (or will): a message on a channel topic is appended to the
    /// bus bridge's message log. The ticket (`None`: not bridged) resolves once it is kept; the
    /// device's acknowledgement waits for it.
    pub fn published(
        &self,
        session: &SessionInfo,
        route: &PublishRoute,
        message: &Message,
    ) -> Option<LogTicket> {
        self.bus.as_ref()?.append(session, route, message)
    }

    /// The session ended: emits `disconnect` (handed to the event log at once, never waiting)
    /// and tells the observers. Awaiting the result (optional) waits until the `disconnect`
    /// is in the log.
    pub fn disconnected(&self, session: &SessionInfo, reason: DisconnectReason) -> EventCommit {
        let commit = self
            .events
            .as_ref()
            .map_or_else(EventCommit::done, |e| e.disconnected(session, reason));
        for o in &self.observers {
            o.on_disconnected(session, reason);
        }
        commit
    }
}

/// Emits `connect`/`disconnect` events into the event queue (the durable log, or the stdout
/// outbox).
pub struct ConnectionEvents {
    queue: EventQueue,
    instance: String,
    details: bool,
    layout: EventLayout,
}

impl ConnectionEvents {
    pub fn new(queue: EventQueue, instance: String) -> Self {
        ConnectionEvents {
            queue,
            instance,
            details: false,
            layout: EventLayout::Seed,
        }
    }

    /// The layout the sinks write (`SMQ_MQTT_ADAPTER_EVENT_LAYOUT`): `supermq` adds the MQTT
    /// client identifier to every event and emits `subscribe` events.
    pub fn with_layout(mut self, layout: EventLayout) -> Self {
        self.layout = layout;
        self
    }

    /// Adds the optional detail fields (`SMQ_MQTT_ADAPTER_EVENT_DETAILS`).
    pub fn with_details(mut self, details: bool) -> Self {
        self.details = details;
        self
    }

    /// The key a session's `connect` and `disconnect` share in the log: unique among open
    /// sessions (a client identifier is held by one session at a time, and the peer address
    /// tells apart even a registry bug).
    pub fn session_key(session: &SessionInfo) -> String {
        format!("{} {}", session.peer, session.mqtt_client_id)
    }

    /// The MQTT client identifier inside a [`ConnectionEvents::session_key`] (a socket address
    /// holds no space).
    pub fn mqtt_client_id_of(session_key: &str) -> Option<&str> {
        session_key.split_once(' ').map(|(_, id)| id)
    }

    /// Queues an event; `details` are the opt-in ones, `always` what the event needs in every
    /// case (subscribe fields).
    fn emit(
        &self,
        session: &SessionInfo,
        event_type: EventType,
        details: EventDetails,
        always: EventDetails,
    ) -> EventCommit {
        let mut details = if self.details { details } else { always };
        if self.layout == EventLayout::Supermq {
            details.mqtt_client_id = Some(session.mqtt_client_id.clone());
        }
        self.queue.push(
            Self::session_key(session),
            ConnectionEvent {
                client_id: session.identity.client_id.clone(),
                event_type,
                instance: self.instance.clone(),
                // Stamped by the queue, in queue order.
                occurred_at: 0,
                details,
            },
        )
    }

    pub fn connected(&self, session: &SessionInfo) -> EventCommit {
        let details = EventDetails {
            remote_addr: Some(session.peer.to_string()),
            protocol_version: Some(session.version.as_str().to_owned()),
            mqtt_client_id: Some(session.mqtt_client_id.clone()),
            ..EventDetails::default()
        };
        self.emit(
            session,
            EventType::Connect,
            details,
            EventDetails::default(),
        )
    }

    /// One granted channel filter; nothing in the seed layout, which has no subscribe events.
    pub fn subscribed(&self, session: &SessionInfo, channel: &ChannelTopic) {
        if self.layout != EventLayout::Supermq {
            return;
        }
        let subscription = EventDetails {
            subscription: Some(Box::new(Subscription {
                domain_id: channel.domain.clone(),
                channel_id: channel.channel.clone(),
                // SuperMQ's form of a subscribe subtopic: `.` between levels, NATS wildcards.
                subtopic: channel
                    .dotted_subtopic()
                    .replace('+', "*")
                    .replace('#', ">"),
            })),
            ..EventDetails::default()
        };
        // A subscribe is not a session boundary: nothing waits for it to reach the log.
        drop(self.emit(
            session,
            EventType::Subscribe,
            subscription.clone(),
            subscription,
        ));
    }

    pub fn disconnected(&self, session: &SessionInfo, reason: DisconnectReason) -> EventCommit {
        let details = EventDetails {
            reason: Some(reason.as_str().to_owned()),
            ..EventDetails::default()
        };
        self.emit(
            session,
            EventType::Disconnect,
            details,
            EventDetails::default(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_key_gives_back_the_mqtt_client_id() {
        let session = SessionInfo {
            identity: Identity {
                client_id: "c1".into(),
                anonymous: false,
            },
            mqtt_client_id: "box 7".into(),
            version: ProtocolVersion::V5,
            peer: "[::1]:40000".parse().expect("socket address"),
        };
        let key = ConnectionEvents::session_key(&session);
        assert_eq!(ConnectionEvents::mqtt_client_id_of(&key), Some("box 7"));
    }
}
