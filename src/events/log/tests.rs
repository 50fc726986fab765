//! The log on a temporary data directory: what survives a reopen, what a torn tail costs, the
//! fsync modes, segment rolling, deletion and the size limit.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio_util::sync::CancellationToken;

use super::*;
use crate::events::{EventDetails, EventType, SinkError};
use std::path::{Path, PathBuf};

const WAIT: Duration = Duration::from_secs(30);

fn settings(max_bytes: u64, fsync: FsyncMode) -> LogSettings {
    LogSettings {
        max_bytes,
        fsync,
        fsync_interval: Duration::from_millis(20),
        max_pending: 100_000,
    }
}

fn event(client: &str, event_type: EventType) -> ConnectionEvent {
    ConnectionEvent {
        client_id: client.into(),
        event_type,
        instance: String::new(),
        occurred_at: 0,
        details: EventDetails::default(),
    }
}

/// Appends `connect` (or `disconnect`) of client `c` keyed `s-c`.
fn append(log: &EventLog, c: &str, event_type: EventType) -> LogTicket {
    log.append(format!("s-{c}"), event(c, event_type))
}

/// Records what it is given; fails while `down` is set.
#[derive(Clone, Default)]
struct RecordingSink {
    got: Arc<Mutex<Vec<ConnectionEvent>>>,
    down: Arc<AtomicBool>,
}

impl RecordingSink {
    fn got(&self) -> Vec<(String, EventType)> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .map(|e| (e.client_id.clone(), e.event_type))
            .collect()
    }
}

#[async_trait]
impl EventSink for RecordingSink {
    fn name(&self) -> &'static str {
        "recording"
    }
    async fn publish(&mut self, batch: &[ConnectionEvent]) -> Result<(), SinkError> {
        if self.down.load(Ordering::Relaxed) {
            return Err(SinkError {
                store: "recording",
                message: "down".into(),
            });
        }
        self.got.lock().unwrap().extend_from_slice(batch);
        Ok(())
    }
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("events-"))
        })
        .collect();
    files.sort();
    files
}

use EventType::{Connect, Disconnect};

#[tokio::test]
async fn open_sessions_and_undelivered_events_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::open(dir.path()).unwrap();
    let (log, recovery) = EventLog::open(&data, settings(1 << 20, FsyncMode::Off)).unwrap();
    assert!(recovery.open_sessions.is_empty());
    append(&log, "a", Connect);
    append(&log, "b", Connect);
    append(&log, "a", Disconnect).wait().await;
    // No close: the process is killed with everything written.
    drop(log);
    drop(data);

    let data = DataDir::open(dir.path()).unwrap();
    let (log, recovery) = EventLog::open(&data, settings(1 << 20, FsyncMode::Off)).unwrap();
    let open: Vec<&str> = recovery
        .open_sessions
        .iter()
        .map(|s| s.client_id.as_str())
        .collect();
    assert_eq!(open, ["b"]);
    assert_eq!(recovery.open_sessions[0].session, "s-b");
    assert_eq!(recovery.undelivered, 3);
    assert_eq!(recovery.cut_bytes, 0);
    // Time goes on after the logged events.
    let c = log.committed();
    append(&log, "b", Disconnect).wait().await;
    assert!(log.committed().written > c.written);
    let sink = RecordingSink::default();
    let _task = log.deliver(Box::new(sink.clone()), CancellationToken::new());
    assert!(log.flush(WAIT).await);
    let got = sink.got.lock().unwrap().clone();
    assert_eq!(got.len(), 4);
    assert!(
        got.windows(2).all(|w| w[0].occurred_at < w[1].occurred_at),
        "occurred_at increases across the reopen: {got:?}"
    );
}

