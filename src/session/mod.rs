//! One device connection: the CONNECT handshake (protocol detection, authentication, takeover,
//! CONNACK), then the loop that relays MQTT between the device and the router link, applying the
//! hooks to every PUBLISH and SUBSCRIBE, until the session ends exactly once.

pub mod codec;
pub mod frame;
pub mod limits;
mod qos;
pub mod registry;
mod teardown;

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures_util::FutureExt;
use rumqttd::local::LinkRx;
use rumqttd::protocol::{
    ConnAck, ConnAckProperties, Connect, ConnectProperties, ConnectReturnCode, Disconnect,
    DisconnectReasonCode, LastWill, Login, Packet, PingResp, PubAck, PubAckReason, PubComp,
    PubCompReason, PubRec, PubRecReason, Publish, QoS, SubAck, SubscribeReasonCode,
};
use rumqttd::Notification;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::auth::{AuthError, Credentials, TopicDecision};
use crate::broker::Broker;
use crate::hooks::{DisconnectReason, Hooks, PublishRoute, SessionInfo};
use crate::metrics::Metrics;
use crate::topic::{self, TopicKind, Usage};
use codec::{Codec, ProtocolVersion};
use frame::FrameError;
use limits::{ConnectionInfo, Limits, PublishRate};
use registry::SessionRegistry;
use teardown::LiveSession;

/// Everything sessions share: the router, the hooks, the takeover registry and the limits.
pub struct SessionContext {
    pub broker: Arc<Broker>,
    pub hooks: Hooks,
    pub registry: SessionRegistry,
    pub connect_timeout: Duration,
    pub max_packet_size: usize,
    pub shutdown: CancellationToken,
    pub metrics: Arc<Metrics>,
    pub limits: Limits,
}

/// A device may stall a write this long before it is disconnected.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Notifications taken from the router per write to the device.
const MAX_WRITE_BATCH: usize = 256;
/// MQTT 5 DISCONNECT reason "disconnect with will message".
const WITH_WILL: u8 = 0x04;
/// Distinct topics whose authorization a session remembers.
const TOPIC_CACHE_SIZE: usize = 64;

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
    let mut rbuf = BytesMut::with_capacity(512);
    let handshake = tokio::select! {
        _ = ctx.shutdown.cancelled() => return,
        r = tokio::time::timeout(ctx.connect_timeout, read_connect(&ctx, &mut stream, &mut rbuf)) => r,
    };
    let (codec, packet) = match handshake {
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
    Box::pin(connected(ctx, stream, peer, conn, rbuf, codec, packet)).await;
}

/// Everything after a well-formed CONNECT: accept or refuse it, then relay until the end.
async fn connected<S>(
    ctx: Arc<SessionContext>,
    mut stream: S,
    peer: SocketAddr,
    conn: ConnectionInfo,
    rbuf: BytesMut,
    codec: Codec,
    packet: Packet,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let Packet::Connect(connect, props, will, _will_props, login) = packet else {
        tracing::info!(%peer, "closed: first packet is not CONNECT");
        return;
    };
    // Held until the session ends: counts against the connection limit.
    let Some(_slot) = ctx.limits.connection_slot() else {
        ctx.metrics.refused("connection_limit");
        ctx.metrics
            .limit_hits
            .with_label_values(&["connections"])
            .inc();
        tracing::info!(%peer, mqtt_client_id = %connect.client_id, "connect refused: connection limit reached");
        let code = match codec.version() {
            ProtocolVersion::V311 => ConnectReturnCode::ServiceUnavailable,
            ProtocolVersion::V5 => ConnectReturnCode::QuotaExceeded,
        };
        let _ = write_packet(&mut stream, &codec, connack(code, false, None)).await;
        return;
    };
    if let Err(why) = ctx.limits.check_certificate(&conn, login.as_ref()) {
        ctx.metrics.refused("certificate_mismatch");
        tracing::info!(%peer, mqtt_client_id = %connect.client_id, reason = %why, "connect refused");
        let refusal = connack(ConnectReturnCode::NotAuthorized, false, None);
        let _ = write_packet(&mut stream, &codec, refusal).await;
        return;
    }
    let request = ConnectRequest {
        persistence: Persistence::of(codec.version(), connect.clean_session, props.as_ref()),
        connect,
        will,
        login,
    };
    let Some(mut session) = accept(&ctx, &mut stream, peer, &codec, request).await else {
        return;
    };
    let end = run(&ctx, &mut session, &mut stream, rbuf, codec).await;
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

    fn lost(detail: impl Into<String>) -> Self {
        End::new(DisconnectReason::ConnectionLost, None, detail)
    }
}

