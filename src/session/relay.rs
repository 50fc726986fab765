//! The steady state of an accepted connection: frames from the device are checked, parsed and
//! handled (PUBLISH authorized and routed into the broker core in this task, SUBSCRIBE authorized
//! filter by filter, acknowledgements applied to the session's in-flight window), and deliveries
//! queued for the session are written to the device within its window, until the connection ends.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{
    DisconnectReasonCode, Packet, PingResp, PubAck, PubAckReason, PubComp, PubCompReason, PubRec,
    PubRecReason, PubRel, PubRelReason, Publish, PublishProperties, RetainForwardRule, SubAck,
    Subscribe, SubscribeProperties, SubscribeReasonCode, UnsubAck, UnsubAckReason, Unsubscribe,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::alias::TopicAliases;
use super::codec::{Codec, ProtocolVersion};
use super::frame::{self, FrameError};
use super::handshake::Accepted;
use super::limits::PublishRate;
use super::{deliver, End, SessionContext, WRITE_TIMEOUT};
use crate::auth::TopicDecision;
use crate::bridge::log::BusRecord;
use crate::broker::{
    message, shared, Expiry, Kick, Message, Origin, Outgoing, Session, SubOptions,
};
use crate::hooks::{DisconnectReason, PublishRoute, SessionInfo};
use crate::log::LogTicket;
use crate::state::StateTicket;
use crate::topic::{self, TopicKind, Usage};

/// Deliveries taken from the session's queue per write to the device.
const MAX_WRITE_BATCH: usize = 256;
/// MQTT 5 DISCONNECT reason "disconnect with will message".
const WITH_WILL: u8 = 0x04;
/// Distinct topics whose authorization a connection remembers.
const TOPIC_CACHE_SIZE: usize = 64;
/// Longest a SUBACK waits for the bus bridge's NATS subscriptions.
const BUS_SUBSCRIBE_WAIT: Duration = Duration::from_secs(2);
/// Buffers larger than this are released once empty instead of kept.
const KEEP_BUFFER: usize = 64 * 1024;

/// How a topic or filter was refused; remembered per connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Denied,
    Invalid,
    /// A store or bound is full (the retained store): MQTT 5 reason 0x97.
    Quota,
}

/// Per-connection state of the relay.
struct Relay<'a> {
    ctx: &'a SessionContext,
    codec: Codec,
    /// Borrowed from the accepted session: an idle connection holds one copy.
    info: &'a SessionInfo,
    session: Arc<Session>,
    wbuf: BytesMut,
    /// What only a publishing session needs, set up at its first PUBLISH (boxed: an idle
    /// session holds 8 bytes for it).
    publishing: Option<Box<Publishing>>,
    /// QoS 1/2 PUBLISHes the device may have unacknowledged from us.
    window: usize,
    /// Deliveries are ready beyond the last batch.
    more: bool,
    scratch: Vec<Outgoing>,
    /// The MQTT 5 device's Maximum Packet Size: larger PUBLISHes are not sent to it.
    device_max_packet: Option<usize>,
    aliases: TopicAliases,
    /// The CONNECT set no session expiry (see [`Accepted::expiry_zero`]).
    expiry_zero: bool,
    /// Set once the session published to the bus or waited for the state store (boxed: other
    /// sessions hold 8 bytes for it).
    pending: Option<Box<PendingAcks>>,
}

/// The part of the relay state a session needs once it publishes.
struct Publishing {
    /// Authorization answers by topic.
    topic_cache: HashMap<Bytes, Result<Arc<PublishRoute>, Refusal>>,
    /// The rights epoch the topic cache was filled in.
    rights_epoch: u64,
    /// The session's PUBLISH rate bucket (it starts full, so starting it at the first PUBLISH
    /// rather than at CONNECT changes nothing a device can see).
    rate: Option<PublishRate>,
}

impl Publishing {
    fn new(ctx: &SessionContext) -> Box<Self> {
        Box::new(Publishing {
            topic_cache: HashMap::new(),
            rights_epoch: ctx.rights.current(),
            rate: ctx.limits.publish_rate(),
        })
    }
}

/// A publishing session's acknowledgements waiting for their messages to be kept: in the bus
/// message log, and (retained messages) in the state store.
#[derive(Default)]
struct PendingAcks {
    /// Whether the session published to the bus (and so is pushed back when its log is full).
    bridged: bool,
    /// Acknowledgements in the order the PUBLISHes came.
    acks: VecDeque<PendingAck>,
    /// Device messages for the bus read since the last append, and the index in `acks` of the
    /// first acknowledgement that waits for them.
    group: Vec<BusRecord>,
    group_start: usize,
}

/// What a PUBLISH is answered with once its message is kept.
#[derive(Debug)]
enum Reply {
    /// QoS 0: nothing, but the message still counts against the pending bound.
    Nothing,
    PubAck(u16),
    PubRec(u16),
    /// A PUBREL's answer: its message was routed (and, if retained, kept) at the PUBREL.
    PubComp(u16, PubCompReason),
    /// A refusal (MQTT 5 reason code), kept in order behind the acknowledgements before it.
    Refusal(Box<Packet>),
}

