//! The broker core: subscriptions, retained messages and sessions, driven directly by the
//! session tasks (no router thread, no links). A PUBLISH is routed in the publishing task: one
//! lookup in the subscription trie (shared read lock; only SUBSCRIBE/UNSUBSCRIBE write), then one
//! short lock per receiving session to queue the delivery. Every delivery a queue cannot take is
//! counted in [`BrokerStats`]; nothing is dropped silently.
//!
//! Lock order: the session table, then one session's state; or the trie, then one session's
//! state. Nothing holds a session's state while taking the table or the trie.

mod durable;
pub mod interest;
pub mod message;
pub mod queue;
pub mod retained;
pub mod session;
pub mod shared;
mod small_map;
pub mod trie;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::state::{MemoryState, StateError, StateStore, StateTicket};
use durable::record_of;
pub use durable::{Restored, WillRoute, CHECKPOINT_INTERVAL};
pub use message::{Message, Origin};
pub use queue::{Delivery, Kept, MailboxImage, Outgoing, QueueLimits};
pub use retained::RetainedLimits;
use retained::{Retained, RetainedStore};
pub use session::{
    Attachment, ConnectionControl, ConnectionMeta, DeferredWill, Expiry, Kick, Session, SessionKey,
    SubOptions,
};
use shared::SharedGroup;
use trie::Trie;

/// Sizing of the broker core.
#[derive(Debug, Clone, Copy)]
pub struct BrokerConfig {
    /// Bounds of every session's delivery queue.
    pub queue: QueueLimits,
    /// Retained topics kept.
    pub max_retained: usize,
    /// Bytes of retained messages kept.
    pub max_retained_bytes: usize,
    /// The share (percent) of both retained bounds one publishing client may hold.
    pub retained_client_share: u8,
    /// Offline persistent sessions one client id keeps; beyond, its oldest is discarded.
    pub max_offline_sessions: usize,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            queue: QueueLimits {
                max_messages: 10_000,
                max_bytes: 64 * 1024 * 1024,
            },
            max_retained: 100_000,
            max_retained_bytes: 256 * 1024 * 1024,
            retained_client_share: 100,
            max_offline_sessions: usize::MAX,
        }
    }
}

/// Counters of the core, read by the metrics endpoint.
#[derive(Debug, Default)]
pub struct BrokerStats {
    /// Deliveries dropped because the receiving session's queue was full.
    pub dropped_queue_full: AtomicU64,
    /// Deliveries still queued when their session was discarded.
    pub dropped_session_ended: AtomicU64,
    /// Deliveries whose MQTT 5 message expiry interval ran out in the queue.
    pub dropped_expired: AtomicU64,
    /// Deliveries larger than the receiving MQTT 5 device's maximum packet size.
    pub dropped_too_large: AtomicU64,
    /// Retained PUBLISHes not retained because the store was full (still delivered).
    pub retained_refused: AtomicU64,
    /// Offline sessions discarded because their client id kept too many.
    pub sessions_evicted: AtomicU64,
}

/// The core's state as the metrics report it.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BrokerGauges {
    /// Sessions with a connection attached.
    pub sessions_online: usize,
    /// Persistent sessions kept without a connection.
    pub sessions_offline: usize,
    /// Subscriptions in the trie (shared groups count once per filter and group).
    pub subscriptions: usize,
    pub retained_messages: usize,
    pub retained_bytes: usize,
    /// Bytes queued for every session (topic, payload and properties, as the queue bound counts).
    pub queued_bytes: usize,
}

/// What a subscription in the trie points at.
#[derive(Debug)]
struct Subscriber {
    session: Arc<Session>,
    options: SubOptions,
}

/// A trie entry: one session's subscription, or a shared subscription group (one member of
/// which gets each message).
#[derive(Debug)]
enum Route {
    Direct(Subscriber),
    Shared(Arc<SharedGroup>),
}

/// How a CONNECT wants its session.
#[derive(Debug, Clone, Copy)]
pub struct AttachRequest {
    /// Discard any existing state first (3.1.1 clean session, MQTT 5 clean start).
    pub clean_start: bool,
    pub expiry: Expiry,
}

/// A live connection as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveClient {
    pub key: SessionKey,
    pub meta: ConnectionMeta,
    pub subscriptions: Vec<String>,
}

/// A share group's name and filter.
type GroupKey = (Box<str>, Box<str>);

/// A takeover waits this long for the previous connection to end before replacing it anyway.
const TAKEOVER_WAIT: Duration = Duration::from_secs(10);
/// Subscriptions removed per write lock when a session is discarded, so a session with very
/// many does not stall publishers.
const REMOVE_CHUNK: usize = 1024;

pub struct Broker {
    config: BrokerConfig,
    trie: RwLock<Trie<u64, Route>>,
    /// Shared subscription groups by (share name, filter). Taken before the trie.
    groups: Mutex<HashMap<GroupKey, Arc<SharedGroup>>>,
    retained: RwLock<RetainedStore>,
    /// Where retained changes are kept beyond this process (written under the retained lock,
    /// so it sees them in the order memory did).
    state: Arc<dyn StateStore>,
    sessions: Mutex<HashMap<SessionKey, Arc<Session>>>,
    /// Offline persistent sessions by client id, oldest (lowest session id) first. Taken only
    /// under the session table's lock.
    offline: Mutex<HashMap<Box<str>, BTreeMap<u64, SessionKey>>>,
    next_id: AtomicU64,
    stats: Arc<BrokerStats>,
    /// Which filters have subscribers (for the bus bridge's subscriptions).
    interest: Arc<interest::FilterInterest>,
    /// Ends pending expiry timers.
    stop: CancellationToken,
    me: Weak<Broker>,
}

impl Broker {
    /// A broker whose state lives in memory only.
    pub fn new(config: BrokerConfig) -> Arc<Broker> {
        Broker::with_state(config, Arc::new(MemoryState))
    }

    /// A broker that writes its retained messages through `state`; call
    /// [`Broker::restore_retained`] before serving.
    pub fn with_state(config: BrokerConfig, state: Arc<dyn StateStore>) -> Arc<Broker> {
        Arc::new_cyclic(|me| Broker {
            config,
            trie: RwLock::new(Trie::default()),
            groups: Mutex::default(),
            retained: RwLock::new(RetainedStore::new(RetainedLimits {
                max_messages: config.max_retained,
                max_bytes: config.max_retained_bytes,
                client_share_percent: config.retained_client_share,
            })),
            state,
            sessions: Mutex::new(HashMap::new()),
            offline: Mutex::default(),
            next_id: AtomicU64::new(1),
            stats: Arc::default(),
            interest: Arc::default(),
            stop: CancellationToken::new(),
            me: me.clone(),
        })
    }

    pub fn stats(&self) -> Arc<BrokerStats> {
        self.stats.clone()
    }

    /// The state store retained changes are written through.
    pub fn state(&self) -> &Arc<dyn StateStore> {
        &self.state
    }

