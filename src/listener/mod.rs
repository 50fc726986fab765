//! Accepts device connections and hands each to its own task. The accept loop never waits on a
//! device: the TLS and WebSocket handshakes and the CONNECT read run in the connection's task,
//! each under a timeout, so an idle socket cannot delay anyone else.
//!
//! `tls` builds the rustls server configuration (mTLS included); `ws` upgrades a stream to MQTT
//! over WebSocket. Every transport ends in the same session code.

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
    /// Time a TLS or WebSocket handshake may take.
    pub handshake_timeout: Duration,
    /// Largest WebSocket message accepted (the MQTT packet limit plus framing).
    pub max_ws_message: usize,
    /// New connections per second per peer IP; `None` is unlimited.
    pub connect_rate: Option<ConnectRate>,
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
    loop {
        let accepted = tokio::select! {
            _ = shared.ctx.shutdown.cancelled() => return,
            _ = housekeeping.tick() => {
                if let Some(rate) = &shared.connect_rate {
                    rate.forget_idle();
                }
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, peer)) => {
                if let Some(rate) = &shared.connect_rate {
                    if !rate.allow(peer.ip()) {
                        shared
                            .metrics
                            .limit_hits
                            .with_label_values(&["connect_rate"])
                            .inc();
                        tracing::debug!(%peer, "closed: connect rate of this IP exceeded");
                        continue;
                    }
                }
                // Small packets must not wait for Nagle + delayed ACK; writes are coalesced.
                if let Err(e) = stream.set_nodelay(true) {
                    tracing::debug!(%peer, error = %e, "TCP_NODELAY not set");
                }
                shared
                    .sessions
                    .spawn(connection(shared.clone(), transport.clone(), stream, peer));
            }
            Err(e) => {
                // Typically out of file descriptors: back off instead of spinning.
                tracing::warn!(error = %e, listener = transport.name(), "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One socket: the transport's handshake under a timeout, then the session.
async fn connection(
    shared: Arc<Accepting>,
    transport: Transport,
    stream: TcpStream,
    peer: SocketAddr,
) {
    let name = transport.name();
    let _open = OpenSocket::new(
        shared
            .metrics
            .listener_connections
            .with_label_values(&[name]),
    );
    // Boxed: a TLS or WebSocket handshake's state is freed once it is done, not held by the
    // connection's task for the whole session.
    let handshake = Box::pin(async {
        match transport {
            Transport::Tcp => {
                let conn = ConnectionInfo {
                    listener: name,
                    ..Default::default()
                };
                Ok(session::serve_with(shared.ctx.clone(), stream, peer, conn).boxed())
            }
            Transport::Tls(acceptor) => {
                let (tls, conn) = tls::accept(&acceptor, stream, name).await?;
                Ok(session::serve_with(shared.ctx.clone(), tls, peer, conn).boxed())
            }
            Transport::Ws => {
                let ws = ws::accept(stream, shared.max_ws_message).await?;
                let conn = ConnectionInfo {
                    listener: name,
                    ..Default::default()
                };
                Ok(session::serve_with(shared.ctx.clone(), ws, peer, conn).boxed())
            }
            Transport::Wss(acceptor) => {
                let (tls, conn) = tls::accept(&acceptor, stream, name).await?;
                let ws = ws::accept(tls, shared.max_ws_message).await?;
                Ok(session::serve_with(shared.ctx.clone(), ws, peer, conn).boxed())
            }
        }
    });
    let handshake = tokio::select! {
        _ = shared.ctx.shutdown.cancelled() => None,
        r = tokio::time::timeout(shared.handshake_timeout, handshake) => Some(r),
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
            tracing::info!(%peer, listener = name, reason = %why, "handshake failed");
        }
        Some(Err(_)) => {
            shared
                .metrics
                .handshake_errors
                .with_label_values(&[name])
                .inc();
            tracing::info!(%peer, listener = name, "handshake timed out");
        }
    }
}

/// Why a TLS or WebSocket handshake failed.
#[derive(Debug)]
pub struct HandshakeError(pub String);

/// Keeps a listener's open-socket gauge right on every path out of the connection task.
struct OpenSocket(prometheus::IntGauge);

impl OpenSocket {
    fn new(gauge: prometheus::IntGauge) -> Self {
        gauge.inc();
        OpenSocket(gauge)
    }
}

impl Drop for OpenSocket {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod footprint {
    use super::*;

    fn future_size<A, F>(_: &impl Fn(A) -> F) -> usize {
        std::mem::size_of::<F>()
    }

    /// The task every accepted socket holds for its whole life (debug build: largest).
    #[test]
    fn a_connection_task_is_small() {
        type Args = (Arc<Accepting>, Transport, TcpStream, SocketAddr);
        let connection = future_size(&|(a, t, s, p): Args| connection(a, t, s, p));
        // The TLS / WebSocket handshake's state is boxed and freed once it is done.
        assert!(
            connection <= 512,
            "connection future grew to {connection} bytes"
        );
    }
}
