//! The durable log behind every "kept before acknowledged" promise: connection events (a
//! `connect` counts as emitted once it is written here) and device messages for the bus (a
//! PUBLISH is acknowledged once it is written here). Delivery tasks read only from the log, so
//! a `kill -9` loses nothing acknowledged and a store never gets a record the log does not have.
//!
//! - `frame.rs`: the on-disk frame (length, checksum, payload);
//! - `recovery.rs`: opening a log, cutting a torn tail, rebuilding the kind's state;
//! - `writer.rs`: writing (group commit, by the appending task or the writer thread; fsync
//!   modes, segments, the size limit);
//! - `delivery.rs`: the task that reads the log and hands batches to a [`LogSink`];
//! - `data_dir.rs`: the locked directory the logs live in.
//!
//! What a record is, what state heads each segment and what a full log does are a [`Kind`]'s:
//! `events::log` and `bridge::log` are the two kinds.
//!
//! A position is a byte offset in the whole log; each segment file (`<files>-<position>.log`)
//! is named by the position of its first byte, and begins with a snapshot of the kind's state
//! when it began. The delivered position is checkpointed in `<files>.delivered`; segments
//! wholly before it are deleted.

pub mod data_dir;
mod delivery;
mod frame;
mod recovery;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use data_dir::{DataDir, DataDirError};
pub use recovery::Opened;

/// When a log's writes reach the disk itself (not only the page cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FsyncMode {
    /// Never fsync: records survive a crash of the process, not a power loss.
    Off,
    /// Fsync at most every interval: a power loss loses at most the last interval's records.
    Interval,
    /// Each group is fsynced before its tickets resolve (the acknowledgement waits for it).
    Always,
}

/// What a log does once it holds its size limit of undelivered bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// The oldest segments are dropped, their undelivered records counted (events: a session
    /// must never wait for an event store that is down).
    DropOldest,
    /// Nothing is dropped: appenders wait for [`Log::room`] (device messages: the device is
    /// pushed back instead).
    PushBack,
}

/// What a log keeps: its records, the state each segment begins with, and its policies.
pub trait Kind: Send + Sync + 'static {
    /// One record of the log.
    type Record: Send + 'static;
    /// What the log tracks of the records written, to head each new segment (and what a scan
    /// at start-up rebuilds).
    type State: Default + Clone + Send + 'static;

    /// File names: `<FILES>-<position>.log`, `<FILES>.delivered`.
    const FILES: &'static str;
    /// What a record is, in log lines ("event", "message").
    const WHAT: &'static str;
    const WHEN_FULL: WhenFull;
    /// Whether delivery may read records written but not yet fsynced. Events: no, so a power cut
    /// never leaves the store with a `connect` the log lost. Messages carry ids unique across
    /// runs, so a message delivered and then lost by the log costs nothing.
    const DELIVER_UNSYNCED: bool;
    /// Records handed to the sink at once at most.
    const MAX_BATCH: usize;

    fn encode(record: &Self::Record, out: &mut Vec<u8>);
    /// `None`: a record this version cannot read (skipped with a warning).
    fn decode(payload: &[u8]) -> Option<Self::Record>;
    /// Whether delivery hands the record on (snapshot records are not).
    fn delivered(record: &Self::Record) -> bool;
    /// When the record was made (Unix ns): the age of the oldest undelivered one.
    fn time(record: &Self::Record) -> i64;
    /// Bytes of payload the record carries beyond its fixed part (for batch sizing).
    fn size(record: &Self::Record) -> usize;
    /// The record is written (or found at start-up).
    fn apply(state: &mut Self::State, record: &Self::Record);
    /// The records a new segment begins with.
    fn snapshot(state: &Self::State) -> Vec<Self::Record>;
    /// Called in log order, under the intake lock, as each record is handed over.
    fn stamp(&self, _record: &mut Self::Record) {}
}

/// Where the delivery task hands the log's records.
#[async_trait]
pub trait LogSink<R: Send + Sync>: Send + 'static {
    fn name(&self) -> &'static str;
    /// Takes the batch, oldest first, or fails it all (it is handed again, from its first
    /// record, after a backoff).
    async fn deliver(&mut self, batch: &[R]) -> Result<(), String>;
}