/// An acknowledgement waiting for its message (and every earlier one) to be kept.
struct PendingAck {
    /// Set on the first acknowledgement of each group appended to the message log; the others
    /// of the group wait behind it.
    ticket: Option<LogTicket>,
    /// Set when the PUBLISH changed a retained message: its write to the state store.
    kept: Option<StateTicket>,
    reply: Reply,
}

impl PendingAck {
    fn is_done(&self) -> bool {
        self.ticket.as_ref().is_none_or(LogTicket::is_done)
            && self.kept.as_ref().is_none_or(StateTicket::is_done)
    }

    /// A future that resolves once it is done; `None` if it has nothing to wait for.
    fn waiter(&self) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>> {
        if self.ticket.is_none() && self.kept.is_none() {
            return None;
        }
        let ticket = self.ticket.as_ref().map(LogTicket::waiter);
        let kept = self.kept.as_ref().map(StateTicket::waiter);
        Some(Box::pin(async move {
            if let Some(ticket) = ticket {
                ticket.await;
            }
            if let Some(kept) = kept {
                kept.await;
            }
        }))
    }
}

/// The relay of one session until it ends. An `async move` block rather than an `async fn`,
/// which would keep a second copy of every argument in the idle connection's state.
#[allow(clippy::manual_async_fn)] // on purpose: see the doc comment
pub(super) fn run<'a, S>(
    ctx: &'a SessionContext,
    accepted: &'a Accepted,
    stream: &'a mut S,
    rbuf: &'a mut BytesMut,
    codec: Codec,
) -> impl std::future::Future<Output = End> + 'a
where
    S: AsyncRead + AsyncWrite + Unpin + 'a,
{
    async move {
        let session = accepted.live.attachment.session.clone();
        let control = accepted.live.attachment.control.clone();
        let mut relay = Relay {
            ctx,
            codec,
            info: &accepted.live.info,
            session,
            wbuf: BytesMut::new(),
            publishing: None,
            window: accepted.window,
            more: true,
            scratch: Vec::new(),
            device_max_packet: accepted.device_max_packet,
            aliases: TopicAliases::new(ctx.topic_alias_maximum, accepted.device_alias_max),
            expiry_zero: accepted.expiry_zero,
            pending: None,
        };
        // A resumed session first completes what the previous connection left in flight.
        for outgoing in relay.session.resend() {
            if let Err(end) = relay.write_outgoing(outgoing) {
                return end;
            }
        }
        // Keep-alive is the shared wheel's: the connection notes its reads in its control.
        if let Some(period) = accepted.keep_alive {
            ctx.keep_alive.watch(&control, period);
        }

        // Bytes after the CONNECT in the first read are the device's next packets.
        if !rbuf.is_empty() {
            if let Err(end) = Box::pin(relay.input(rbuf)).await {
                return end;
            }
        }
        loop {
            if let Err(end) = relay.write_kept_acks() {
                return end;
            }
            if let Err(end) = relay.fill() {
                return end;
            }
            if !relay.wbuf.is_empty() {
                match tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&relay.wbuf)).await {
                    Ok(Ok(())) => relay.wbuf.clear(),
                    Ok(Err(e)) => return End::lost(format!("write error: {e}")),
                    Err(_) => return End::lost("device did not read for 30 s"),
                }
                // A session with nothing more to send keeps no write buffer; a busy one keeps it
                // (up to KEEP_BUFFER) for the next batch.
                if !relay.more || relay.wbuf.capacity() > KEEP_BUFFER {
                    relay.wbuf = BytesMut::new();
                }
            }
            if !relay.more && relay.scratch.capacity() > 0 {
                relay.scratch = Vec::new();
            }
            // Nothing half-read: the buffer is released, so a quiet device holds none (the next
            // read lands on the stack first, see `read_some`).
            if rbuf.is_empty() {
                *rbuf = BytesMut::new();
            }
            let pushed_back = relay.pushed_back();
            let acks_full = relay
                .pending
                .as_ref()
                .is_some_and(|b| b.acks.len() >= usize::from(ctx.limits.max_inflight()));
            // Boxed, and only while an acknowledgement waits or the session is pushed back: an
            // idle session holds no room for it.
            let kept_wait = relay.kept_wait(pushed_back);
            // Time pushed back (not read) does not count against the device.
            control.set_paused(pushed_back || acks_full);
            let cancel = control.wake_up();
            if control.is_cancelled() {
                return kicked(ctx, control.kicked());
            }
            let step = tokio::select! {
                biased;
                _ = cancel => match control.is_cancelled() {
                    true => Err(kicked(ctx, control.kicked())),
                    false => Ok(()),
                },
                Some(()) = futures_util::future::OptionFuture::from(kept_wait) => Ok(()),
                read = read_some(stream, rbuf), if !pushed_back && !acks_full => match read {
                    Ok(0) => Err(End::lost("connection closed by device")),
                    Err(e) => Err(End::lost(format!("read error: {e}"))),
                    Ok(_) => {
                        control.read_at(ctx.keep_alive.now());
                        // Boxed: an idle connection holds no room for handling a packet.
                        Box::pin(relay.input(rbuf)).await
                    }
                },
                _ = relay.session.delivery_ready(), if !relay.more => {
                    relay.more = true;
                    Ok(())
                }
                _ = std::future::ready(()), if relay.more => Ok(()),
            };
            if let Err(end) = step {
                return end;
            }
        }
    }
}

