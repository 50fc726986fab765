//! The CONNECT handshake: read the first frame and pick the codec by its protocol level, check
//! the limits, authenticate, authorize the will, attach to the broker session of (client id,
//! MQTT client identifier) — ending the connection that held it — and answer CONNACK.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{
    ConnAckProperties, ConnectProperties, ConnectReturnCode, LastWill, Packet,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::codec::{Codec, ProtocolVersion};
use super::limits::ConnectionInfo;
use super::teardown::{LiveSession, Will};
use super::{connack, frame, write_packet, SessionContext};
use crate::auth::ban::Failure;
use crate::auth::{AuthError, Credentials, TopicDecision};
use crate::broker::{AttachRequest, ConnectionMeta, Expiry, Message, Origin};
use crate::hooks::{DisconnectReason, SessionInfo};
use crate::topic::Usage;

/// A well-formed CONNECT and what the raw frame told beyond the codec.
pub(super) struct ReadConnect {
    pub codec: Codec,
    pub packet: Packet,
    /// The password exactly as sent (binary data, MQTT 3.1.3.5).
    pub password: Option<Bytes>,
}

/// Reads the first frame, which must be a CONNECT, and picks the codec from its protocol level.
pub(super) async fn read_connect<S>(
    ctx: &SessionContext,
    stream: &mut S,
    buf: &mut BytesMut,
) -> Result<ReadConnect, String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // Until the device is authenticated it may make us hold only a small CONNECT.
    let max_connect = ctx.max_connect_size.min(ctx.max_packet_size);
    let header = loop {
        match frame::peek_header(buf, max_connect) {
            Err(frame::FrameError::TooLarge(n)) => {
                // Closed as soon as the length is read: nothing of it is buffered.
                ctx.metrics.limit_hit("connect_size");
                return Err(format!(
                    "CONNECT of {n} bytes exceeds SMQ_MQTT_ADAPTER_MAX_CONNECT_SIZE ({max_connect})"
                ));
            }
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
    let (version, level) = match frame::connect_protocol_level(buf, &header) {
        Some(4) => (ProtocolVersion::V311, 4),
        Some(5) => (ProtocolVersion::V5, 5),
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
    let Some(layout) = frame::connect_layout(buf, &header, level) else {
        return malformed(stream, &codec, "shorter than its flags announce".into()).await;
    };
    if layout.flags & 0x01 != 0 || header.byte1 & 0x0F != 0 {
        return malformed(stream, &codec, "reserved flag set".into()).await;
    }
    // The codec reads the password as a string: hand it a same-length stand-in and keep the
    // bytes as sent.
    let password = layout.password.map(|range| {
        let raw = Bytes::copy_from_slice(&buf[range.clone()]);
        buf[range].fill(b'x');
        raw
    });
    match codec.read(buf) {
        Ok(packet) => Ok(ReadConnect {
            codec,
            packet,
            password,
        }),
        Err(e) => malformed(stream, &codec, e.to_string()).await,
    }
}

/// Refuses a malformed CONNECT (MQTT 5: CONNACK 0x81; 3.1.1 has no code for it: just closed).
async fn malformed<S: AsyncWrite + Unpin>(
    stream: &mut S,
    codec: &Codec,
    why: String,
) -> Result<ReadConnect, String> {
    if codec.version() == ProtocolVersion::V5 {
        let refusal = connack(ConnectReturnCode::MalformedPacket, false, None);
        let _ = write_packet(stream, codec, refusal).await;
    }
    Err(format!("malformed CONNECT: {why}"))
}

/// An accepted session: the teardown guard plus what the relay needs.
pub(super) struct Accepted {
    pub live: LiveSession,
    pub version: ProtocolVersion,
    pub keep_alive: Option<Duration>,
    /// QoS 1/2 PUBLISHes the device may have unacknowledged from us.
    pub window: usize,
    /// The MQTT 5 device's Maximum Packet Size.
    pub device_max_packet: Option<usize>,
    /// The MQTT 5 device's Topic Alias Maximum (0: send it no aliases).
    pub device_alias_max: u16,
    /// The MQTT 5 CONNECT set no session expiry: a DISCONNECT may not raise it (3.14.2.2.2).
    pub expiry_zero: bool,
}

/// Authenticates, attaches to the broker session (taking over any connection holding it) and
/// answers CONNACK. `None` when the CONNECT was refused (the refusal is already sent).
pub(super) async fn accept<S>(
    ctx: &Arc<SessionContext>,
    stream: &mut S,
    peer: SocketAddr,
    conn: &ConnectionInfo,
    read: ReadConnect,
) -> Option<Accepted>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let ReadConnect {
        codec,
        packet,
        password,
    } = read;
    let Packet::Connect(connect, props, will, will_props, login) = packet else {
        tracing::info!(%peer, "closed: first packet is not CONNECT");
        return None;
    };
    let version = codec.version();
    let pick = |v311: ConnectReturnCode, v5: ConnectReturnCode| match version {
        ProtocolVersion::V311 => v311,
        ProtocolVersion::V5 => v5,
    };
    let user = login
        .as_ref()
        .map(|l| l.username.clone())
        .unwrap_or_default();
    let refuse = |code: ConnectReturnCode, why: &str| {
        tracing::info!(%peer, username = %user.escape_debug(), mqtt_client_id = %connect.client_id.escape_debug(), reason = %why.escape_debug(), "connect refused");
        connack(code, false, None)
    };

    // Held until the session ends: counts against the connection limit.
    let Some(slot) = ctx.limits.connection_slot() else {
        ctx.metrics.refused("connection_limit");
        ctx.metrics
            .limit_hits
            .with_label_values(&["connections"])
            .inc();
        let code = pick(
            ConnectReturnCode::ServiceUnavailable,
            ConnectReturnCode::QuotaExceeded,
        );
        let _ = write_packet(stream, &codec, refuse(code, "connection limit reached")).await;
        return None;
    };
    if let Err(why) = ctx.limits.check_certificate(conn, login.as_ref()) {
        ctx.metrics.refused("certificate_mismatch");
        let p = refuse(ConnectReturnCode::NotAuthorized, &why.to_string());
        let _ = write_packet(stream, &codec, p).await;
        return None;
    }
    if props.as_ref().and_then(|p| p.receive_maximum) == Some(0) {
        let p = refuse(ConnectReturnCode::ProtocolError, "receive maximum 0");
        let _ = write_packet(stream, &codec, p).await;
        return None;
    }
    if props
        .as_ref()
        .is_some_and(|p| p.authentication_method.is_some())
    {
        // Enhanced authentication (AUTH) is not offered (MQTT 4.12).
        let code = ConnectReturnCode::BadAuthenticationMethod;
        let p = refuse(code, "enhanced authentication is not supported");
        let _ = write_packet(stream, &codec, p).await;
        return None;
    }

    let clean = connect.clean_session;
    let (mqtt_client_id, assigned) = if connect.client_id.is_empty() {
        if !clean {
            let code = ConnectReturnCode::ClientIdentifierNotValid;
            let p = refuse(code, "empty client identifier with a persistent session");
            let _ = write_packet(stream, &codec, p).await;
            return None;
        }
        (format!("auto-{}", uuid::Uuid::new_v4().simple()), true)
    } else {
        (connect.client_id.clone(), false)
    };

    let credentials = Credentials {
        username: login.as_ref().map(|l| l.username.as_str()),
        password: password.as_deref(),
    };
    let identity = match ctx.hooks.authenticate(credentials).await {
        Ok(identity) => identity,
        Err(e) => {
            let code = match e {
                AuthError::BadCredentials => pick(
                    ConnectReturnCode::NotAuthorized,
                    ConnectReturnCode::BadUserNamePassword,
                ),
                AuthError::MissingCredentials => ConnectReturnCode::NotAuthorized,
                AuthError::Unavailable(_) => pick(
                    ConnectReturnCode::ServiceUnavailable,
                    ConnectReturnCode::ServerUnavailable,
                ),
            };
            // An auth service that is down is not the device's failure.
            if !matches!(e, AuthError::Unavailable(_)) {
                note_auth_failure(ctx, peer);
            }
            let _ = write_packet(stream, &codec, refuse(code, &e.to_string())).await;
            return None;
        }
    };

    // The will is bounded and authorized now, as the publish it will become.
    if let Some(will) = &will {
        if let Err(e) = ctx.limits.check_topic(&will.topic, &ctx.metrics) {
            let code = pick(
                ConnectReturnCode::NotAuthorized,
                ConnectReturnCode::TopicNameInvalid,
            );
            let p = refuse(code, &format!("will topic refused: {e}"));
            let _ = write_packet(stream, &codec, p).await;
            return None;
        }
    }
    let will = match will {
        None => None,
        Some(will) => match authorize_will(ctx, &identity, will, will_props).await {
            Ok(will) => Some(will),
            Err(WillRefused::Denied(topic)) => {
                let why = format!("will topic {topic:?} not authorized");
                let p = refuse(ConnectReturnCode::NotAuthorized, &why);
                let _ = write_packet(stream, &codec, p).await;
                return None;
            }
            Err(WillRefused::Invalid(why)) => {
                let code = pick(
                    ConnectReturnCode::NotAuthorized,
                    ConnectReturnCode::TopicNameInvalid,
                );
                let p = refuse(code, &format!("will topic refused: {why}"));
                let _ = write_packet(stream, &codec, p).await;
                return None;
            }
        },
    };

    let request = AttachRequest {
        clean_start: clean,
        expiry: expiry_of(version, clean, props.as_ref()),
    };
    let expiry_zero = matches!(request.expiry, Expiry::WithConnection);
    let key = crate::broker::SessionKey {
        client_id: identity.client_id.clone(),
        mqtt_client_id: mqtt_client_id.clone(),
    };
    let meta = ConnectionMeta {
        remote_addr: peer.to_string(),
        transport: if conn.listener.is_empty() {
            "tcp"
        } else {
            conn.listener
        },
        protocol_version: version.as_str(),
        keep_alive: connect.keep_alive,
        connected_at: u64::try_from(crate::clock::unix_nanos()).unwrap_or(0),
    };
    let attachment = ctx.broker.attach(key, request, meta, &ctx.shutdown).await;
    let info = SessionInfo {
        identity,
        mqtt_client_id,
        version,
        peer,
    };
    if attachment.present {
        reauthorize(ctx, &info, &attachment.session).await;
    }
    let present = attachment.present;
    let mut live = LiveSession::new(ctx.clone(), info, attachment, will, slot);

    let receive_maximum = ctx.limits.max_inflight();
    let device_window = props
        .as_ref()
        .and_then(|p| p.receive_maximum)
        .unwrap_or(u16::MAX);
    let device_max_packet = props
        .as_ref()
        .and_then(|p| p.max_packet_size)
        .map(|n| n as usize);
    let device_alias_max = props.as_ref().and_then(|p| p.topic_alias_max).unwrap_or(0);
    let v5 = version == ProtocolVersion::V5;
    // MQTT 5 Server Keep Alive: a device asking for more (or for none) gets the maximum.
    let keep_alive = match ctx.max_keep_alive {
        max if v5 && max > 0 && (connect.keep_alive == 0 || connect.keep_alive > max) => max,
        _ => connect.keep_alive,
    };
    let props = v5.then(|| ConnAckProperties {
        assigned_client_identifier: assigned.then(|| live.info.mqtt_client_id.clone()),
        max_packet_size: Some(ctx.max_packet_size as u32),
        receive_max: Some(receive_maximum),
        retain_available: Some(1),
        shared_subscription_available: Some(1),
        subscription_identifiers_available: Some(1),
        wildcard_subscription_available: Some(1),
        // Absent means 0 (MQTT 3.2.2.3.8).
        topic_alias_max: (ctx.topic_alias_maximum > 0).then_some(ctx.topic_alias_maximum),
        max_qos: None,
        server_keep_alive: (keep_alive != connect.keep_alive).then_some(keep_alive),
        ..Default::default()
    });
    // The `connect` is in the event log before the device hears CONNACK, so a crash from here
    // on finds the session open and closes it with a `disconnect` at the next start.
    // A persistent session is written (record, will, deliveries) before CONNACK too.
    let kept = ctx
        .broker
        .keep_connected(&live.attachment.session, live.kept_will());
    let announced = live.announce();
    tokio::join!(announced, kept.wait());
    if let Err(e) = write_packet(
        stream,
        &codec,
        connack(ConnectReturnCode::Success, present, props),
    )
    .await
    {
        tracing::info!(%peer, error = %e, "CONNACK could not be written");
        let _ = live.end(DisconnectReason::ConnectionLost, false);
        return None;
    }
    tracing::info!(client_id = %live.info.identity.client_id.escape_debug(), mqtt_client_id = %live.info.mqtt_client_id.escape_debug(),
        %peer, version = version.as_str(), keep_alive = connect.keep_alive, clean, present, "connected");
    let keep_alive = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
    Some(Accepted {
        live,
        version,
        keep_alive,
        window: usize::from(receive_maximum.min(device_window)),
        device_max_packet,
        device_alias_max,
        expiry_zero,
    })
}

/// Counts a CONNECT refused for its credentials against its IP; logs the ban it starts.
fn note_auth_failure(ctx: &SessionContext, peer: SocketAddr) {
    let Some(bans) = ctx.limits.auth_bans() else {
        return;
    };
    match bans.record_failure(peer.ip()) {
        Failure::Counted => {}
        Failure::BanStarted { failures } => {
            tracing::warn!(ip = %peer.ip(), failures, ban_seconds = bans.ban_duration().as_secs(),
                "IP banned: too many failed CONNECTs within a minute; its new sockets are closed");
        }
        Failure::Untracked { first } => {
            ctx.metrics.limit_hit("auth_ban_table_full");
            if first {
                tracing::warn!(ip = %peer.ip(), tracked = bans.tracked(),
                    "auth failure table full: failed CONNECTs from new IPs are not counted until entries expire");
            }
        }
    }
}

/// 3.1.1: clean session or kept until a clean CONNECT. 5: the session expiry interval (default
/// 0, 0xFFFFFFFF = never) says how long the state outlives the connection.
fn expiry_of(version: ProtocolVersion, clean: bool, props: Option<&ConnectProperties>) -> Expiry {
    match version {
        ProtocolVersion::V311 if clean => Expiry::WithConnection,
        ProtocolVersion::V311 => Expiry::Never,
        ProtocolVersion::V5 => {
            Expiry::from_interval(props.and_then(|p| p.session_expiry_interval).unwrap_or(0))
        }
    }
}

/// Why a will was refused.
enum WillRefused {
    /// Not permitted to this client: the topic.
    Denied(String),
    /// Malformed (not UTF-8, not a valid topic, beyond the bounds): why.
    Invalid(String),
}

/// Authorizes the will topic as the PUBLISH it will become.
async fn authorize_will(
    ctx: &SessionContext,
    identity: &crate::auth::Identity,
    will: LastWill,
    props: Option<rumqttd::protocol::LastWillProperties>,
) -> Result<Will, WillRefused> {
    // MQTT 1.5.4: a topic is UTF-8; a lossy conversion would authorize another topic.
    let topic = std::str::from_utf8(&will.topic)
        .map_err(|_| WillRefused::Invalid("not valid UTF-8".into()))?
        .to_owned();
    match ctx.hooks.authorize(identity, &topic, Usage::Publish).await {
        TopicDecision::Allow(canonical) => {
            ctx.limits
                .check_levels(canonical.as_bytes(), &ctx.metrics)
                .map_err(|e| WillRefused::Invalid(e.to_string()))?;
            let delay = props.as_ref().and_then(|p| p.delay_interval);
            let properties = props.and_then(|p| {
                crate::broker::message::forwarded_properties(Some(
                    rumqttd::protocol::PublishProperties {
                        payload_format_indicator: p.payload_format_indicator,
                        message_expiry_interval: p.message_expiry_interval,
                        topic_alias: None,
                        response_topic: p.response_topic,
                        correlation_data: p.correlation_data,
                        user_properties: p.user_properties,
                        subscription_identifiers: Vec::new(),
                        content_type: p.content_type,
                    },
                ))
            });
            let mut message = Message {
                topic: Bytes::from(canonical),
                payload: will.message,
                qos: will.qos as u8,
                retain: will.retain,
                properties,
                origin: Origin::Bus,
                // Set when the will is published: its expiry runs from then (MQTT 3.1.3.2.4).
                expires_at: None,
            };
            message.qos = message.qos.min(2);
            let delay = Duration::from_secs(u64::from(delay.unwrap_or(0)));
            Ok(Will { message, delay })
        }
        TopicDecision::Invalid(e) => Err(WillRefused::Invalid(e.to_string())),
        TopicDecision::Deny => Err(WillRefused::Denied(topic)),
    }
}

/// A resumed session inherits its subscriptions; rights may have been revoked while it was
/// offline, so each is authorized again and what no longer passes is dropped.
async fn reauthorize(
    ctx: &SessionContext,
    info: &SessionInfo,
    session: &Arc<crate::broker::Session>,
) {
    for (filter, _) in session.subscriptions() {
        let inner = crate::broker::shared::inner(&filter);
        // Allowed is enough: the filter is already canonical, and canonicalising it again may
        // decode a `%` its subtopic kept (`a%2555` is stored as `a%55`), on the same channel.
        let still = matches!(
            ctx.hooks
                .authorize(&info.identity, inner, Usage::Subscribe)
                .await,
            TopicDecision::Allow(_)
        );
        if !still {
            ctx.broker.unsubscribe(session, &filter);
            tracing::info!(client_id = %info.identity.client_id.escape_debug(), mqtt_client_id = %info.mqtt_client_id.escape_debug(),
                filter = %filter.escape_debug(), "inherited subscription no longer authorized: dropped");
        }
    }
}
