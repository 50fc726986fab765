//! The delivery task: reads the log from the delivered position, hands the events to the store
//! in batches (oldest first), retries a batch with backoff until the store acknowledges it,
//! then checkpoints the position and deletes the segments wholly delivered. It reads only
//! what is durable in the log's fsync mode, so the store never holds an event the log lost.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::record::{decode, Frame, Record};
use super::{lock, segment_path, write_checkpoint, Shared};
use crate::events::{ConnectionEvent, EventSink};

const MAX_BATCH: usize = 512;
/// Bytes read from a segment at a time: more than the largest record.
const READ_CHUNK: usize = (1 << 20) + 64;
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

struct Batch {
    events: Vec<ConnectionEvent>,
    /// Where the log continues after the batch.
    end: u64,
}

/// The segment file the task reads, kept open between batches.
#[derive(Default)]
struct Reader {
    file: Option<(u64, File)>,
    buf: Vec<u8>,
}

impl Reader {
    /// Up to `max` events from the read position, not past `limit`. Segments the writer
    /// dropped meanwhile (over the size limit) are skipped: their events were counted.
    fn read(&mut self, shared: &Shared, limit: u64, max: usize) -> std::io::Result<Batch> {
        let mut segments = lock(&shared.segments);
        let mut events = Vec::new();
        while events.len() < max && segments.read < limit {
            let read = segments.read;
            let idx = segments.bases.partition_point(|&b| b <= read);
            let Some(&base) = idx.checked_sub(1).and_then(|i| segments.bases.get(i)) else {
                segments.read = segments.bases[0];
                continue;
            };
            let next = segments.bases.get(idx).copied();
            let seg_end = next.unwrap_or(u64::MAX).min(limit);
            if self.file.as_ref().map(|(b, _)| *b) != Some(base) {
                self.file = Some((base, File::open(segment_path(&shared.dir, base))?));
            }
            let file = &mut self.file.as_mut().expect("opened above").1;
            let want = ((seg_end - read) as usize).min(READ_CHUNK);
            self.buf.resize(want, 0);
            file.seek(SeekFrom::Start(read - base))?;
            let mut got = 0;
            while got < want {
                match file.read(&mut self.buf[got..])? {
                    0 => break,
                    n => got += n,
                }
            }
            let mut at = 0;
            while events.len() < max {
                match decode(&self.buf[at..got]) {
                    Frame::Record(record, n) => {
                        if let Record::Event { event, .. } = record {
                            events.push(event);
                        }
                        at += n;
                    }
                    Frame::Unknown(n) => at += n,
                    // A record continuing past this chunk: the next read starts with it.
                    Frame::Incomplete if at > 0 => break,
                    Frame::Incomplete | Frame::Corrupt => {
                        // Nothing readable here: the segment was cut short at start-up (or
                        // damaged since); the log goes on in the next segment.
                        match next {
                            Some(next) if next <= limit => at = (next - read) as usize,
                            _ => tracing::warn!(position = read,
                                "event log: unreadable record while delivering; waiting for the next segment"),
                        }
                        break;
                    }
                }
            }
            if at == 0 {
                break;
            }
            segments.read = read + at as u64;
        }
        Ok(Batch {
            events,
            end: segments.read,
        })
    }
}

/// Records `position` as delivered: checkpoint, the delivered watch, and deletion of the
/// segments wholly before it (never the one being written).
fn mark_delivered(shared: &Shared, position: u64) {
    if let Err(e) = write_checkpoint(&shared.dir, position) {
        tracing::warn!(error = %e, "event log: cannot record the delivered position; these events may be sent again after a restart");
    }
    shared.delivered.send_replace(position);
    let mut segments = lock(&shared.segments);
    while segments.bases.len() > 1 && segments.bases[1] <= position {
        let base = segments.bases.remove(0);
        let path = segment_path(&shared.dir, base);
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(file = %path.display(), error = %e, "event log: cannot delete a delivered segment");
        }
    }
    let first = segments.bases[0];
    drop(segments);
    let end = shared.committed.borrow().written;
    shared
        .stats
        .log_bytes
        .store(end.saturating_sub(first), Ordering::Relaxed);
}

pub(super) async fn run(
    shared: Arc<Shared>,
    mut sink: Box<dyn EventSink>,
    stop: CancellationToken,
) {
    let mut committed = shared.committed.subscribe();
    let mut reader = Reader::default();
    let mut delivered = *shared.delivered.borrow();
    if shared.stats.pending.load(Ordering::Relaxed) > 0 {
        tracing::info!(
            events = shared.stats.pending.load(Ordering::Relaxed),
            "delivering the events an earlier run left in the event log first"
        );
    }
    let mut backoff = RETRY_MIN;
    let mut store_down = false;
    loop {
        let limit = shared.deliverable(&committed.borrow_and_update());
        let batch = match reader.read(&shared, limit, MAX_BATCH) {
            Ok(batch) => batch,
            Err(e) => {
                tracing::warn!(error = %e, "event log: cannot read; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(RETRY_MAX) => continue,
                }
            }
        };
        if batch.events.is_empty() {
            if batch.end > delivered {
                delivered = batch.end;
                mark_delivered(&shared, delivered);
            }
            shared
                .stats
                .oldest_undelivered_ns
                .store(0, Ordering::Relaxed);
            tokio::select! {
                _ = stop.cancelled() => return,
                changed = committed.changed() => if changed.is_err() { return },
            }
            continue;
        }
        shared
            .stats
            .oldest_undelivered_ns
            .store(batch.events[0].occurred_at, Ordering::Relaxed);
        loop {
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                result = sink.publish(&batch.events) => result,
            };
            match result {
                Ok(()) => {
                    if store_down {
                        store_down = false;
                        tracing::info!(store = sink.name(), "event store reached again");
                    }
                    backoff = RETRY_MIN;
                    break;
                }
                Err(e) => {
                    store_down = true;
                    tracing::warn!(store = sink.name(), error = %e, retry_in = ?backoff,
                        events = batch.events.len(), "event store did not take events, retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
        let n = batch.events.len() as u64;
        shared.stats.published.fetch_add(n, Ordering::Relaxed);
        shared.stats.pending.fetch_sub(n, Ordering::Relaxed);
        delivered = batch.end;
        mark_delivered(&shared, delivered);
    }
}