/// Bytes one read takes on the stack when the read buffer has no room.
const READ_CHUNK: usize = 4096;

/// Reads what the device sent onto `rbuf`. With no room in `rbuf` the bytes are read into a
/// buffer on the stack and copied, so a read buffer is allocated only once bytes have arrived.
fn read_some<'a, S>(
    stream: &'a mut S,
    rbuf: &'a mut BytesMut,
) -> impl std::future::Future<Output = std::io::Result<usize>> + 'a
where
    S: AsyncRead + Unpin,
{
    std::future::poll_fn(move |cx| {
        if rbuf.capacity() > rbuf.len() {
            return tokio_util::io::poll_read_buf(std::pin::Pin::new(&mut *stream), cx, rbuf);
        }
        let mut stack = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut buf = tokio::io::ReadBuf::uninit(&mut stack);
        std::task::ready!(std::pin::Pin::new(&mut *stream).poll_read(cx, &mut buf))?;
        rbuf.extend_from_slice(buf.filled());
        std::task::Poll::Ready(Ok(buf.filled().len()))
    })
}

/// A codec error as logged, naming the packet it was found in (the codec's own text for a bad
/// reason code speaks of "connect" whatever the packet).
fn codec_error(kind: u8, e: rumqttd::protocol::Error) -> String {
    let packet = match kind {
        frame::PUBLISH => "PUBLISH",
        4 => "PUBACK",
        5 => "PUBREC",
        frame::PUBREL => "PUBREL",
        7 => "PUBCOMP",
        frame::SUBSCRIBE => "SUBSCRIBE",
        frame::UNSUBSCRIBE => "UNSUBSCRIBE",
        12 => "PINGREQ",
        _ => "packet",
    };
    match e {
        rumqttd::protocol::Error::InvalidConnectReturnCode(code) => {
            format!("malformed {packet}: invalid reason code {code:#04x}")
        }
        e => format!("malformed {packet}: {e}"),
    }
}

/// Why the broker (or the server) ended the connection.
fn kicked(ctx: &SessionContext, why: Option<Kick>) -> End {
    match why {
        Some(Kick::Takeover) => End::new(
            DisconnectReason::Takeover,
            Some(DisconnectReasonCode::SessionTakenOver),
            "another connection took the session over",
        ),
        Some(Kick::Administrative) => End::new(
            DisconnectReason::Administrative,
            Some(DisconnectReasonCode::AdministrativeAction),
            "closed by an operator",
        ),
        Some(Kick::KeepAlive) => End::new(
            DisconnectReason::KeepAliveTimeout,
            Some(DisconnectReasonCode::KeepAliveTimeout),
            "no packet within 1.5 × keep-alive",
        ),
        Some(Kick::Revoked) => End::new(
            DisconnectReason::Revoked,
            Some(DisconnectReasonCode::NotAuthorized),
            "the client's rights were revoked",
        ),
        None if ctx.shutdown.is_cancelled() => End::new(
            DisconnectReason::ServerShutdown,
            Some(DisconnectReasonCode::ServerShuttingDown),
            "adapter shutting down",
        ),
        None => End::new(
            DisconnectReason::ServerShutdown,
            Some(DisconnectReasonCode::ServerShuttingDown),
            "connection cancelled",
        ),
    }
}

