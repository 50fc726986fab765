//! One device connection: the CONNECT handshake (`handshake.rs`: protocol detection,
//! authentication, attaching to its broker session, CONNACK), then the relay between the device
//! and the broker core (`relay.rs`), until the session ends exactly once (`teardown.rs`).

mod alias;
pub mod codec;
mod deliver;
pub mod frame;
mod handshake;
pub mod keep_alive;
pub mod limits;
mod relay;
mod teardown;

pub use teardown::kept_will_route;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::protocol::{
    ConnectReturnCode, Disconnect, DisconnectProperties, DisconnectReasonCode, Packet,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
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
    /// Largest CONNECT read before authentication (at most `max_packet_size`).
    pub max_connect_size: usize,
    /// MQTT 5 Server Keep Alive in seconds (0: accept what the device asks).
    pub max_keep_alive: u16,
    /// MQTT 5 Topic Alias Maximum offered to devices (0: none).
    pub topic_alias_maximum: u16,
    pub shutdown: CancellationToken,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
    /// Advances on every revocation: connections forget their own topic decisions then.
    pub rights: Arc<RightsEpoch>,
    /// Ends connections silent for 1.5 × their keep-alive.
    pub keep_alive: Arc<keep_alive::KeepAliveWheel>,
}

/// A device may stall a write this long before it is disconnected.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one accepted socket until the session ends. Never panics on device input; logs why
/// the connection closed.
pub async fn serve<S>(ctx: Arc<SessionContext>, stream: S, peer: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    serve_with(ctx, stream, peer, Box::default()).await
}

/// [`serve`] with what the transport learned before the CONNECT (e.g. a client certificate).
///
/// One `async move` block for the whole connection, holding each argument once (an `async fn`
/// keeps a second copy of every argument, and so did a second block for the accepted session).
/// The CONNECT and the authentication are boxed and freed when done; `conn` is boxed too, so
/// the idle session keeps 8 bytes of it; the relay runs inline; the closing steps are boxed.
#[allow(clippy::manual_async_fn)] // on purpose: see the doc comment
pub fn serve_with<S>(
    ctx: Arc<SessionContext>,
    mut stream: S,
    peer: SocketAddr,
    conn: Box<ConnectionInfo>,
) -> impl std::future::Future<Output = ()> + Send
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    async move {
        let mut rbuf = BytesMut::with_capacity(256);
        let (mut session, codec) =
            match Box::pin(establish(&ctx, &mut stream, peer, &conn, &mut rbuf)).await {
                Some(accepted) => accepted,
                None => return,
            };
        drop(conn);
        let end = relay::run(&ctx, &session, &mut stream, &mut rbuf, codec).await;
        if end.reason == DisconnectReason::ProtocolError {
            ctx.metrics
                .packet_errors
                .with_label_values(&[limits::packet_error_kind(end.v5_code)])
                .inc();
        }
        // Boxed: the relay's idle state does not keep room for the closing steps.
        Box::pin(close(&mut stream, &mut session, end, peer)).await;
    }
}

/// Reads the CONNECT (within the connect timeout), then accepts or refuses it.
async fn establish<S>(
    ctx: &Arc<SessionContext>,
    stream: &mut S,
    peer: SocketAddr,
    conn: &ConnectionInfo,
    rbuf: &mut BytesMut,
) -> Option<(handshake::Accepted, Codec)>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    // One deadline for the whole CONNECT, however the device paces its bytes.
    let deadline = conn
        .connect_deadline
        .unwrap_or_else(|| tokio::time::Instant::now() + ctx.connect_timeout);
    let handshake = tokio::select! {
        _ = ctx.shutdown.cancelled() => return None,
        r = tokio::time::timeout_at(deadline, handshake::read_connect(ctx, stream, rbuf)) => r,
    };
    let connect = match handshake {
        Err(_) => {
            tracing::info!(%peer, "closed: no CONNECT within the connect timeout");
            return None;
        }
        Ok(Err(reason)) => {
            tracing::info!(%peer, reason = %reason.escape_debug(), "closed before CONNECT");
            return None;
        }
        Ok(Ok(v)) => v,
    };
    let codec = connect.codec.clone();
    let accept = Box::pin(handshake::accept(ctx, stream, peer, conn, connect));
    let accepted = accept.await?;
    // Authenticated: the device may now send packets up to the maximum packet size.
    if let Some(budget) = &conn.connect_budget {
        budget.lift();
    }
    Some((accepted, codec))
}