/// How a log is sized and synced.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// Bytes kept on disk before [`WhenFull`] applies.
    pub max_bytes: u64,
    pub fsync: FsyncMode,
    pub fsync_interval: Duration,
    /// Records handed over but not yet written; beyond, new ones are dropped (counted). Not
    /// applied to [`WhenFull::PushBack`] logs, whose appenders wait for room instead.
    pub max_pending: usize,
}

impl LogSettings {
    /// Bytes written into one segment before the next begins.
    fn segment_bytes(&self) -> u64 {
        (self.max_bytes / 8).clamp(4096, 64 << 20)
    }
}

/// Counters an operator needs to see a log's (or the memory outbox's) health.
#[derive(Debug, Default)]
pub struct LogStats {
    /// Records accepted but not yet acknowledged by the sink.
    pub pending: AtomicU64,
    pub published: AtomicU64,
    /// Records lost because a queue or the log was full.
    pub dropped: AtomicU64,
    /// Bytes of the log on disk (0 without one).
    pub log_bytes: AtomicU64,
    /// Time of the oldest record handed to the sink and not yet acknowledged (0: none).
    pub oldest_undelivered_ns: AtomicI64,
    /// Times the log became full and pushed its appenders back.
    pub pushback_episodes: AtomicU64,
    /// Whether it is full now.
    pub full: AtomicBool,
}

/// How far the writer got; published after every write and fsync.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Committed {
    /// Tickets up to this one are written.
    pub written_ticket: u64,
    /// Tickets up to this one are fsynced (in `off` mode: written).
    pub synced_ticket: u64,
    /// End position of what is written.
    pub written: u64,
    /// End position of what is fsynced (in `off` mode: written).
    pub synced: u64,
}

/// Resolves once its records are in the log: written, and in `always` mode fsynced.
#[derive(Debug)]
pub struct LogTicket {
    /// `None` when there is nothing to wait for (the records were dropped).
    wait: Option<(watch::Receiver<Committed>, u64, bool)>,
}

impl LogTicket {
    /// A ticket with nothing to wait for.
    pub fn done() -> Self {
        LogTicket { wait: None }
    }

    /// Whether the records are in the log already (never waits).
    pub fn is_done(&self) -> bool {
        match &self.wait {
            None => true,
            Some((committed, ticket, synced)) => reached(&committed.borrow(), *ticket, *synced),
        }
    }

    /// A future that resolves with the ticket, owning what it needs (so it borrows nothing).
    pub fn waiter(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let wait = self
            .wait
            .as_ref()
            .map(|(committed, ticket, synced)| (committed.clone(), *ticket, *synced));
        LogTicket { wait }.wait()
    }

    pub async fn wait(self) {
        let Some((mut committed, ticket, synced)) = self.wait else {
            return;
        };
        // The sender lives as long as the log, and the writer resolves every ticket it was
        // handed, also when it closes.
        let _ = committed.wait_for(|c| reached(c, ticket, synced)).await;
    }
}

fn reached(c: &Committed, ticket: u64, synced: bool) -> bool {
    if synced {
        c.synced_ticket >= ticket
    } else {
        c.written_ticket >= ticket
    }
}

struct Intake<R> {
    records: Vec<R>,
    /// The last ticket handed out.
    tickets: u64,
    closed: bool,
}

/// The kept segments and the delivery task's place in them, shared by the writer (who adds
/// segments and drops the oldest when over the limit) and the delivery task.
struct Segments {
    /// Positions of the first byte of every kept segment, ascending; the last is written to.
    bases: Vec<u64>,
    /// Where the delivery task reads next.
    read: u64,
}

struct Shared<K: Kind> {
    kind: K,
    dir: PathBuf,
    settings: LogSettings,
    intake: Mutex<Intake<K::Record>>,
    wake: Condvar,
    segments: Mutex<Segments>,
    committed: watch::Sender<Committed>,
    delivered: watch::Sender<u64>,
    stats: Arc<LogStats>,
    /// The writing side (file, state); held by whoever writes a group.
    writer: Mutex<writer::Writer<K>>,
}

impl<K: Kind> Shared<K> {
    /// How far the delivery task may read: what is written, or (unless the kind allows
    /// otherwise or the mode is `off`) what is fsynced.
    fn deliverable(&self, c: &Committed) -> u64 {
        if K::DELIVER_UNSYNCED || self.settings.fsync == FsyncMode::Off {
            c.written
        } else {
            c.synced
        }
    }

