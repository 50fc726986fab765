//! The delivery task: reads a log from the delivered position, hands the records to the sink in
//! batches (oldest first), retries a batch with backoff until the sink takes it, then
//! checkpoints the position and deletes the segments wholly delivered. It reads only what the
//! kind may deliver in the log's fsync mode (see [`Kind::DELIVER_UNSYNCED`]).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::frame::{decode, Frame, HEADER};
use super::{lock, write_checkpoint, Kind, LogSink, Shared};

/// Bytes read from a segment at a time (a larger record is read whole).
const READ_CHUNK: usize = 1 << 20;
/// Payload bytes handed to the sink at once at most (with at least one record).
const MAX_BATCH_BYTES: usize = 4 << 20;
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

struct Batch<R> {
    records: Vec<R>,
    /// Where the log continues after the batch.
    end: u64,
}

/// The segment file the task reads, kept open between batches.
struct Reader {
    file: Option<(u64, File)>,
    buf: Vec<u8>,
}

impl Reader {
    /// Up to [`Kind::MAX_BATCH`] records from the read position, not past `limit`. Segments the
    /// writer dropped meanwhile (over the size limit) are skipped: their records were counted.
    fn read<K: Kind>(
        &mut self,
        shared: &Shared<K>,
        limit: u64,
    ) -> std::io::Result<Batch<K::Record>> {
        let mut segments = lock(&shared.segments);
        let mut records = Vec::new();
        let mut bytes = 0;
        while records.len() < K::MAX_BATCH && bytes < MAX_BATCH_BYTES && segments.read < limit {
            let read = segments.read;
            let idx = segments.bases.partition_point(|&b| b <= read);
            let Some(&base) = idx.checked_sub(1).and_then(|i| segments.bases.get(i)) else {
                segments.read = segments.bases[0];
                continue;
            };
            let next = segments.bases.get(idx).copied();
            let seg_end = next.unwrap_or(u64::MAX).min(limit);
            if self.file.as_ref().map(|(b, _)| *b) != Some(base) {
                self.file = Some((base, File::open(shared.segment_path(base))?));
            }
            let file = &mut self.file.as_mut().expect("opened above").1;
            let mut want = ((seg_end - read) as usize).min(READ_CHUNK);
            let got = loop {
                self.buf.resize(want, 0);
                file.seek(SeekFrom::Start(read - base))?;
                let mut got = 0;
                while got < want {
                    match file.read(&mut self.buf[got..])? {
                        0 => break,
                        n => got += n,
                    }
                }
                // A record larger than a chunk is read whole.
                match decode(&self.buf[..got]) {
                    Frame::Incomplete(Some(len))
                        if got == want && len > want && (len as u64) <= seg_end - read =>
                    {
                        want = len;
                    }
                    _ => break got,
                }
            };
            let mut at = 0;
            while records.len() < K::MAX_BATCH && bytes < MAX_BATCH_BYTES {
                match decode(&self.buf[at..got]) {
                    Frame::Good(payload, n) => {
                        match K::decode(payload) {
                            Some(record) if K::delivered(&record) => {
                                bytes += HEADER + K::size(&record);
                                records.push(record);
                            }
                            Some(_) => {}
                            None => tracing::warn!(
                                position = read + at as u64,
                                "{} log: skipped a record this version cannot read",
                                K::FILES
                            ),
                        }
                        at += n;
                    }
                    // A record continuing past this chunk: the next read starts with it.
                    Frame::Incomplete(_) if at > 0 => break,
                    Frame::Incomplete(_) | Frame::Corrupt => {
                        // Nothing readable here: the segment was cut short at start-up (or
                        // damaged since); the log goes on in the next segment.
                        match next {
                            Some(next) if next <= limit => at = (next - read) as usize,
                            _ => tracing::warn!(position = read,
                                "{} log: unreadable record while delivering; waiting for the next segment", K::FILES),
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
        if self.buf.capacity() > 2 * READ_CHUNK {
            self.buf = Vec::new();
        }
        Ok(Batch {
            records,
            end: segments.read,
        })
    }
}

/// Records `position` as delivered: checkpoint, the delivered watch, and deletion of the
/// segments wholly before it (never the one being written).
fn mark_delivered<K: Kind>(shared: &Shared<K>, position: u64) {
    if let Err(e) = write_checkpoint(&shared.dir, K::FILES, position) {
        tracing::warn!(error = %e, "{} log: cannot record the delivered position; these {}s may be sent again after a restart", K::FILES, K::WHAT);
    }
    shared.delivered.send_replace(position);
    let mut segments = lock(&shared.segments);
    while segments.bases.len() > 1 && segments.bases[1] <= position {
        let base = segments.bases.remove(0);
        let path = shared.segment_path(base);
        if let Err(e) = std::fs::remove_file(&path) {
            tracing::warn!(file = %path.display(), error = %e, "{} log: cannot delete a delivered segment", K::FILES);
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

pub(super) async fn run<K: Kind>(
    shared: Arc<Shared<K>>,
    mut sink: Box<dyn LogSink<K::Record>>,
    stop: CancellationToken,
) where
    K::Record: Sync,
{
    let mut committed = shared.committed.subscribe();
    let mut reader = Reader {
        file: None,
        buf: Vec::new(),
    };
    let mut delivered = *shared.delivered.borrow();
    let pending = shared.stats.pending.load(Ordering::Relaxed);
    if pending > 0 {
        tracing::info!(
            records = pending,
            sink = sink.name(),
            "delivering the {}s an earlier run left in the {} log first",
            K::WHAT,
            K::FILES
        );
    }
    let mut backoff = RETRY_MIN;
    let mut sink_down = false;
    loop {
        let limit = shared.deliverable(&committed.borrow_and_update());
        let batch = match reader.read(&shared, limit) {
            Ok(batch) => batch,
            Err(e) => {
                tracing::warn!(error = %e, "{} log: cannot read; retrying", K::FILES);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(RETRY_MAX) => continue,
                }
            }
        };
        if batch.records.is_empty() {
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
            .store(K::time(&batch.records[0]), Ordering::Relaxed);
        loop {
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                result = sink.deliver(&batch.records) => result,
            };
            match result {
                Ok(()) => {
                    if sink_down {
                        sink_down = false;
                        tracing::info!(sink = sink.name(), "{} sink reached again", K::FILES);
                    }
                    backoff = RETRY_MIN;
                    break;
                }
                Err(e) => {
                    sink_down = true;
                    tracing::warn!(sink = sink.name(), error = %e, retry_in = ?backoff,
                        records = batch.records.len(), "{} sink did not take {}s, retrying", K::FILES, K::WHAT);
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
        let n = batch.records.len() as u64;
        shared.stats.published.fetch_add(n, Ordering::Relaxed);
        shared.stats.pending.fetch_sub(n, Ordering::Relaxed);
        delivered = batch.end;
        mark_delivered(&shared, delivered);
    }
}