/// Ends the session (will, `disconnect` event), tells an MQTT 5 device why, closes the socket.
async fn close<S>(stream: &mut S, session: &mut handshake::Accepted, end: End, peer: SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let disconnect_logged = session.live.end(end.reason, end.publish_will);
    let mut told = false;
    if let (ProtocolVersion::V5, Some(code)) = (session.version, end.v5_code) {
        let mut buf = BytesMut::new();
        // With a reason string: rumqttd encodes a property-less DISCONNECT with a remaining
        // length one byte short, which clients read as a stray packet.
        let props = DisconnectProperties {
            session_expiry_interval: None,
            reason_string: Some(reason_string(&end.detail)),
            user_properties: Vec::new(),
            server_reference: None,
        };
        let packet = Packet::Disconnect(Disconnect { reason_code: code }, Some(props));
        if Codec::new(ProtocolVersion::V5, usize::MAX)
            .write(packet, &mut buf)
            .is_ok()
        {
            told = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&buf))
                .await
                .is_ok_and(|r| r.is_ok());
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), stream.shutdown()).await;
    if told {
        // Closing with unread input resets the connection, and a reset can discard the
        // DISCONNECT before the device reads its reason: read on until the device closes.
        let _ = tokio::time::timeout(LINGER, discard_input(stream)).await;
    }
    // The session's teardown completes once its `disconnect` is in the event log (after the
    // socket is closed, so the device never waits for it).
    disconnect_logged.await;
    tracing::info!(client_id = %session.live.info.identity.client_id.escape_debug(),
        mqtt_client_id = %session.live.info.mqtt_client_id.escape_debug(), %peer,
        reason = end.reason.as_str(), detail = %end.detail.escape_debug(), "disconnected");
}

/// The MQTT 5 Reason String of a DISCONNECT: the detail logged, kept short.
fn reason_string(detail: &str) -> String {
    const MAX: usize = 128;
    if detail.len() <= MAX {
        return if detail.is_empty() {
            "disconnected".into()
        } else {
            detail.into()
        };
    }
    let mut end = MAX;
    while !detail.is_char_boundary(end) {
        end -= 1;
    }
    detail[..end].into()
}

/// How long a device told why it is disconnected may take to close its end.
const LINGER: Duration = Duration::from_secs(1);

async fn discard_input<S: AsyncRead + Unpin>(stream: &mut S) {
    let mut scratch = [0u8; 512];
    while let Ok(n) = stream.read(&mut scratch).await {
        if n == 0 {
            return;
        }
    }
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

/// Size of the future a closure returns, without calling it (the footprint tests).
#[cfg(test)]
pub(crate) fn future_size<A, F>(_: &impl Fn(A) -> F) -> usize {
    std::mem::size_of::<F>()
}

#[cfg(test)]
mod footprint {
    use super::*;

    /// What an idle plain-TCP session's task holds (checked in the debug build, where futures
    /// are largest): the session future is the task's whole state, in a 128-byte aligned tokio
    /// cell of about 200 bytes more.
    #[test]
    fn an_accepted_session_holds_a_small_future() {
        type Serve = (
            Arc<SessionContext>,
            tokio::net::TcpStream,
            SocketAddr,
            Box<ConnectionInfo>,
        );
        let serve = future_size(&|(c, s, p, i): Serve| serve_with(c, s, p, i));
        println!("serve_with future: {serve} B");
        // 808 bytes in debug (1,096 before the keep-alive wheel, the boxed publishing state
        // and the cancel wait on the control's `Notify`).
        assert!(serve <= 840, "serve_with future grew to {serve} bytes");
    }

    /// Every accepted socket holds this much (besides the two above) until its CONNECT arrives.
    #[test]
    fn a_socket_before_connect_holds_a_small_future() {
        type Args = (
            &'static Arc<SessionContext>,
            &'static mut tokio::net::TcpStream,
            SocketAddr,
            &'static ConnectionInfo,
            &'static mut BytesMut,
        );
        let establish = future_size(&|(c, s, p, i, b): Args| establish(c, s, p, i, b));
        assert!(
            establish <= 2048,
            "establish future grew to {establish} bytes"
        );
    }
}
