//! Accepts device connections and hands each to its own task. The accept loop never waits on a
//! device: the TLS and WebSocket handshakes and the CONNECT read run in the connection's task,
//! each under a timeout, so an idle socket cannot delay anyone else.
//!
//! `tls` builds the rustls server configuration (mTLS included); `ws` upgrades a stream to MQTT
//! over WebSocket. Every transport ends in the same session code.

pub mod budget;
pub mod descriptors;
pub mod tls;
pub mod ws;

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::session::limits::ConnectionInfo;
use crate::session::{self, SessionContext};
use descriptors::{Descriptors, OpenSocket, OpenSockets};

/// How a listener's sockets speak MQTT.
#[derive(Clone)]
pub enum Transport {
    Tcp,
    Tls(TlsAcceptor),
    Ws,
    Wss(TlsAcceptor),
}

impl Transport {
    /// The listener's name in logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls(_) => "tls",
            Transport::Ws => "ws",
            Transport::Wss(_) => "wss",
        }
    }
}

/// What every accept loop shares.
pub struct Accepting {
    pub ctx: Arc<SessionContext>,
    pub sessions: TaskTracker,
    pub metrics: Arc<Metrics>,
    /// Time a TLS or WebSocket handshake may take (within the connect timeout, which runs from
    /// accept).
    pub handshake_timeout: Duration,
    /// Largest WebSocket message accepted (the MQTT packet limit plus framing).
    pub max_ws_message: usize,
    /// Bytes a WebSocket socket may send before its CONNECT is accepted (upgrade request,
    /// framing and CONNECT).
    pub ws_connect_budget: usize,
    /// New connections per second per peer IP; `None` is unlimited.
    pub connect_rate: Option<ConnectRate>,
    /// Sockets open on every listener, the HTTP port's included (bounded below the open file
    /// limit less a reserve).
    pub open_sockets: Arc<OpenSockets>,
}

/// Token buckets of new connections, one per peer IP.
pub struct ConnectRate(DefaultKeyedRateLimiter<IpAddr>);

impl ConnectRate {
    /// `per_second` connections per second per IP, with a burst of the same size.
    pub fn new(per_second: NonZeroU32) -> Self {
        ConnectRate(RateLimiter::keyed(Quota::per_second(per_second)))
    }

    fn allow(&self, ip: IpAddr) -> bool {
        self.0.check_key(&ip).is_ok()
    }

    /// Forgets IPs whose bucket is full again, so the map does not grow with every peer.
    fn forget_idle(&self) {
        self.0.retain_recent();
        self.0.shrink_to_fit();
    }
}