#[tokio::test]
async fn a_torn_last_record_is_cut_and_the_rest_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::open(dir.path()).unwrap();
    let (log, _) = EventLog::open(&data, settings(1 << 20, FsyncMode::Off)).unwrap();
    append(&log, "a", Connect);
    append(&log, "b", Connect);
    append(&log, "a", Disconnect);
    assert!(log.close());
    drop(log);
    drop(data);
    let segment = segment_files(dir.path()).pop().unwrap();
    // Half a record, as a power cut mid-write leaves it: a header announcing 200 bytes.
    let mut torn = Vec::new();
    torn.extend_from_slice(&200u32.to_le_bytes());
    torn.extend_from_slice(&[0xab; 4]);
    torn.extend_from_slice(br#"{"event":{"session":"s-c","#);
    std::fs::OpenOptions::new()
        .append(true)
        .open(&segment)
        .unwrap()
        .write_all(&torn)
        .unwrap();

    let data = DataDir::open(dir.path()).unwrap();
    let (log, recovery) = EventLog::open(&data, settings(1 << 20, FsyncMode::Off)).unwrap();
    assert_eq!(recovery.cut_bytes, torn.len() as u64);
    assert_eq!(recovery.undelivered, 3);
    let sink = RecordingSink::default();
    let _task = log.deliver(Box::new(sink.clone()), CancellationToken::new());
    // Appending after the cut continues a readable log.
    append(&log, "b", Disconnect);
    assert!(log.flush(WAIT).await);
    assert_eq!(
        sink.got(),
        [
            ("a".into(), Connect),
            ("b".into(), Connect),
            ("a".into(), Disconnect),
            ("b".into(), Disconnect)
        ]
    );
}

#[tokio::test]
async fn a_bad_checksum_in_the_last_record_is_cut_and_nothing_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::open(dir.path()).unwrap();
    let (log, _) = EventLog::open(&data, settings(1 << 20, FsyncMode::Off)).unwrap();
    append(&log, "a", Connect).wait().await;
    let before_last = log.committed().written;
    append(&log, "b", Connect);
    assert!(log.close());
    let end = log.committed().written;
    drop(log);
    drop(data);
    let segment = segment_files(dir.path()).pop().unwrap();
    let mut bytes = std::fs::read(&segment).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x20;
    std::fs::write(&segment, &bytes).unwrap();

    let data = DataDir::open(dir.path()).unwrap();
    let (log, recovery) = EventLog::open(&data, settings(1 << 20, FsyncMode::Off)).unwrap();
    assert_eq!(recovery.cut_bytes, end - before_last);
    let open: Vec<&str> = recovery
        .open_sessions
        .iter()
        .map(|s| s.client_id.as_str())
        .collect();
    assert_eq!(open, ["a"], "the good record before the bad one is kept");
    assert_eq!(log.committed().written, before_last);
}

#[tokio::test]
async fn always_mode_resolves_the_ticket_after_the_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::open(dir.path()).unwrap();
    let (log, _) = EventLog::open(&data, settings(1 << 20, FsyncMode::Always)).unwrap();
    append(&log, "a", Connect).wait().await;
    let c = log.committed();
    assert!(c.written > 0);
    assert_eq!(c.synced, c.written, "fsynced before the ticket resolved");
    let synced: Vec<String> = log
        .synced_events()
        .unwrap()
        .into_iter()
        .map(|e| e.client_id)
        .collect();
    assert_eq!(synced, ["a"]);
}

#[tokio::test]
async fn off_mode_resolves_the_ticket_once_written_without_fsync() {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::open(dir.path()).unwrap();
    let (log, _) = EventLog::open(&data, settings(1 << 20, FsyncMode::Off)).unwrap();
    append(&log, "a", Connect).wait().await;
    let c = log.committed();
    assert!(c.written > 0);
    assert_eq!(c.synced, 0, "off never fsyncs");
    assert!(log.synced_events().unwrap().is_empty());
}

#[tokio::test]
async fn interval_mode_delivers_once_synced() {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::open(dir.path()).unwrap();
    let (log, _) = EventLog::open(&data, settings(1 << 20, FsyncMode::Interval)).unwrap();
    let sink = RecordingSink::default();
    let _task = log.deliver(Box::new(sink.clone()), CancellationToken::new());
    append(&log, "a", Connect).wait().await;
    assert!(log.flush(WAIT).await);
    assert_eq!(sink.got(), [("a".into(), Connect)]);
    let c = log.committed();
    assert!(c.synced >= log.delivered() && log.delivered() > 0);
}

