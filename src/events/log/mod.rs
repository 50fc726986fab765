//! The durable event log in front of every external store: an event counts as emitted once it
//! is written here, and the delivery task reads only from here, so a `kill -9` loses nothing
//! emitted and the store never gets an event the log does not have.
//!
//! - `record.rs`: the on-disk record (length, checksum, JSON payload);
//! - `recovery.rs`: opening the log, cutting a torn tail, finding the sessions left open;
//! - `writer.rs`: writing (group commit, by the session or the writer thread; fsync modes,
//!   segments, size limit);
//! - `delivery.rs`: the task that reads the log and hands batches to the store.
//!
//! A position is a byte offset in the whole log; each segment file (`events-<position>.log`)
//! is named by the position of its first byte, and begins with a snapshot of the sessions open
//! when it began. The delivered position is checkpointed in `events.delivered`; segments wholly
//! before it are deleted; beyond the size limit the oldest are dropped (counted).

mod delivery;
mod record;
mod recovery;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::data_dir::{DataDir, DataDirError};
use super::outbox::OutboxStats;
use super::{ConnectionEvent, EventClock, EventSink};

pub use recovery::{OpenSession, Recovery};

const SEGMENT_PREFIX: &str = "events-";
const SEGMENT_SUFFIX: &str = ".log";
const CHECKPOINT_FILE: &str = "events.delivered";

/// When the log's writes reach the disk itself (not only the page cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FsyncMode {
    /// Never fsync: events survive a crash of the process, not a power loss.
    Off,
    /// Fsync at most every interval: a power loss loses at most the last interval's events.
    Interval,
    /// Each group is fsynced before its tickets resolve (CONNACK waits for it).
    Always,
}

/// How the log is sized and synced.
#[derive(Debug, Clone)]
pub struct LogSettings {
    /// Bytes kept on disk; beyond, the oldest segments are dropped (their events counted).
    pub max_bytes: u64,
    pub fsync: FsyncMode,
    pub fsync_interval: Duration,
    /// Events handed over but not yet written; beyond, new ones are dropped (counted).
    pub max_pending: usize,
}

impl LogSettings {
    /// Events written into one segment before the next begins.
    fn segment_bytes(&self) -> u64 {
        (self.max_bytes / 8).clamp(4096, 64 << 20)
    }
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

/// Resolves once its event is in the log: written, and in `always` mode fsynced.
#[derive(Debug)]
pub struct LogTicket {
    /// `None` when there is nothing to wait for (the event was dropped).
    wait: Option<(watch::Receiver<Committed>, u64, bool)>,
}

impl LogTicket {
    pub async fn wait(self) {
        let Some((mut committed, ticket, synced)) = self.wait else {
            return;
        };
        // The sender lives as long as the log, and the writer resolves every ticket it was
        // handed, also when it closes.
        let _ = committed
            .wait_for(|c| {
                if synced {
                    c.synced_ticket >= ticket
                } else {
                    c.written_ticket >= ticket
                }
            })
            .await;
    }
}

struct Entry {
    session: String,
    event: ConnectionEvent,
}

#[derive(Default)]
struct Intake {
    entries: Vec<Entry>,
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

struct Shared {
    dir: PathBuf,
    settings: LogSettings,
    intake: Mutex<Intake>,
    wake: Condvar,
    segments: Mutex<Segments>,
    committed: watch::Sender<Committed>,
    delivered: watch::Sender<u64>,
    clock: EventClock,
    stats: Arc<OutboxStats>,
    /// The writing side (file, open sessions); held by whoever writes a group.
    writer: Mutex<writer::Writer>,
}

impl Shared {
    /// How far the delivery task may read. In `off` mode what is written; otherwise what is
    /// fsynced, so a power cut can never leave the store with a `connect` the log lost (whose
    /// session recovery could then not close).
    fn deliverable(&self, c: &Committed) -> u64 {
        match self.settings.fsync {
            FsyncMode::Off => c.written,
            FsyncMode::Interval | FsyncMode::Always => c.synced,
        }
    }

