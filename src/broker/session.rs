//! One broker session: what outlives a connection when the session is persistent (its
//! subscriptions, delivery queue, in-flight window and held QoS 2 PUBLISHes), and the control of
//! the connection attached to it right now. Sessions are keyed by (authenticated client id, MQTT
//! client identifier): the same MQTT client identifier under another identity is another session.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::message::Message;
use super::queue::{Delivery, Mailbox, Outgoing, Pushed, QueueLimits};
use super::small_map::SmallMap;
use crate::state::{KeptWill, StateStore, StateTicket};

/// Who a session belongs to: the platform identity and the MQTT client identifier it chose.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    /// The authenticated client id (empty for anonymous sessions).
    pub client_id: String,
    pub mqtt_client_id: String,
}

/// Options of one subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubOptions {
    /// Highest QoS granted.
    pub qos: u8,
    /// MQTT 5 No Local: the session's own messages are not delivered through it.
    pub no_local: bool,
    /// MQTT 5 Retain As Published: forwarded messages keep their RETAIN flag.
    pub retain_as_published: bool,
    /// MQTT 5 Subscription Identifier, sent back with every message it delivers.
    pub id: Option<u32>,
}

impl SubOptions {
    pub fn qos(qos: u8) -> Self {
        SubOptions {
            qos,
            ..SubOptions::default()
        }
    }
}

/// Why a connection was told to end by someone other than its device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kick {
    /// A new connection of the same session.
    Takeover = 1,
    /// An operator closed it.
    Administrative = 2,
    /// Its rights were revoked.
    Revoked = 3,
    /// No packet within 1.5 × keep-alive (the keep-alive wheel).
    KeepAlive = 4,
}

/// What an operator sees of a live connection (admin API).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConnectionMeta {
    pub remote_addr: String,
    /// `tcp`, `tls`, `ws` or `wss`.
    pub transport: &'static str,
    /// `3.1.1` or `5`.
    pub protocol_version: &'static str,
    pub keep_alive: u16,
    /// Unix time in nanoseconds.
    pub connected_at: u64,
}

/// How the broker asks an attached connection to end.
#[derive(Debug)]
pub struct ConnectionControl {
    pub meta: ConnectionMeta,
    kick: AtomicU8,
    /// Set to end the connection (a kick, or the server's shutdown). A flag and the `Notify`
    /// below rather than a child of the server's `CancellationToken` (a ~100-byte tree node
    /// per connection): the broker cancels every attached connection at shutdown instead.
    cancelled: AtomicBool,
    /// The connection is pushed back (not reading): the keep-alive wheel does not count it.
    paused: AtomicBool,
    /// The keep-alive wheel's tick of the connection's last read.
    last_read: AtomicU32,
    /// Set once the connection has fully ended (its teardown is complete).
    ended: AtomicBool,
    /// Wakes whoever waits in [`ConnectionControl::cancelled`] or [`ConnectionControl::ended`]
    /// (each checks its own flag). (A `watch` channel did this before, at ~400 B per
    /// connection: it carries eight `Notify`s.)
    wake: Notify,
}

impl ConnectionControl {
    /// Tells the connection to end; the first reason given is the one it reports.
    pub fn kick(&self, why: Kick) {
        let _ = self
            .kick
            .compare_exchange(0, why as u8, Ordering::AcqRel, Ordering::Acquire);
        self.cancel();
    }

    /// Tells the connection to end without a reason of its own (server shutdown).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Release);
        self.wake.notify_waiters();
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// Notes a read at keep-alive wheel tick `tick`.
    pub fn read_at(&self, tick: u32) {
        self.last_read.store(tick, Ordering::Relaxed);
    }

    pub fn last_read(&self) -> u32 {
        self.last_read.load(Ordering::Relaxed)
    }