#[tokio::test]
async fn delivered_segments_are_deleted_and_long_open_sessions_still_found() {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::open(dir.path()).unwrap();
    // 32 KiB limit: 4 KiB segments.
    let (log, _) = EventLog::open(&data, settings(32 << 10, FsyncMode::Off)).unwrap();
    let sink = RecordingSink::default();
    let stop = CancellationToken::new();
    let task = log.deliver(Box::new(sink.clone()), stop.clone());
    append(&log, "long-lived", Connect);
    // In steps well below the limit, so delivery keeps up and nothing is dropped.
    for step in 0..15 {
        for i in 0..20 {
            let c = format!("short-{step}-{i}");
            append(&log, &c, Connect);
            append(&log, &c, Disconnect);
        }
        assert!(log.flush(WAIT).await);
    }
    assert_eq!(sink.got().len(), 601);
    assert_eq!(log.stats().dropped.load(Ordering::Relaxed), 0);
    assert!(
        segment_files(dir.path()).len() <= 2,
        "delivered segments deleted: {:?}",
        segment_files(dir.path())
    );
    assert!(log.stats().log_bytes.load(Ordering::Relaxed) <= 8 << 10);
    stop.cancel();
    task.await.unwrap();
    drop(log);
    drop(data);

    let data = DataDir::open(dir.path()).unwrap();
    let (_log, recovery) = EventLog::open(&data, settings(32 << 10, FsyncMode::Off)).unwrap();
    let open: Vec<&str> = recovery
        .open_sessions
        .iter()
        .map(|s| s.client_id.as_str())
        .collect();
    assert_eq!(open, ["long-lived"], "found through a segment snapshot");
    assert_eq!(recovery.undelivered, 0);
}

#[tokio::test]
async fn over_the_size_limit_the_oldest_events_are_dropped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::open(dir.path()).unwrap();
    let (log, _) = EventLog::open(&data, settings(32 << 10, FsyncMode::Off)).unwrap();
    let sink = RecordingSink::default();
    sink.down.store(true, Ordering::Relaxed);
    let stop = CancellationToken::new();
    let task = log.deliver(Box::new(sink.clone()), stop.clone());
    for i in 0..500 {
        append(&log, &format!("c{i}"), Connect);
        append(&log, &format!("c{i}"), Disconnect);
    }
    assert!(log.close());
    let dropped = log.stats().dropped.load(Ordering::Relaxed);
    assert!(dropped > 0, "the limit was passed");
    assert!(log.stats().log_bytes.load(Ordering::Relaxed) <= (32 + 4) << 10);
    stop.cancel();
    task.await.unwrap();
    drop(log);
    drop(data);

    let data = DataDir::open(dir.path()).unwrap();
    let (log, recovery) = EventLog::open(&data, settings(32 << 10, FsyncMode::Off)).unwrap();
    assert_eq!(
        recovery.undelivered + dropped,
        1000,
        "every event is either kept or counted as dropped"
    );
    sink.down.store(false, Ordering::Relaxed);
    let _task = log.deliver(Box::new(sink.clone()), CancellationToken::new());
    assert!(log.flush(WAIT).await);
    let got = sink.got();
    assert_eq!(got.len() as u64, recovery.undelivered);
    // The newest are the ones kept.
    assert_eq!(got.last().unwrap(), &("c499".to_owned(), Disconnect));
}

#[tokio::test]
async fn delivery_resumes_after_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = DataDir::open(dir.path()).unwrap();
    let (log, _) = EventLog::open(&data, settings(1 << 20, FsyncMode::Off)).unwrap();
    let sink = RecordingSink::default();
    let stop = CancellationToken::new();
    let task = log.deliver(Box::new(sink.clone()), stop.clone());
    append(&log, "a", Connect);
    append(&log, "a", Disconnect);
    assert!(log.flush(WAIT).await);
    sink.down.store(true, Ordering::Relaxed);
    append(&log, "b", Connect).wait().await;
    stop.cancel();
    task.await.unwrap();
    drop(log);
    drop(data);

    let data = DataDir::open(dir.path()).unwrap();
    let (log, recovery) = EventLog::open(&data, settings(1 << 20, FsyncMode::Off)).unwrap();
    assert_eq!(recovery.undelivered, 1);
    sink.down.store(false, Ordering::Relaxed);
    let _task = log.deliver(Box::new(sink.clone()), CancellationToken::new());
    assert!(log.flush(WAIT).await);
    assert_eq!(
        sink.got(),
        [
            ("a".into(), Connect),
            ("a".into(), Disconnect),
            ("b".into(), Connect)
        ]
    );
}
