//! Writing the log: everything sessions handed over since the last write goes out with one
//! `write` call (so a connect storm costs one system call per group, not per event), then the
//! group's tickets resolve. Without fsync (`off`, `interval`) the session that hands over an
//! event writes the group itself when no one else is writing (no thread hop on the CONNACK
//! path); otherwise, and for fsyncs, segment starts and `always` mode, the writer thread does.
//! A new segment begins (with the open sessions) when one is full; the oldest segments are
//! dropped when the log is over its size limit.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Instant;

use super::record::{encode, Record};
use super::recovery::{count_events_from, Found};
use super::{lock, segment_path, Committed, Entry, FsyncMode, Shared};
use crate::events::data_dir::DataDirError;
use crate::events::EventType;

pub(super) struct Writer {
    file: File,
    /// Position of the segment being written.
    base: u64,
    /// Its length.
    len: u64,
    /// Length of its leading snapshot (not counted against the segment size).
    snapshot_len: u64,
    /// Open sessions by key: (client id, connect time), for the next segment's snapshot.
    open: HashMap<String, (String, i64)>,
    committed: Committed,
    last_sync: Instant,
}

impl Writer {
    /// Continues the last kept segment.
    pub fn resume(dir: &Path, found: &Found, committed: Committed) -> Result<Writer, DataDirError> {
        let base = *found
            .bases
            .last()
            .expect("the scan keeps at least one segment");
        let path = segment_path(dir, base);
        let file = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(|e| DataDirError::io(&path, e))?;
        Ok(Writer {
            file,
            base,
            len: found.end - base,
            snapshot_len: found.last_snapshot_len,
            open: found.open.clone(),
            committed,
            last_sync: Instant::now(),
        })
    }

    /// Whether the next write starts a new segment (left to the writer thread: it writes the
    /// snapshot of every open session).
    fn roll_due(&self, shared: &Shared) -> bool {
        self.len - self.snapshot_len >= shared.settings.segment_bytes()
    }

    /// Writes everything handed over until none is left, resolving written tickets. Returns
    /// whether the log is closed and drained.
    fn write_pending(&mut self, shared: &Shared, buf: &mut Vec<u8>) -> bool {
        loop {
            let (entries, ticket, closed) = {
                let mut intake = lock(&shared.intake);
                (
                    std::mem::take(&mut intake.entries),
                    intake.tickets,
                    intake.closed,
                )
            };
            if entries.is_empty() && ticket == self.committed.written_ticket {
                return closed;
            }
            if !entries.is_empty() {
                buf.clear();
                self.write_group(shared, entries, buf);
            }
            self.committed.written_ticket = ticket;
            if shared.settings.fsync == FsyncMode::Always {
                self.sync(ticket);
            }
            shared.committed.send_replace(self.committed);
            self.enforce_limit(shared);
        }
    }

