//! The `nats` state backend: retained messages in a JetStream key-value bucket (`mqtt-retained`,
//! history 1, file storage) that every adapter instance shares, on SMQ_MQTT_ADAPTER_STATE_URL
//! or else SMQ_MESSAGE_BROKER_URL.
//!
//! - Key: the topic in base64url without padding (KV keys allow few characters; a topic may
//!   hold any UTF-8). Value: [`record::encode`]. A clear is a KV delete marker.
//! - Writes are handed to one task, which publishes them pipelined (many in flight, in the
//!   order the broker core made them) and resolves their tickets as JetStream acknowledges
//!   them, in order. A failed write is counted and logged once per run of failures; its change
//!   stays in this instance's memory.
//! - At start-up the bucket is read (the newest entry of each key) before the listeners
//!   accept; then the same watch keeps every change any instance makes coming, and those are
//!   applied to the in-memory retained store without being written back
//!   ([`Broker::apply_remote_retained`]). The watch is an ordered consumer that recreates
//!   itself after a reconnect; if it ends anyway it is started again after the last revision
//!   seen.
//!
//! Races: an entry's revision is its stream sequence, so revisions order every change of a
//! topic the way the bucket holds them. Per topic the store remembers, while this instance has
//! writes of it in flight or just acknowledged, the newest revision memory holds (`known`).
//! An entry at or below it is not applied (the echo of an own write, or an older one); an
//! entry of another instance that arrives while own writes of the topic await their acks is
//! held and applied only if it is newer than the last of them. So memory never goes back to an
//! older value, and two instances writing one topic end with what the bucket holds. The
//! decision and the change of memory happen under the broker core's retained lock, which own
//! writes take too.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv, message::PublishMessage};
use async_nats::{ConnectOptions, ServerAddr};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use bytes::Bytes;
use futures_util::stream::{FuturesOrdered, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::record::{self, Decoded};
use super::{StateError, StateStore, StateTicket};
use crate::broker::{Broker, Message};

/// The bucket's name unless told otherwise.
pub const BUCKET: &str = "mqtt-retained";
/// Writes published and not yet acknowledged, at most.
const MAX_IN_FLIGHT: usize = 4096;
/// How long one write waits for its acknowledgement before it counts as failed.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long start-up waits for NATS before it gives up.
const FIRST_CONNECT_WAIT: Duration = Duration::from_secs(10);
/// How long start-up may take to read the bucket.
const LOAD_WAIT: Duration = Duration::from_secs(120);
/// Longest key: NATS refuses a protocol line beyond 4 KiB (topics up to 2,250 bytes fit).
const MAX_KEY: usize = 3000;
/// The header that marks a KV delete.
const KV_OPERATION: &str = "KV-Operation";

/// Where the bucket is and who writes it.
#[derive(Debug, Clone)]
pub struct NatsSettings {
    /// `nats://host:port` (comma-separated for a cluster).
    pub url: String,
    /// The setting `url` came from, named in errors.
    pub setting: &'static str,
    /// The key-value bucket's name.
    pub bucket: String,
    /// This process's UUID (the NATS connection's name).
    pub instance_id: String,
}

/// The bucket key of `topic`.
fn key_of(topic: &str) -> String {
    URL_SAFE_NO_PAD.encode(topic)
}

/// The topic of a bucket key; `None` for a key this store did not write.
fn topic_of(key: &str) -> Option<String> {
    String::from_utf8(URL_SAFE_NO_PAD.decode(key).ok()?).ok()
}

/// A change of a topic read from the bucket.
#[derive(Debug, Clone)]
struct Remote {
    revision: u64,
    /// `None`: deleted.
    value: Option<Bytes>,
}

/// What the store remembers of a topic this instance wrote lately.
#[derive(Debug, Default)]
struct Topic {
    /// Own writes handed over and not yet acknowledged (or failed).
    pending: u32,
    /// The newest revision of the topic memory holds or has passed.
    known: u64,
    /// The newest entry seen while own writes were pending.
    held: Option<Remote>,
}

/// One change handed to the writer.
struct Write {
    ticket: u64,
    topic: Box<str>,
    /// `None`: clear.
    message: Option<Arc<Message>>,
}

struct Tracker {
    topics: HashMap<Box<str>, Topic>,
    /// The newest revision the watch delivered.
    watched: u64,
    /// The last ticket handed out.
    tickets: u64,
    /// `None` once closed.
    intake: Option<mpsc::UnboundedSender<Write>>,
}

impl Tracker {
    /// Forgets `topic` once nothing about it can still be out of order: no own write in
    /// flight, nothing held, and the watch has passed the newest revision memory holds.
    fn prune(&mut self, topic: &str) {
        let watched = self.watched;
        if self
            .topics
            .get(topic)
            .is_some_and(|t| t.pending == 0 && t.held.is_none() && watched >= t.known)
        {
            self.topics.remove(topic);
        }
    }

    /// Whether an entry of `topic` at `remote.revision` goes into memory now (it is newer than
    /// what memory holds, and no own write of the topic awaits its ack); while own writes are
    /// pending it is held instead.
    fn admit(&mut self, topic: &str, remote: &Remote) -> bool {
        let Some(t) = self.topics.get_mut(topic) else {
            return true;
        };
        if remote.revision <= t.known {
            self.prune(topic);
            return false;
        }
        if t.pending > 0 {
            if t.held.as_ref().is_none_or(|h| h.revision < remote.revision) {
                t.held = Some(remote.clone());
            }
            return false;
        }
        t.known = remote.revision;
        self.prune(topic);
        true
    }
}

struct Shared {
    tracker: Mutex<Tracker>,
    /// The last ticket resolved.
    committed: watch::Sender<u64>,
    failed: AtomicU64,
    /// Whether the last write failed: a run of failures is logged once.
    failing: AtomicBool,
    broker: OnceLock<Weak<Broker>>,
    stop: CancellationToken,
    /// Set by the writer when it ended.
    writer_done: (Mutex<bool>, Condvar),
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

pub struct NatsState {
    shared: Arc<Shared>,
    store: kv::Store,
    /// What start-up read, until [`StateStore::load_retained`] takes it.
    loaded: Mutex<Option<Vec<Arc<Message>>>>,
    /// The watch start-up read from, until [`StateStore::follow`] continues it.
    watch: Mutex<Option<(kv::Watch, u64)>>,
    runtime: tokio::runtime::Handle,
}

fn fail(settings: &NatsSettings, what: String) -> StateError {
    StateError::Nats(format!("{}: {what}", settings.setting))
}

impl NatsState {
    /// Connects, checks the server, opens (creating) the bucket, reads it, and starts the
    /// writer. NATS must be reachable: the retained messages are loaded before serving.
    pub async fn open(settings: &NatsSettings) -> Result<NatsState, StateError> {
        let addrs = settings
            .url
            .split(',')
            .map(|a| ServerAddr::from_str(a.trim()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| {
                fail(
                    settings,
                    format!(
                        "{:?} is not a NATS URL ({e}); use e.g. nats://localhost:4222",
                        settings.url
                    ),
                )
            })?;
        let reconnected = Arc::new(AtomicBool::new(false));
        let client = ConnectOptions::new()
            .name(format!("mqtt-adapter state {}", settings.instance_id))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis(100 << attempts.min(4)).min(Duration::from_secs(1))
            })
            .event_callback(move |event| {
                // The first connection is not news (a refused start-up prints one line only).
                let first = matches!(event, async_nats::Event::Connected)
                    && !reconnected.swap(true, Ordering::Relaxed);
                async move {
                    if first {
                        tracing::debug!(%event, "nats state store");
                    } else {
                        tracing::info!(%event, "nats state store");
                    }
                }
            })
            .connect(addrs)
            .await
            .map_err(|e| fail(settings, e.to_string()))?;
        let deadline = tokio::time::Instant::now() + FIRST_CONNECT_WAIT;
        while client.connection_state() != async_nats::connection::State::Connected {
            if tokio::time::Instant::now() >= deadline {
                return Err(fail(settings, format!(
                    "NATS at {} not reachable within {} s; the nats state store loads the retained messages before serving: start NATS, or set SMQ_MQTT_ADAPTER_STATE=local",
                    settings.url, FIRST_CONNECT_WAIT.as_secs())));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let version = client.server_info().version;
        if !crate::bridge::server_supported(&version) {
            return Err(fail(settings, format!(
                "nats-server {version} is too old: the nats state store needs 2.10 or newer with JetStream; upgrade NATS, or set SMQ_MQTT_ADAPTER_STATE=local")));
        }
        let js = jetstream::ContextBuilder::new()
            .timeout(ACK_TIMEOUT)
            .max_ack_inflight(MAX_IN_FLIGHT)
            .backpressure_on_inflight(true)
            .build(client);
        let store = open_bucket(&js, &settings.bucket).await.map_err(|e| {
            fail(settings, format!(
                "no JetStream key-value bucket {:?} ({e}); the nats state store needs JetStream (nats-server -js): enable it, or set SMQ_MQTT_ADAPTER_STATE=local",
                settings.bucket))
        })?;
        let (found, watch, last, expired) = load(&store).await.map_err(|e| {
            fail(
                settings,
                format!("cannot read the bucket {:?}: {e}", settings.bucket),
            )
        })?;
        if !expired.is_empty() {
            tracing::info!(
                expired = expired.len(),
                "retained messages whose message expiry passed: removed from the bucket"
            );
            tokio::spawn(remove_expired(js.clone(), store.prefix.clone(), expired));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            tracker: Mutex::new(Tracker {
                topics: HashMap::new(),
                watched: last,
                tickets: 0,
                intake: Some(tx),
            }),
            committed: watch::channel(0).0,
            failed: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            broker: OnceLock::new(),
            stop: CancellationToken::new(),
            writer_done: (Mutex::new(false), Condvar::new()),
        });
        tokio::spawn(write_loop(shared.clone(), js, store.prefix.clone(), rx));
        tracing::info!(url = %settings.url, bucket = %settings.bucket, server = %version,
            retained = found.len(), "nats state store: bucket read; following it");
        Ok(NatsState {
            shared,
            store,
            loaded: Mutex::new(Some(found)),
            watch: Mutex::new(Some((watch, last))),
            runtime: tokio::runtime::Handle::current(),
        })
    }

    fn hand_over(&self, topic: &str, message: Option<Arc<Message>>) -> StateTicket {
        let shared = &self.shared;
        let mut tracker = lock(&shared.tracker);
        let ticket = tracker.tickets + 1;
        let Some(intake) = &tracker.intake else {
            return StateTicket::done();
        };
        let write = Write {
            ticket,
            topic: topic.into(),
            message,
        };
        if intake.send(write).is_err() {
            return StateTicket::done();
        }
        tracker.tickets = ticket;
        tracker.topics.entry(topic.into()).or_default().pending += 1;
        StateTicket::on(shared.committed.subscribe(), ticket)
    }
}

/// The bucket, created if missing (another instance may create it at the same time).
async fn open_bucket(js: &jetstream::Context, bucket: &str) -> Result<kv::Store, String> {
    if let Ok(store) = js.get_key_value(bucket).await {
        return Ok(store);
    }
    let created = js
        .create_key_value(kv::Config {
            bucket: bucket.to_owned(),
            description: "MQTT retained messages (SuperMQ MQTT adapter)".to_owned(),
            history: 1,
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        })
        .await;
    match created {
        Ok(store) => Ok(store),
        Err(e) => js.get_key_value(bucket).await.map_err(|_| e.to_string()),
    }
}

type Loaded = (Vec<Arc<Message>>, kv::Watch, u64, Vec<(String, u64)>);

/// Reads the newest entry of every key; returns the retained messages, the watch (to go on
/// with), the last revision read, and the keys (with revisions) whose expiry passed.
async fn load(store: &kv::Store) -> Result<Loaded, String> {
    let mut watch = store
        .watch_with_history(">")
        .await
        .map_err(|e| e.to_string())?;
    let info = store.stream.get_info().await.map_err(|e| e.to_string())?;
    let (mut found, mut expired) = (Vec::new(), Vec::new());
    if info.state.messages == 0 {
        return Ok((found, watch, info.state.last_sequence, expired));
    }
    let (now, now_ms) = (Instant::now(), record::unix_ms_now());
    let deadline = tokio::time::Instant::now() + LOAD_WAIT;
    loop {
        let entry = match tokio::time::timeout_at(deadline, watch.next()).await {
            Err(_) => return Err(format!("not read within {} s", LOAD_WAIT.as_secs())),
            Ok(None) => return Err("the watch ended".to_owned()),
            Ok(Some(Err(e))) => return Err(e.to_string()),
            Ok(Some(Ok(entry))) => entry,
        };
        if entry.operation == kv::Operation::Put {
            match topic_of(&entry.key) {
                None => {
                    tracing::warn!(key = %entry.key, "nats state store: a key this adapter did not write: skipped")
                }
                Some(topic) => match record::decode(&topic, &entry.value, now, now_ms) {
                    Some(Decoded::Message(m)) => found.push(m),
                    Some(Decoded::Expired) => expired.push((entry.key, entry.revision)),
                    None => tracing::warn!(topic = %topic.escape_debug(),
                        "retained message not readable by this version: skipped (left in place)"),
                },
            }
        }
        if entry.delta == 0 {
            return Ok((found, watch, entry.revision, expired));
        }
    }
}

/// Deletes keys whose message expired, each only if nobody wrote it since.
async fn remove_expired(js: jetstream::Context, prefix: String, keys: Vec<(String, u64)>) {
    for (key, revision) in keys {
        let delete = PublishMessage::build()
            .header(KV_OPERATION, "DEL")
            .expected_last_subject_sequence(revision);
        if let Ok(ack) = js.send_publish(format!("{prefix}{key}"), delete).await {
            // Refused if the key changed meanwhile: then it is not expired.
            let _ = ack.await;
        }
    }
}

type Acked = Pin<Box<dyn Future<Output = (u64, Box<str>, Result<u64, String>)> + Send>>;

/// The writer: publishes what is handed over, many in flight, and resolves tickets in order.
async fn write_loop(
    shared: Arc<Shared>,
    js: jetstream::Context,
    prefix: String,
    mut intake: mpsc::UnboundedReceiver<Write>,
) {
    let mut in_flight: FuturesOrdered<Acked> = FuturesOrdered::new();
    let mut open = true;
    loop {
        tokio::select! {
            Some((ticket, topic, result)) = in_flight.next(), if !in_flight.is_empty() => {
                shared.acked(ticket, &topic, result);
            }
            write = intake.recv(), if open && in_flight.len() < MAX_IN_FLIGHT => match write {
                None => open = false,
                Some(write) => in_flight.push_back(publish(&js, &prefix, write).await),
            },
            else => break,
        }
    }
    let (done, ended) = &shared.writer_done;
    *lock(done) = true;
    ended.notify_all();
}

/// Publishes one write; the future resolves with its revision once JetStream acknowledged it.
async fn publish(js: &jetstream::Context, prefix: &str, write: Write) -> Acked {
    let Write {
        ticket,
        topic,
        message,
    } = write;
    let key = key_of(&topic);
    if key.len() > MAX_KEY {
        let e = format!("topic of {} bytes: too long for a bucket key", topic.len());
        return Box::pin(std::future::ready((ticket, topic, Err(e))));
    }
    let publish = match message {
        Some(message) => {
            let mut value = Vec::with_capacity(message.payload.len() + 16);
            record::encode(&message, Instant::now(), record::unix_ms_now(), &mut value);
            PublishMessage::build().payload(Bytes::from(value))
        }
        None => PublishMessage::build().header(KV_OPERATION, "DEL"),
    };
    // Bounded too: with NATS away the client's buffer fills, and the writes after it fail
    // (their acknowledgements are not held) instead of waiting for the reconnect.
    let sent = tokio::time::timeout(
        ACK_TIMEOUT,
        js.send_publish(format!("{prefix}{key}"), publish),
    )
    .await;
    match sent {
        Ok(Ok(ack)) => Box::pin(async move {
            let result = ack.await.map(|a| a.sequence).map_err(|e| e.to_string());
            (ticket, topic, result)
        }),
        Ok(Err(e)) => Box::pin(std::future::ready((ticket, topic, Err(e.to_string())))),
        Err(_) => {
            let e = "not sent: the NATS connection's buffer stayed full".to_owned();
            Box::pin(std::future::ready((ticket, topic, Err(e))))
        }
    }
}

impl Shared {
    /// An own write was acknowledged (with its revision) or failed.
    fn acked(&self, ticket: u64, topic: &str, result: Result<u64, String>) {
        let release = {
            let mut tracker = lock(&self.tracker);
            let mut release = None;
            if let Some(t) = tracker.topics.get_mut(topic) {
                t.pending = t.pending.saturating_sub(1);
                if let Ok(revision) = result {
                    t.known = t.known.max(revision);
                }
                if t.pending == 0 {
                    release = t.held.take().filter(|h| h.revision > t.known);
                }
                tracker.prune(topic);
            }
            release
        };
        match result {
            Ok(_) => {
                if self.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(
                        failed = self.failed.load(Ordering::Relaxed),
                        "nats state store: writes succeed again"
                    );
                }
            }
            Err(e) => {
                let n = self.failed.fetch_add(1, Ordering::Relaxed) + 1;
                if !self.failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(error = %e, topic = %topic.escape_debug(), failed = n,
                        "nats state store write failed: retained changes are kept in this instance's memory only until writes succeed again");
                }
            }
        }
        // Resolved also after a failure: the acknowledgement is not held forever.
        self.committed.send_replace(ticket);
        if let Some(remote) = release {
            self.apply(topic, remote);
        }
    }

    /// Applies an entry of the bucket to memory if it is newer than what memory holds.
    fn apply(&self, topic: &str, remote: Remote) {
        let Some(broker) = self.broker.get().and_then(Weak::upgrade) else {
            return;
        };
        let admit = || {
            let mut tracker = lock(&self.tracker);
            tracker.watched = tracker.watched.max(remote.revision);
            tracker.admit(topic, &remote)
        };
        let (now, now_ms) = (Instant::now(), record::unix_ms_now());
        match remote
            .value
            .as_deref()
            .map(|v| record::decode(topic, v, now, now_ms))
        {
            Some(Some(Decoded::Message(message))) => {
                broker.apply_remote_retained(message, admit);
            }
            None | Some(Some(Decoded::Expired)) => {
                broker.apply_remote_clear(topic, admit);
            }
            Some(None) => {
                admit();
                tracing::warn!(topic = %topic.escape_debug(),
                    "retained message not readable by this version: skipped");
            }
        }
    }

    /// One entry of the watch.
    fn entry(&self, entry: kv::Entry) {
        let Some(topic) = topic_of(&entry.key) else {
            let mut tracker = lock(&self.tracker);
            tracker.watched = tracker.watched.max(entry.revision);
            return;
        };
        let value = (entry.operation == kv::Operation::Put).then_some(entry.value);
        self.apply(
            &topic,
            Remote {
                revision: entry.revision,
                value,
            },
        );
    }
}