/// Reads the first frame, which must be a CONNECT, and picks the codec from its protocol level.
async fn read_connect<S>(
    ctx: &SessionContext,
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<(Codec, Packet), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let header = loop {
        match frame::peek_header(buf, ctx.max_packet_size) {
            Err(e) => return Err(e.to_string()),
            Ok(Some(h)) if h.packet_type() != frame::CONNECT => {
                return Err(format!(
                    "first packet is type {}, not CONNECT",
                    h.packet_type()
                ))
            }
            Ok(Some(h)) if buf.len() >= h.frame_len() => break h,
            Ok(Some(h)) => buf.reserve(h.frame_len() - buf.len()),
            Ok(None) if !buf.is_empty() && buf[0] >> 4 != frame::CONNECT => {
                return Err(format!("first packet is type {}, not CONNECT", buf[0] >> 4))
            }
            Ok(None) => {}
        }
        match stream.read_buf(buf).await {
            Ok(0) => return Err("connection closed".into()),
            Ok(_) => {}
            Err(e) => return Err(format!("read error: {e}")),
        }
    };
    let version = match frame::connect_protocol_level(buf, &header) {
        Some(4) => ProtocolVersion::V311,
        Some(5) => ProtocolVersion::V5,
        Some(level) => {
            // 3.1.1's "unacceptable protocol version" is understood by older clients too.
            let mut out = BytesMut::new();
            let refusal = connack(ConnectReturnCode::RefusedProtocolVersion, false, None);
            if Codec::new(ProtocolVersion::V311, usize::MAX)
                .write(refusal, &mut out)
                .is_ok()
            {
                let _ = stream.write_all(&out).await;
            }
            return Err(format!("unsupported protocol level {level}"));
        }
        None => return Err("CONNECT has no MQTT protocol name".into()),
    };
    let codec = Codec::new(version, ctx.max_packet_size);
    match codec.read(buf) {
        Ok(packet) => Ok((codec, packet)),
        Err(e) => {
            if version == ProtocolVersion::V5 {
                let _ = write_packet(
                    stream,
                    &codec,
                    connack(ConnectReturnCode::MalformedPacket, false, None),
                )
                .await;
            }
            Err(format!("malformed CONNECT: {e}"))
        }
    }
}