    /// Whether the connection is pushed back (it does not read, so keep-alive does not run).
    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::Relaxed);
    }

    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }

    /// A control outside any broker (the keep-alive wheel's tests).
    #[cfg(test)]
    pub(crate) fn new_for_test(meta: ConnectionMeta) -> Arc<Self> {
        connection(0, &CancellationToken::new(), meta).1
    }

    /// Resolves once the connection is told to end.
    pub async fn cancelled(&self) {
        Self::until(&self.wake, &self.cancelled).await
    }

    /// A wake-up for the next [`ConnectionControl::kick`] or [`ConnectionControl::cancel`]:
    /// made before [`ConnectionControl::is_cancelled`] is read, it is woken by a cancel after
    /// that read, polled or not (it may also wake when the connection ends: read the flag
    /// again). Smaller in a connection's future than [`ConnectionControl::cancelled`].
    pub fn wake_up(&self) -> tokio::sync::futures::Notified<'_> {
        self.wake.notified()
    }

    /// The reason given to [`ConnectionControl::kick`], if any (a cancelled connection without
    /// one is ending for a server shutdown).
    pub fn kicked(&self) -> Option<Kick> {
        match self.kick.load(Ordering::Acquire) {
            1 => Some(Kick::Takeover),
            2 => Some(Kick::Administrative),
            3 => Some(Kick::Revoked),
            4 => Some(Kick::KeepAlive),
            _ => None,
        }
    }

    /// Resolves once the connection has fully ended (its teardown is complete).
    pub async fn ended(&self) {
        Self::until(&self.wake, &self.ended).await
    }

    /// Waits until `flag` is set (the one `Notify` wakes the waiters of either flag).
    async fn until(wake: &Notify, flag: &AtomicBool) {
        loop {
            let notified = wake.notified();
            tokio::pin!(notified);
            // Registered before the flag is read: a set in between still wakes us.
            notified.as_mut().enable();
            if flag.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    fn finish(&self) {
        self.ended.store(true, Ordering::Release);
        self.wake.notify_waiters();
    }
}

/// The connection attached to a session.
#[derive(Debug)]
pub(super) struct Attached {
    pub id: u64,
    pub control: Arc<ConnectionControl>,
}

/// How long a session outlives its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expiry {
    /// Discarded when the connection ends (clean session, MQTT 5 expiry interval 0).
    WithConnection,
    /// Kept this long after the connection ends.
    After(Duration),
    /// Kept until a clean connection replaces it (MQTT 3.1.1 clean session 0, MQTT 5 0xFFFFFFFF).
    Never,
}

impl Expiry {
    /// The expiry an MQTT 5 Session Expiry Interval (seconds) gives.
    pub fn from_interval(seconds: u32) -> Expiry {
        match seconds {
            0 => Expiry::WithConnection,
            u32::MAX => Expiry::Never,
            s => Expiry::After(Duration::from_secs(u64::from(s))),
        }
    }
}

/// A will whose connection has ended, waiting for its MQTT 5 Will Delay Interval.
pub struct DeferredWill {
    pub message: Arc<Message>,
    /// Publishes it as the session layer does (bridge, then broker core), which the core does
    /// not know.
    pub publish: Box<dyn FnOnce(Arc<Message>) + Send>,
}

impl std::fmt::Debug for DeferredWill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeferredWill")
            .field("topic", &self.message.topic_str())
            .finish_non_exhaustive()
    }
}

#[derive(Debug)]
pub(super) struct State {
    pub mailbox: Mailbox,
    pub subscriptions: SmallMap<Box<str>, SubOptions>,
    /// QoS 2 PUBLISHes received and PUBRECed, by packet id, until their PUBREL; `None` for a
    /// refused one (its PUBREL still gets a PUBCOMP).
    pub incoming: HashMap<u16, Option<Arc<Message>>>,
    pub attached: Option<Attached>,
    pub expiry: Expiry,
    /// Bumped by every attach, so an expiry timer set by an older connection is recognised.
    pub generation: u64,
    /// The will of the last connection while its delay runs (offline sessions only).
    pub will: Option<DeferredWill>,
    /// Set while the session is kept by the state store (persistent, and a store that keeps
    /// sessions). Boxed: most sessions are not.
    pub durable: Option<Box<Durable>>,
}

