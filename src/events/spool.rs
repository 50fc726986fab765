//! The outbox's overflow on disk: an append-only file of JSON-line events (`events.spool`) and
//! the byte offset of the oldest undelivered one (`events.spool.offset`). It survives a restart
//! and is delivered first on the next start. The live part is bounded: appending beyond the
//! size limit drops the oldest events, which the caller counts and logs.
//!
//! Writes go to the page cache without fsync: the spool survives a crash or `kill -9` of the
//! process, not a power loss of the machine.

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use super::data_dir::{DataDir, DataDirError};
use super::ConnectionEvent;

const SPOOL_FILE: &str = "events.spool";
const OFFSET_FILE: &str = "events.spool.offset";

/// Undelivered events on disk, oldest first.
#[derive(Debug)]
pub struct Spool {
    path: PathBuf,
    offset_path: PathBuf,
    file: File,
    /// Byte offset of the oldest undelivered event.
    head: u64,
    /// File length (the next append goes here).
    file_len: u64,
    /// Live events (between `head` and `len`).
    count: u64,
    max_bytes: u64,
}

/// Events read from the head, and where the head moves once they are delivered.
#[derive(Debug)]
pub struct SpoolBatch {
    pub events: Vec<ConnectionEvent>,
    /// Lines the batch covers, including unreadable ones that were skipped.
    pub lines: u64,
    pub start: u64,
    pub end: u64,
}

impl Spool {
    /// Opens (or creates) the spool in `dir`. A torn last line (the process died mid-write) is
    /// cut off; a stale or corrupt offset restarts from the beginning (at-least-once).
    pub fn open(dir: &DataDir, max_bytes: u64) -> Result<Spool, DataDirError> {
        let path = dir.file(SPOOL_FILE);
        let offset_path = dir.file(OFFSET_FILE);
        let io = |e| DataDirError::io(&path, e);
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if complete < bytes.len() {
            tracing::warn!(path = %path.display(), bytes = bytes.len() - complete,
                "event spool ends with a partly written event; cutting it off");
            file.set_len(complete as u64).map_err(io)?;
        }
        let head = std::fs::read_to_string(&offset_path)
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .filter(|&h| {
                h as usize <= complete && (h == 0 || bytes.get(h as usize - 1) == Some(&b'\n'))
            })
            .unwrap_or(0);
        let count = bytes[head as usize..complete]
            .iter()
            .filter(|&&b| b == b'\n')
            .count() as u64;
        Ok(Spool {
            path,
            offset_path,
            file,
            head,
            file_len: complete as u64,
            count,
            max_bytes: max_bytes.max(1),
        })
    }

