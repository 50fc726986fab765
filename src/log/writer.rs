//! Writing a log: everything handed over since the last write goes out with one `write` call
//! (so a connect storm or a publish burst costs one system call per group, not per record),
//! then the group's tickets resolve. Without fsync (`off`, `interval`) the task that hands over
//! a record writes the group itself when no one else is writing (no thread hop on the CONNACK or
//! PUBACK path); otherwise, and for fsyncs, segment starts and `always` mode, the writer thread
//! does. A new segment begins (with the kind's snapshot) when one is full; a
//! [`WhenFull::DropOldest`] log drops its oldest segments when over its size limit.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::frame;
use super::recovery::{count_from, Opened};
use super::{lock, segment_path, Committed, FsyncMode, Kind, Shared, WhenFull};
use crate::log::data_dir::DataDirError;

pub(super) struct Writer<K: Kind> {
    file: File,
    /// Position of the segment being written.
    base: u64,
    /// Its length.
    len: u64,
    /// Length of its leading snapshot (not counted against the segment size).
    snapshot_len: u64,
    /// The kind's state after every record written, for the next segment's snapshot.
    state: K::State,
    committed: Committed,
    last_sync: Instant,
}

impl<K: Kind> Writer<K> {
    /// Continues the last kept segment.
    pub fn resume(
        dir: &Path,
        found: &Opened<K::State>,
        committed: Committed,
    ) -> Result<Writer<K>, DataDirError> {
        let base = *found
            .bases
            .last()
            .expect("the scan keeps at least one segment");
        let path = segment_path(dir, K::FILES, base);
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| DataDirError::io(&path, e))?;
        Ok(Writer {
            file,
            base,
            len: found.end - base,
            snapshot_len: found.last_snapshot_len,
            state: found.state.clone(),
            committed,
            last_sync: Instant::now(),
        })
    }

    /// Whether the next write starts a new segment (left to the writer thread: it writes the
    /// snapshot of every open session).
    fn roll_due(&self, shared: &Shared<K>) -> bool {
        self.len - self.snapshot_len >= shared.settings.segment_bytes()
    }

    /// Writes everything handed over until none is left, resolving written tickets. Returns
    /// whether the log is closed and drained.
    fn write_pending(&mut self, shared: &Shared<K>, buf: &mut Vec<u8>) -> bool {
        loop {
            let (records, ticket, closed) = {
                let mut intake = lock(&shared.intake);
                (
                    std::mem::take(&mut intake.records),
                    intake.tickets,
                    intake.closed,
                )
            };
            if records.is_empty() && ticket == self.committed.written_ticket {
                return closed;
            }
            if !records.is_empty() {
                buf.clear();
                self.write_group(shared, records, buf);
            }
            self.committed.written_ticket = ticket;
            if shared.settings.fsync == FsyncMode::Always {
                self.sync(ticket);
            }
            shared.committed.send_replace(self.committed);
            self.enforce_limit(shared);
        }
    }

    /// Called right after handing over a record: writes the group itself when
    /// that needs no fsync and no one else is writing; otherwise wakes the writer thread.
    pub fn write_inline_or_wake(shared: &Shared<K>) {
        if shared.settings.fsync != FsyncMode::Always {
            if let Ok(mut writer) = shared.writer.try_lock() {
                if !writer.roll_due(shared) {
                    let mut buf = Vec::new();
                    writer.write_pending(shared, &mut buf);
                    return;
                }
            }
        }
        // Whoever holds the writer may have looked at the intake before this event arrived.
        shared.wake.notify_one();
    }

    /// The writer thread: writes what sessions left to it, fsyncs as the mode says, and ends
    /// once the log is closed and everything is written (and, unless `off`, fsynced).
    pub fn thread(shared: &Shared<K>) {
        let mode = shared.settings.fsync;
        let interval = shared.settings.fsync_interval;
        let mut buf = Vec::new();
        loop {
            {
                let intake = lock(&shared.intake);
                if intake.records.is_empty() && !intake.closed {
                    // With `interval`, wake at least every interval to fsync what others wrote.
                    let _unused = if mode == FsyncMode::Interval {
                        shared
                            .wake
                            .wait_timeout(intake, interval)
                            .unwrap_or_else(|p| p.into_inner())
                            .0
                    } else {
                        shared.wake.wait(intake).unwrap_or_else(|p| p.into_inner())
                    };
                }
            }
            let mut writer = lock(&shared.writer);
            let closed = writer.write_pending(shared, &mut buf);
            if mode == FsyncMode::Interval
                && (closed || writer.last_sync.elapsed() >= interval)
                && writer.committed.synced < writer.committed.written
            {
                let ticket = writer.committed.written_ticket;
                writer.sync(ticket);
                shared.committed.send_replace(writer.committed);
            }
            if closed {
                return;
            }
        }
    }

    fn sync(&mut self, ticket: u64) {
        if self.committed.synced < self.committed.written {
            if let Err(e) = self.file.sync_data() {
                tracing::warn!(error = %e, "{} log: fsync failed; recent {}s may not survive a power loss", K::FILES, K::WHAT);
            }
        }
        self.last_sync = Instant::now();
        self.committed.synced = self.committed.written;
        self.committed.synced_ticket = ticket;
    }

    /// Encodes the group and writes it with one call, or one per segment when it fills the
    /// current one (a new segment then begins).
    fn write_group(&mut self, shared: &Shared<K>, records: Vec<K::Record>, buf: &mut Vec<u8>) {
        let segment_bytes = shared.settings.segment_bytes();
        let mut records = records.into_iter().peekable();
        let mut chunk = Vec::new();
        while records.peek().is_some() {
            if self.len - self.snapshot_len >= segment_bytes {
                if let Err(e) = self.roll(shared) {
                    tracing::warn!(error = %e, "{} log: cannot start a new segment; writing on in the current one", K::FILES);
                }
            }
            buf.clear();
            chunk.clear();
            let room = (self.snapshot_len + segment_bytes).saturating_sub(self.len) as usize;
            while let Some(record) = records.next_if(|_| buf.len() < room.max(1)) {
                frame::encode(buf, |out| K::encode(&record, out));
                chunk.push(record);
            }
            self.write_chunk(shared, buf, &mut chunk);
        }
    }

    /// Writes encoded records; once they are in the file, the kind's state takes them in.
    fn write_chunk(&mut self, shared: &Shared<K>, buf: &[u8], chunk: &mut Vec<K::Record>) {
        match self.file.write_all(buf) {
            Ok(()) => {
                self.len += buf.len() as u64;
                self.committed.written = self.base + self.len;
                for record in chunk.drain(..) {
                    K::apply(&mut self.state, &record);
                }
            }
            Err(e) => {
                let n = chunk.iter().filter(|r| K::delivered(r)).count() as u64;
                chunk.clear();
                tracing::warn!(error = %e, records = n, "{} log: write failed, {}s dropped (and counted)", K::FILES, K::WHAT);
                shared.stats.dropped.fetch_add(n, Ordering::Relaxed);
                shared.stats.pending.fetch_sub(n, Ordering::Relaxed);
                // A partial write must not stay in front of the next one.
                if let Err(e) = self.file.set_len(self.len) {
                    tracing::warn!(error = %e, "{} log: cannot cut a partial write", K::FILES);
                }
            }
        }
    }

    /// Ends the current segment (fsynced unless `off`) and begins the next with the kind's
    /// snapshot, so the older segments are not needed to rebuild its state.
    fn roll(&mut self, shared: &Shared<K>) -> std::io::Result<()> {
        let durable = shared.settings.fsync != FsyncMode::Off;
        if durable {
            self.file.sync_data()?;
        }
        let base = self.base + self.len;
        let path = shared.segment_path(base);
        let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
        // A file left at this position (by a cut tail) holds nothing of the log now.
        file.set_len(0)?;
        let mut snapshot = Vec::new();
        for record in K::snapshot(&self.state) {
            frame::encode(&mut snapshot, |out| K::encode(&record, out));
        }
        file.write_all(&snapshot)?;
        if durable {
            file.sync_data()?;
            // The new file's name must survive a power cut too.
            File::open(&shared.dir)?.sync_all()?;
        }
        self.file = file;
        self.base = base;
        self.len = snapshot.len() as u64;
        self.snapshot_len = self.len;
        self.committed.written = base + self.len;
        lock(&shared.segments).bases.push(base);
        Ok(())
    }

    /// A [`WhenFull::DropOldest`] log drops its oldest segments while over its size limit;
    /// their records not yet taken by the delivery task are counted as dropped.
    fn enforce_limit(&mut self, shared: &Shared<K>) {
        let end = self.committed.written;
        let mut segments = lock(&shared.segments);
        let mut dropped = 0;
        while K::WHEN_FULL == WhenFull::DropOldest
            && segments.bases.len() > 1
            && end - segments.bases[0] > shared.settings.max_bytes
        {
            let base = segments.bases.remove(0);
            let next = segments.bases[0];
            let path = shared.segment_path(base);
            if segments.read < next {
                let mut bytes = Vec::new();
                match File::open(&path).and_then(|mut f| f.read_to_end(&mut bytes)) {
                    Ok(_) => dropped += count_from::<K>(&bytes, base, segments.read),
                    Err(e) => tracing::warn!(file = %path.display(), error = %e,
                        "{} log: cannot count the records of a dropped segment", K::FILES),
                }
                segments.read = next;
            }
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(file = %path.display(), error = %e, "{} log: cannot delete a segment", K::FILES);
            }
        }
        let first = segments.bases[0];
        drop(segments);
        shared.stats.log_bytes.store(end - first, Ordering::Relaxed);
        if dropped > 0 {
            shared.stats.dropped.fetch_add(dropped, Ordering::Relaxed);
            shared.stats.pending.fetch_sub(dropped, Ordering::Relaxed);
            tracing::warn!(
                records = dropped,
                "{} log full: the oldest undelivered {}s were dropped (and counted)",
                K::FILES,
                K::WHAT
            );
        }
    }
}