fn connack(
    code: ConnectReturnCode,
    session_present: bool,
    props: Option<ConnAckProperties>,
) -> Packet {
    Packet::ConnAck(
        ConnAck {
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

/// An accepted session: the teardown guard plus what the loop needs.
struct Accepted {
    live: LiveSession,
    link_rx: LinkRx,
    version: ProtocolVersion,
    keep_alive: Option<Duration>,
}

/// Authenticates, takes over any session with the same client identifier, registers the router
/// link and answers CONNACK. `None` when the CONNECT was refused (the refusal is already sent).
async fn accept<S>(
    ctx: &Arc<SessionContext>,
    stream: &mut S,
    peer: SocketAddr,
    codec: &Codec,
    request: ConnectRequest,
) -> Option<Accepted>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let ConnectRequest {
        connect,
        persistence,
        will,
        login,
    } = request;
    let version = codec.version();
    let refuse = |v311: ConnectReturnCode, v5: ConnectReturnCode| match version {
        ProtocolVersion::V311 => v311,
        ProtocolVersion::V5 => v5,
    };
    let refusal = |code: ConnectReturnCode, why: String| {
        let packet = connack(code, false, None);
        let user = login
            .as_ref()
            .map(|l| l.username.clone())
            .unwrap_or_default();
        tracing::info!(%peer, username = %user, mqtt_client_id = %connect.client_id, reason = %why, "connect refused");
        packet
    };

    let clean = connect.clean_session;
    let (mqtt_client_id, assigned) = if connect.client_id.is_empty() {
        if !clean {
            let p = refusal(
                refuse(
                    ConnectReturnCode::ClientIdentifierNotValid,
                    ConnectReturnCode::ClientIdentifierNotValid,
                ),
                "empty client identifier with a persistent session".into(),
            );
            let _ = write_packet(stream, codec, p).await;
            return None;
        }
        (format!("auto-{}", uuid::Uuid::new_v4().simple()), true)
    } else {
        (connect.client_id.clone(), false)
    };

    let credentials = Credentials {
        username: login.as_ref().map(|l| l.username.as_str()),
        password: login.as_ref().map(|l| l.password.as_str()),
    };
    let identity = match ctx.hooks.authenticate(credentials).await {
        Ok(identity) => identity,
        Err(e) => {
            let code = match e {
                AuthError::BadCredentials => refuse(
                    ConnectReturnCode::NotAuthorized,
                    ConnectReturnCode::BadUserNamePassword,
                ),
                AuthError::MissingCredentials => refuse(
                    ConnectReturnCode::NotAuthorized,
                    ConnectReturnCode::NotAuthorized,
                ),
                AuthError::Unavailable(_) => refuse(
                    ConnectReturnCode::ServiceUnavailable,
                    ConnectReturnCode::ServerUnavailable,
                ),
            };
            let p = refusal(code, e.to_string());
            let _ = write_packet(stream, codec, p).await;
            return None;
        }
    };

    // The will is authorized now, as the publish it will become.
    let will = match will {
        None => None,
        Some(mut will) => {
            let topic = String::from_utf8_lossy(&will.topic).into_owned();
            match ctx.hooks.authorize(&identity, &topic, Usage::Publish).await {
                TopicDecision::Allow(canonical) => {
                    will.topic = Bytes::from(canonical);
                    Some(will)
                }
                _ => {
                    let p = refusal(
                        refuse(
                            ConnectReturnCode::NotAuthorized,
                            ConnectReturnCode::NotAuthorized,
                        ),
                        format!("will topic {topic:?} not authorized"),
                    );
                    let _ = write_packet(stream, codec, p).await;
                    return None;
                }
            }
        }
    };

    let registration = ctx.registry.register(&mqtt_client_id, &ctx.shutdown).await;
    if clean && !persistence.router_clean {
        // A clean start that persists afterwards: discard the old state first.
        if let Some(generation) = ctx.broker.persistent_generation(&mqtt_client_id) {
            ctx.broker.expire(&mqtt_client_id, generation).await;
        }
    }
    let router_clean = persistence.router_clean;
    let router_name = ctx.broker.name_for(&mqtt_client_id, router_clean);
    let info = SessionInfo {
        identity,
        mqtt_client_id,
        version,
        peer,
    };
    let (link_tx, link_rx, ack) = match ctx.broker.link(&router_name, router_clean).await {
        Ok(link) => link,
        Err(e) => {
            ctx.broker.release(router_name);
            ctx.registry
                .unregister(&info.mqtt_client_id, registration.id);
            let p = refusal(
                refuse(
                    ConnectReturnCode::ServiceUnavailable,
                    ConnectReturnCode::ServerUnavailable,
                ),
                e.to_string(),
            );
            let _ = write_packet(stream, codec, p).await;
            return None;
        }
    };
    let expiry = (!router_clean).then_some(persistence.expiry);
    let mut live = LiveSession::new(
        ctx.clone(),
        info,
        link_tx,
        router_name,
        registration,
        will,
        expiry,
    );

    let session_present = match Option::<Packet>::from(ack) {
        Some(Packet::ConnAck(ack, _)) => !clean && !router_clean && ack.session_present,
        _ => false,
    };
    let props = (version == ProtocolVersion::V5).then(|| ConnAckProperties {
        assigned_client_identifier: assigned.then(|| live.info.mqtt_client_id.clone()),
        max_packet_size: Some(ctx.max_packet_size as u32),
        receive_max: Some(ctx.limits.max_inflight()),
        retain_available: Some(1),
        shared_subscription_available: Some(0),
        subscription_identifiers_available: Some(0),
        wildcard_subscription_available: Some(1),
        ..Default::default()
    });
    // The `connect` is in the event log before the device hears CONNACK, so a crash from
    // here on finds the session open and closes it with a `disconnect` at the next start.
    live.announce().await;
    if let Err(e) = write_packet(
        stream,
        codec,
        connack(ConnectReturnCode::Success, session_present, props),
    )
    .await
    {
        tracing::info!(%peer, error = %e, "CONNACK could not be written");
        let _ = live.end(DisconnectReason::ConnectionLost, false);
        return None;
    }
    tracing::info!(client_id = %live.info.identity.client_id, mqtt_client_id = %live.info.mqtt_client_id,
        %peer, version = version.as_str(), keep_alive = connect.keep_alive, clean, "connected");
    let keep_alive = (connect.keep_alive > 0)
        .then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
    Some(Accepted {
        live,
        link_rx,
        version,
        keep_alive,
    })
}

/// What a CONNECT asks for.
struct ConnectRequest {
    connect: Connect,
    persistence: Persistence,
    will: Option<LastWill>,
    login: Option<Login>,
}

/// How long a session's state outlives its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Persistence {
    /// Whether the router link starts and ends without state.
    router_clean: bool,
    /// How long the state is kept after disconnect when the link is not clean (`None`: forever).
    expiry: Option<Duration>,
}

impl Persistence {
    /// 3.1.1: clean session or kept forever. 5: clean start decides the start, the session
    /// expiry interval (default 0, 0xFFFFFFFF = never) how long the state outlives the connection.
    fn of(version: ProtocolVersion, clean: bool, props: Option<&ConnectProperties>) -> Self {
        match version {
            ProtocolVersion::V311 => Persistence {
                router_clean: clean,
                expiry: None,
            },
            ProtocolVersion::V5 => {
                let interval = props.and_then(|p| p.session_expiry_interval).unwrap_or(0);
                Persistence {
                    router_clean: clean && interval == 0,
                    expiry: (interval != u32::MAX)
                        .then(|| Duration::from_secs(u64::from(interval))),
                }
            }
        }
    }
}

/// How a topic or filter was refused; remembered per session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Denied,
    Invalid,
}

