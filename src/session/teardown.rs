//! The accepted session's resources and the one place that releases them: the will, the router
//! link, the router name, the `disconnect` hooks and the takeover registration. `end` runs once,
//! on every path, including a panic (through `Drop`).

use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use rumqttd::local::{LinkError, LinkTx};
use rumqttd::protocol::{Disconnect, DisconnectReasonCode, LastWill, Packet};
use tokio_util::sync::CancellationToken;

use super::registry::Registration;
use super::{publish_with_qos, SessionContext};
use crate::broker::RouterName;
use crate::events::EventCommit;
use crate::hooks::{DisconnectReason, SessionInfo};

pub(super) struct LiveSession {
    ctx: Arc<SessionContext>,
    pub info: SessionInfo,
    link_tx: LinkTx,
    router_name: Option<RouterName>,
    registration: Option<Registration>,
    will: Option<LastWill>,
    /// `Some` when the router keeps this session's state after it ends: for how long.
    expiry: Option<Option<Duration>>,
    announced: bool,
    ended: bool,
}

impl LiveSession {
    pub fn new(
        ctx: Arc<SessionContext>,
        info: SessionInfo,
        link_tx: LinkTx,
        router_name: RouterName,
        registration: Registration,
        will: Option<LastWill>,
        expiry: Option<Option<Duration>>,
    ) -> Self {
        LiveSession {
            ctx,
            info,
            link_tx,
            router_name: Some(router_name),
            registration: Some(registration),
            will,
            expiry,
            announced: false,
            ended: false,
        }
    }

    /// Marks the session accepted and tells the hooks; from here on it ends with a
    /// `disconnect`. Await the result before writing CONNACK: the `connect` is then in the
    /// event log.
    pub fn announce(&mut self) -> EventCommit {
        self.announced = true;
        self.ctx.hooks.connected(&self.info)
    }

    pub fn takeover_token(&self) -> CancellationToken {
        self.registration
            .as_ref()
            .map(|r| r.takeover.clone())
            .unwrap_or_default()
    }

    /// Hands packets to the router and signals it once.
    pub async fn send_to_router(&mut self, packets: &mut Vec<Packet>) -> Result<(), LinkError> {
        let Some(last) = packets.pop() else {
            return Ok(());
        };
        self.link_tx.buffer().extend(packets.drain(..));
        self.link_tx.send(last).await.map(|_| ())
    }

    /// Ends the session: publishes the will if asked, disconnects the router link, frees the
    /// router name, emits `disconnect` (if `connect` was emitted) and leaves the registry.
    /// Never waits; awaiting the result waits until the `disconnect` is in the event log.
    pub fn end(&mut self, reason: DisconnectReason, publish_will: bool) -> EventCommit {
        if std::mem::replace(&mut self.ended, true) {
            return EventCommit::done();
        }
        if let Some(will) = self.will.take().filter(|_| publish_will) {
            let pkid = u16::from(will.qos as u8 > 0);
            let publish = publish_with_qos(&will.topic, &will.message, will.qos, will.retain, pkid);
            let mut props = None;
            super::qos::mark_origin(&mut props, will.qos as u8);
            self.link_tx
                .buffer()
                .push_back(Packet::Publish(publish, props));
        }
        // A DISCONNECT through the link is the only public way to make the router drop it.
        let disconnect = Packet::Disconnect(
            Disconnect {
                reason_code: DisconnectReasonCode::NormalDisconnection,
            },
            None,
        );
        // `LinkTx::send` never awaits, so this completes in place (also inside `Drop`).
        let _ = self.link_tx.send(disconnect).now_or_never();
        if let Some(name) = self.router_name.take() {
            self.ctx.broker.release(name);
        }
        let logged = if self.announced {
            self.ctx.hooks.disconnected(&self.info, reason)
        } else {
            EventCommit::done()
        };
        let registration = self.registration.take();
        match (self.expiry, registration) {
            (Some(Some(Duration::ZERO)), Some(registration)) => {
                // The state ends with the connection: discard it while still holding the
                // client id, so a reconnect waits for the discard instead of resuming.
                self.discard_now(registration);
            }
            (expiry, registration) => {
                if let Some(registration) = registration {
                    self.ctx
                        .registry
                        .unregister(&self.info.mqtt_client_id, registration.id);
                }
                if let Some(Some(after)) = expiry {
                    self.schedule_expiry(after);
                }
            }
        }
        logged
    }

    fn discard_now(&self, registration: Registration) {
        let ctx = self.ctx.clone();
        let client_id = self.info.mqtt_client_id.clone();
        let generation = ctx.broker.persistent_generation(&client_id);
        let discard = async move {
            if let Some(generation) = generation {
                ctx.broker.expire(&client_id, generation).await;
            }
            ctx.registry.unregister(&client_id, registration.id);
        };
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => drop(runtime.spawn(discard)),
            Err(_) => tracing::warn!("no runtime to discard an ended session's state"),
        }
    }

    /// Discards the router state after `after`, unless the client reconnected meanwhile.
    fn schedule_expiry(&self, after: Duration) {
        let (Ok(runtime), Some(generation)) = (
            tokio::runtime::Handle::try_current(),
            self.ctx
                .broker
                .persistent_generation(&self.info.mqtt_client_id),
        ) else {
            return;
        };
        let ctx = self.ctx.clone();
        let client_id = self.info.mqtt_client_id.clone();
        runtime.spawn(async move {
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return,
                _ = tokio::time::sleep(after) => {}
            }
            // Holding the client id keeps a reconnect from racing the discard.
            let Some(registration) = ctx.registry.try_register(&client_id, &ctx.shutdown) else {
                return;
            };
            ctx.broker.expire(&client_id, generation).await;
            ctx.registry.unregister(&client_id, registration.id);
        });
    }
}

impl Drop for LiveSession {
    fn drop(&mut self) {
        // Only reached without an explicit end when the session task panicked or was dropped.
        // The `disconnect` is handed to the event log all the same; nobody is left to await it.
        let _ = self.end(DisconnectReason::ProtocolError, true);
    }
}
