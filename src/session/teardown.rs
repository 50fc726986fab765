//! The accepted connection's resources and the one place that releases them: the will, the
//! attachment to its broker session, the `disconnect` hooks and the connection slot. `end` runs
//! once, on every path, including a panic (through `Drop`).

use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use crate::auth::Identity;
use crate::broker::{Attachment, Broker, DeferredWill, Message, Origin, SessionKey, WillRoute};
use crate::events::EventCommit;
use crate::hooks::{DisconnectReason, PublishRoute, SessionInfo};
use crate::state::{KeptWill, WillDue};
use crate::topic::{self, TopicKind, Usage};

use super::codec::ProtocolVersion;
use super::limits::ConnectionSlot;
use super::SessionContext;

/// A will authorized at CONNECT, ready to be published.
pub(super) struct Will {
    pub message: Message,
    /// MQTT 5 Will Delay Interval: published this long after the connection ends (or when the
    /// session ends, if sooner), unless the session is resumed first.
    pub delay: std::time::Duration,
}

pub(super) struct LiveSession {
    ctx: Arc<SessionContext>,
    pub info: SessionInfo,
    pub attachment: Attachment,
    /// Boxed: most sessions have none, and an idle session should not keep room for one.
    will: Option<Box<Will>>,
    announced: bool,
    ended: bool,
    _slot: ConnectionSlot,
}

impl LiveSession {
    pub fn new(
        ctx: Arc<SessionContext>,
        info: SessionInfo,
        attachment: Attachment,
        will: Option<Will>,
        slot: ConnectionSlot,
    ) -> Self {
        LiveSession {
            ctx,
            info,
            attachment,
            will: will.map(Box::new),
            announced: false,
            ended: false,
            _slot: slot,
        }
    }

    /// The will as the state store keeps it with a persistent session.
    pub fn kept_will(&self) -> Option<KeptWill> {
        self.will.as_ref().map(|will| KeptWill {
            message: Arc::new(will.message.copy()),
            due: WillDue::AfterEnd(will.delay),
            protocol: match self.info.version {
                ProtocolVersion::V5 => 5,
                ProtocolVersion::V311 => 4,
            },
            peer: self.info.peer.to_string(),
        })
    }

    /// Marks the session accepted and tells the hooks; from here on it ends with a
    /// `disconnect`. Await the result before writing CONNACK: the `connect` is then in the
    /// event log.
    pub fn announce(&mut self) -> EventCommit {
        self.announced = true;
        self.ctx.hooks.connected(&self.info)
    }

    /// Ends the connection: publishes the will if asked, detaches from the broker session
    /// (discarding it unless it is persistent), emits `disconnect` (if `connect` was emitted),
    /// then lets a waiting takeover proceed. Never waits; awaiting the result waits until the
    /// `disconnect` is in the event log.
    pub fn end(&mut self, reason: DisconnectReason, publish_will: bool) -> EventCommit {
        if std::mem::replace(&mut self.ended, true) {
            return EventCommit::done();
        }
        let mut deferred = None;
        if let Some(will) = self.will.take().filter(|_| publish_will) {
            let Will { mut message, delay } = *will;
            message.origin = Origin::Session(self.attachment.session.id);
            let message = Arc::new(message);
            if delay.is_zero() {
                let message = expiring_from_now(message);
                let route = route_of(&message.topic);
                route_message(&self.ctx, &self.info, &route, message);
            } else {
                let (ctx, info) = (self.ctx.clone(), self.info.clone());
                let publish = Box::new(move |message: Arc<Message>| {
                    let message = expiring_from_now(message);
                    let route = route_of(&message.topic);
                    route_message(&ctx, &info, &route, message);
                });
                deferred = Some((DeferredWill { message, publish }, delay));
            }
        }
        self.ctx
            .broker
            .detach_with_will(&mut self.attachment, deferred);
        let logged = if self.announced {
            self.ctx.hooks.disconnected(&self.info, reason)
        } else {
            EventCommit::done()
        };
        Broker::release(&mut self.attachment);
        logged
    }
}

/// A will as published now: its MQTT 5 Message Expiry Interval runs from its publication
/// (MQTT 3.1.3.2.4), so a retained or queued will is dropped once it has run out and a late
/// delivery carries what is left of it.
fn expiring_from_now(message: Arc<Message>) -> Arc<Message> {
    let Some(expires_at) = Message::expiry_of(message.properties.as_deref()) else {
        return message;
    };
    let mut owned = Arc::try_unwrap(message).unwrap_or_else(|shared| shared.copy());
    owned.expires_at = Some(expires_at);
    Arc::new(owned)
}

/// Publishes the wills the state store kept for sessions this process did not see connect
/// (restored at start-up), as their own connections would have: bus bridge, then broker core.
pub fn kept_will_route(ctx: Weak<SessionContext>) -> WillRoute {
    Arc::new(
        move |key: &SessionKey, will: &KeptWill, message: Arc<Message>| {
            let Some(ctx) = ctx.upgrade() else {
                return;
            };
            let info = SessionInfo {
                identity: Identity {
                    client_id: key.client_id.clone(),
                    anonymous: key.client_id.is_empty(),
                },
                mqtt_client_id: key.mqtt_client_id.clone(),
                version: if will.protocol == 5 {
                    ProtocolVersion::V5
                } else {
                    ProtocolVersion::V311
                },
                peer: will
                    .peer
                    .parse()
                    .unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0))),
            };
            tracing::info!(client_id = %key.client_id.escape_debug(), mqtt_client_id = %key.mqtt_client_id.escape_debug(),
            "will of a kept session published");
            let message = expiring_from_now(message);
            let route = route_of(&message.topic);
            route_message(&ctx, &info, &route, message);
        },
    )
}

/// Publishes an authorized message: the hooks (bus bridge) first, then the broker core.
pub(super) fn route_message(
    ctx: &SessionContext,
    info: &SessionInfo,
    route: &PublishRoute,
    message: Arc<Message>,
) {
    ctx.hooks.published(info, route, &message);
    ctx.broker.publish_from(&info.identity.client_id, message);
}

/// The route of an already authorized, canonical topic.
pub(super) fn route_of(topic: &bytes::Bytes) -> PublishRoute {
    let channel = match topic::parse(std::str::from_utf8(topic).unwrap_or(""), Usage::Publish) {
        Ok(TopicKind::Channel(c)) => Some(c),
        _ => None,
    };
    PublishRoute {
        topic: topic.clone(),
        channel,
    }
}

impl Drop for LiveSession {
    fn drop(&mut self) {
        // Only reached without an explicit end when the session task panicked or was dropped.
        // The `disconnect` is handed to the event log all the same; nobody is left to await it.
        let _ = self.end(DisconnectReason::ProtocolError, true);
    }
}