/// Per-session state of the relay loop.
struct Relay<'a> {
    ctx: &'a SessionContext,
    codec: Codec,
    info: SessionInfo,
    wbuf: BytesMut,
    to_router: Vec<Packet>,
    /// SUBSCRIBEs partly refused here: the codes of the refused filters, by packet id, merged
    /// into the router's SUBACK.
    pending_subacks: HashMap<u16, Vec<Option<SubscribeReasonCode>>>,
    /// QoS 2 PUBLISHes refused with a PUBREC; their PUBREL is answered here.
    refused_qos2: HashSet<u16>,
    topic_cache: HashMap<Bytes, Result<Arc<PublishRoute>, Refusal>>,
    publish_rate: Option<PublishRate>,
    /// QoS 1/2 PUBLISHes handed to the router and not yet acknowledged to the device.
    inflight_in: u16,
    /// Router QoS 2 deliveries written to the device at QoS 1, by packet id.
    capped_2to1: HashSet<u16>,
    /// Router QoS 2 deliveries acknowledged here; their PUBREL is answered here too.
    absorb_pubrel: HashSet<u16>,
}

async fn run<S>(
    ctx: &SessionContext,
    session: &mut Accepted,
    stream: &mut S,
    mut rbuf: BytesMut,
    codec: Codec,
) -> End
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut relay = Relay {
        ctx,
        codec,
        info: session.live.info.clone(),
        wbuf: BytesMut::new(),
        to_router: Vec::new(),
        pending_subacks: HashMap::new(),
        refused_qos2: HashSet::new(),
        topic_cache: HashMap::new(),
        publish_rate: ctx.limits.publish_rate(),
        inflight_in: 0,
        capped_2to1: HashSet::new(),
        absorb_pubrel: HashSet::new(),
    };
    let takeover = session.live.takeover_token();
    let mut last_read = Instant::now();
    let keep_alive = session.keep_alive.unwrap_or(Duration::from_secs(3600));
    let keep_alive_timer = tokio::time::sleep(keep_alive);
    tokio::pin!(keep_alive_timer);

    // Bytes after the CONNECT in the first read are the device's next packets.
    if !rbuf.is_empty() {
        if let Err(end) = relay.input(&mut rbuf, &mut session.live).await {
            return end;
        }
    }
    loop {
        let step = tokio::select! {
            biased;
            _ = takeover.cancelled() => Err(if ctx.shutdown.is_cancelled() {
                End::new(DisconnectReason::ServerShutdown, Some(DisconnectReasonCode::ServerShuttingDown), "adapter shutting down")
            } else {
                End::new(DisconnectReason::Takeover, Some(DisconnectReasonCode::SessionTakenOver), "another connection took the client identifier over")
            }),
            _ = &mut keep_alive_timer, if session.keep_alive.is_some() => {
                let due = last_read + keep_alive;
                if Instant::now() >= due {
                    Err(End::new(DisconnectReason::KeepAliveTimeout, Some(DisconnectReasonCode::KeepAliveTimeout), "no packet within 1.5 × keep-alive"))
                } else {
                    keep_alive_timer.as_mut().reset(due);
                    Ok(())
                }
            }
            read = stream.read_buf(&mut rbuf) => match read {
                Ok(0) => Err(End::lost("connection closed by device")),
                Err(e) => Err(End::lost(format!("read error: {e}"))),
                Ok(_) => {
                    last_read = Instant::now();
                    relay.input(&mut rbuf, &mut session.live).await
                }
            },
            notification = session.link_rx.next() => match notification {
                Ok(first) => relay.output(first, &mut session.link_rx, &mut session.live).await,
                Err(e) => Err(End::new(DisconnectReason::ServerShutdown, Some(DisconnectReasonCode::ServerShuttingDown), format!("router link closed: {e}"))),
            },
        };
        if let Err(end) = step {
            return end;
        }
        if !relay.wbuf.is_empty() {
            match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&relay.wbuf)).await {
                Ok(Ok(())) => relay.wbuf.clear(),
                Ok(Err(e)) => return End::lost(format!("write error: {e}")),
                Err(_) => return End::lost("device did not read for 30 s"),
            }
            if relay.wbuf.capacity() > 64 * 1024 {
                relay.wbuf = BytesMut::new();
            }
        }
        if rbuf.is_empty() && rbuf.capacity() > 64 * 1024 {
            rbuf = BytesMut::with_capacity(512);
        }
    }
}

