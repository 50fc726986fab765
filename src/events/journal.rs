//! The session journal (`sessions.journal` in the data directory): an append-only record of
//! sessions opened and closed, so that after a crash (`kill -9`, power cut of the process) the
//! next start can emit the `disconnect` every open session never got. Consumers that rebuild
//! presence from `supermq.mqtt` are then never left with a phantom online client.
//!
//! It observes sessions like any hook; one short line is appended per connect and disconnect,
//! and the file is compacted (rewritten with the open sessions only) when it grows.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::data_dir::{DataDir, DataDirError};
use crate::hooks::{DisconnectReason, SessionInfo, SessionObserver};

const JOURNAL_FILE: &str = "sessions.journal";
/// Closed-session records tolerated before the file is compacted.
const COMPACT_AFTER: usize = 10_000;

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Record {
    Open { key: String, client_id: String },
    Close { key: String },
}

/// Open sessions, on disk.
#[derive(Debug)]
pub struct SessionJournal {
    state: Mutex<JournalState>,
}

#[derive(Debug)]
struct JournalState {
    path: PathBuf,
    file: File,
    open: HashMap<String, String>,
    records: usize,
}

/// A session that was open when the previous run died.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OrphanSession {
    pub client_id: String,
}

impl SessionJournal {
    /// Opens the journal and returns the sessions a previous run left open. Call
    /// [`SessionJournal::forget_orphans`] once their `disconnect`s are stored safely.
    pub fn open(dir: &DataDir) -> Result<(SessionJournal, Vec<OrphanSession>), DataDirError> {
        let path = dir.file(JOURNAL_FILE);
        let io = |e| DataDirError::io(&path, e);
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io)?;
        let mut open: HashMap<String, String> = HashMap::new();
        let mut order = Vec::new();
        for line in BufReader::new(&file).lines() {
            let line = line.map_err(io)?;
            // A torn last line (the process died mid-write) or garbage is skipped.
            match serde_json::from_str::<Record>(&line) {
                Ok(Record::Open { key, client_id }) => {
                    order.push(key.clone());
                    open.insert(key, client_id);
                }
                Ok(Record::Close { key }) => {
                    open.remove(&key);
                }
                Err(_) => {}
            }
        }
        let mut seen = std::collections::HashSet::new();
        let orphans = order
            .into_iter()
            .filter(|key| seen.insert(key.clone()))
            .filter_map(|key| open.get(&key))
            .map(|client_id| OrphanSession {
                client_id: client_id.clone(),
            })
            .collect();
        let mut state = JournalState {
            path,
            file,
            open,
            records: 0,
        };
        // Rewriting drops a torn last line, which the next record would otherwise extend.
        state
            .compact()
            .map_err(|e| DataDirError::io(&state.path, e))?;
        let journal = SessionJournal {
            state: Mutex::new(state),
        };
        Ok((journal, orphans))
    }

    /// Empties the journal of the previous run's sessions (their `disconnect`s are stored).
    pub fn forget_orphans(&self) -> Result<(), DataDirError> {
        let mut state = self.lock();
        state.open.clear();
        state
            .compact()
            .map_err(|e| DataDirError::io(&state.path, e))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, JournalState> {
        // A panic while holding the lock leaves consistent state (one line appended or not).
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn key(session: &SessionInfo) -> String {
        format!("{} {}", session.peer, session.mqtt_client_id)
    }

    fn append(&self, record: Record) {
        let mut state = self.lock();
        match &record {
            Record::Open { key, client_id } => {
                state.open.insert(key.clone(), client_id.clone());
            }
            Record::Close { key } => {
                state.open.remove(key);
            }
        }
        state.records += 1;
        let result = if state.records > state.open.len() * 2 + COMPACT_AFTER {
            state.compact()
        } else {
            let mut line = serde_json::to_vec(&record).expect("records always serialize");
            line.push(b'\n');
            // One write per record, so a crash leaves at most the last line torn.
            state.file.write_all(&line)
        };
        if let Err(e) = result {
            tracing::warn!(path = %state.path.display(), error = %e,
                "cannot write the session journal; a crash now could leave sessions without a disconnect event");
        }
    }
}

impl JournalState {
    /// Rewrites the file with the open sessions only, through a renamed temporary file.
    fn compact(&mut self) -> std::io::Result<()> {
        let mut text = Vec::new();
        for (key, client_id) in &self.open {
            let record = Record::Open {
                key: key.clone(),
                client_id: client_id.clone(),
            };
            text.extend(serde_json::to_vec(&record).expect("records always serialize"));
            text.push(b'\n');
        }
        let tmp = self.path.with_extension("journal.tmp");
        std::fs::write(&tmp, &text)?;
        std::fs::rename(&tmp, &self.path)?;
        self.file = OpenOptions::new().append(true).open(&self.path)?;
        self.records = self.open.len();
        Ok(())
    }
}

impl SessionObserver for SessionJournal {
    fn on_connected(&self, session: &SessionInfo) {
        self.append(Record::Open {
            key: Self::key(session),
            client_id: session.identity.client_id.clone(),
        });
    }

    fn on_disconnected(&self, session: &SessionInfo, _reason: DisconnectReason) {
        self.append(Record::Close {
            key: Self::key(session),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Identity;
    use crate::session::codec::ProtocolVersion;

    fn session(client: &str, port: u16) -> SessionInfo {
        SessionInfo {
            identity: Identity {
                client_id: client.into(),
                anonymous: false,
            },
            mqtt_client_id: format!("{client}-dev"),
            version: ProtocolVersion::V311,
            peer: ([127, 0, 0, 1], port).into(),
        }
    }

    #[test]
    fn sessions_open_at_a_crash_are_reported_once() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = DataDir::open(dir.path()).expect("data dir");
        let (journal, orphans) = SessionJournal::open(&data).expect("open");
        assert!(orphans.is_empty());
        let (a, b, c) = (session("a", 1), session("b", 2), session("c", 3));
        journal.on_connected(&a);
        journal.on_connected(&b);
        journal.on_connected(&c);
        journal.on_disconnected(&b, DisconnectReason::ClientDisconnect);
        // A torn record, as a crash mid-write leaves it.
        {
            let mut state = journal.lock();
            state
                .file
                .write_all(br#"{"open":{"key":"x"#)
                .expect("torn write");
        }
        drop(journal);

        let (journal, orphans) = SessionJournal::open(&data).expect("reopen");
        let ids: Vec<&str> = orphans.iter().map(|o| o.client_id.as_str()).collect();
        assert_eq!(ids, ["a", "c"]);
        // Records written after the torn line are still read.
        let d = session("d", 4);
        journal.on_connected(&d);
        drop(journal);
        let (journal, orphans) = SessionJournal::open(&data).expect("reopen");
        let mut ids: Vec<&str> = orphans.iter().map(|o| o.client_id.as_str()).collect();
        ids.sort_unstable();
        assert_eq!(ids, ["a", "c", "d"]);
        journal.forget_orphans().expect("forget");
        drop(journal);
        let (_journal, orphans) = SessionJournal::open(&data).expect("reopen again");
        assert!(orphans.is_empty(), "{orphans:?}");
    }
}