    /// Undelivered events on disk.
    pub fn len(&self) -> u64 {
        self.count
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Appends events after the newest; returns how many of the oldest were dropped to stay
    /// within the size limit.
    pub fn append(&mut self, events: &[ConnectionEvent]) -> std::io::Result<u64> {
        if events.is_empty() {
            return Ok(0);
        }
        let mut text = Vec::with_capacity(events.len() * 128);
        for event in events {
            text.extend_from_slice(event.to_json().as_bytes());
            text.push(b'\n');
        }
        self.file.write_all(&text)?;
        self.file_len += text.len() as u64;
        self.count += events.len() as u64;
        let mut dropped = 0;
        if self.file_len - self.head > self.max_bytes {
            dropped = self.drop_oldest()?;
        }
        Ok(dropped)
    }

    /// Puts events back in front of the oldest (used at shutdown for the memory queue, whose
    /// events are older than the spool's). Rewrites the file.
    pub fn prepend(&mut self, events: &[ConnectionEvent]) -> std::io::Result<u64> {
        if events.is_empty() {
            return Ok(0);
        }
        let mut text = Vec::new();
        for event in events {
            text.extend_from_slice(event.to_json().as_bytes());
            text.push(b'\n');
        }
        text.extend_from_slice(&self.live_bytes()?);
        self.count += events.len() as u64;
        self.rewrite(&text)?;
        if self.file_len > self.max_bytes {
            return self.drop_oldest();
        }
        Ok(0)
    }

    /// Reads up to `max` events from the head without consuming them.
    pub fn peek(&mut self, max: usize) -> std::io::Result<SpoolBatch> {
        let mut reader = BufReader::new(&self.file);
        reader.seek(SeekFrom::Start(self.head))?;
        let mut events = Vec::new();
        let mut lines = 0;
        let mut end = self.head;
        let mut line = String::new();
        while events.len() < max && end < self.file_len {
            line.clear();
            let n = reader.read_line(&mut line)?;
            if n == 0 {
                break;
            }
            end += n as u64;
            lines += 1;
            match serde_json::from_str(line.trim_end()) {
                Ok(event) => events.push(event),
                Err(e) => tracing::warn!(path = %self.path.display(), error = %e,
                    "unreadable event in the spool, skipped"),
            }
        }
        Ok(SpoolBatch {
            events,
            lines,
            start: self.head,
            end,
        })
    }

    /// Marks a peeked batch delivered: moves the head past it and records the offset. Returns
    /// how many of its lines were still live (the rest were dropped as oldest meanwhile). An
    /// emptied spool is truncated; one mostly made of delivered events is compacted.
    pub fn consume(&mut self, batch: &SpoolBatch) -> std::io::Result<u64> {
        let consumed = if batch.end <= self.head {
            0
        } else if batch.start == self.head {
            batch.lines
        } else {
            let mut range = Vec::new();
            let mut reader = &self.file;
            reader.seek(SeekFrom::Start(self.head))?;
            reader.take(batch.end - self.head).read_to_end(&mut range)?;
            range.iter().filter(|&&b| b == b'\n').count() as u64
        };
        self.head = self.head.max(batch.end).min(self.file_len);
        self.count = self.count.saturating_sub(consumed);
        self.sync_head()?;
        Ok(consumed)
    }

    fn sync_head(&mut self) -> std::io::Result<()> {
        if self.head == self.file_len {
            self.file.set_len(0)?;
            self.head = 0;
            self.file_len = 0;
            self.count = 0;
        } else if self.head > self.max_bytes / 2 + (1 << 20) {
            let live = self.live_bytes()?;
            return self.rewrite(&live);
        }
        self.write_offset()
    }

    fn live_bytes(&mut self) -> std::io::Result<Vec<u8>> {
        let mut live = Vec::with_capacity((self.file_len - self.head) as usize);
        let mut reader = &self.file;
        reader.seek(SeekFrom::Start(self.head))?;
        reader
            .take(self.file_len - self.head)
            .read_to_end(&mut live)?;
        Ok(live)
    }

    /// Replaces the file's content with `text` (all live) through a renamed temporary file.
    fn rewrite(&mut self, text: &[u8]) -> std::io::Result<()> {
        let tmp = self.path.with_extension("spool.tmp");
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, &self.path)?;
        self.file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&self.path)?;
        self.head = 0;
        self.file_len = text.len() as u64;
        self.write_offset()
    }

    /// Advances the head past the oldest events until the live part fits the limit.
    fn drop_oldest(&mut self) -> std::io::Result<u64> {
        let mut reader = BufReader::new(&self.file);
        reader.seek(SeekFrom::Start(self.head))?;
        let mut dropped = 0;
        let mut line = Vec::new();
        while self.file_len - self.head > self.max_bytes {
            line.clear();
            let n = reader.read_until(b'\n', &mut line)?;
            if n == 0 {
                break;
            }
            self.head += n as u64;
            self.count = self.count.saturating_sub(1);
            dropped += 1;
        }
        self.write_offset()?;
        Ok(dropped)
    }

    fn write_offset(&self) -> std::io::Result<()> {
        let tmp = self.offset_path.with_extension("offset.tmp");
        std::fs::write(&tmp, self.head.to_string())?;
        std::fs::rename(&tmp, &self.offset_path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::events::test_event as event;

    fn order(events: &[ConnectionEvent]) -> Vec<i64> {
        events.iter().map(|e| e.occurred_at).collect()
    }

    #[test]
    fn survives_reopen_and_resumes_after_the_delivered_part() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = DataDir::open(dir.path()).expect("data dir");
        let mut spool = Spool::open(&data, 1 << 20).expect("open");
        spool
            .append(&(0..10).map(event).collect::<Vec<_>>())
            .expect("append");
        let batch = spool.peek(4).expect("peek");
        assert_eq!(order(&batch.events), [0, 1, 2, 3]);
        spool.consume(&batch).expect("consume");
        drop(spool);

        let mut spool = Spool::open(&data, 1 << 20).expect("reopen");
        assert_eq!(spool.len(), 6);
        let batch = spool.peek(100).expect("peek");
        assert_eq!(order(&batch.events), [4, 5, 6, 7, 8, 9]);
        spool.consume(&batch).expect("consume");
        assert!(spool.is_empty());
        assert_eq!(
            std::fs::metadata(data.file(SPOOL_FILE))
                .expect("meta")
                .len(),
            0
        );
    }

    #[test]
    fn torn_last_line_is_cut_off() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = DataDir::open(dir.path()).expect("data dir");
        let mut spool = Spool::open(&data, 1 << 20).expect("open");
        spool.append(&[event(1), event(2)]).expect("append");
        drop(spool);
        let mut f = OpenOptions::new()
            .append(true)
            .open(data.file(SPOOL_FILE))
            .expect("open raw");
        f.write_all(br#"{"client_id":"c3","ev"#)
            .expect("torn write");
        let mut spool = Spool::open(&data, 1 << 20).expect("reopen");
        assert_eq!(spool.len(), 2);
        spool.append(&[event(3)]).expect("append");
        assert_eq!(order(&spool.peek(10).expect("peek").events), [1, 2, 3]);
    }

    #[test]
    fn full_spool_drops_the_oldest() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = DataDir::open(dir.path()).expect("data dir");
        let one_line = event(100).to_json().len() as u64 + 1;
        let mut spool = Spool::open(&data, one_line * 5).expect("open");
        let dropped = spool
            .append(&(100..108).map(event).collect::<Vec<_>>())
            .expect("append");
        assert_eq!(dropped, 3);
        assert_eq!(
            order(&spool.peek(10).expect("peek").events),
            [103, 104, 105, 106, 107]
        );
    }

    #[test]
    fn prepend_goes_before_the_oldest() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = DataDir::open(dir.path()).expect("data dir");
        let mut spool = Spool::open(&data, 1 << 20).expect("open");
        spool.append(&[event(3), event(4)]).expect("append");
        let batch = spool.peek(1).expect("peek");
        spool.consume(&batch).expect("consume");
        spool.prepend(&[event(1), event(2)]).expect("prepend");
        drop(spool);
        let mut spool = Spool::open(&data, 1 << 20).expect("reopen");
        assert_eq!(order(&spool.peek(10).expect("peek").events), [1, 2, 4]);
    }
}