impl Relay<'_> {
    fn write(&mut self, packet: Packet) -> Result<(), End> {
        self.codec
            .write(packet, &mut self.wbuf)
            .map(|_| ())
            .map_err(|e| {
                End::protocol(
                    DisconnectReasonCode::ImplementationSpecificError,
                    format!("encode error: {e}"),
                )
            })
    }

    /// Parses every complete frame in `rbuf`, applies the hooks and hands the result to the
    /// router in one batch.
    async fn input(&mut self, rbuf: &mut BytesMut, live: &mut LiveSession) -> Result<(), End> {
        // Packets before a DISCONNECT or a bad frame in the same read still reach the router.
        let parsed = self.parse(rbuf).await;
        let flushed = self.flush_to_router(live).await;
        parsed.and(flushed)
    }

    async fn parse(&mut self, rbuf: &mut BytesMut) -> Result<(), End> {
        loop {
            let header = match frame::peek_header(rbuf, self.ctx.max_packet_size) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(FrameError::TooLarge(n)) => {
                    return Err(End::protocol(
                        DisconnectReasonCode::PacketTooLarge,
                        format!("packet of {n} bytes exceeds the maximum"),
                    ))
                }
                Err(e) => {
                    return Err(End::protocol(
                        DisconnectReasonCode::MalformedPacket,
                        e.to_string(),
                    ))
                }
            };
            if rbuf.len() < header.frame_len() {
                rbuf.reserve(header.frame_len() - rbuf.len());
                break;
            }
            let kind = header.packet_type();
            if kind == frame::CONNECT || !frame::client_may_send(kind) {
                return Err(End::protocol(
                    DisconnectReasonCode::ProtocolError,
                    format!("unexpected packet type {kind}"),
                ));
            }
            if kind == frame::DISCONNECT {
                // Read here: rumqttd's MQTT 5 codec rejects the legal one-byte (reason only) form.
                let reason = rbuf
                    .get(header.header_len)
                    .copied()
                    .filter(|_| header.remaining_len > 0);
                let _ = rbuf.split_to(header.frame_len());
                let mut end = End::new(DisconnectReason::ClientDisconnect, None, "DISCONNECT");
                end.publish_will = reason == Some(WITH_WILL);
                return Err(end);
            }
            let mut publish_id = None;
            if kind == frame::PUBLISH {
                match header.publish_qos() {
                    0 => {}
                    3 => {
                        return Err(End::protocol(
                            DisconnectReasonCode::MalformedPacket,
                            "PUBLISH with QoS 3",
                        ))
                    }
                    _ => publish_id = frame::publish_packet_id(rbuf, &header),
                }
            }
            let qos = header.publish_qos();
            let packet = self.codec.read(rbuf).map_err(|e| {
                End::protocol(
                    DisconnectReasonCode::MalformedPacket,
                    format!("malformed packet: {e}"),
                )
            })?;
            self.packet(packet, qos, publish_id).await?;
        }
        Ok(())
    }

    async fn packet(
        &mut self,
        packet: Packet,
        qos: u8,
        publish_id: Option<u16>,
    ) -> Result<(), End> {
        match packet {
            Packet::Publish(publish, props) => self.publish(publish, props, qos, publish_id).await,
            Packet::PubRel(rel, props) => {
                if self.refused_qos2.remove(&rel.pkid) {
                    let comp = PubComp {
                        pkid: rel.pkid,
                        reason: PubCompReason::Success,
                    };
                    self.write(Packet::PubComp(comp, None))
                } else {
                    self.to_router.push(Packet::PubRel(rel, props));
                    Ok(())
                }
            }
            Packet::Subscribe(subscribe, props) => self.subscribe(subscribe, props).await,
            Packet::Unsubscribe(mut unsubscribe, props) => {
                for filter in &mut unsubscribe.filters {
                    if let Ok(TopicKind::Channel(c)) = topic::parse(filter, Usage::Subscribe) {
                        *filter = c.canonical();
                    }
                }
                self.to_router.push(Packet::Unsubscribe(unsubscribe, props));
                Ok(())
            }
            Packet::PingReq(_) => self.write(Packet::PingResp(PingResp)),
            Packet::PubAck(ack, _) if self.capped_2to1.remove(&ack.pkid) => {
                // The device acknowledged at QoS 1 what the router sent at QoS 2.
                self.router_ack_qos2(ack.pkid);
                Ok(())
            }
            ack @ (Packet::PubAck(..) | Packet::PubRec(..) | Packet::PubComp(..)) => {
                self.to_router.push(ack);
                Ok(())
            }
            other => Err(End::protocol(
                DisconnectReasonCode::ProtocolError,
                format!("unexpected packet {other:?}"),
            )),
        }
    }

    async fn publish(
        &mut self,
        mut publish: Publish,
        props: Option<rumqttd::protocol::PublishProperties>,
        qos: u8,
        publish_id: Option<u16>,
    ) -> Result<(), End> {
        self.ctx.metrics.messages_in.inc();
        if self.publish_rate.as_ref().is_some_and(|r| !r.allow()) {
            self.ctx
                .metrics
                .limit_hits
                .with_label_values(&["publish_rate"])
                .inc();
            return Err(End::protocol(
                DisconnectReasonCode::MessageRateTooHigh,
                "publish rate limit exceeded",
            ));
        }
        if props.as_ref().is_some_and(|p| p.topic_alias.is_some()) {
            return Err(End::protocol(
                DisconnectReasonCode::TopicAliasInvalid,
                "topic aliases are not accepted",
            ));
        }
        let decision = match self.topic_cache.get(&publish.topic) {
            Some(d) => d.clone(),
            None => {
                let d = self.decide_publish(&publish.topic).await;
                if self.topic_cache.len() >= TOPIC_CACHE_SIZE {
                    self.topic_cache.clear();
                }
                // A denial may come from an auth service that is briefly unavailable: it is
                // asked again next time (the auth backends cache their real answers). The key
                // is a copy: the frame's bytes would pin the whole read buffer they came in.
                if !matches!(d, Err(Refusal::Denied)) {
                    self.topic_cache
                        .insert(Bytes::copy_from_slice(&publish.topic), d.clone());
                }
                d
            }
        };
        match decision {
            Ok(route) => {
                self.ctx
                    .hooks
                    .published(&self.info, &route, &publish.payload);
                publish.topic = route.topic.clone();
                if qos > 0 {
                    self.inflight_in = self.inflight_in.saturating_add(1);
                    if self.inflight_in > self.ctx.limits.max_inflight() {
                        self.ctx
                            .metrics
                            .limit_hits
                            .with_label_values(&["inflight"])
                            .inc();
                        return Err(End::protocol(
                            DisconnectReasonCode::ReceiveMaximumExceeded,
                            "too many unacknowledged QoS 1/2 PUBLISHes",
                        ));
                    }
                }
                let mut props = props;
                qos::mark_origin(&mut props, qos);
                self.to_router.push(Packet::Publish(publish, props));
                Ok(())
            }
            Err(refusal) => self.refuse_publish(&publish.topic, refusal, qos, publish_id),
        }
    }

    async fn decide_publish(&self, topic: &Bytes) -> Result<Arc<PublishRoute>, Refusal> {
        let Ok(text) = std::str::from_utf8(topic) else {
            return Err(Refusal::Invalid);
        };
        match self
            .ctx
            .hooks
            .authorize(&self.info.identity, text, Usage::Publish)
            .await
        {
            TopicDecision::Allow(canonical) => {
                let channel = match topic::parse(&canonical, Usage::Publish) {
                    Ok(TopicKind::Channel(c)) => Some(c),
                    _ => None,
                };
                // Owned bytes: the frame's would pin the whole read buffer they came in.
                Ok(Arc::new(PublishRoute {
                    topic: Bytes::from(canonical),
                    channel,
                }))
            }
            TopicDecision::Deny => Err(Refusal::Denied),
            TopicDecision::Invalid(_) => Err(Refusal::Invalid),
        }
    }

    fn refuse_publish(
        &mut self,
        topic: &Bytes,
        refusal: Refusal,
        qos: u8,
        publish_id: Option<u16>,
    ) -> Result<(), End> {
        let topic = String::from_utf8_lossy(topic);
        tracing::info!(client_id = %self.info.identity.client_id, %topic, ?refusal, qos, "publish refused");
        if self.codec.version() == ProtocolVersion::V311 {
            // 3.1.1 has no way to refuse a PUBLISH: close, as SuperMQ does.
            return Err(End::protocol(
                DisconnectReasonCode::NotAuthorized,
                format!("publish to {topic:?} refused"),
            ));
        }
        let Some(pkid) = publish_id else {
            return Ok(());
        };
        match qos {
            1 => {
                let reason = match refusal {
                    Refusal::Denied => PubAckReason::NotAuthorized,
                    Refusal::Invalid => PubAckReason::TopicNameInvalid,
                };
                self.write(Packet::PubAck(PubAck { pkid, reason }, None))
            }
            _ => {
                let reason = match refusal {
                    Refusal::Denied => PubRecReason::NotAuthorized,
                    Refusal::Invalid => PubRecReason::TopicNameInvalid,
                };
                self.refused_qos2.insert(pkid);
                self.write(Packet::PubRec(PubRec { pkid, reason }, None))
            }
        }
    }

    async fn subscribe(
        &mut self,
        mut subscribe: rumqttd::protocol::Subscribe,
        props: Option<rumqttd::protocol::SubscribeProperties>,
    ) -> Result<(), End> {
        let v5 = self.codec.version() == ProtocolVersion::V5;
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut allowed = Vec::with_capacity(subscribe.filters.len());
        for mut filter in std::mem::take(&mut subscribe.filters) {
            // `$` filters (including `$share`) would make the router drop the connection.
            let decision = if filter.path.starts_with('$') {
                TopicDecision::Invalid(topic::TopicError::BadFilter)
            } else {
                self.ctx
                    .hooks
                    .authorize(&self.info.identity, &filter.path, Usage::Subscribe)
                    .await
            };
            match decision {
                TopicDecision::Allow(canonical) => {
                    filter.path = canonical;
                    allowed.push(filter);
                    codes.push(None);
                }
                refused => {
                    tracing::info!(client_id = %self.info.identity.client_id, filter = %filter.path, "subscribe refused");
                    codes.push(Some(match (v5, refused) {
                        (false, _) => SubscribeReasonCode::Failure,
                        (true, TopicDecision::Invalid(_)) => {
                            SubscribeReasonCode::TopicFilterInvalid
                        }
                        (true, _) => SubscribeReasonCode::NotAuthorized,
                    }));
                }
            }
        }
        if allowed.is_empty() {
            let return_codes = codes.into_iter().flatten().collect();
            return self.write(Packet::SubAck(
                SubAck {
                    pkid: subscribe.pkid,
                    return_codes,
                },
                None,
            ));
        }
        if allowed.len() < codes.len() {
            self.pending_subacks.insert(subscribe.pkid, codes);
        }
        subscribe.filters = allowed;
        self.to_router.push(Packet::Subscribe(subscribe, props));
        Ok(())
    }

    async fn flush_to_router(&mut self, live: &mut LiveSession) -> Result<(), End> {
        live.send_to_router(&mut self.to_router).await.map_err(|e| {
            End::new(
                DisconnectReason::ServerShutdown,
                Some(DisconnectReasonCode::ServerShuttingDown),
                format!("router link closed: {e}"),
            )
        })
    }

    /// Encodes a batch of router notifications for the device, then answers the router for
    /// anything acknowledged here.
    async fn output(
        &mut self,
        first: Option<Notification>,
        link_rx: &mut LinkRx,
        live: &mut LiveSession,
    ) -> Result<(), End> {
        let mut unscheduled = false;
        let mut next = first;
        for _ in 0..MAX_WRITE_BATCH {
            if let Some(notification) = next.take() {
                unscheduled |= self.notification(notification)?;
            }
            match link_rx.next().now_or_never() {
                Some(Ok(Some(n))) => next = Some(n),
                _ => break,
            }
        }
        if let Some(n) = next {
            unscheduled |= self.notification(n)?;
        }
        self.flush_to_router(live).await?;
        if unscheduled {
            // The router parks a link that reported Unschedule until it is woken.
            link_rx.wake().await.map_err(|e| {
                End::new(
                    DisconnectReason::ServerShutdown,
                    None,
                    format!("router link closed: {e}"),
                )
            })?;
        }
        Ok(())
    }

    /// Handles one router notification; returns whether the router unscheduled the link.
    fn notification(&mut self, notification: Notification) -> Result<bool, End> {
        match notification {
            Notification::Forward(mut forward) => {
                self.ctx.metrics.messages_out.inc();
                let origin = qos::take_origin(&mut forward.properties).filter(|&q| q < 2);
                let start = self.wbuf.len();
                let resend = origin.map(|_| {
                    let p = &forward.publish;
                    (
                        p.topic.clone(),
                        p.payload.clone(),
                        p.retain,
                        forward.properties.clone(),
                    )
                });
                self.write(Packet::Publish(forward.publish, forward.properties))?;
                if let (Some(origin), Some(resend)) = (origin, resend) {
                    self.cap_qos(start, origin, resend)?;
                }
            }
            Notification::DeviceAck(ack) => match Packet::from(ack) {
                Packet::PubRel(rel, _) if self.absorb_pubrel.remove(&rel.pkid) => {
                    // The device got this one at a lower QoS: finish the router's flow here.
                    let comp = PubComp {
                        pkid: rel.pkid,
                        reason: PubCompReason::Success,
                    };
                    self.to_router.push(Packet::PubComp(comp, None));
                }
                Packet::SubAck(mut suback, props) => {
                    if let Some(codes) = self.pending_subacks.remove(&suback.pkid) {
                        let mut granted = std::mem::take(&mut suback.return_codes).into_iter();
                        suback.return_codes = codes
                            .into_iter()
                            .map(|c| {
                                c.or_else(|| granted.next())
                                    .unwrap_or(SubscribeReasonCode::Failure)
                            })
                            .collect();
                    }
                    self.write(Packet::SubAck(suback, props))?;
                }
                packet => {
                    if matches!(packet, Packet::PubAck(..) | Packet::PubComp(..)) {
                        self.inflight_in = self.inflight_in.saturating_sub(1);
                    }
                    self.write(packet)?
                }
            },
            Notification::Unschedule => return Ok(true),
            Notification::Disconnect(disconnect, _) => {
                return Err(End::protocol(
                    disconnect.reason_code,
                    "router closed the session",
                ));
            }
            _ => {}
        }
        Ok(false)
    }

    /// Caps the PUBLISH just encoded at `start` to the QoS it was published with.
    fn cap_qos(
        &mut self,
        start: usize,
        origin: u8,
        (topic, payload, retain, props): (
            Bytes,
            Bytes,
            bool,
            Option<rumqttd::protocol::PublishProperties>,
        ),
    ) -> Result<(), End> {
        let delivered = (self.wbuf[start] >> 1) & 0b11;
        if delivered <= origin {
            return Ok(());
        }
        let encoded = &self.wbuf[start..];
        let pkid = frame::peek_header(encoded, usize::MAX)
            .ok()
            .flatten()
            .and_then(|h| frame::publish_packet_id(encoded, &h))
            .ok_or_else(|| {
                End::protocol(
                    DisconnectReasonCode::ImplementationSpecificError,
                    "encoded PUBLISH has no packet id",
                )
            })?;
        if origin == 1 {
            // QoS 2 and QoS 1 PUBLISH frames differ only in the QoS bits.
            self.wbuf[start] = (self.wbuf[start] & !0b0110) | 0b0010;
            self.capped_2to1.insert(pkid);
            return Ok(());
        }
        self.wbuf.truncate(start);
        self.write(Packet::Publish(Publish::new(topic, payload, retain), props))?;
        if delivered == 1 {
            let ack = PubAck {
                pkid,
                reason: PubAckReason::Success,
            };
            self.to_router.push(Packet::PubAck(ack, None));
        } else {
            self.router_ack_qos2(pkid);
        }
        Ok(())
    }

    /// Acknowledges a router QoS 2 delivery (PUBREC now, PUBCOMP when its PUBREL comes).
    fn router_ack_qos2(&mut self, pkid: u16) {
        let rec = PubRec {
            pkid,
            reason: PubRecReason::Success,
        };
        self.to_router.push(Packet::PubRec(rec, None));
        self.absorb_pubrel.insert(pkid);
    }
}