impl Relay<'_> {
    fn v5(&self) -> bool {
        self.codec.version() == ProtocolVersion::V5
    }

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

    fn write_outgoing(&mut self, outgoing: Outgoing) -> Result<(), End> {
        let pkid = match &outgoing {
            Outgoing::Publish { pkid, .. } => Some(*pkid),
            Outgoing::Release(_) => None,
        };
        let start = self.wbuf.len();
        let mut packet = deliver::packet(outgoing, self.v5());
        let aliased = self.aliases.apply(&mut packet);
        self.write(packet)?;
        let Some(pkid) = pkid else {
            return Ok(());
        };
        if self
            .device_max_packet
            .is_some_and(|max| self.wbuf.len() - start > max)
        {
            // MQTT 3.1.2.11.4: not sent, and counted, as if delivered.
            self.wbuf.truncate(start);
            if let Some(topic) = aliased {
                self.aliases.unassign(&topic);
            }
            if pkid != 0 {
                self.session.forget(pkid);
            }
            let n = self
                .ctx
                .broker
                .stats()
                .dropped_too_large
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if n == 0 || (n + 1).is_power_of_two() {
                tracing::info!(client_id = %self.info.identity.client_id.escape_debug(), mqtt_client_id = %self.info.mqtt_client_id.escape_debug(),
                    "PUBLISH larger than the device's maximum packet size not sent");
            }
            return Ok(());
        }
        self.ctx.metrics.messages_out.inc();
        Ok(())
    }

    /// Encodes the next batch of deliveries the window allows.
    fn fill(&mut self) -> Result<(), End> {
        if !self.more {
            return Ok(());
        }
        let mut batch = std::mem::take(&mut self.scratch);
        let (more, expired) = self
            .session
            .take_ready(self.window, MAX_WRITE_BATCH, &mut batch);
        self.more = more;
        if expired > 0 {
            self.ctx
                .broker
                .stats()
                .dropped_expired
                .fetch_add(expired, std::sync::atomic::Ordering::Relaxed);
        }
        let result = batch.drain(..).try_for_each(|o| self.write_outgoing(o));
        self.scratch = batch;
        if self.scratch.capacity() > MAX_WRITE_BATCH {
            self.scratch = Vec::new();
        }
        result
    }

    /// Parses every complete frame in `rbuf` and handles it; the device messages for the bus
    /// among them go to the message log as one group.
    async fn input(&mut self, rbuf: &mut BytesMut) -> Result<(), End> {
        let result = self.frames(rbuf).await;
        self.append_bus_group();
        result
    }

    /// Appends the messages for the bus read since the last append; the first acknowledgement
    /// that waits for them gets the ticket.
    fn append_bus_group(&mut self) {
        let (Some(pending), Some(log)) = (self.pending.as_mut(), self.ctx.hooks.bus()) else {
            return;
        };
        if pending.group.is_empty() {
            return;
        }
        let ticket = log.append_all(std::mem::take(&mut pending.group));
        if let Some(first) = pending.acks.get_mut(pending.group_start) {
            first.ticket = Some(ticket);
        }
        if pending.group.capacity() > MAX_WRITE_BATCH {
            pending.group = Vec::new();
        }
    }

    /// Writes the acknowledgements whose messages are kept, in order.
    fn write_kept_acks(&mut self) -> Result<(), End> {
        let Some(pending) = self.pending.as_mut() else {
            return Ok(());
        };
        let mut kept = Vec::new();
        while let Some(front) = pending.acks.front() {
            if !front.is_done() {
                break;
            }
            if let Some(front) = pending.acks.pop_front() {
                kept.push(front.reply);
            }
        }
        if pending.acks.is_empty() && pending.acks.capacity() > MAX_WRITE_BATCH {
            pending.acks = VecDeque::new();
        }
        kept.into_iter()
            .try_for_each(|reply| self.write_reply(reply))
    }

    fn write_reply(&mut self, reply: Reply) -> Result<(), End> {
        match reply {
            Reply::Nothing => Ok(()),
            Reply::PubAck(pkid) => self.write(Packet::PubAck(
                PubAck {
                    pkid,
                    reason: PubAckReason::Success,
                },
                None,
            )),
            Reply::PubRec(pkid) => self.write(Packet::PubRec(
                PubRec {
                    pkid,
                    reason: PubRecReason::Success,
                },
                None,
            )),
            Reply::PubComp(pkid, reason) => {
                self.write(Packet::PubComp(PubComp { pkid, reason }, None))
            }
            Reply::Refusal(packet) => self.write(*packet),
        }
    }

    /// Answers a PUBLISH (or PUBREL): at once, unless its message (or an earlier one) waits
    /// for the bus message log or, retained, for the state store (`kept`).
    fn reply(&mut self, reply: Reply, bridged: bool, kept: StateTicket) -> Result<(), End> {
        let kept = (!kept.is_done()).then_some(kept);
        if kept.is_some() && self.pending.is_none() {
            self.pending = Some(Box::default());
        }
        let pending = match self.pending.as_mut() {
            Some(pending) if bridged || kept.is_some() || !pending.acks.is_empty() => pending,
            _ => return self.write_reply(reply),
        };
        if bridged && pending.group.len() == 1 {
            pending.group_start = pending.acks.len();
        }
        if bridged || kept.is_some() || !matches!(reply, Reply::Nothing) {
            pending.acks.push_back(PendingAck {
                ticket: None,
                kept,
                reply,
            });
        }
        Ok(())
    }

    /// Whether this session is pushed back: it publishes to the bus, whose message log is full.
    fn pushed_back(&self) -> bool {
        self.pending.as_ref().is_some_and(|p| p.bridged)
            && self.ctx.hooks.bus().is_some_and(|b| !b.has_room())
    }

    /// What the session waits for besides the socket: its oldest acknowledgement being kept,
    /// or (pushed back) room in the bus message log; `None` for neither.
    fn kept_wait(
        &self,
        pushed_back: bool,
    ) -> Option<std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + '_>>> {
        let ack = self
            .pending
            .as_ref()
            .and_then(|b| b.acks.front())
            .and_then(PendingAck::waiter);
        let bus = self.ctx.hooks.bus().filter(|_| pushed_back);
        match (ack, bus) {
            (None, None) => None,
            (Some(ack), None) => Some(ack),
            (ack, Some(bus)) => Some(Box::pin(async move {
                match ack {
                    Some(ack) => {
                        tokio::select! {
                            _ = ack => {}
                            _ = bus.room() => {}
                        }
                    }
                    None => bus.room().await,
                }
            })),
        }
    }

    async fn frames(&mut self, rbuf: &mut BytesMut) -> Result<(), End> {
        loop {
            let header = match frame::peek_header(rbuf, self.ctx.max_packet_size) {
                Ok(Some(h)) => h,
                Ok(None) => return Ok(()),
                Err(FrameError::TooLarge(n)) => {
                    return Err(End::protocol(
                        DisconnectReasonCode::PacketTooLarge,
                        format!("packet of {n} bytes exceeds the maximum"),
                    ))
                }
                Err(e) => return Err(End::malformed(e.to_string())),
            };
            if rbuf.len() < header.frame_len() {
                rbuf.reserve(header.frame_len() - rbuf.len());
                return Ok(());
            }
            let kind = header.packet_type();
            if kind == frame::CONNECT || !frame::client_may_send(kind) {
                return Err(End::protocol(
                    DisconnectReasonCode::ProtocolError,
                    format!("unexpected packet type {kind}"),
                ));
            }
            if !frame::fixed_flags_valid(&header) {
                return Err(End::malformed(format!(
                    "packet type {kind} with reserved header flags {:#06b}",
                    header.byte1 & 0x0F
                )));
            }
            if kind == frame::DISCONNECT {
                // Read here: rumqttd's MQTT 5 codec rejects the legal one-byte (reason only) form.
                let reason = rbuf
                    .get(header.header_len)
                    .copied()
                    .filter(|_| header.remaining_len > 0);
                let expiry = self
                    .v5()
                    .then(|| frame::disconnect_session_expiry(rbuf, &header))
                    .flatten();
                let _ = rbuf.split_to(header.frame_len());
                if self.expiry_zero && expiry.is_some_and(|s| s > 0) {
                    return Err(End::protocol(
                        DisconnectReasonCode::ProtocolError,
                        "DISCONNECT sets a session expiry where the CONNECT set none",
                    ));
                }
                if let Some(seconds) = expiry {
                    // MQTT 5 3.14.2.2.2: the session outlives this connection as now told.
                    self.ctx
                        .broker
                        .set_expiry(&self.session, Expiry::from_interval(seconds));
                }
                let mut end = End::new(DisconnectReason::ClientDisconnect, None, "DISCONNECT");
                end.publish_will = reason == Some(WITH_WILL);
                return Err(end);
            }
            if kind == frame::SUBSCRIBE || kind == frame::UNSUBSCRIBE {
                frame::check_subscription(rbuf, &header, self.v5()).map_err(End::malformed)?;
            }
            let mut publish_id = None;
            if kind == frame::PUBLISH {
                match header.publish_qos() {
                    0 => {}
                    3 => return Err(End::malformed("PUBLISH with QoS 3")),
                    _ => publish_id = frame::publish_packet_id(rbuf, &header),
                }
                if self.v5() {
                    frame::check_publish_properties(rbuf, &header)
                        .map_err(|why| End::protocol(DisconnectReasonCode::ProtocolError, why))?;
                }
            }
            let qos = header.publish_qos();
            let packet = self
                .codec
                .read(rbuf)
                .map_err(|e| End::malformed(codec_error(kind, e)))?;
            self.packet(packet, qos, publish_id).await?;
        }
    }

    async fn packet(
        &mut self,
        packet: Packet,
        qos: u8,
        publish_id: Option<u16>,
    ) -> Result<(), End> {
        match packet {
            Packet::Publish(p, props) => self.publish(p, props, qos, publish_id).await,
            Packet::PubRel(rel, _) => {
                let mut kept = StateTicket::done();
                let reason = match self.session.release_incoming(rel.pkid) {
                    Some(held) => {
                        // Its bus copy was logged at the PUBLISH; a retained one is kept now.
                        if let Some(message) = held {
                            kept = self
                                .ctx
                                .broker
                                .publish_kept(&self.info.identity.client_id, message)
                                .1;
                        }
                        PubCompReason::Success
                    }
                    None => PubCompReason::PacketIdentifierNotFound,
                };
                self.reply(Reply::PubComp(rel.pkid, reason), false, kept)
            }
            // Boxed (as below): an idle connection's future keeps no room for the rare await.
            Packet::Subscribe(subscribe, props) => Box::pin(self.subscribe(subscribe, props)).await,
            Packet::Unsubscribe(unsubscribe, _) => Box::pin(self.unsubscribe(unsubscribe)).await,
            Packet::PingReq(_) => self.write(Packet::PingResp(PingResp)),
            Packet::PubAck(ack, _) => {
                self.session.puback(ack.pkid);
                self.more = true;
                Ok(())
            }
            Packet::PubRec(rec, _) => {
                let reason = if self.session.pubrec(rec.pkid) {
                    PubRelReason::Success
                } else {
                    PubRelReason::PacketIdentifierNotFound
                };
                self.write(Packet::PubRel(
                    PubRel {
                        pkid: rec.pkid,
                        reason,
                    },
                    None,
                ))
            }
            Packet::PubComp(comp, _) => {
                self.session.pubcomp(comp.pkid);
                self.more = true;
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
        props: Option<PublishProperties>,
        qos: u8,
        publish_id: Option<u16>,
    ) -> Result<(), End> {
        self.ctx.metrics.messages_in.inc();
        let ctx = self.ctx;
        let publishing = self.publishing.get_or_insert_with(|| Publishing::new(ctx));
        if publishing.rate.as_ref().is_some_and(|r| !r.allow()) {
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
        // Bounded before an alias can store it: a topic beyond the bounds sets up no alias.
        // (An empty topic passes; the alias it names held a topic already checked.)
        if self
            .ctx
            .limits
            .check_topic(&publish.topic, &self.ctx.metrics)
            .is_err()
        {
            return self.refuse_publish(&publish.topic, Refusal::Invalid, qos, publish_id);
        }
        if self.v5() {
            let alias = props.as_ref().and_then(|p| p.topic_alias);
            publish.topic = self.aliases.resolve(&publish.topic, alias).map_err(|e| {
                let code = match e {
                    super::alias::AliasError::NoTopic => DisconnectReasonCode::ProtocolError,
                    _ => DisconnectReasonCode::TopicAliasInvalid,
                };
                End::protocol(code, e.to_string())
            })?;
        }
        // A revocation since the cache was filled may have taken any of its answers back.
        let epoch = self.ctx.rights.current();
        let cached = {
            let publishing = self.publishing.get_or_insert_with(|| Publishing::new(ctx));
            if epoch != publishing.rights_epoch {
                publishing.topic_cache.clear();
                publishing.rights_epoch = epoch;
            }
            publishing.topic_cache.get(&publish.topic).cloned()
        };
        let decision = match cached {
            Some(d) => d,
            None => {
                let d = Box::pin(self.decide_publish(&publish.topic)).await;
                let publishing = self.publishing.get_or_insert_with(|| Publishing::new(ctx));
                if publishing.topic_cache.len() >= TOPIC_CACHE_SIZE {
                    publishing.topic_cache.clear();
                }
                // A denial may come from an auth service that is briefly unavailable: it is
                // asked again next time (the auth backends cache their real answers). The key
                // is a copy: the frame's bytes would pin the whole read buffer they came in.
                if !matches!(d, Err(Refusal::Denied)) {
                    publishing
                        .topic_cache
                        .insert(Bytes::copy_from_slice(&publish.topic), d.clone());
                }
                d
            }
        };
        let route = match decision {
            Ok(route) => route,
            Err(refusal) => return self.refuse_publish(&publish.topic, refusal, qos, publish_id),
        };
        if qos == 2 && self.session.incoming_held() >= usize::from(self.ctx.limits.max_inflight()) {
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
        let expires_at = Message::expiry_of(props.as_ref());
        // One copy of the payload, owned, so the read buffer is never pinned by a queue.
        let message = Arc::new(Message {
            topic: route.topic.clone(),
            payload: Bytes::copy_from_slice(&publish.payload),
            qos,
            retain: publish.retain,
            properties: if self.v5() {
                message::forwarded_properties(props)
            } else {
                None
            },
            origin: Origin::Session(self.session.id),
            expires_at,
        });
        // Where MQTT can say so (5, QoS 1/2), a retained PUBLISH the store (or this client's
        // share of it) cannot keep is refused rather than delivered without being retained.
        if publish.retain
            && self.v5()
            && qos > 0
            && !self
                .ctx
                .broker
                .retained_accepts(&self.info.identity.client_id, &message)
        {
            self.ctx.broker.count_retained_refused(message.topic_str());
            return self.refuse_publish(&publish.topic, Refusal::Quota, qos, publish_id);
        }
        let pkid = publish_id.unwrap_or(0);
        // A QoS 2 PUBLISH sent again before its PUBREL is answered again, not kept twice.
        if qos == 2 && !self.session.hold_incoming(pkid, Some(message.clone())) {
            return self.reply(Reply::PubRec(pkid), false, StateTicket::done());
        }
        // The bus copy is logged now (for QoS 2 too: PUBREC promises it is kept); local
        // subscribers get the message at once, without waiting for the log.
        let record = self
            .ctx
            .hooks
            .bus()
            .and_then(|bus| bus.record(self.info, &route, &message));
        let bridged = record.is_some();
        if let Some(record) = record {
            let pending = self.pending.get_or_insert_default();
            pending.bridged = true;
            pending.group.push(record);
        }
        match qos {
            0 => {
                // Nothing to acknowledge: a retained change is kept without being waited for.
                self.ctx
                    .broker
                    .publish_from(&self.info.identity.client_id, message);
                self.reply(Reply::Nothing, bridged, StateTicket::done())
            }
            1 => {
                // Routed at once; the PUBACK waits for a retained change to be kept.
                let (_, kept) = self
                    .ctx
                    .broker
                    .publish_kept(&self.info.identity.client_id, message);
                self.reply(Reply::PubAck(pkid), bridged, kept)
            }
            // Held (above) until PUBREL: a repeated PUBLISH with the same packet id is not
            // routed twice.
            _ => self.reply(Reply::PubRec(pkid), bridged, StateTicket::done()),
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
                // Levels again once `%2F` and `.` are levels: the bound holds for what is routed.
                if self
                    .ctx
                    .limits
                    .check_levels(canonical.as_bytes(), &self.ctx.metrics)
                    .is_err()
                {
                    return Err(Refusal::Invalid);
                }
                let channel = match topic::parse(&canonical, Usage::Publish) {
                    Ok(TopicKind::Channel(c)) => Some(c),
                    _ => None,
                };
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
        tracing::info!(client_id = %self.info.identity.client_id.escape_debug(), topic = %topic.escape_debug(), ?refusal, qos, "publish refused");
        if !self.v5() {
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
                    Refusal::Quota => PubAckReason::QuotaExceeded,
                };
                self.reply(
                    Reply::Refusal(Box::new(Packet::PubAck(PubAck { pkid, reason }, None))),
                    false,
                    StateTicket::done(),
                )
            }
            _ => {
                let reason = match refusal {
                    Refusal::Denied => PubRecReason::NotAuthorized,
                    Refusal::Invalid => PubRecReason::TopicNameInvalid,
                    Refusal::Quota => PubRecReason::QuotaExceeded,
                };
                self.session.hold_incoming(pkid, None);
                self.reply(
                    Reply::Refusal(Box::new(Packet::PubRec(PubRec { pkid, reason }, None))),
                    false,
                    StateTicket::done(),
                )
            }
        }
    }

    async fn subscribe(
        &mut self,
        subscribe: Subscribe,
        props: Option<SubscribeProperties>,
    ) -> Result<(), End> {
        let id = props.and_then(|p| p.id);
        if id == Some(0) {
            // MQTT 3.8.2.1.2.
            return Err(End::protocol(
                DisconnectReasonCode::ProtocolError,
                "Subscription Identifier 0",
            ));
        }
        let id = id.and_then(|id| u32::try_from(id).ok());
        let v5 = self.v5();
        let mut codes = Vec::with_capacity(subscribe.filters.len());
        let mut granted = Vec::with_capacity(subscribe.filters.len());
        let mut channels = Vec::new();
        for filter in subscribe.filters {
            // `$share/<group>/<filter>` is authorized as its inner filter; other `$` filters
            // are not offered.
            let bounds = *self.ctx.limits.session();
            let shared = shared::split(&filter.path);
            if v5 && filter.nolocal && shared.is_some() {
                return Err(End::protocol(
                    DisconnectReasonCode::ProtocolError,
                    "No Local on a shared subscription",
                ));
            }
            let group = match shared {
                Some(Ok((group, inner))) if !inner.starts_with('$') => Some((group, inner)),
                _ => None,
            };
            let path = group.map_or(filter.path.as_str(), |(_, inner)| inner);
            let decision = if group.is_none() && filter.path.starts_with('$') {
                TopicDecision::Invalid(topic::TopicError::BadFilter)
            } else if let Err(e) = self
                .ctx
                .limits
                .check_topic(filter.path.as_bytes(), &self.ctx.metrics)
            {
                TopicDecision::Invalid(e)
            } else {
                match self
                    .ctx
                    .hooks
                    .authorize(&self.info.identity, path, Usage::Subscribe)
                    .await
                {
                    // Levels again once `%2F` and `.` are levels (see `decide_publish`).
                    TopicDecision::Allow(inner) => match self
                        .ctx
                        .limits
                        .check_levels(inner.as_bytes(), &self.ctx.metrics)
                    {
                        Ok(()) => TopicDecision::Allow(inner),
                        Err(e) => TopicDecision::Invalid(e),
                    },
                    other => other,
                }
            };
            match decision {
                TopicDecision::Allow(inner) => {
                    let canonical = match group {
                        Some((group, _)) => shared::join(group, &inner),
                        None => inner.clone(),
                    };
                    if !self
                        .session
                        .has_room_for(&canonical, bounds.max_subscriptions)
                    {
                        self.ctx.metrics.limit_hit("subscriptions");
                        tracing::info!(client_id = %self.info.identity.client_id.escape_debug(), filter = %filter.path.escape_debug(),
                            max = bounds.max_subscriptions, "subscribe refused: subscription limit reached");
                        codes.push(if v5 {
                            SubscribeReasonCode::QuotaExceeded
                        } else {
                            SubscribeReasonCode::Failure
                        });
                        continue;
                    }
                    // A shared subscription's event names its inner channel filter.
                    if let Ok(TopicKind::Channel(channel)) = topic::parse(&inner, Usage::Subscribe)
                    {
                        channels.push(channel);
                    }
                    let options = SubOptions {
                        qos: (filter.qos as u8).min(2),
                        no_local: v5 && filter.nolocal,
                        retain_as_published: v5 && filter.preserve_retain,
                        id: if v5 { id } else { None },
                    };
                    let existed = self
                        .ctx
                        .broker
                        .subscribe(&self.session, &canonical, options);
                    codes.push(SubscribeReasonCode::Success(filter.qos));
                    let retained = match filter.retain_forward_rule {
                        // Never on a shared subscription (MQTT 4.8.2).
                        _ if group.is_some() => false,
                        RetainForwardRule::OnEverySubscribe => true,
                        RetainForwardRule::OnNewSubscribe => !existed,
                        RetainForwardRule::Never => false,
                    };
                    if retained {
                        granted.push((canonical, options));
                    }
                }
                refused => {
                    tracing::info!(client_id = %self.info.identity.client_id.escape_debug(), filter = %filter.path.escape_debug(), "subscribe refused");
                    codes.push(match (v5, refused) {
                        (false, _) => SubscribeReasonCode::Failure,
                        (true, TopicDecision::Invalid(_)) => {
                            SubscribeReasonCode::TopicFilterInvalid
                        }
                        (true, _) => SubscribeReasonCode::NotAuthorized,
                    });
                }
            }
        }
        // A persistent session's new subscriptions are kept before the SUBACK promises them.
        self.ctx
            .broker
            .keep_subscriptions(&self.session)
            .wait()
            .await;
        if self.ctx.hooks.bus().is_some() {
            // The bus bridge subscribes on NATS for new filters: the SUBACK waits (bounded)
            // until it has, so bus messages published after the SUBACK are not missed.
            let interest = self.ctx.broker.interest();
            interest
                .wait_synced(interest.generation(), BUS_SUBSCRIBE_WAIT)
                .await;
        }
        self.write(Packet::SubAck(
            SubAck {
                pkid: subscribe.pkid,
                return_codes: codes,
            },
            None,
        ))?;
        self.ctx.hooks.subscribed(self.info, &channels);
        // Retained messages follow the SUBACK.
        for (filter, options) in granted {
            self.ctx
                .broker
                .deliver_retained(&self.session, &filter, options);
        }
        self.more = true;
        Ok(())
    }

    async fn unsubscribe(&mut self, unsubscribe: Unsubscribe) -> Result<(), End> {
        let mut reasons = Vec::with_capacity(unsubscribe.filters.len());
        for filter in &unsubscribe.filters {
            let canonical = match shared::split(filter) {
                Some(Ok((group, inner))) => {
                    shared::join(group, &self.ctx.hooks.canonical_filter(inner).await)
                }
                _ => self.ctx.hooks.canonical_filter(filter).await,
            };
            reasons.push(if self.ctx.broker.unsubscribe(&self.session, &canonical) {
                UnsubAckReason::Success
            } else {
                UnsubAckReason::NoSubscriptionExisted
            });
        }
        self.ctx
            .broker
            .keep_subscriptions(&self.session)
            .wait()
            .await;
        self.write(Packet::UnsubAck(
            UnsubAck {
                pkid: unsubscribe.pkid,
                reasons,
            },
            None,
        ))
    }
}

#[cfg(test)]
mod footprint {
    use super::*;
    use crate::session::future_size;
    use tokio::net::TcpStream;

    #[test]
    fn an_idle_connection_holds_small_futures() {
        type Args = (
            &'static SessionContext,
            &'static Accepted,
            &'static mut TcpStream,
            &'static mut BytesMut,
            Codec,
        );
        let run = future_size(&|(c, a, s, b, k): Args| run(c, a, s, b, k));
        let input =
            future_size(&|(r, b): (&'static mut Relay<'static>, &'static mut BytesMut)| r.input(b));
        println!("relay future: {run} B, packet handling: {input} B");
        // Handling a packet is boxed per read: an idle connection does not hold its room.
        // 440 bytes in debug: no keep-alive `Sleep`, the publishing state boxed.
        assert!(run <= 480, "relay future grew to {run} bytes");
        assert!(
            input > run / 2,
            "the packet handling is what the box keeps out"
        );
    }
}
