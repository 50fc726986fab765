//! Opening the log after any kind of stop: every kept segment is read once, a torn or corrupt
//! tail is cut (with a warning naming the bytes), the delivered position is checked against
//! the records, and the sessions whose `connect` has no `disconnect` are collected: those the
//! previous run left open when it crashed.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::Path;

use super::record::{Frame, Record, Records};
use super::{segment_path, write_checkpoint, CHECKPOINT_FILE, SEGMENT_PREFIX, SEGMENT_SUFFIX};
use crate::events::data_dir::DataDirError;
use crate::events::{ConnectionEvent, EventType};

/// A session whose `connect` is in the log without a `disconnect`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenSession {
    /// The key it was logged under.
    pub session: String,
    pub client_id: String,
    /// The `connect`'s occurred_at.
    pub since: i64,
}

/// What opening the log found.
#[derive(Debug, Default)]
pub struct Recovery {
    /// Sessions the previous run left open, oldest `connect` first.
    pub open_sessions: Vec<OpenSession>,
    /// Events written but not yet delivered.
    pub undelivered: u64,
    /// Bytes of torn or corrupt records cut off.
    pub cut_bytes: u64,
}

/// The scanned log, as the writer and the delivery task resume from it.
pub(super) struct Found {
    pub bases: Vec<u64>,
    /// End of the last segment.
    pub end: u64,
    /// Where delivery resumes.
    pub start: u64,
    /// Length of the last segment's leading snapshot.
    pub last_snapshot_len: u64,
    /// The open sessions by key: (client id, connect time).
    pub open: HashMap<String, (String, i64)>,
    /// The latest occurred_at logged.
    pub latest: i64,
    pub recovery: Recovery,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> DataDirError + '_ {
    move |e| DataDirError::io(path, e)
}

fn read_all(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    File::open(path)?.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The kept segment bases, ascending.
fn list_segments(dir: &Path) -> Result<Vec<u64>, DataDirError> {
    let mut bases = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let name = entry.map_err(io(dir))?.file_name();
        if let Some(base) = name
            .to_str()
            .and_then(|n| n.strip_prefix(SEGMENT_PREFIX))
            .and_then(|n| n.strip_suffix(SEGMENT_SUFFIX))
            .and_then(|n| n.parse::<u64>().ok())
        {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

pub(super) fn scan(dir: &Path) -> Result<Found, DataDirError> {
    let mut bases = list_segments(dir)?;
    if bases.is_empty() {
        let path = segment_path(dir, 0);
        File::create(&path).map_err(io(&path))?;
        bases.push(0);
    }
    let checkpoint = std::fs::read_to_string(dir.join(CHECKPOINT_FILE))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let mut open: HashMap<String, (String, i64)> = HashMap::new();
    let mut latest = 0i64;
    let mut cut_bytes = 0u64;
    // Events at or after the checkpoint, and all events, so either can be the undelivered count.
    let (mut after_checkpoint, mut all) = (0u64, 0u64);
    let mut checkpoint_on_boundary = false;
    let (mut end, mut last_snapshot_len) = (0u64, 0u64);
    for (i, &base) in bases.iter().enumerate() {
        let path = segment_path(dir, base);
        let bytes = read_all(&path).map_err(io(&path))?;
        let mut records = Records::new(&bytes);
        let mut snapshot_len = 0;
        let mut in_snapshot = true;
        while let Some((at, record)) = records.next() {
            let position = base + at as u64;
            checkpoint_on_boundary |= checkpoint == Some(position);
            match record {
                Some(Record::Event { session, event }) => {
                    in_snapshot = false;
                    latest = latest.max(event.occurred_at);
                    all += 1;
                    if checkpoint.is_none_or(|c| position >= c) {
                        after_checkpoint += 1;
                    }
                    match event.event_type {
                        EventType::Connect => {
                            open.insert(session, (event.client_id, event.occurred_at));
                        }
                        EventType::Disconnect => {
                            open.remove(&session);
                        }
                        EventType::Subscribe => {}
                    }
                }
                Some(Record::Open {
                    session,
                    client_id,
                    since,
                }) => {
                    latest = latest.max(since);
                    open.insert(session, (client_id, since));
                }
                None => {
                    in_snapshot = false;
                    tracing::warn!(file = %path.display(), at,
                        "event log: skipped a record this version cannot read");
                }
            }
            if in_snapshot {
                snapshot_len = records.at as u64;
            }
        }
        let good = records.at;
        checkpoint_on_boundary |= checkpoint == Some(base + good as u64);
        if matches!(records.stop, Some(Frame::Incomplete | Frame::Corrupt)) {
            let cut = bytes.len() - good;
            let what = if i + 1 == bases.len() {
                "torn or corrupt record at its end (the process or machine stopped mid-write)"
            } else {
                "corrupt record"
            };
            tracing::warn!(file = %path.display(), at = good, bytes = cut,
                "event log: cut {cut} bytes of a {what}");
            OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(good as u64))
                .map_err(io(&path))?;
            cut_bytes += cut as u64;
        }
        end = base + good as u64;
        last_snapshot_len = snapshot_len;
    }

    let first = bases[0];
    let (start, undelivered) = match checkpoint {
        None => (first, all),
        Some(c) if c > end => {
            // What was cut had been delivered: new records will be written from `end` on.
            (end, 0)
        }
        Some(c) if c >= first && checkpoint_on_boundary => (c, after_checkpoint),
        Some(c) if c < first => (first, all),
        Some(c) => {
            tracing::warn!(
                checkpoint = c,
                "event log: the delivered position is not on a record; delivering the whole kept log again (repeats possible)"
            );
            (first, all)
        }
    };
    if checkpoint != Some(start) {
        write_checkpoint(dir, start).map_err(io(dir))?;
    }
    let mut open_sessions: Vec<OpenSession> = open
        .iter()
        .map(|(session, (client_id, since))| OpenSession {
            session: session.clone(),
            client_id: client_id.clone(),
            since: *since,
        })
        .collect();
    open_sessions.sort_by(|a, b| (a.since, &a.session).cmp(&(b.since, &b.session)));
    Ok(Found {
        bases,
        end,
        start,
        last_snapshot_len,
        open,
        latest,
        recovery: Recovery {
            open_sessions,
            undelivered,
            cut_bytes,
        },
    })
}

/// The events of the segments `bases` before position `limit`, oldest first.
pub(super) fn events_before(
    dir: &Path,
    bases: &[u64],
    limit: u64,
) -> std::io::Result<Vec<ConnectionEvent>> {
    let mut events = Vec::new();
    for &base in bases.iter().take_while(|&&b| b < limit) {
        let mut bytes = read_all(&segment_path(dir, base))?;
        bytes.truncate((limit - base).min(bytes.len() as u64) as usize);
        events.extend(Records::new(&bytes).filter_map(|(_, r)| match r {
            Some(Record::Event { event, .. }) => Some(event),
            _ => None,
        }));
    }
    Ok(events)
}

/// Events in `bytes` (a segment starting at `base`) at position `from` or later.
pub(super) fn count_events_from(bytes: &[u8], base: u64, from: u64) -> u64 {
    Records::new(bytes)
        .filter(|(at, r)| matches!(r, Some(Record::Event { .. })) && base + *at as u64 >= from)
        .count() as u64
}