/// Runs one listener's accept loop until shutdown.
pub async fn serve(listener: TcpListener, transport: Transport, shared: Arc<Accepting>) {
    let mut housekeeping = tokio::time::interval(Duration::from_secs(60));
    let mut descriptors = Descriptors::new();
    loop {
        let accepted = tokio::select! {
            _ = shared.ctx.shutdown.cancelled() => return,
            _ = housekeeping.tick() => {
                if let Some(rate) = &shared.connect_rate {
                    rate.forget_idle();
                }
                if let Some(bans) = shared.ctx.limits.auth_bans() {
                    bans.forget_expired();
                }
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                let gauge = shared
                    .metrics
                    .listener_connections
                    .with_label_values(&[transport.name()]);
                let open = match shared.open_sockets.admit_device(gauge) {
                    Ok(open) => open,
                    Err(refusal) => {
                        descriptors
                            .running_out("open sockets near the open file limit", transport.name());
                        shared.metrics.limit_hit(refusal.limit());
                        continue;
                    }
                };
                descriptors.available(transport.name());
                let bans = shared.ctx.limits.auth_bans();
                if bans.is_some_and(|b| b.is_banned(peer.ip())) {
                    shared.metrics.limit_hit("auth_ban");
                    tracing::debug!(%peer, "closed: IP banned after failed CONNECTs");
                    continue;
                }
                if let Some(rate) = &shared.connect_rate {
                    if !rate.allow(peer.ip()) {
                        shared.metrics.limit_hit("connect_rate");
                        tracing::debug!(%peer, "closed: connect rate of this IP exceeded");
                        continue;
                    }
                }
                // Small packets must not wait for Nagle + delayed ACK; writes are coalesced.
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(%peer, error = %e, "TCP_NODELAY not set");
                }
                match transport {
                    // No handshake: the session is the task itself, one allocation (a
                    // connection task holding a boxed session took two).
                    Transport::Tcp => {
                        let conn = Box::new(ConnectionInfo {
                            listener: transport.name(),
                            connect_deadline: Some(
                                tokio::time::Instant::now() + shared.ctx.connect_timeout,
                            ),
                            ..Default::default()
                        });
                        let session = session::serve_with(shared.ctx.clone(), stream, peer, conn);
                        shared.sessions.spawn(session.map(move |()| drop(open)));
                    }
                    _ => {
                        shared.sessions.spawn(connection(
                            shared.clone(),
                            transport.clone(),
                            stream,
                            peer,
                            open,
                        ));
                    }
                }
            }
            Err(e) if Descriptors::exhausted(&e) => {
                descriptors.running_out(&e.to_string(), transport.name());
                if descriptors.shed(&listener) {
                    shared.metrics.limit_hit("file_descriptors");
                } else {
                    // No reserve to shed with: wait for descriptors instead of spinning.
                    tokio::select! {
                        _ = shared.ctx.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, listener = transport.name(), "accept failed");
                tokio::select! {
                    _ = shared.ctx.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
}

/// A WebSocket's raw stream, bounded until its device is authenticated (see [`budget`]).
fn budgeted<S>(shared: &Accepting, stream: S) -> (budget::Budgeted<S>, budget::ConnectBudget) {
    let hit = shared
        .metrics
        .limit_hits
        .with_label_values(&["connect_size"]);
    budget::Budgeted::new(stream, shared.ws_connect_budget, hit)
}

/// One TLS or WebSocket socket: the transport's handshake under a timeout, then the session.
async fn connection(
    shared: Arc<Accepting>,
    transport: Transport,
    stream: TcpStream,
    peer: SocketAddr,
    _open: OpenSocket,
) {
    let name = transport.name();
    // The connect timeout runs from accept: the TLS and WebSocket handshakes are part of it, so
    // a socket trickling its bytes is closed at one deadline whatever the transport.
    let accepted = tokio::time::Instant::now();
    let deadline = accepted + shared.ctx.connect_timeout;
    // Boxed: a TLS or WebSocket handshake's state is freed once it is done, not held by the
    // connection's task for the whole session.
    let handshake = Box::pin(async {
        let plain = ConnectionInfo {
            listener: name,
            ..Default::default()
        };
        let with_deadline = |conn: ConnectionInfo| {
            Box::new(ConnectionInfo {
                connect_deadline: Some(deadline),
                ..conn
            })
        };
        match transport {
            // Served without this task (see `serve`); kept for completeness.
            Transport::Tcp => {
                let conn = with_deadline(plain);
                Ok(session::serve_with(shared.ctx.clone(), stream, peer, conn).boxed())
            }
            Transport::Tls(acceptor) => {
                let (tls, conn) = tls::accept(&acceptor, stream, name).await?;
                let conn = with_deadline(conn);
                Ok(session::serve_with(shared.ctx.clone(), tls, peer, conn).boxed())
            }
            Transport::Ws => {
                let (stream, budget) = budgeted(&shared, stream);
                let ws = ws::accept(stream, shared.max_ws_message).await?;
                let conn = with_deadline(ConnectionInfo {
                    connect_budget: Some(budget),
                    ..plain
                });
                Ok(session::serve_with(shared.ctx.clone(), ws, peer, conn).boxed())
            }
            Transport::Wss(acceptor) => {
                let (tls, conn) = tls::accept(&acceptor, stream, name).await?;
                let (tls, budget) = budgeted(&shared, tls);
                let ws = ws::accept(tls, shared.max_ws_message).await?;
                let conn = with_deadline(ConnectionInfo {
                    connect_budget: Some(budget),
                    ..conn
                });
                Ok(session::serve_with(shared.ctx.clone(), ws, peer, conn).boxed())
            }
        }
    });
    let handshake_deadline = deadline.min(accepted + shared.handshake_timeout);
    let handshake = tokio::select! {
        _ = shared.ctx.shutdown.cancelled() => None,
        r = tokio::time::timeout_at(handshake_deadline, handshake) => Some(r),
    };
    match handshake {
        None => {}
        Some(Ok(Ok(session))) => session.await,
        Some(Ok(Err(HandshakeError(why)))) => {
            shared
                .metrics
                .handshake_errors
                .with_label_values(&[name])
                .inc();
            tracing::info!(%peer, listener = name, reason = %why.escape_debug(), "handshake failed");
        }
        Some(Err(_)) => {
            shared
                .metrics
                .handshake_errors
                .with_label_values(&[name])
                .inc();
            tracing::info!(%peer, listener = name, "handshake timed out (handshake or connect timeout)");
        }
    }
}

/// Why a TLS or WebSocket handshake failed.
#[derive(Debug)]
pub struct HandshakeError(pub String);

#[cfg(test)]
mod footprint {
    use super::*;
    use crate::session::future_size;

    /// The task every accepted socket holds for its whole life (debug build: largest).
    #[test]
    fn a_connection_task_is_small() {
        type Args = (Arc<Accepting>, Transport, TcpStream, SocketAddr, OpenSocket);
        let connection = future_size(&|(a, t, s, p, o): Args| connection(a, t, s, p, o));
        // The TLS / WebSocket handshake's state is boxed and freed once it is done.
        assert!(
            connection <= 512,
            "connection future grew to {connection} bytes"
        );
    }
}