/// Applies every change of the bucket until stopped; a watch that ends is started again after
/// the last revision seen.
async fn follow(shared: Arc<Shared>, store: kv::Store, mut watch: kv::Watch, mut last: u64) {
    let mut erring = false;
    loop {
        let next = tokio::select! {
            _ = shared.stop.cancelled() => return,
            next = watch.next() => next,
        };
        match next {
            Some(Ok(entry)) => {
                if std::mem::take(&mut erring) {
                    tracing::info!("nats state store: following the bucket again");
                }
                last = last.max(entry.revision);
                shared.entry(entry);
            }
            Some(Err(e)) => {
                if !std::mem::replace(&mut erring, true) {
                    tracing::warn!(error = %e, "nats state store: the bucket's watch failed; it resumes by itself");
                }
            }
            None => {
                let mut delay = Duration::from_millis(100);
                watch = loop {
                    match store.watch_all_from_revision(last + 1).await {
                        Ok(watch) => break watch,
                        Err(e) => {
                            if !std::mem::replace(&mut erring, true) {
                                tracing::warn!(error = %e, "nats state store: the bucket's watch ended; starting it again");
                            }
                        }
                    }
                    tokio::select! {
                        _ = shared.stop.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                    delay = (delay * 2).min(Duration::from_secs(2));
                };
            }
        }
    }
}

impl StateStore for NatsState {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn load_retained(&self) -> Result<Vec<Arc<Message>>, StateError> {
        Ok(lock(&self.loaded).take().unwrap_or_default())
    }

    fn put_retained(&self, message: &Arc<Message>) -> StateTicket {
        self.hand_over(message.topic_str(), Some(message.clone()))
    }

    fn clear_retained(&self, topic: &str) -> StateTicket {
        self.hand_over(topic, None)
    }

    fn failed_writes(&self) -> u64 {
        self.shared.failed.load(Ordering::Relaxed)
    }

    fn follow(&self, broker: Weak<Broker>) {
        if self.shared.broker.set(broker).is_err() {
            return;
        }
        if let Some((watch, last)) = lock(&self.watch).take() {
            self.runtime
                .spawn(follow(self.shared.clone(), self.store.clone(), watch, last));
        }
    }

    fn close(&self) {
        drop(lock(&self.shared.tracker).intake.take());
        let (done, ended) = &self.shared.writer_done;
        let guard = lock(done);
        let (_guard, waited) = ended
            .wait_timeout_while(guard, ACK_TIMEOUT + Duration::from_secs(1), |done| !*done)
            .unwrap_or_else(|p| p.into_inner());
        if waited.timed_out() {
            tracing::warn!("nats state store: writes still unacknowledged at shutdown");
        }
        self.shared.stop.cancel();
    }
}

impl Drop for NatsState {
    fn drop(&mut self) {
        // Never waits here (a drop may run on the runtime): the writer ends by itself.
        drop(lock(&self.shared.tracker).intake.take());
        self.shared.stop.cancel();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_topic_makes_a_valid_key_and_comes_back() {
        for topic in ["a/b", "$SYS/x", "é/☃/ 空白", "a.b.c", "+/#", "/"] {
            let key = key_of(topic);
            assert!(
                key.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "{key}"
            );
            assert_eq!(topic_of(&key).as_deref(), Some(topic));
        }
        assert_eq!(topic_of("not base64!"), None);
    }

    fn tracker() -> Tracker {
        Tracker {
            topics: HashMap::new(),
            watched: 0,
            tickets: 0,
            intake: None,
        }
    }

    fn remote(revision: u64) -> Remote {
        Remote {
            revision,
            value: Some(Bytes::from_static(b"v")),
        }
    }

    #[test]
    fn remote_entries_wait_for_own_writes_and_older_ones_are_dropped() {
        let mut t = tracker();
        // Nothing of ours in flight: applied.
        assert!(t.admit("a", &remote(5)));
        // An own write in flight: another instance's entry is held.
        t.topics.entry("a".into()).or_default().pending = 1;
        assert!(!t.admit("a", &remote(7)));
        // Our write acknowledged at 8: the held 7 is older, the echo 8 is ours.
        let a = t.topics.get_mut("a").expect("tracked");
        a.pending = 0;
        a.known = 8;
        assert!(a.held.take().is_some_and(|h| h.revision == 7));
        assert!(!t.admit("a", &remote(8)));
        // The watch passed 8: forgotten; a newer entry applies.
        t.watched = 8;
        t.prune("a");
        assert!(t.topics.is_empty());
        assert!(t.admit("a", &remote(9)));
    }
}