/// What the broker tracks of a session the state store keeps.
#[derive(Debug, Default)]
pub(super) struct Durable {
    /// The position the next delivery appended to the kept list takes.
    pub next_position: u64,
    /// The mailbox changed since it was last written (online sessions are written at
    /// checkpoints, never per message).
    pub changed: bool,
    /// The will as the session record keeps it.
    pub will: Option<KeptWill>,
    /// Unix time in milliseconds the last connection ended (`None` while one is attached): what
    /// the expiry runs from, also after a restart.
    pub ended_ms: Option<u64>,
}

impl State {
    /// Notes a mailbox change of an online durable session for the next checkpoint.
    fn touched(&mut self) {
        if let Some(d) = self.durable.as_mut() {
            d.changed = true;
        }
    }
}

/// One session. Shared by the connection attached to it and by the subscriptions that deliver
/// into its queue.
#[derive(Debug)]
pub struct Session {
    pub id: u64,
    pub key: SessionKey,
    pub(super) state: Mutex<State>,
    wake: Notify,
}

impl Session {
    pub(super) fn new(id: u64, key: SessionKey, expiry: Expiry) -> Self {
        Session {
            id,
            key,
            state: Mutex::new(State {
                mailbox: Mailbox::default(),
                subscriptions: SmallMap::new(),
                incoming: HashMap::new(),
                attached: None,
                expiry,
                generation: 0,
                will: None,
                durable: None,
            }),
            wake: Notify::new(),
        }
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queues a delivery; wakes the connection if it may be waiting for one. A QoS 1/2
    /// delivery to an offline durable session is appended to the state store (under the
    /// session's lock, so the store sees them in queue order): the ticket says when it is kept.
    pub(super) fn deliver(
        &self,
        delivery: Delivery,
        limits: QueueLimits,
        store: &dyn StateStore,
    ) -> (Pushed, Option<StateTicket>) {
        let (pushed, attached, kept) = {
            let mut state = self.lock();
            let offline_durable =
                state.durable.is_some() && state.attached.is_none() && delivery.qos > 0;
            let copy = offline_durable.then(|| delivery.clone());
            let pushed = state.mailbox.push(delivery, limits);
            let mut kept = None;
            if pushed.queued {
                match (copy, state.durable.as_mut()) {
                    (Some(copy), Some(d)) => {
                        kept = Some(store.append_delivery(&self.key, d.next_position, &copy));
                        d.next_position += 1;
                    }
                    (None, Some(d)) => d.changed = true,
                    _ => {}
                }
            }
            (pushed, state.attached.is_some(), kept)
        };
        if pushed.was_empty && attached {
            self.wake.notify_one();
        }
        (pushed, kept)
    }

    /// Whether a connection is attached now.
    pub fn is_attached(&self) -> bool {
        self.lock().attached.is_some()
    }

    /// Resolves when a delivery arrives in an empty queue (or one is already pending).
    pub async fn delivery_ready(&self) {
        self.wake.notified().await
    }

    /// Moves up to `max` writable deliveries into `out`, within `window` unacknowledged QoS 1/2
    /// PUBLISHes; returns whether more are ready, and how many expired ones were dropped.
    pub fn take_ready(&self, window: usize, max: usize, out: &mut Vec<Outgoing>) -> (bool, u64) {
        let mut state = self.lock();
        state.touched();
        let now = std::time::Instant::now();
        let mut expired = 0;
        let mut taken = 0;
        while taken < max {
            match state.mailbox.next(window) {
                Some(Outgoing::Publish { delivery, .. })
                    if delivery.message.expired(now) && delivery.qos == 0 =>
                {
                    expired += 1;
                }
                Some(Outgoing::Publish { delivery, pkid, .. }) if delivery.message.expired(now) => {
                    // Taken into the window by `next`: give the packet id back.
                    state.mailbox.forget(pkid);
                    expired += 1;
                }
                Some(o) => {
                    out.push(o);
                    taken += 1;
                }
                None => return (false, expired),
            }
        }
        (state.mailbox.ready(window), expired)
    }

    /// Drops a delivery taken into the window that will not be written (too large for the
    /// device): its packet id is free again.
    pub fn forget(&self, pkid: u16) {
        {
            let mut state = self.lock();
            state.touched();
            state.mailbox.forget(pkid)
        };
    }

    /// What a resumed connection must send again first.
    pub fn resend(&self) -> Vec<Outgoing> {
        self.lock().mailbox.resend()
    }

    pub fn puback(&self, pkid: u16) -> bool {
        {
            let mut state = self.lock();
            state.touched();
            state.mailbox.puback(pkid)
        }
    }

    pub fn pubrec(&self, pkid: u16) -> bool {
        {
            let mut state = self.lock();
            state.touched();
            state.mailbox.pubrec(pkid)
        }
    }

    pub fn pubcomp(&self, pkid: u16) -> bool {
        {
            let mut state = self.lock();
            state.touched();
            state.mailbox.pubcomp(pkid)
        }
    }

    /// Holds an inbound QoS 2 PUBLISH until its PUBREL; false if that packet id is already held
    /// (a duplicate, not to be routed again).
    pub fn hold_incoming(&self, pkid: u16, message: Option<Arc<Message>>) -> bool {
        use std::collections::hash_map::Entry;
        match self.lock().incoming.entry(pkid) {
            Entry::Occupied(_) => false,
            Entry::Vacant(v) => {
                v.insert(message);
                true
            }
        }
    }

    /// The PUBREL of an inbound QoS 2 PUBLISH: `Some` if the packet id was held, with the
    /// message to route now (`None` inside for a refused one).
    pub fn release_incoming(&self, pkid: u16) -> Option<Option<Arc<Message>>> {
        self.lock().incoming.remove(&pkid)
    }

    /// Inbound QoS 2 PUBLISHes waiting for their PUBREL.
    pub fn incoming_held(&self) -> usize {
        self.lock().incoming.len()
    }

    /// The session's subscription filters and options.
    pub fn subscriptions(&self) -> Vec<(String, SubOptions)> {
        self.lock()
            .subscriptions
            .iter()
            .map(|(f, o)| (f.to_string(), *o))
            .collect()
    }

    /// Whether a subscription to `filter` fits within `max` subscriptions (replacing an existing
    /// one always does).
    pub fn has_room_for(&self, filter: &str, max: usize) -> bool {
        let state = self.lock();
        state.subscriptions.len() < max || state.subscriptions.contains_key(filter)
    }

    /// Deliveries queued and in flight.
    pub fn queued(&self) -> (usize, usize) {
        let state = self.lock();
        (state.mailbox.queued(), state.mailbox.inflight())
    }
}

/// A connection's hold on its session: releasing it (or dropping it) tells a waiting takeover
/// that the connection has fully ended.
#[derive(Debug)]
pub struct Attachment {
    pub session: Arc<Session>,
    pub connection_id: u64,
    pub control: Arc<ConnectionControl>,
    /// Whether the session existed before (MQTT's "session present").
    pub present: bool,
    pub(super) released: bool,
}

impl Attachment {
    /// Ends the hold (once): whoever waits for the connection to end proceeds.
    pub(super) fn release(&mut self) {
        if !std::mem::replace(&mut self.released, true) {
            self.control.finish();
        }
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        self.release();
    }
}

/// A new connection's control; cancelled from the start if the server is shutting down
/// (`shutdown`), since the broker's cancelling of every attached connection may have passed.
pub(super) fn connection(
    id: u64,
    shutdown: &CancellationToken,
    meta: ConnectionMeta,
) -> (Attached, Arc<ConnectionControl>) {
    let control = Arc::new(ConnectionControl {
        meta,
        kick: AtomicU8::new(0),
        cancelled: AtomicBool::new(shutdown.is_cancelled()),
        paused: AtomicBool::new(false),
        last_read: AtomicU32::new(0),
        ended: AtomicBool::new(false),
        wake: Notify::new(),
    });
    (
        Attached {
            id,
            control: control.clone(),
        },
        control,
    )
}
