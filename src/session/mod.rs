//! One device connection: the CONNECT handshake (`handshake.rs`: protocol detection,
//! authentication, attaching to its broker session, CONNACK), then the relay between the device
//! and the broker core (`relay.rs`), until the session ends exactly once (`teardown.rs`).

pub mod codec;
mod deliver;
pub mod frame;
mod handshake;
pub mod limits;
mod relay;
mod teardown;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::protocol::{ConnectReturnCode, Disconnect, DisconnectReasonCode, Packet};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::hooks::{DisconnectReason, Hooks};
use crate::metrics::Metrics;
use crate::revocation::RightsEpoch;
use codec::{Codec, ProtocolVersion};
use limits::{ConnectionInfo, Limits};

/// Everything sessions share: the broker core, the hooks and the limits.
pub struct SessionContext {
    pub broker: Arc<Broker>,
    pub hooks: Hooks,
    pub connect_timeout: Duration,
    pub max_packet_size: usize,
    /// MQTT 5 Server Keep Alive in seconds (0: accept what the device asks).
    pub max_keep_alive: u16,
    pub shutdown: CancellationToken,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// Advances on every revocation: connections forget their own topic decisions then.
    pub rights: Arc<RightsEpoch>,
}

/// A device may stall a write this long before it is disconnected.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one accepted socket until the session ends. Never panics on device input; logs why
/// the connection closed.
pub async fn serve<S>(ctx: Arc<SessionContext>, stream: S, peer: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    serve_with(ctx, stream, peer, ConnectionInfo::default()).await
}

/// [`serve`] with what the transport learned before the CONNECT (e.g. a client certificate).
pub async fn serve_with<S>(
    ctx: Arc<SessionContext>,
    mut stream: S,
    peer: SocketAddr,
    conn: ConnectionInfo,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let mut rbuf = BytesMut::with_capacity(256);
    // One deadline for the whole CONNECT, however the device paces its bytes.
    let deadline = conn
        .connect_deadline
        .unwrap_or_else(|| tokio::time::Instant::now() + ctx.connect_timeout);
    let handshake = tokio::select! {
        _ = ctx.shutdown.cancelled() => return,
        r = tokio::time::timeout_at(deadline, handshake::read_connect(&ctx, &mut stream, &mut rbuf)) => r,
    };
    let connect = match handshake {
        Err(_) => {
            tracing::info!(%peer, "closed: no CONNECT within the connect timeout");
            return;
        }
        Ok(Err(reason)) => {
            tracing::info!(%peer, %reason, "closed before CONNECT");
            return;
        }
        Ok(Ok(v)) => v,
    };
    // Boxed so a socket that has not sent CONNECT holds only the small handshake state.
    Box::pin(connected(ctx, stream, peer, conn, rbuf, connect)).await;
}

/// Everything after a well-formed CONNECT: accept or refuse it, then relay until the end.
async fn connected<S>(
    ctx: Arc<SessionContext>,
    mut stream: S,
    peer: SocketAddr,
    conn: ConnectionInfo,
    rbuf: BytesMut,
    connect: handshake::ReadConnect,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let codec = connect.codec.clone();
    let Some(mut session) = handshake::accept(&ctx, &mut stream, peer, &conn, connect).await else {
        return;
    };
    let end = relay::run(&ctx, &mut session, &mut stream, rbuf, codec).await;
    if end.reason == DisconnectReason::ProtocolError {
        ctx.metrics
            .packet_errors
            .with_label_values(&[limits::packet_error_kind(end.v5_code)])
            .inc();
    }
    let disconnect_logged = session.live.end(end.reason, end.publish_will);
    if let (ProtocolVersion::V5, Some(code)) = (session.version, end.v5_code) {
        let mut buf = BytesMut::new();
        let packet = Packet::Disconnect(Disconnect { reason_code: code }, None);
        if Codec::new(ProtocolVersion::V5, usize::MAX)
            .write(packet, &mut buf)
            .is_ok()
        {
            let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&buf)).await;
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
    // The session's teardown completes once its `disconnect` is in the event log (after the
    // socket is closed, so the device never waits for it).
    disconnect_logged.await;
    tracing::info!(client_id = %session.live.info.identity.client_id,
        mqtt_client_id = %session.live.info.mqtt_client_id, %peer,
        reason = end.reason.as_str(), detail = %end.detail, "disconnected");
}

/// Why the session loop stopped.
struct End {
    reason: DisconnectReason,
    v5_code: Option<DisconnectReasonCode>,
    publish_will: bool,
    detail: String,
}

impl End {
    fn new(
        reason: DisconnectReason,
        code: Option<DisconnectReasonCode>,
        detail: impl Into<String>,
    ) -> Self {
        End {
            reason,
            v5_code: code,
            publish_will: reason != DisconnectReason::ClientDisconnect,
            detail: detail.into(),
        }
    }

    fn protocol(code: DisconnectReasonCode, detail: impl Into<String>) -> Self {
        End::new(DisconnectReason::ProtocolError, Some(code), detail)
    }

    fn malformed(detail: impl Into<String>) -> Self {
        End::protocol(DisconnectReasonCode::MalformedPacket, detail)
    }

    fn lost(detail: impl Into<String>) -> Self {
        End::new(DisconnectReason::ConnectionLost, None, detail)
    }
}

fn connack(
    code: ConnectReturnCode,
    session_present: bool,
    props: Option<rumqttd::protocol::ConnAckProperties>,
) -> Packet {
    Packet::ConnAck(
        rumqttd::protocol::ConnAck {
            session_present,
            code,
        },
        props,
    )
}

async fn write_packet<S: AsyncWrite + Unpin>(
    stream: &mut S,
    codec: &Codec,
    packet: Packet,
) -> std::io::Result<()> {
    let mut buf = BytesMut::new();
    codec
        .write(packet, &mut buf)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string()))?;
    tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&buf))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "write timed out"))?
}

#[cfg(test)]
mod footprint {
    use super::*;

    #[tokio::test]
    async fn a_socket_before_connect_holds_a_small_future() {
        let registry = Arc::new(crate::auth::StaticRegistry::demo());
        let (outbox, _t) =
            crate::events::Outbox::start(Box::new(crate::events::StdoutSink::new()), 10);
        let ctx = Arc::new(SessionContext {
            broker: Broker::new(crate::broker::BrokerConfig::default()),
            hooks: Hooks::new(registry.clone(), registry).with_events(Arc::new(
                crate::hooks::ConnectionEvents::new(
                    crate::events::EventQueue::memory(outbox),
                    String::new(),
                ),
            )),
            connect_timeout: Duration::from_secs(1),
            max_packet_size: 1024,
            max_keep_alive: 0,
            shutdown: CancellationToken::new(),
            metrics: Metrics::new(),
            limits: Limits::unlimited(),
            rights: Arc::default(),
        });
        let (a, _b) = tokio::io::duplex(64);
        let fut = serve(ctx, a, "127.0.0.1:1".parse().unwrap());
        // Every accepted socket holds this much until its CONNECT arrives.
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 2048, "serve future grew to {size} bytes");
    }
}