    /// Loads the state store's retained messages (those whose expiry passed are not), within
    /// the retained bound. Returns how many are held.
    pub fn restore_retained(&self) -> Result<usize, StateError> {
        let found = self.state.load_retained()?;
        let mut retained = self.retained.write().unwrap_or_else(|p| p.into_inner());
        let mut over = 0u64;
        for message in found {
            // The owner is not kept: restored messages count against no client's share.
            if retained.store(message, "") == Retained::Refused {
                over += 1;
            }
        }
        if over > 0 {
            // Left in the store: a larger bound loads them again.
            tracing::warn!(
                not_loaded = over,
                max = self.config.max_retained,
                "more retained messages kept than SMQ_MQTT_ADAPTER_MAX_RETAINED: the rest are not served"
            );
        }
        Ok(retained.len())
    }

    /// Keeps `message` as its topic's retained message in memory only: a change another
    /// instance made to the shared state store (it is not written back). `current` runs under
    /// the retained lock, so no local change of the topic slips in between; the change is
    /// applied only if it says so. Beyond the retained bound the topic is cleared instead (what
    /// it held is older than the store) and the refusal counted. Returns whether it applied.
    pub fn apply_remote_retained(
        &self,
        message: Arc<Message>,
        current: impl FnOnce() -> bool,
    ) -> bool {
        let mut retained = self.retained.write().unwrap_or_else(|p| p.into_inner());
        if !current() {
            return false;
        }
        let topic = message.topic.clone();
        if retained.store(message, "") == Retained::Refused {
            retained.store(
                Message::new(topic, bytes::Bytes::new(), 0, true, Origin::Bus),
                "",
            );
            drop(retained);
            let n = self.stats.retained_refused.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(refused = n, max = self.config.max_retained,
                    "retained store full: a retained message of another instance is not served here (SMQ_MQTT_ADAPTER_MAX_RETAINED, _MAX_RETAINED_BYTES)");
            }
        }
        true
    }

    /// Clears `topic`'s retained message in memory only (see
    /// [`Broker::apply_remote_retained`]). Returns whether it applied.
    pub fn apply_remote_clear(&self, topic: &str, current: impl FnOnce() -> bool) -> bool {
        let mut retained = self.retained.write().unwrap_or_else(|p| p.into_inner());
        if !current() {
            return false;
        }
        let empty = Message::new(
            bytes::Bytes::copy_from_slice(topic.as_bytes()),
            bytes::Bytes::new(),
            0,
            true,
            Origin::Bus,
        );
        retained.store(empty, "");
        true
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<SessionKey, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches a new connection to the session `key`, first ending any connection attached to
    /// it (a takeover: that connection's teardown completes before this returns). Other
    /// identities' sessions are never touched, whatever their MQTT client identifier.
    pub async fn attach(
        &self,
        key: SessionKey,
        request: AttachRequest,
        meta: ConnectionMeta,
        shutdown: &CancellationToken,
    ) -> Attachment {
        loop {
            let previous = {
                let mut table = self.table();
                let live = table.get(&key).and_then(|s| {
                    let state = s.lock();
                    state.attached.as_ref().map(|a| a.control.clone())
                });
                match live {
                    Some(control) => control,
                    None => return self.attach_locked(&mut table, key, request, meta, shutdown),
                }
            };
            previous.kick(Kick::Takeover);
            if tokio::time::timeout(TAKEOVER_WAIT, previous.ended())
                .await
                .is_err()
            {
                tracing::error!(client_id = %key.client_id.escape_debug(), mqtt_client_id = %key.mqtt_client_id.escape_debug(),
                    "previous connection did not end in time; replacing it");
                if let Some(s) = self.table().get(&key) {
                    s.lock().attached = None;
                }
            }
        }
    }

    fn attach_locked(
        &self,
        table: &mut HashMap<SessionKey, Arc<Session>>,
        key: SessionKey,
        request: AttachRequest,
        meta: ConnectionMeta,
        shutdown: &CancellationToken,
    ) -> Attachment {
        let connection_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (attached, control) = session::connection(connection_id, shutdown, meta);
        let existing = table.get(&key).cloned();
        if let Some(s) = &existing {
            self.offline_remove(&s.key, s.id);
        }
        let (session, present) = match existing {
            Some(s) if !request.clean_start => (s, true),
            old => {
                if let Some(old) = old {
                    // Its record is the new session's now (rewritten at its CONNECT) or gone.
                    let was_durable = old.lock().durable.take().is_some();
                    if was_durable && request.expiry == Expiry::WithConnection {
                        drop(self.state.remove_session(&key));
                    }
                    self.discard_later(old);
                }
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let s = Arc::new(Session::new(id, key.clone(), request.expiry));
                table.insert(key, s.clone());
                (s, false)
            }
        };
        {
            let mut state = session.lock();
            state.attached = Some(attached);
            state.expiry = request.expiry;
            state.generation += 1;
            // Resumed before its delay ran out: the will is not published (MQTT 3.1.3.2.2).
            state.will = None;
        }
        Attachment {
            session,
            connection_id,
            control,
            present,
            released: false,
        }
    }

    /// Detaches the connection from its session: a session that ends with its connection is
    /// discarded now; a persistent one stays (subscriptions still queue for it) until it is
    /// resumed or its expiry interval passes. Dropping the attachment afterwards completes the
    /// connection's end.
    pub fn detach(&self, attachment: &mut Attachment) {
        self.detach_with_will(attachment, None);
    }

    /// [`Broker::detach`] with a will to publish after `delay` (MQTT 5 Will Delay Interval), or
    /// when the session ends if that is sooner; not at all if the session is resumed first.
    pub fn detach_with_will(
        &self,
        attachment: &mut Attachment,
        will: Option<(DeferredWill, Duration)>,
    ) {
        let session = attachment.session.clone();
        let mut will = will;
        let discard = {
            let mut table = self.table();
            let mut state = session.lock();
            if state
                .attached
                .as_ref()
                .is_none_or(|a| a.id != attachment.connection_id)
            {
                // Replaced after a stuck takeover: the session is no longer ours.
                return;
            }
            state.attached = None;
            let mut will_due = None;
            if let Some((deferred, delay)) = will.take() {
                match state.expiry {
                    Expiry::WithConnection => will = Some((deferred, delay)),
                    Expiry::After(after) if after <= delay => {
                        will_due = Some((deferred.message.clone(), after));
                        state.will = Some(deferred);
                    }
                    Expiry::After(_) | Expiry::Never => {
                        will_due = Some((deferred.message.clone(), delay));
                        state.will = Some(deferred);
                        self.schedule_will(&session, state.generation, delay);
                    }
                }
            }
            if state.expiry != Expiry::WithConnection {
                self.keep_ended(&session, &mut state, will_due);
            }
            match state.expiry {
                Expiry::WithConnection => {
                    if table
                        .get(&session.key)
                        .is_some_and(|s| Arc::ptr_eq(s, &session))
                    {
                        table.remove(&session.key);
                    }
                    true
                }
                Expiry::After(after) => {
                    self.schedule_expiry(&session, state.generation, after);
                    false
                }
                Expiry::Never => false,
            }
        };
        let evicted = if discard {
            Vec::new()
        } else {
            self.went_offline(&session)
        };
        for old in evicted {
            self.discard(&old);
        }
        if let Some((deferred, _)) = will {
            // The session ends with its connection: that is sooner than any delay.
            (deferred.publish)(deferred.message);
        }
        if discard {
            self.discard(&session);
        }
    }

    fn schedule_will(&self, session: &Arc<Session>, generation: u64, delay: Duration) {
        let (key, id) = (session.key.clone(), session.id);
        self.after(delay, move |broker| broker.will_due(&key, id, generation));
    }

    /// Publishes the will of an offline session whose will delay passed, unless the session was
    /// resumed (or replaced) since.
    fn will_due(&self, key: &SessionKey, id: u64, generation: u64) {
        let will = self.session(key).and_then(|s| {
            let mut state = s.lock();
            let same = s.id == id && state.generation == generation;
            let will = (same && state.attached.is_none())
                .then(|| state.will.take())
                .flatten();
            if will.is_some() {
                if let Some(d) = state.durable.as_mut() {
                    d.will = None;
                    drop(self.state.put_session(record_of(&s, &state), None));
                }
            }
            will
        });
        if let Some(will) = will {
            tracing::info!(client_id = %key.client_id.escape_debug(), mqtt_client_id = %key.mqtt_client_id.escape_debug(),
                "will delay interval passed: will published");
            (will.publish)(will.message);
        }
    }

    /// Ends the connection's hold: a takeover waiting for it proceeds.
    pub fn release(attachment: &mut Attachment) {
        attachment.release();
    }

    fn schedule_expiry(&self, session: &Arc<Session>, generation: u64, after: Duration) {
        let (key, id) = (session.key.clone(), session.id);
        self.after(after, move |broker| broker.expire(&key, id, generation));
    }

    /// Runs `then` after `delay` on a timer task, unless the broker stops first.
    fn after(&self, delay: Duration, then: impl FnOnce(&Broker) + Send + 'static) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let broker = self.me.clone();
        let stop = self.stop.clone();
        runtime.spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
            if let Some(broker) = broker.upgrade() {
                then(&broker);
            }
        });
    }

    /// Discards an offline session whose expiry interval passed without a resume.
    fn expire(&self, key: &SessionKey, id: u64, generation: u64) {
        let expired = {
            let mut table = self.table();
            let Some(session) = table.get(key).cloned() else {
                return;
            };
            let state = session.lock();
            if session.id != id || state.generation != generation || state.attached.is_some() {
                return;
            }
            drop(state);
            table.remove(key);
            self.offline_remove(key, id);
            session
        };
        tracing::info!(client_id = %key.client_id.escape_debug(), mqtt_client_id = %key.mqtt_client_id.escape_debug(),
            "session expired");
        self.discard(&expired);
    }

    fn offline_index(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<Box<str>, BTreeMap<u64, SessionKey>>> {
        self.offline.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn offline_remove(&self, key: &SessionKey, id: u64) {
        let mut offline = self.offline_index();
        if let Some(sessions) = offline.get_mut(key.client_id.as_str()) {
            sessions.remove(&id);
            if sessions.is_empty() {
                offline.remove(key.client_id.as_str());
            }
        }
    }

    /// A persistent session went offline: indexes it under its client id and takes out of the
    /// table the client's oldest offline sessions beyond the bound (returned, to discard
    /// outside the table lock; counted, logged).
    fn went_offline(&self, session: &Arc<Session>) -> Vec<Arc<Session>> {
        let mut table = self.table();
        // Resumed (or replaced) since it detached: not offline.
        if !table
            .get(&session.key)
            .is_some_and(|s| Arc::ptr_eq(s, session))
            || session.is_attached()
        {
            return Vec::new();
        }
        let mut evicted = Vec::new();
        let mut offline = self.offline_index();
        let mine = offline
            .entry(session.key.client_id.as_str().into())
            .or_default();
        mine.insert(session.id, session.key.clone());
        while mine.len() > self.config.max_offline_sessions {
            let Some((_, key)) = mine.pop_first() else {
                break;
            };
            if let Some(old) = table.remove(&key) {
                evicted.push(old);
            }
        }
        drop(offline);
        drop(table);
        for old in &evicted {
            let n = self.stats.sessions_evicted.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(client_id = %old.key.client_id.escape_debug(), mqtt_client_id = %old.key.mqtt_client_id.escape_debug(),
                    evicted = n, "offline session discarded: its client id keeps too many (SMQ_MQTT_ADAPTER_MAX_OFFLINE_SESSIONS)");
            }
        }
        evicted
    }

    fn discard_later(&self, session: Arc<Session>) {
        // Called under the table lock: the trie is taken outside it.
        match (tokio::runtime::Handle::try_current(), self.me.upgrade()) {
            (Ok(runtime), Some(broker)) => {
                runtime.spawn(async move { broker.discard(&session) });
            }
            _ => self.discard_subscriptions_only(&session),
        }
    }

    fn discard_subscriptions_only(&self, session: &Session) {
        let (shared, filters): (Vec<Box<str>>, Vec<Box<str>>) = {
            let mut state = session.lock();
            std::mem::take(&mut state.subscriptions)
                .into_keys()
                .partition(|f| matches!(shared::split(f), Some(Ok(_))))
        };
        for filter in &shared {
            // What the device never acknowledged goes to the group's other members.
            self.leave_group(session, filter, true);
        }
        for chunk in filters.chunks(REMOVE_CHUNK) {
            let mut trie = self.trie.write().unwrap_or_else(|p| p.into_inner());
            for filter in chunk {
                if trie.remove(filter, session.id).is_some() {
                    self.interest.remove(filter);
                }
            }
        }
    }

    /// Removes every subscription of the session, drops what it had queued (counted) and
    /// publishes a will still waiting for its delay: the session has ended.
    fn discard(&self, session: &Session) {
        self.discard_subscriptions_only(session);
        let mut state = session.lock();
        if state.durable.take().is_some() {
            drop(self.state.remove_session(&session.key));
        }
        let (queued, inflight) = (state.mailbox.queued(), state.mailbox.inflight());
        state.mailbox = Default::default();
        state.incoming = HashMap::new();
        let will = state.will.take();
        drop(state);
        if let Some(will) = will {
            tracing::info!(client_id = %session.key.client_id.escape_debug(), mqtt_client_id = %session.key.mqtt_client_id.escape_debug(),
                "session ended before its will delay: will published");
            (will.publish)(will.message);
        }
        let lost = (queued + inflight) as u64;
        if lost > 0 {
            self.stats
                .dropped_session_ended
                .fetch_add(lost, Ordering::Relaxed);
        }
    }

    /// Which filters have subscribers now, and when that changes.
    pub fn interest(&self) -> Arc<interest::FilterInterest> {
        self.interest.clone()
    }

    fn trie_mut(&self) -> std::sync::RwLockWriteGuard<'_, Trie<u64, Route>> {
        self.trie.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds (or replaces) the session's subscription to `filter`; returns whether it existed.
    /// A `$share/<group>/<filter>` filter (validated by the caller) joins that share group.
    pub fn subscribe(&self, session: &Arc<Session>, filter: &str, options: SubOptions) -> bool {
        let existed = session
            .lock()
            .subscriptions
            .insert(filter.into(), options)
            .is_some();
        if let Some(Ok((name, inner))) = shared::split(filter) {
            let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
            let group = groups
                .entry((name.into(), inner.into()))
                .or_insert_with(|| {
                    let group = Arc::new(SharedGroup::new(
                        self.next_id.fetch_add(1, Ordering::Relaxed),
                    ));
                    self.trie_mut()
                        .insert(inner, group.id, Route::Shared(group.clone()));
                    self.interest.add(inner);
                    group
                });
            group.join(session, options);
            return existed;
        }
        let subscriber = Subscriber {
            session: session.clone(),
            options,
        };
        if self
            .trie_mut()
            .insert(filter, session.id, Route::Direct(subscriber))
            .is_none()
        {
            self.interest.add(filter);
        }
        existed
    }

    /// Removes the session's subscription to `filter`; returns whether it existed. Leaving a
    /// share group hands the group's messages still queued for the session to other members.
    pub fn unsubscribe(&self, session: &Session, filter: &str) -> bool {
        let existed = session.lock().subscriptions.remove(filter).is_some();
        if existed {
            if matches!(shared::split(filter), Some(Ok(_))) {
                self.leave_group(session, filter, false);
            } else if self.trie_mut().remove(filter, session.id).is_some() {
                self.interest.remove(filter);
            }
        }
        existed
    }

    /// Takes the session out of the share group of `filter` (dropping the group when it was the
    /// last member), then hands the group's QoS 1/2 messages it had not delivered (and, with
    /// `unacked`, those its device never acknowledged) to the remaining members.
    fn leave_group(&self, session: &Session, filter: &str, unacked: bool) {
        let Some(Ok((name, inner))) = shared::split(filter) else {
            return;
        };
        let group = {
            let mut groups = self.groups.lock().unwrap_or_else(|p| p.into_inner());
            let key = (Box::<str>::from(name), Box::<str>::from(inner));
            let Some(group) = groups.get(&key).cloned() else {
                return;
            };
            if group.leave(session.id) {
                groups.remove(&key);
                if self.trie_mut().remove(inner, group.id).is_some() {
                    self.interest.remove(inner);
                }
            }
            group
        };
        let orphans = session.lock().mailbox.take_shared(group.id, unacked);
        let mut lost = 0;
        for delivery in orphans {
            if !self.deliver_shared(&group, &delivery.message) {
                lost += 1;
            }
        }
        if lost > 0 {
            self.stats
                .dropped_session_ended
                .fetch_add(lost, Ordering::Relaxed);
        }
    }

    /// Queues a message for the share group's next member; false if it has none or that
    /// member's queue refused it (counted).
    fn deliver_shared(&self, group: &SharedGroup, message: &Arc<Message>) -> bool {
        self.deliver_shared_kept(group, message, &mut None)
    }

    /// [`Broker::deliver_shared`], keeping in `kept` the latest state store ticket.
    fn deliver_shared_kept(
        &self,
        group: &SharedGroup,
        message: &Arc<Message>,
        kept: &mut Option<StateTicket>,
    ) -> bool {
        let Some((session, options)) = group.pick() else {
            return false;
        };
        let delivery = Delivery {
            message: message.clone(),
            qos: message.qos.min(options.qos),
            retain: message.retain && options.retain_as_published,
            ids: options.id.into_iter().collect(),
            shared: Some(group.id),
        };
        let (pushed, ticket) = session.deliver(delivery, self.config.queue, &*self.state);
        later(kept, ticket);
        self.count(&session, pushed);
        pushed.queued
    }

    /// Queues the retained messages `filter` matches for the session (after its SUBSCRIBE),
    /// each at min(its QoS, the subscription's) with RETAIN set.
    pub fn deliver_retained(&self, session: &Session, filter: &str, options: SubOptions) {
        let mut found = Vec::new();
        self.retained
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .for_each_match(filter, |m| found.push(m.clone()));
        for message in found {
            let delivery = Delivery {
                qos: message.qos.min(options.qos),
                message,
                retain: true,
                ids: options.id.into_iter().collect(),
                shared: None,
            };
            // The subscriber is online (it just subscribed): nothing is appended.
            let (pushed, _) = session.deliver(delivery, self.config.queue, &*self.state);
            self.count(session, pushed);
        }
    }

    /// Routes a message to every matching subscription (once per session, at the highest QoS
    /// among its matching subscriptions, capped at the message's own QoS) and stores it if it is
    /// retained. Returns the number of sessions it was queued for.
    pub fn publish(&self, message: Arc<Message>) -> usize {
        self.publish_kept("", message).0
    }

    /// [`Broker::publish`] for a message client `owner` published: a retained one counts
    /// against that client's share of the retained store.
    pub fn publish_from(&self, owner: &str, message: Arc<Message>) -> usize {
        self.publish_kept(owner, message).0
    }

    /// [`Broker::publish_from`], also returning the ticket of the retained change's write to
    /// the state store (done at once for a message that is not retained): an acknowledgement
    /// waits for it.
    pub fn publish_kept(&self, owner: &str, message: Arc<Message>) -> (usize, StateTicket) {
        let kept = if message.retain {
            self.retain(owner, &message)
        } else {
            StateTicket::done()
        };
        let mut queued_kept = None;
        let n = self.route(message, &mut queued_kept);
        // Tickets of one store resolve in order: the latest one covers both.
        let kept = match queued_kept {
            Some(q) => kept.later(q),
            None => kept,
        };
        (n, kept)
    }

    /// Stores (or clears) the retained message in memory and hands the change to the state
    /// store, under the retained lock.
    fn retain(&self, owner: &str, message: &Arc<Message>) -> StateTicket {
        let mut retained = self.retained.write().unwrap_or_else(|p| p.into_inner());
        match retained.store(message.clone(), owner) {
            Retained::Stored => self.state.put_retained(message),
            // Also when memory held none: the store may hold one beyond the bound.
            Retained::Cleared => self.state.clear_retained(message.topic_str()),
            Retained::Refused => {
                drop(retained);
                // MQTT 3.1.1 and QoS 0 cannot be told: delivered, but not retained.
                let n = self.stats.retained_refused.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    tracing::warn!(topic = %message.topic_str().escape_debug(), refused = n,
                        "retained store full: message delivered but not retained (SMQ_MQTT_ADAPTER_MAX_RETAINED, _MAX_RETAINED_BYTES, _RETAINED_CLIENT_SHARE)");
                }
                StateTicket::done()
            }
        }
    }

    /// Queues `message` for its subscribers; `kept` gets the latest ticket of what was appended
    /// to the state store for offline durable sessions.
    fn route(&self, message: Arc<Message>, kept: &mut Option<StateTicket>) -> usize {
        let trie = self.trie.read().unwrap_or_else(|p| p.into_inner());
        let mut targets: Vec<&Subscriber> = Vec::new();
        let mut groups: Vec<&SharedGroup> = Vec::new();
        trie.for_each_match(message.topic_str(), |_, route| match route {
            // No Local: a session's own message does not come back through this subscription.
            Route::Direct(s)
                if !(s.options.no_local && message.origin == Origin::Session(s.session.id)) =>
            {
                targets.push(s)
            }
            Route::Direct(_) => {}
            Route::Shared(group) => groups.push(group),
        });
        // Each share group is a subscriber of its own: one of its members gets the message,
        // whatever other subscriptions that member has.
        let mut queued = groups
            .into_iter()
            .filter(|g| self.deliver_shared_kept(g, &message, kept))
            .count();
        if targets.len() > 1 {
            // Overlapping subscriptions of one session deliver once, at the highest QoS.
            targets.sort_unstable_by(|a, b| {
                (a.session.id, b.options.qos).cmp(&(b.session.id, a.options.qos))
            });
        }
        let mut rest = &targets[..];
        while let Some(first) = rest.first() {
            let same = rest
                .iter()
                .take_while(|s| s.session.id == first.session.id)
                .count();
            let (group, next) = rest.split_at(same);
            rest = next;
            let delivery = Delivery {
                message: message.clone(),
                qos: message.qos.min(first.options.qos),
                retain: message.retain && group.iter().any(|s| s.options.retain_as_published),
                ids: group.iter().filter_map(|s| s.options.id).collect(),
                shared: None,
            };
            let (pushed, ticket) = first
                .session
                .deliver(delivery, self.config.queue, &*self.state);
            later(kept, ticket);
            queued += usize::from(pushed.queued);
            self.count(&first.session, pushed);
        }
        queued
    }

    fn count(&self, session: &Session, pushed: queue::Pushed) {
        if pushed.dropped == 0 {
            return;
        }
        self.stats
            .dropped_queue_full
            .fetch_add(u64::from(pushed.dropped), Ordering::Relaxed);
        if pushed.episode {
            let (queued, _) = session.queued();
            tracing::warn!(client_id = %session.key.client_id.escape_debug(),
                mqtt_client_id = %session.key.mqtt_client_id.escape_debug(), queued,
                "delivery queue full: dropping messages for this session (counted in mqtt_adapter_messages_dropped_total)");
        }
    }

    /// Every live connection, ordered by MQTT client identifier then client id.
    pub fn live_clients(&self) -> Vec<LiveClient> {
        self.live_page(|_| true, 0, usize::MAX).1
    }

    /// The live connections whose key `which` accepts, ordered by (MQTT client identifier,
    /// client id): how many there are, and the page `offset..offset + limit` of them. Only the
    /// page's subscriptions are copied, so a small page of many sessions costs little more than
    /// a pointer per session.
    pub fn live_page(
        &self,
        which: impl Fn(&SessionKey) -> bool,
        offset: usize,
        limit: usize,
    ) -> (usize, Vec<LiveClient>) {
        let mut sessions: Vec<Arc<Session>> = self
            .table()
            .values()
            .filter(|s| which(&s.key))
            .cloned()
            .collect();
        sessions.retain(|s| s.is_attached());
        sessions.sort_unstable_by(|a, b| {
            (&a.key.mqtt_client_id, &a.key.client_id)
                .cmp(&(&b.key.mqtt_client_id, &b.key.client_id))
        });
        let page = sessions
            .iter()
            .skip(offset)
            .take(limit)
            .filter_map(|s| {
                let state = s.lock();
                let attached = state.attached.as_ref()?;
                let mut subscriptions: Vec<String> =
                    state.subscriptions.keys().map(|f| f.to_string()).collect();
                subscriptions.sort_unstable();
                Some(LiveClient {
                    key: s.key.clone(),
                    meta: attached.control.meta.clone(),
                    subscriptions,
                })
            })
            .collect();
        (sessions.len(), page)
    }

    /// The keys of the live connections `which` accepts.
    pub fn live_keys(&self, which: impl Fn(&SessionKey) -> bool) -> Vec<SessionKey> {
        let sessions: Vec<Arc<Session>> = self
            .table()
            .values()
            .filter(|s| which(&s.key))
            .cloned()
            .collect();
        sessions
            .into_iter()
            .filter(|s| s.is_attached())
            .map(|s| s.key.clone())
            .collect()
    }

    /// Tells the live connections matching `which` to end, for `why`; returns their controls
    /// (to await their end).
    pub fn kick(
        &self,
        which: impl Fn(&SessionKey) -> bool,
        why: Kick,
    ) -> Vec<Arc<ConnectionControl>> {
        let sessions: Vec<Arc<Session>> = self
            .table()
            .iter()
            .filter(|(k, _)| which(k))
            .map(|(_, s)| s.clone())
            .collect();
        let controls: Vec<Arc<ConnectionControl>> = sessions
            .iter()
            .filter_map(|s| s.lock().attached.as_ref().map(|a| a.control.clone()))
            .collect();
        for control in &controls {
            control.kick(why);
        }
        controls
    }

    /// Every session held, live and offline.
    pub fn sessions(&self) -> Vec<Arc<Session>> {
        self.table().values().cloned().collect()
    }

    /// The session `key`, live or offline.
    pub fn session(&self, key: &SessionKey) -> Option<Arc<Session>> {
        self.table().get(key).cloned()
    }

    /// Sessions held (live and offline).
    pub fn session_count(&self) -> usize {
        self.table().len()
    }

    /// Subscriptions in the trie, and the trie's nodes.
    pub fn subscription_count(&self) -> (usize, usize) {
        let trie = self.trie.read().unwrap_or_else(|p| p.into_inner());
        (trie.len(), trie.node_count())
    }

    /// Whether a retained PUBLISH of `message` by client `owner` would be kept: it clears its
    /// topic, or the store and the client's share have room for it.
    pub fn retained_accepts(&self, owner: &str, message: &Message) -> bool {
        message.payload.is_empty()
            || self
                .retained
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .accepts(message.topic_str(), owner, message.size())
    }

    /// Counts a retained PUBLISH refused before routing because the store is full.
    pub fn count_retained_refused(&self, topic: &str) {
        let n = self.stats.retained_refused.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            tracing::warn!(topic = %topic.escape_debug(), refused = n,
                "retained store full: retained PUBLISH refused (SMQ_MQTT_ADAPTER_MAX_RETAINED, _MAX_RETAINED_BYTES, _RETAINED_CLIENT_SHARE)");
        }
    }

    /// Retained topics held.
    pub fn retained_count(&self) -> usize {
        self.retained
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// What the metrics report of the core's state, read at scrape time: one pass over the
    /// session table (a short lock of each session), and the trie's and retained store's counts.
    pub fn gauges(&self) -> BrokerGauges {
        let mut gauges = BrokerGauges::default();
        {
            let table = self.table();
            for session in table.values() {
                let state = session.lock();
                if state.attached.is_some() {
                    gauges.sessions_online += 1;
                } else {
                    gauges.sessions_offline += 1;
                }
                gauges.queued_bytes += state.mailbox.queued_bytes();
            }
        }
        gauges.subscriptions = self.subscription_count().0;
        let retained = self.retained.read().unwrap_or_else(|p| p.into_inner());
        gauges.retained_messages = retained.len();
        gauges.retained_bytes = retained.bytes();
        gauges
    }

    /// Tells every attached connection to end (server shutdown, after the server's shutdown
    /// token is cancelled: a connection attached from then on starts cancelled).
    pub fn cancel_connections(&self) {
        let table = self.table();
        for session in table.values() {
            if let Some(attached) = &session.lock().attached {
                attached.control.cancel();
            }
        }
    }

    /// Stops expiry timers (server shutdown).
    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Publishes every will still waiting for its delay (server shutdown: the connections they
    /// stand for ended with it; a kept session comes back after the restart without its will);
    /// returns how many.
    pub fn publish_pending_wills(&self) -> usize {
        let wills: Vec<DeferredWill> = self
            .sessions()
            .iter()
            .filter_map(|s| {
                let mut state = s.lock();
                let will = state.will.take()?;
                // A kept session comes back after the restart without it.
                if let Some(d) = state.durable.as_mut() {
                    d.will = None;
                    drop(self.state.put_session(record_of(s, &state), None));
                }
                Some(will)
            })
            .collect();
        let n = wills.len();
        for will in wills {
            (will.publish)(will.message);
        }
        n
    }
}

/// Keeps in `kept` whichever ticket resolves later.
fn later(kept: &mut Option<StateTicket>, ticket: Option<StateTicket>) {
    if let Some(ticket) = ticket {
        *kept = Some(match kept.take() {
            Some(k) => k.later(ticket),
            None => ticket,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(client: &str, mqtt: &str) -> SessionKey {
        SessionKey {
            client_id: client.into(),
            mqtt_client_id: mqtt.into(),
        }
    }

    fn meta() -> ConnectionMeta {
        ConnectionMeta::default()
    }

    const CLEAN: AttachRequest = AttachRequest {
        clean_start: true,
        expiry: Expiry::WithConnection,
    };
    const PERSISTENT: AttachRequest = AttachRequest {
        clean_start: false,
        expiry: Expiry::Never,
    };

    fn msg(topic: &'static str, qos: u8) -> Arc<Message> {
        Message::new(topic.into(), "x".into(), qos, false, Origin::Bus)
    }

    fn drain(session: &Session) -> Vec<(u8, bool)> {
        let mut out = Vec::new();
        session.take_ready(usize::MAX, usize::MAX, &mut out);
        out.into_iter()
            .map(|o| match o {
                Outgoing::Publish { delivery, .. } => (delivery.qos, delivery.retain),
                Outgoing::Release(_) => (9, false),
            })
            .collect()
    }

    #[tokio::test]
    async fn overlapping_subscriptions_deliver_once_at_the_highest_qos_capped_by_the_publish() {
        let broker = Broker::new(BrokerConfig::default());
        let stop = CancellationToken::new();
        let a = broker.attach(key("c1", "m1"), CLEAN, meta(), &stop).await;
        broker.subscribe(&a.session, "a/#", SubOptions::qos(0));
        broker.subscribe(&a.session, "a/+", SubOptions::qos(2));
        broker.subscribe(&a.session, "a/b", SubOptions::qos(1));
        assert_eq!(broker.publish(msg("a/b", 1)), 1);
        assert_eq!(broker.publish(msg("a/b", 2)), 1);
        assert_eq!(broker.publish(msg("a/c", 0)), 1);
        assert_eq!(drain(&a.session), [(1, false), (2, false), (0, false)]);
    }

    #[tokio::test]
    async fn same_mqtt_client_id_under_another_identity_is_another_session() {
        let broker = Broker::new(BrokerConfig::default());
        let stop = CancellationToken::new();
        let mut victim = broker
            .attach(key("c2", "dev-42"), PERSISTENT, meta(), &stop)
            .await;
        broker.subscribe(&victim.session, "m/d1/c/ch2/#", SubOptions::qos(1));
        broker.detach(&mut victim);
        Broker::release(&mut victim);
        broker.publish(msg("m/d1/c/ch2/temp", 1));

        let thief = broker
            .attach(key("c1", "dev-42"), PERSISTENT, meta(), &stop)
            .await;
        assert!(!thief.present, "another identity never resumes the session");
        assert!(drain(&thief.session).is_empty());
        assert_eq!(broker.session_count(), 2);

        let back = broker
            .attach(key("c2", "dev-42"), PERSISTENT, meta(), &stop)
            .await;
        assert!(back.present);
        assert_eq!(drain(&back.session), [(1, false)]);
    }

    #[tokio::test]
    async fn takeover_waits_for_the_previous_connection_to_end() {
        let broker = Broker::new(BrokerConfig::default());
        let stop = CancellationToken::new();
        let mut first = broker
            .attach(key("c1", "m"), PERSISTENT, meta(), &stop)
            .await;
        let control = first.control.clone();
        let b = broker.clone();
        let second = tokio::spawn(async move {
            let stop = CancellationToken::new();
            b.attach(key("c1", "m"), PERSISTENT, meta(), &stop).await
        });
        control.cancelled().await;
        assert_eq!(control.kicked(), Some(Kick::Takeover));
        broker.detach(&mut first);
        Broker::release(&mut first);
        let second = second.await.expect("attach");
        assert!(second.present);
    }

    #[tokio::test]
    async fn no_local_retain_as_published_and_identifiers() {
        let broker = Broker::new(BrokerConfig::default());
        let stop = CancellationToken::new();
        let a = broker.attach(key("c1", "a"), CLEAN, meta(), &stop).await;
        let local = SubOptions {
            qos: 1,
            no_local: true,
            retain_as_published: true,
            id: Some(7),
        };
        broker.subscribe(&a.session, "t/#", local);
        broker.subscribe(
            &a.session,
            "t/+",
            SubOptions {
                id: Some(9),
                ..SubOptions::qos(0)
            },
        );
        let own = Message::new(
            "t/x".into(),
            "x".into(),
            1,
            true,
            Origin::Session(a.session.id),
        );
        broker.publish(own);
        let foreign = Message::new("t/x".into(), "x".into(), 1, true, Origin::Bus);
        broker.publish(foreign);
        let mut out = Vec::new();
        a.session.take_ready(10, 10, &mut out);
        let got: Vec<(u8, bool, Vec<u32>)> = out
            .into_iter()
            .map(|o| match o {
                Outgoing::Publish { delivery, .. } => (delivery.qos, delivery.retain, delivery.ids),
                Outgoing::Release(_) => unreachable!(),
            })
            .collect();
        // Its own message only through `t/+` (QoS 0, RETAIN cleared); the other through both.
        assert_eq!(got[0], (0, false, vec![9]));
        assert_eq!(got[1].0, 1);
        assert!(got[1].1, "retain as published");
        let mut ids = got[1].2.clone();
        ids.sort_unstable();
        assert_eq!(ids, [7, 9]);
    }

    #[tokio::test]
    async fn live_clients_and_kicks_by_key() {
        let broker = Broker::new(BrokerConfig::default());
        let stop = CancellationToken::new();
        let a = broker.attach(key("c1", "b"), CLEAN, meta(), &stop).await;
        let _b = broker.attach(key("c2", "a"), CLEAN, meta(), &stop).await;
        broker.subscribe(&a.session, "t/2", SubOptions::qos(0));
        broker.subscribe(&a.session, "t/1", SubOptions::qos(0));
        let live = broker.live_clients();
        let ids: Vec<&str> = live.iter().map(|c| c.key.mqtt_client_id.as_str()).collect();
        assert_eq!(ids, ["a", "b"]);
        assert_eq!(live[1].subscriptions, ["t/1", "t/2"]);
        let kicked = broker.kick(|k| k.mqtt_client_id == "b", Kick::Administrative);
        assert_eq!(kicked.len(), 1);
        assert!(a.control.is_cancelled());
        assert_eq!(a.control.kicked(), Some(Kick::Administrative));
    }

    #[tokio::test]
    async fn a_clean_session_leaves_nothing_behind() {
        let broker = Broker::new(BrokerConfig::default());
        let stop = CancellationToken::new();
        let mut a = broker.attach(key("c1", "m1"), CLEAN, meta(), &stop).await;
        for i in 0..5000 {
            broker.subscribe(&a.session, &format!("t/{i}/#"), SubOptions::qos(1));
        }
        broker.publish(msg("t/7/x", 1));
        assert_eq!(broker.subscription_count().0, 5000);
        broker.detach(&mut a);
        Broker::release(&mut a);
        assert_eq!(broker.session_count(), 0);
        assert_eq!(broker.subscription_count(), (0, 0));
        assert_eq!(
            broker.stats.dropped_session_ended.load(Ordering::Relaxed),
            1
        );
    }

    #[tokio::test]
    async fn full_queue_counts_every_dropped_delivery() {
        let broker = Broker::new(BrokerConfig {
            queue: QueueLimits {
                max_messages: 10,
                max_bytes: usize::MAX,
            },
            max_retained: 10,
            ..BrokerConfig::default()
        });
        let stop = CancellationToken::new();
        let slow = broker.attach(key("c1", "slow"), CLEAN, meta(), &stop).await;
        let fast = broker.attach(key("c1", "fast"), CLEAN, meta(), &stop).await;
        broker.subscribe(&slow.session, "t", SubOptions::qos(1));
        broker.subscribe(&fast.session, "t", SubOptions::qos(1));
        let mut fast_got = 0;
        for _ in 0..100 {
            broker.publish(msg("t", 1));
            fast_got += drain(&fast.session).len();
        }
        assert_eq!(fast_got, 100, "a slow subscriber does not affect another");
        assert_eq!(slow.session.queued().0, 10);
        assert_eq!(broker.stats.dropped_queue_full.load(Ordering::Relaxed), 90);
    }

    #[tokio::test]
    async fn retained_messages_reach_new_subscriptions_with_retain_set() {
        let broker = Broker::new(BrokerConfig::default());
        let stop = CancellationToken::new();
        broker.publish(Message::new("r/1".into(), "v".into(), 2, true, Origin::Bus));
        broker.publish(Message::new("r/2".into(), "v".into(), 1, true, Origin::Bus));
        let a = broker.attach(key("c1", "m1"), CLEAN, meta(), &stop).await;
        broker.subscribe(&a.session, "r/+", SubOptions::qos(1));
        broker.deliver_retained(&a.session, "r/+", SubOptions::qos(1));
        let mut got = drain(&a.session);
        got.sort_unstable();
        assert_eq!(got, [(1, true), (1, true)]);
        broker.publish(Message::new("r/1".into(), "".into(), 0, true, Origin::Bus));
        assert_eq!(broker.retained_count(), 1);
    }

    #[tokio::test]
    async fn retained_changes_go_through_the_state_store_and_come_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = BrokerConfig {
            max_retained: 2,
            ..BrokerConfig::default()
        };
        let open = || -> Arc<dyn StateStore> {
            Arc::new(crate::state::LocalState::open(dir.path()).expect("open state"))
        };
        let broker = Broker::with_state(config, open());
        let retained = |t: &'static str, p: &'static str| {
            Message::new(t.into(), p.into(), 1, true, Origin::Bus)
        };
        broker.publish_kept("", retained("r/1", "a")).1.wait().await;
        broker.publish_kept("", retained("r/2", "b")).1.wait().await;
        let (_, refused) = broker.publish_kept("", retained("r/3", "c"));
        assert!(refused.is_done(), "beyond the bound nothing is written");
        broker.publish_kept("", retained("r/1", "")).1.wait().await;
        let (_, plain) = broker.publish_kept(
            "",
            Message::new("r/4".into(), "d".into(), 1, false, Origin::Bus),
        );
        assert!(
            plain.is_done(),
            "a message that is not retained costs no write"
        );
        broker.state().close();
        drop(broker);

        let again = Broker::with_state(config, open());
        assert_eq!(again.restore_retained().expect("restore"), 1);
        let stop = CancellationToken::new();
        let a = again.attach(key("c1", "m1"), CLEAN, meta(), &stop).await;
        again.deliver_retained(&a.session, "r/#", SubOptions::qos(1));
        assert_eq!(payloads(&a.session), ["b"]);
    }

    fn payloads(session: &Session) -> Vec<String> {
        let mut out = Vec::new();
        session.take_ready(usize::MAX, usize::MAX, &mut out);
        out.into_iter()
            .filter_map(|o| match o {
                Outgoing::Publish { delivery, .. } => {
                    Some(String::from_utf8_lossy(&delivery.message.payload).into_owned())
                }
                Outgoing::Release(_) => None,
            })
            .collect()
    }

    fn numbered(i: usize) -> Arc<Message> {
        Message::new("s/t".into(), i.to_string().into(), 1, false, Origin::Bus)
    }

    #[tokio::test]
    async fn a_share_group_gets_each_message_once_round_robin() {
        let broker = Broker::new(BrokerConfig::default());
        let stop = CancellationToken::new();
        let mut members = Vec::new();
        for m in ["a", "b", "c"] {
            let a = broker.attach(key("c1", m), CLEAN, meta(), &stop).await;
            broker.subscribe(&a.session, "$share/g/s/+", SubOptions::qos(1));
            members.push(a);
        }
        // Another group and a plain subscription each get every message.
        let other = broker.attach(key("c1", "o"), CLEAN, meta(), &stop).await;
        broker.subscribe(&other.session, "$share/h/s/#", SubOptions::qos(1));
        broker.subscribe(&other.session, "s/t", SubOptions::qos(1));
        assert_eq!(broker.subscription_count().0, 3, "two groups, one plain");
        for i in 0..9 {
            assert_eq!(broker.publish(numbered(i)), 3);
        }
        let got: Vec<Vec<String>> = members.iter().map(|m| payloads(&m.session)).collect();
        assert!(got.iter().all(|g| g.len() == 3), "{got:?}");
        let mut all: Vec<String> = got.concat();
        all.sort_unstable_by_key(|p| p.parse::<u32>().unwrap_or(0));
        let expected: Vec<String> = (0..9).map(|i| i.to_string()).collect();
        assert_eq!(all, expected);
        assert_eq!(payloads(&other.session).len(), 18);
    }

    #[tokio::test]
    async fn a_leaving_member_hands_its_undelivered_messages_to_the_others() {
        let broker = Broker::new(BrokerConfig::default());
        let stop = CancellationToken::new();
        let mut a = broker.attach(key("c1", "a"), CLEAN, meta(), &stop).await;
        let b = broker.attach(key("c1", "b"), CLEAN, meta(), &stop).await;
        let c = broker.attach(key("c1", "c"), CLEAN, meta(), &stop).await;
        for s in [&a, &b, &c] {
            broker.subscribe(&s.session, "$share/g/s/t", SubOptions::qos(1));
        }
        for i in 0..6 {
            broker.publish(numbered(i));
        }
        // `b` unsubscribes with two queued; `a` ends with one written (unacknowledged) and one
        // queued. Everything reaches `c`, and nothing is counted as lost.
        assert!(broker.unsubscribe(&b.session, "$share/g/s/t"));
        assert_eq!(b.session.queued(), (0, 0));
        let mut written = Vec::new();
        a.session.take_ready(usize::MAX, 1, &mut written);
        assert_eq!(a.session.queued().1, 1, "one written, not acknowledged");
        broker.detach(&mut a);
        Broker::release(&mut a);
        let mut got = payloads(&c.session);
        got.sort_unstable();
        assert_eq!(got, ["0", "1", "2", "3", "4", "5"]);
        assert_eq!(
            broker.stats.dropped_session_ended.load(Ordering::Relaxed),
            0
        );
        // The last member leaving removes the group from the trie.
        assert!(broker.unsubscribe(&c.session, "$share/g/s/t"));
        assert_eq!(broker.subscription_count(), (0, 0));
        assert_eq!(broker.publish(numbered(9)), 0);
    }

    fn recording_will(
        topic: &'static str,
    ) -> (DeferredWill, std::sync::mpsc::Receiver<Arc<Message>>) {
        let (tx, rx) = std::sync::mpsc::channel();
        let will = DeferredWill {
            message: Message::new(topic.into(), "gone".into(), 1, false, Origin::Bus),
            publish: Box::new(move |m| {
                let _ = tx.send(m);
            }),
        };
        (will, rx)
    }

    /// Attaches `mqtt` (client c1) and ends its connection with a will on `topic` delayed by
    /// `delay`; returns where the will shows up when published.
    async fn offline_with_will(
        broker: &Broker,
        mqtt: &str,
        request: AttachRequest,
        topic: &'static str,
        delay: Duration,
    ) -> std::sync::mpsc::Receiver<Arc<Message>> {
        let stop = CancellationToken::new();
        let mut a = broker.attach(key("c1", mqtt), request, meta(), &stop).await;
        let (will, published) = recording_will(topic);
        broker.detach_with_will(&mut a, Some((will, delay)));
        Broker::release(&mut a);
        published
    }

    #[tokio::test(start_paused = true)]
    async fn a_delayed_will_waits_and_a_resume_cancels_it() {
        let broker = Broker::new(BrokerConfig::default());
        let stop = CancellationToken::new();
        let published =
            offline_with_will(&broker, "w", PERSISTENT, "w/1", Duration::from_secs(5)).await;
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert!(published.try_recv().is_err(), "not before the delay");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(
            published.try_recv().map(|m| m.topic.clone()),
            Ok("w/1".into())
        );

        let published =
            offline_with_will(&broker, "w", PERSISTENT, "w/2", Duration::from_secs(5)).await;
        tokio::time::sleep(Duration::from_secs(2)).await;
        let _resumed = broker
            .attach(key("c1", "w"), PERSISTENT, meta(), &stop)
            .await;
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert!(
            published.try_recv().is_err(),
            "a resumed session sends no will"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn delayed_wills_go_out_at_shutdown() {
        let broker = Broker::new(BrokerConfig::default());
        let published =
            offline_with_will(&broker, "w", PERSISTENT, "w/1", Duration::from_secs(60)).await;
        broker.stop();
        assert!(published.try_recv().is_err());
        assert_eq!(broker.publish_pending_wills(), 1);
        assert!(published.try_recv().is_ok());
        assert_eq!(broker.publish_pending_wills(), 0, "once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_delayed_will_goes_out_when_the_session_ends_sooner() {
        let broker = Broker::new(BrokerConfig::default());
        let expiring = AttachRequest {
            clean_start: false,
            expiry: Expiry::After(Duration::from_secs(2)),
        };
        let minute = Duration::from_secs(60);
        let published = offline_with_will(&broker, "w", expiring, "w/1", minute).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        assert_eq!(broker.session_count(), 0);
        assert!(published.try_recv().is_ok(), "published at session expiry");

        // A session that ends with its connection publishes at once, whatever the delay.
        let published = offline_with_will(&broker, "x", CLEAN, "w/2", minute).await;
        assert!(published.try_recv().is_ok());
    }

    #[tokio::test]
    async fn one_client_keeps_a_bounded_number_of_offline_sessions() {
        let broker = Broker::new(BrokerConfig {
            max_offline_sessions: 2,
            ..BrokerConfig::default()
        });
        let stop = CancellationToken::new();
        for mqtt in ["m1", "m2", "m3"] {
            let mut a = broker
                .attach(key("c1", mqtt), PERSISTENT, meta(), &stop)
                .await;
            broker.subscribe(&a.session, &format!("t/{mqtt}"), SubOptions::qos(1));
            broker.detach(&mut a);
            Broker::release(&mut a);
        }
        // Another client's sessions are its own account.
        let mut other = broker
            .attach(key("c2", "m1"), PERSISTENT, meta(), &stop)
            .await;
        broker.detach(&mut other);
        Broker::release(&mut other);
        assert_eq!(broker.session_count(), 3);
        assert!(
            broker.session(&key("c1", "m1")).is_none(),
            "the oldest went"
        );
        assert_eq!(broker.stats().sessions_evicted.load(Ordering::Relaxed), 1);
        assert_eq!(broker.gauges().sessions_offline, 3);
        // A resumed session leaves the offline account, and comes back to it.
        let mut b = broker
            .attach(key("c1", "m2"), PERSISTENT, meta(), &stop)
            .await;
        assert!(b.present);
        broker.detach(&mut b);
        Broker::release(&mut b);
        assert_eq!(broker.session_count(), 3);
        assert_eq!(broker.stats().sessions_evicted.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn offline_session_expires_unless_resumed() {
        let broker = Broker::new(BrokerConfig::default());
        let stop = CancellationToken::new();
        let expiring = AttachRequest {
            clean_start: false,
            expiry: Expiry::After(Duration::from_secs(5)),
        };
        let mut a = broker
            .attach(key("c1", "m1"), expiring, meta(), &stop)
            .await;
        broker.subscribe(&a.session, "t", SubOptions::qos(1));
        broker.detach(&mut a);
        Broker::release(&mut a);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut b = broker
            .attach(key("c1", "m1"), expiring, meta(), &stop)
            .await;
        assert!(b.present);
        broker.detach(&mut b);
        Broker::release(&mut b);
        // The first timer (at 5 s) belongs to an older connection: it does nothing.
        tokio::time::sleep(Duration::from_secs(4)).await;
        assert_eq!(broker.session_count(), 1);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(broker.session_count(), 0);
        assert_eq!(broker.subscription_count(), (0, 0));
    }
}
