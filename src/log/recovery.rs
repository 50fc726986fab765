//! Opening a log after any kind of stop: every kept segment is read once, a torn or corrupt
//! tail is cut (with a warning naming the bytes), the delivered position is checked against
//! the records, and the kind's state is rebuilt from the records kept.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::path::Path;

use super::frame::{Frame, Frames};
use super::{segment_path, write_checkpoint, Kind};
use crate::log::data_dir::DataDirError;

/// What opening a log found.
#[derive(Debug, Clone, Default)]
pub struct Opened<S> {
    /// The kind's state after every record kept (events: the sessions left open).
    pub state: S,
    /// Deliverable records written but not yet delivered.
    pub undelivered: u64,
    /// Bytes of torn or corrupt records cut off.
    pub cut_bytes: u64,
    /// The latest record time found (Unix ns; 0 for none).
    pub latest: i64,
    /// The time of the first undelivered record (0 for none).
    pub oldest_undelivered: i64,
    /// Positions of the kept segments, ascending.
    pub(super) bases: Vec<u64>,
    /// End of the last segment.
    pub(super) end: u64,
    /// Where delivery resumes.
    pub(super) start: u64,
    /// Length of the last segment's leading snapshot.
    pub(super) last_snapshot_len: u64,
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
fn list_segments(dir: &Path, files: &str) -> Result<Vec<u64>, DataDirError> {
    let prefix = format!("{files}-");
    let mut bases = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io(dir))? {
        let name = entry.map_err(io(dir))?.file_name();
        if let Some(base) = name
            .to_str()
            .and_then(|n| n.strip_prefix(prefix.as_str()))
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            bases.push(base);
        }
    }
    bases.sort_unstable();
    Ok(bases)
}

pub(super) fn scan<K: Kind>(dir: &Path) -> Result<Opened<K::State>, DataDirError> {
    let mut bases = list_segments(dir, K::FILES)?;
    if bases.is_empty() {
        let path = segment_path(dir, K::FILES, 0);
        File::create(&path).map_err(io(&path))?;
        bases.push(0);
    }
    let checkpoint_file = dir.join(format!("{}.delivered", K::FILES));
    let checkpoint = std::fs::read_to_string(&checkpoint_file)
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let mut state = K::State::default();
    let mut latest = 0i64;
    let mut cut_bytes = 0u64;
    // Records at or after the checkpoint, and all records, so either can be the undelivered
    // count (with the time of the first of each).
    let (mut after_checkpoint, mut all) = (0u64, 0u64);
    let (mut first_after_checkpoint, mut first_of_all) = (0i64, 0i64);
    let mut checkpoint_on_boundary = false;
    let (mut end, mut last_snapshot_len) = (0u64, 0u64);
    for (i, &base) in bases.iter().enumerate() {
        let path = segment_path(dir, K::FILES, base);
        let bytes = read_all(&path).map_err(io(&path))?;
        let mut frames = Frames::new(&bytes);
        let mut snapshot_len = 0;
        let mut in_snapshot = true;
        while let Some((at, payload)) = frames.next() {
            let position = base + at as u64;
            checkpoint_on_boundary |= checkpoint == Some(position);
            match K::decode(payload) {
                Some(record) => {
                    latest = latest.max(K::time(&record));
                    if K::delivered(&record) {
                        in_snapshot = false;
                        if all == 0 {
                            first_of_all = K::time(&record);
                        }
                        all += 1;
                        if checkpoint.is_none_or(|c| position >= c) {
                            if after_checkpoint == 0 {
                                first_after_checkpoint = K::time(&record);
                            }
                            after_checkpoint += 1;
                        }
                    }
                    K::apply(&mut state, &record);
                }
                None => {
                    in_snapshot = false;
                    tracing::warn!(file = %path.display(), at,
                        "{} log: skipped a record this version cannot read", K::FILES);
                }
            }
            if in_snapshot {
                snapshot_len = frames.at as u64;
            }
        }
        let good = frames.at;
        checkpoint_on_boundary |= checkpoint == Some(base + good as u64);
        if matches!(frames.stop, Some(Frame::Incomplete(_) | Frame::Corrupt)) && frames.damaged() {
            let cut = bytes.len() - good;
            let what = if i + 1 == bases.len() {
                "torn or corrupt record at its end (the process or machine stopped mid-write)"
            } else {
                "corrupt record"
            };
            tracing::warn!(file = %path.display(), at = good, bytes = cut,
                "{} log: cut {cut} bytes of a {what}", K::FILES);
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
    let (start, undelivered, oldest_undelivered) = match checkpoint {
        None => (first, all, first_of_all),
        Some(c) if c > end => {
            // What was cut had been delivered: new records will be written from `end` on.
            (end, 0, 0)
        }
        Some(c) if c >= first && checkpoint_on_boundary => {
            (c, after_checkpoint, first_after_checkpoint)
        }
        Some(c) if c < first => (first, all, first_of_all),
        Some(c) => {
            tracing::warn!(
                checkpoint = c,
                "{} log: the delivered position is not on a record; delivering the whole kept log again (repeats possible)",
                K::FILES
            );
            (first, all, first_of_all)
        }
    };
    if checkpoint != Some(start) {
        write_checkpoint(dir, K::FILES, start).map_err(io(dir))?;
    }
    Ok(Opened {
        state,
        undelivered,
        cut_bytes,
        latest,
        oldest_undelivered,
        bases,
        end,
        start,
        last_snapshot_len,
    })
}

/// The deliverable records of the segments `bases` before position `limit`, oldest first.
pub(super) fn records_before<K: Kind>(
    dir: &Path,
    bases: &[u64],
    limit: u64,
) -> std::io::Result<Vec<K::Record>> {
    let mut records = Vec::new();
    for &base in bases.iter().take_while(|&&b| b < limit) {
        let mut bytes = read_all(&segment_path(dir, K::FILES, base))?;
        bytes.truncate((limit - base).min(bytes.len() as u64) as usize);
        records.extend(
            Frames::new(&bytes)
                .filter_map(|(_, payload)| K::decode(payload))
                .filter(K::delivered),
        );
    }
    Ok(records)
}

/// Deliverable records in `bytes` (a segment starting at `base`) at position `from` or later.
pub(super) fn count_from<K: Kind>(bytes: &[u8], base: u64, from: u64) -> u64 {
    Frames::new(bytes)
        .filter(|(at, _)| base + *at as u64 >= from)
        .filter(|(_, payload)| K::decode(payload).is_some_and(|r| K::delivered(&r)))
        .count() as u64
}