    fn close(&self) {
        lock(&self.intake).closed = true;
        self.wake.notify_one();
    }
}

/// The log; cheap to clone, shared by every session.
#[derive(Clone)]
pub struct EventLog {
    shared: Arc<Shared>,
    writer: Arc<WriterThread>,
}

/// Stops the writer thread when the last handle goes.
struct WriterThread {
    shared: Arc<Shared>,
    handle: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Drop for WriterThread {
    fn drop(&mut self) {
        self.shared.close();
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section leaves consistent state, so a panic elsewhere does not poison it.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn segment_path(dir: &Path, base: u64) -> PathBuf {
    dir.join(format!("{SEGMENT_PREFIX}{base:020}{SEGMENT_SUFFIX}"))
}

fn write_checkpoint(dir: &Path, position: u64) -> std::io::Result<()> {
    let tmp = dir.join("events.delivered.tmp");
    std::fs::write(&tmp, position.to_string())?;
    std::fs::rename(&tmp, dir.join(CHECKPOINT_FILE))
}

impl EventLog {
    /// Opens the log in `dir` (creating it), cuts a torn or corrupt tail (with a warning naming
    /// the bytes) and tells which sessions the previous run left open. Starts the writer
    /// thread; delivery starts with [`EventLog::deliver`].
    pub fn open(
        dir: &DataDir,
        settings: LogSettings,
    ) -> Result<(EventLog, Recovery), DataDirError> {
        let path = dir.path().to_owned();
        let found = recovery::scan(&path)?;
        let stats = Arc::new(OutboxStats::default());
        stats
            .pending
            .store(found.recovery.undelivered, Ordering::Relaxed);
        stats
            .log_bytes
            .store(found.end - found.bases[0], Ordering::Relaxed);
        let clock = EventClock::default();
        // Later than anything logged, so occurred_at keeps increasing across restarts.
        clock.advance_past(found.latest);
        let committed = Committed {
            written: found.end,
            synced: found.end,
            ..Committed::default()
        };
        let writer = writer::Writer::resume(&path, &found, committed)?;
        let shared = Arc::new(Shared {
            writer: Mutex::new(writer),
            dir: path.clone(),
            settings,
            intake: Mutex::new(Intake::default()),
            wake: Condvar::new(),
            segments: Mutex::new(Segments {
                bases: found.bases.clone(),
                read: found.start,
            }),
            committed: watch::channel(committed).0,
            delivered: watch::channel(found.start).0,
            clock,
            stats,
        });
        let thread_shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name("event-log-writer".into())
            .spawn(move || writer::Writer::thread(&thread_shared))
            .map_err(|e| DataDirError::io(&path, e))?;
        let log = EventLog {
            writer: Arc::new(WriterThread {
                shared: shared.clone(),
                handle: Mutex::new(Some(handle)),
            }),
            shared,
        };
        Ok((log, found.recovery))
    }

    /// Hands an event over for writing; never blocks on the store or the disk. Its
    /// `occurred_at` is stamped here: strictly increasing in log order, across restarts too.
    /// `session` keys the session among the open ones (same key on `connect` and `disconnect`).
    pub fn append(&self, session: String, event: ConnectionEvent) -> LogTicket {
        self.append_all(vec![(session, event)])
    }

    /// Like [`EventLog::append`] for several events at once (one group, e.g. the crash
    /// recovery's `disconnect`s); the ticket resolves once all are written.
    pub fn append_all(&self, events: Vec<(String, ConnectionEvent)>) -> LogTicket {
        let shared = &self.shared;
        let mut intake = lock(&shared.intake);
        let room = shared
            .settings
            .max_pending
            .saturating_sub(intake.entries.len());
        if intake.closed || room < events.len() {
            drop(intake);
            shared
                .stats
                .dropped
                .fetch_add(events.len() as u64, Ordering::Relaxed);
            for (_, event) in &events {
                tracing::warn!(client_id = %event.client_id, event_type = event.event_type.as_str(),
                    "event log closed or its writer behind: event dropped");
            }
            return LogTicket { wait: None };
        }
        let n = events.len() as u64;
        for (session, mut event) in events {
            event.occurred_at = shared.clock.now();
            intake.entries.push(Entry { session, event });
        }
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

    /// The counters shared with the metrics.
    pub fn stats(&self) -> Arc<OutboxStats> {
        self.shared.stats.clone()
    }

    /// How far writes and fsyncs have got.
    pub fn committed(&self) -> Committed {
        *self.shared.committed.borrow()
    }

    /// The delivered position (what the store acknowledged).
    pub fn delivered(&self) -> u64 {
        *self.shared.delivered.borrow()
    }

    /// The events in the kept log up to its last fsync, oldest first: what a start after a
    /// power cut would find (delivered ones included while their segment is kept).
    pub fn synced_events(&self) -> std::io::Result<Vec<ConnectionEvent>> {
        let synced = self.committed().synced;
        let bases = lock(&self.shared.segments).bases.clone();
        recovery::events_before(&self.shared.dir, &bases, synced)
    }

    /// Waits until every event handed over before this call is delivered (or dropped), or the
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

    /// Writes what was handed over, fsyncs (unless `off`) and stops the writer; later events
    /// are dropped. Returns whether the writer ended cleanly.
    pub fn close(&self) -> bool {
        self.shared.close();
        match lock(&self.writer.handle).take() {
            Some(handle) => handle.join().is_ok(),
            None => true,
        }
    }

    /// Starts the delivery task: reads the log from the delivered position and hands it to
    /// `sink` in batches, retrying each until the store acknowledges it, until `stop` is
    /// cancelled. What it has not delivered stays in the log for the next start.
    pub fn deliver(&self, sink: Box<dyn EventSink>, stop: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(delivery::run(self.shared.clone(), sink, stop))
    }
}

#[cfg(test)]
mod tests;