    /// Called by a session right after handing over an event: writes the group itself when
    /// that needs no fsync and no one else is writing; otherwise wakes the writer thread.
    pub fn write_inline_or_wake(shared: &Shared) {
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
    pub fn thread(shared: &Shared) {
        let mode = shared.settings.fsync;
        let interval = shared.settings.fsync_interval;
        let mut buf = Vec::new();
        loop {
            {
                let intake = lock(&shared.intake);
                if intake.entries.is_empty() && !intake.closed {
                    // With `interval`, wake at least every interval to fsync what sessions wrote.
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
                tracing::warn!(error = %e, "event log: fsync failed; recent events may not survive a power loss");
            }
        }
        self.last_sync = Instant::now();
        self.committed.synced = self.committed.written;
        self.committed.synced_ticket = ticket;
    }

    /// Encodes the group and writes it with one call, or one per segment when it fills the
    /// current one (a new segment then begins).
    fn write_group(&mut self, shared: &Shared, entries: Vec<Entry>, buf: &mut Vec<u8>) {
        let segment_bytes = shared.settings.segment_bytes();
        let mut entries = entries.into_iter().peekable();
        let mut changes = Vec::new();
        while entries.peek().is_some() {
            if self.len - self.snapshot_len >= segment_bytes {
                if let Err(e) = self.roll(shared) {
                    tracing::warn!(error = %e, "event log: cannot start a new segment; writing on in the current one");
                }
            }
            buf.clear();
            changes.clear();
            let room = (self.snapshot_len + segment_bytes).saturating_sub(self.len) as usize;
            while let Some(Entry { session, event }) = entries.next_if(|_| buf.len() < room.max(1))
            {
                changes.push((
                    session.clone(),
                    event.event_type,
                    event.client_id.clone(),
                    event.occurred_at,
                ));
                encode(&Record::Event { session, event }, buf);
            }
            self.write_chunk(shared, buf, &mut changes);
        }
    }

    /// Writes encoded events; once they are in the file, their sessions open or close.
    fn write_chunk(
        &mut self,
        shared: &Shared,
        buf: &[u8],
        changes: &mut Vec<(String, EventType, String, i64)>,
    ) {
        match self.file.write_all(buf) {
            Ok(()) => {
                self.len += buf.len() as u64;
                self.committed.written = self.base + self.len;
                for (session, event_type, client_id, at) in changes.drain(..) {
                    match event_type {
                        EventType::Connect => {
                            self.open.insert(session, (client_id, at));
                        }
                        EventType::Disconnect => {
                            self.open.remove(&session);
                        }
                        // Inside a session: opens and closes nothing.
                        EventType::Subscribe => {}
                    }
                }
            }
            Err(e) => {
                let n = changes.len() as u64;
                tracing::warn!(error = %e, events = n, "event log: write failed, events dropped (and counted)");
                shared.stats.dropped.fetch_add(n, Ordering::Relaxed);
                shared.stats.pending.fetch_sub(n, Ordering::Relaxed);
                // A partial write must not stay in front of the next one.
                if let Err(e) = self.file.set_len(self.len) {
                    tracing::warn!(error = %e, "event log: cannot cut a partial write");
                }
            }
        }
    }

    /// Ends the current segment (fsynced unless `off`) and begins the next with a snapshot of
    /// the open sessions, so the older segments are not needed to recover them.
    fn roll(&mut self, shared: &Shared) -> std::io::Result<()> {
        let durable = shared.settings.fsync != FsyncMode::Off;
        if durable {
            self.file.sync_data()?;
        }
        let base = self.base + self.len;
        let path = segment_path(&shared.dir, base);
        let mut file = OpenOptions::new().create(true).append(true).open(&path)?;
        // A file left at this position (by a cut tail) holds nothing of the log now.
        file.set_len(0)?;
        let mut open: Vec<_> = self.open.iter().collect();
        open.sort_by_key(|(_, (_, since))| *since);
        let mut snapshot = Vec::new();
        for (session, (client_id, since)) in open {
            encode(
                &Record::Open {
                    session: session.clone(),
                    client_id: client_id.clone(),
                    since: *since,
                },
                &mut snapshot,
            );
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

    /// Drops the oldest segments while the log is over its size limit; their events not yet
    /// taken by the delivery task are counted as dropped.
    fn enforce_limit(&mut self, shared: &Shared) {
        let end = self.committed.written;
        let mut segments = lock(&shared.segments);
        let mut dropped = 0;
        while segments.bases.len() > 1 && end - segments.bases[0] > shared.settings.max_bytes {
            let base = segments.bases.remove(0);
            let next = segments.bases[0];
            let path = segment_path(&shared.dir, base);
            if segments.read < next {
                let mut bytes = Vec::new();
                match File::open(&path).and_then(|mut f| f.read_to_end(&mut bytes)) {
                    Ok(_) => dropped += count_events_from(&bytes, base, segments.read),
                    Err(e) => tracing::warn!(file = %path.display(), error = %e,
                        "event log: cannot count the events of a dropped segment"),
                }
                segments.read = next;
            }
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!(file = %path.display(), error = %e, "event log: cannot delete a segment");
            }
        }
        let first = segments.bases[0];
        drop(segments);
        shared.stats.log_bytes.store(end - first, Ordering::Relaxed);
        if dropped > 0 {
            shared.stats.dropped.fetch_add(dropped, Ordering::Relaxed);
            shared.stats.pending.fetch_sub(dropped, Ordering::Relaxed);
            tracing::warn!(
                events = dropped,
                "event log full: the oldest undelivered events were dropped (and counted)"
            );
        }
    }
}