    fn close(&self) {
        lock(&self.intake).closed = true;
        self.wake.notify_one();
    }

    fn segment_path(&self, base: u64) -> PathBuf {
        segment_path(&self.dir, K::FILES, base)
    }

    /// Undelivered bytes on disk.
    fn backlog(&self) -> u64 {
        let written = self.committed.borrow().written;
        written.saturating_sub(*self.delivered.borrow())
    }
}

/// A log; cheap to clone, shared by every appender.
pub struct Log<K: Kind> {
    shared: Arc<Shared<K>>,
    writer: Arc<WriterThread<K>>,
}

impl<K: Kind> Clone for Log<K> {
    fn clone(&self) -> Self {
        Log {
            shared: self.shared.clone(),
            writer: self.writer.clone(),
        }
    }
}

/// Stops the writer thread when the last handle goes.
struct WriterThread<K: Kind> {
    shared: Arc<Shared<K>>,
    handle: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl<K: Kind> Drop for WriterThread<K> {
    fn drop(&mut self) {
        self.shared.close();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves consistent state, so a panic elsewhere does not poison it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn segment_path(dir: &Path, files: &str, base: u64) -> PathBuf {
    dir.join(format!("{files}-{base:020}.log"))
}

fn write_checkpoint(dir: &Path, files: &str, position: u64) -> std::io::Result<()> {
    let tmp = dir.join(format!("{files}.delivered.tmp"));
    std::fs::write(&tmp, position.to_string())?;
    std::fs::rename(&tmp, dir.join(format!("{files}.delivered")))
}

impl<K: Kind> Log<K> {
    /// Opens the log in `dir` (creating its first segment), cuts a torn or corrupt tail (with a
    /// warning naming the bytes) and rebuilds the kind's state from what is kept. Starts the
    /// writer thread; delivery starts with [`Log::deliver`].
    pub fn open(
        kind: K,
        dir: &DataDir,
        settings: LogSettings,
    ) -> Result<(Log<K>, Opened<K::State>), DataDirError> {
        let path = dir.path().to_owned();
        let found = recovery::scan::<K>(&path)?;
        let stats = Arc::new(LogStats::default());
        stats.pending.store(found.undelivered, Ordering::Relaxed);
        if found.undelivered > 0 {
            stats
                .oldest_undelivered_ns
                .store(found.oldest_undelivered, Ordering::Relaxed);
        }
        stats
            .log_bytes
            .store(found.end - found.bases[0], Ordering::Relaxed);
        let committed = Committed {
            written: found.end,
            synced: found.end,
            ..Committed::default()
        };
        let writer = writer::Writer::resume(&path, &found, committed)?;
        let segments = Segments {
            bases: found.bases.clone(),
            read: found.start,
        };
        let shared = Arc::new(Shared {
            kind,
            writer: Mutex::new(writer),
            dir: path.clone(),
            settings,
            intake: Mutex::new(Intake {
                records: Vec::new(),
                tickets: 0,
                closed: false,
            }),
            wake: Condvar::new(),
            segments: Mutex::new(segments),
            committed: watch::channel(committed).0,
            delivered: watch::channel(found.start).0,
            stats,
        });
        let thread_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name(format!("{}-log-writer", K::FILES))
            .spawn(move || writer::Writer::thread(&thread_shared))
            .map_err(|e| DataDirError::io(&path, e))?;
        let log = Log {
            writer: Arc::new(WriterThread {
                shared: shared.clone(),
                handle: Mutex::new(Some(handle)),
            }),
            shared,
        };
        Ok((log, found))
    }

    /// The kind (e.g. its clock).
    pub fn kind(&self) -> &K {
        &self.shared.kind
    }

    /// Hands a record over for writing; never blocks on the sink or the disk.
    pub fn append(&self, record: K::Record) -> LogTicket {
        self.append_all(vec![record])
    }

    /// Like [`Log::append`] for several records at once (one group); the ticket resolves once
    /// all are written.
    pub fn append_all(&self, mut records: Vec<K::Record>) -> LogTicket {
        let shared = &self.shared;
        let mut intake = lock(&shared.intake);
        let room = match K::WHEN_FULL {
            WhenFull::DropOldest => shared
                .settings
                .max_pending
                .saturating_sub(intake.records.len()),
            WhenFull::PushBack => usize::MAX,
        };
        if intake.closed || room < records.len() {
            drop(intake);
            shared
                .stats
                .dropped
                .fetch_add(records.len() as u64, Ordering::Relaxed);
            tracing::warn!(
                records = records.len(),
                "{} log closed or its writer behind: {}s dropped (and counted)",
                K::FILES,
                K::WHAT
            );
            return LogTicket { wait: None };
        }
        let n = records.len() as u64;
        for record in &mut records {
            shared.kind.stamp(record);
        }
        intake.records.append(&mut records);
        intake.tickets += 1;
        let ticket = intake.tickets;
        drop(intake);
        shared.stats.pending.fetch_add(n, Ordering::Relaxed);
        let committed = shared.committed.subscribe();
        writer::Writer::write_inline_or_wake(shared);
        let synced = shared.settings.fsync == FsyncMode::Always;
        LogTicket {
            wait: Some((committed, ticket, synced)),
        }
    }

    /// Whether the log has room for more (always, unless [`WhenFull::PushBack`] and its
    /// undelivered bytes reached the size limit). Counts the start of a push-back episode.
    pub fn has_room(&self) -> bool {
        let stats = &self.shared.stats;
        if K::WHEN_FULL == WhenFull::DropOldest
            || self.shared.backlog() < self.shared.settings.max_bytes
        {
            if stats.full.load(Ordering::Relaxed) {
                stats.full.store(false, Ordering::Relaxed);
            }
            return true;
        }
        if !stats.full.swap(true, Ordering::Relaxed) {
            stats.pushback_episodes.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                bytes = self.shared.backlog(),
                "{} log full: publishers are pushed back until delivery catches up",
                K::FILES
            );
        }
        false
    }

    /// Waits until [`Log::has_room`].
    pub async fn room(&self) {
        if self.has_room() {
            return;
        }
        let mut delivered = self.shared.delivered.subscribe();
        let shared = &self.shared;
        let _ = delivered
            .wait_for(|_| shared.backlog() < shared.settings.max_bytes)
            .await;
        self.has_room();
    }

    /// The counters shared with the metrics.
    pub fn stats(&self) -> Arc<LogStats> {
        self.shared.stats.clone()
    }

    /// How far writes and fsyncs have got.
    pub fn committed(&self) -> Committed {
        *self.shared.committed.borrow()
    }

    /// The delivered position (what the sink acknowledged).
    pub fn delivered(&self) -> u64 {
        *self.shared.delivered.borrow()
    }

    /// The deliverable records in the kept log up to its last fsync, oldest first: what a
    /// start after a power cut would find (delivered ones included while their segment is
    /// kept).
    pub fn synced_records(&self) -> std::io::Result<Vec<K::Record>> {
        let synced = self.committed().synced;
        let bases = lock(&self.shared.segments).bases.clone();
        recovery::records_before::<K>(&self.shared.dir, &bases, synced)
    }

    /// Waits until every record handed over before this call is delivered (or dropped), or the
    /// timeout passes. Returns whether everything was delivered.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let ticket = lock(&self.shared.intake).tickets;
        let mut committed = self.shared.committed.subscribe();
        let mut delivered = self.shared.delivered.subscribe();
        let shared = &self.shared;
        let done = async {
            let c = *committed
                .wait_for(|c| c.written_ticket >= ticket && shared.deliverable(c) >= c.written)
                .await
                .ok()?;
            delivered.wait_for(|&d| d >= c.written).await.ok()?;
            Some(())
        };
        matches!(tokio::time::timeout(timeout, done).await, Ok(Some(())))
    }

    /// Writes what was handed over, fsyncs (unless `off`) and stops the writer; later records
    /// are dropped. Returns whether the writer ended cleanly.
    pub fn close(&self) -> bool {
        self.shared.close();
        match lock(&self.writer.handle).take() {
            Some(handle) => handle.join().is_ok(),
            None => true,
        }
    }

    /// Starts the delivery task: reads the log from the delivered position and hands it to
    /// `sink` in batches, retrying each until the sink takes it, until `stop` is cancelled.
    /// What it has not delivered stays in the log for the next start.
    pub fn deliver(
        &self,
        sink: Box<dyn LogSink<K::Record>>,
        stop: CancellationToken,
    ) -> JoinHandle<()>
    where
        K::Record: Sync,
    {
        tokio::spawn(delivery::run(self.shared.clone(), sink, stop))
    }
}