/// Builds a PUBLISH with a QoS and packet id; rumqttd keeps those fields crate-private, so this
/// goes through its neutral serialization.
pub(crate) fn publish_with_qos(
    topic: &[u8],
    payload: &[u8],
    qos: QoS,
    retain: bool,
    pkid: u16,
) -> Publish {
    let mut raw = BytesMut::with_capacity(5 + topic.len() + payload.len());
    raw.put_u8(0x30 | u8::from(retain) | ((qos as u8) << 1));
    raw.put_u16(pkid);
    raw.put_u16(topic.len() as u16);
    raw.extend_from_slice(topic);
    raw.extend_from_slice(payload);
    Publish::deserialize(raw.freeze())
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
            broker: Broker::start(&crate::broker::BrokerConfig::default()),
            hooks: Hooks::new(registry.clone(), registry).with_events(Arc::new(
                crate::hooks::ConnectionEvents::new(
                    crate::events::EventQueue::memory(outbox),
                    String::new(),
                ),
            )),
            registry: SessionRegistry::default(),
            connect_timeout: Duration::from_secs(1),
            max_packet_size: 1024,
            shutdown: CancellationToken::new(),
            metrics: Metrics::new(),
            limits: Limits::unlimited(),
        });
        let (a, _b) = tokio::io::duplex(64);
        let fut = serve(ctx, a, "127.0.0.1:1".parse().unwrap());
        // Every accepted socket holds this much until its CONNECT arrives.
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 2048, "serve future grew to {size} bytes");
    }
}
