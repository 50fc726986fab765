//! The `local` state backend: a redb database (`<data_dir>/state/state.redb`): table `retained`
//! keyed by topic, `sessions` keyed by session key and `deliveries` keyed by (session key,
//! position) (formats in `record.rs` and `session.rs`). Changes are handed to one writer thread, which commits everything handed over
//! since its last commit in one transaction (group commit) with immediate durability (fsynced),
//! then resolves the tickets: a PUBACK that waits for its ticket survives a `kill -9` and a
//! power loss. The data directory's lock keeps a second process away.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::watch;

use super::record::{self, Decoded};
use super::session::{self as kept, LoadedSession, SessionRecord};
use super::{StateError, StateStore, StateTicket};
use crate::broker::{Delivery, Kept, Message, SessionKey};

const RETAINED: TableDefinition<&str, &[u8]> = TableDefinition::new("retained");
const SESSIONS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("sessions");
const DELIVERIES: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("deliveries");
const FILE: &str = "state.redb";

/// One change handed to the writer.
enum Change {
    Put(Arc<Message>),
    Clear(Box<str>),
    Session(Box<SessionRecord>, Option<Vec<Kept>>),
    Append(SessionKey, u64, Delivery),
    Remove(SessionKey),
}

struct Intake {
    changes: Vec<Change>,
    /// The last ticket handed out.
    tickets: u64,
    closed: bool,
}

struct Shared {
    db: Database,
    path: PathBuf,
    intake: Mutex<Intake>,
    wake: Condvar,
    /// The last ticket committed.
    committed: watch::Sender<u64>,
    /// Commits that failed (their changes are in memory only).
    failed: AtomicU64,
}

pub struct LocalState {
    shared: Arc<Shared>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn lock(m: &Mutex<Intake>) -> MutexGuard<'_, Intake> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl LocalState {
    /// Opens (creating) the database in `dir` and starts its writer thread.
    pub fn open(dir: &Path) -> Result<LocalState, StateError> {
        let path = dir.join(FILE);
        let fail = |reason: String| StateError::Local {
            path: path.clone(),
            reason,
        };
        std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
        let db = Database::create(&path).map_err(|e| fail(e.to_string()))?;
        // The table exists from the start, so a read never meets a missing one.
        let txn = db.begin_write().map_err(|e| fail(e.to_string()))?;
        txn.open_table(RETAINED).map_err(|e| fail(e.to_string()))?;
        txn.open_table(SESSIONS).map_err(|e| fail(e.to_string()))?;
        txn.open_table(DELIVERIES)
            .map_err(|e| fail(e.to_string()))?;
        txn.commit().map_err(|e| fail(e.to_string()))?;
        let shared = Arc::new(Shared {
            db,
            path: path.clone(),
            intake: Mutex::new(Intake {
                changes: Vec::new(),
                tickets: 0,
                closed: false,
            }),
            wake: Condvar::new(),
            committed: watch::channel(0).0,
            failed: AtomicU64::new(0),
        });
        let thread_shared = shared.clone();
        let writer = std::thread::Builder::new()
            .name("state-writer".into())
            .spawn(move || write_loop(&thread_shared))
            .map_err(|e| fail(e.to_string()))?;
        Ok(LocalState {
            shared,
            writer: Mutex::new(Some(writer)),
        })
    }

    fn hand_over(&self, change: Change) -> StateTicket {
        let shared = &self.shared;
        let mut intake = lock(&shared.intake);
        if intake.closed {
            return StateTicket::done();
        }
        intake.changes.push(change);
        intake.tickets += 1;
        let ticket = intake.tickets;
        drop(intake);
        shared.wake.notify_one();
        StateTicket::on(shared.committed.subscribe(), ticket)
    }
}

impl StateStore for LocalState {
    fn name(&self) -> &'static str {
        "local"
    }

    fn load_retained(&self) -> Result<Vec<Arc<Message>>, StateError> {
        let shared = &self.shared;
        let fail = |reason: String| StateError::Local {
            path: shared.path.clone(),
            reason,
        };
        let (now, now_ms) = (Instant::now(), record::unix_ms_now());
        let mut found = Vec::new();
        let mut gone: Vec<String> = Vec::new();
        {
            let txn = shared.db.begin_read().map_err(|e| fail(e.to_string()))?;
            let table = txn.open_table(RETAINED).map_err(|e| fail(e.to_string()))?;
            for entry in table.iter().map_err(|e| fail(e.to_string()))? {
                let (key, value) = entry.map_err(|e| fail(e.to_string()))?;
                let topic = key.value();
                match record::decode(topic, value.value(), now, now_ms) {
                    Some(Decoded::Message(m)) => found.push(m),
                    Some(Decoded::Expired) => gone.push(topic.to_owned()),
                    None => {
                        tracing::warn!(topic, file = %shared.path.display(),
                            "retained message not readable by this version: skipped (left in place)");
                    }
                }
            }
        }
        if !gone.is_empty() {
            tracing::info!(
                expired = gone.len(),
                "retained messages whose message expiry passed while stopped: removed"
            );
            for topic in gone {
                drop(self.hand_over(Change::Clear(topic.into())));
            }
        }
        Ok(found)
    }

    fn put_retained(&self, message: &Arc<Message>) -> StateTicket {
        self.hand_over(Change::Put(message.clone()))
    }

    fn clear_retained(&self, topic: &str) -> StateTicket {
        self.hand_over(Change::Clear(topic.into()))
    }

    fn keeps_sessions(&self) -> bool {
        true
    }

    fn load_sessions(&self) -> Result<Vec<LoadedSession>, StateError> {
        let shared = &self.shared;
        let fail = |reason: String| StateError::Local {
            path: shared.path.clone(),
            reason,
        };
        let (now, now_ms) = (Instant::now(), record::unix_ms_now());
        let txn = shared.db.begin_read().map_err(|e| fail(e.to_string()))?;
        let sessions = txn.open_table(SESSIONS).map_err(|e| fail(e.to_string()))?;
        let deliveries = txn
            .open_table(DELIVERIES)
            .map_err(|e| fail(e.to_string()))?;
        let mut found = Vec::new();
        for entry in sessions.iter().map_err(|e| fail(e.to_string()))? {
            let (k, v) = entry.map_err(|e| fail(e.to_string()))?;
            let record = kept::decode_key(k.value())
                .and_then(|key| kept::decode_record(key, v.value(), now, now_ms));
            let Some(record) = record else {
                tracing::warn!(file = %shared.path.display(),
                    "persistent session not readable by this version: skipped (left in place)");
                continue;
            };
            let mut kept_deliveries = Vec::new();
            let range = deliveries
                .range((k.value(), 0)..=(k.value(), u64::MAX))
                .map_err(|e| fail(e.to_string()))?;
            for entry in range {
                let (_, v) = entry.map_err(|e| fail(e.to_string()))?;
                match kept::decode_delivery(v.value(), now, now_ms) {
                    Some(Some(d)) => kept_deliveries.push(d),
                    Some(None) => {}
                    None => tracing::warn!(file = %shared.path.display(),
                        "kept delivery not readable by this version: skipped"),
                }
            }
            found.push(LoadedSession {
                record,
                deliveries: kept_deliveries,
            });
        }
        Ok(found)
    }

    fn put_session(&self, record: SessionRecord, deliveries: Option<Vec<Kept>>) -> StateTicket {
        self.hand_over(Change::Session(Box::new(record), deliveries))
    }

    fn append_delivery(&self, key: &SessionKey, position: u64, delivery: &Delivery) -> StateTicket {
        self.hand_over(Change::Append(key.clone(), position, delivery.clone()))
    }

    fn remove_session(&self, key: &SessionKey) -> StateTicket {
        self.hand_over(Change::Remove(key.clone()))
    }

    fn failed_writes(&self) -> u64 {
        self.shared.failed.load(Ordering::Relaxed)
    }

    fn close(&self) {
        lock(&self.shared.intake).closed = true;
        self.shared.wake.notify_one();
        let handle = self.writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(handle) = handle {
            if handle.join().is_err() {
                tracing::error!("state writer thread panicked");
            }
        }
    }
}

impl Drop for LocalState {
    fn drop(&mut self) {
        self.close();
    }
}

/// The writer thread: commits what was handed over, a group at a time, until closed and
/// drained.
fn write_loop(shared: &Shared) {
    let mut value = Vec::new();
    loop {
        let (changes, last) = {
            let mut intake = lock(&shared.intake);
            while intake.changes.is_empty() && !intake.closed {
                intake = shared.wake.wait(intake).unwrap_or_else(|p| p.into_inner());
            }
            if intake.changes.is_empty() {
                return;
            }
            (std::mem::take(&mut intake.changes), intake.tickets)
        };
        if let Err(e) = commit(shared, &changes, &mut value) {
            let n = shared.failed.fetch_add(1, Ordering::Relaxed) + 1;
            tracing::error!(error = %e, file = %shared.path.display(), changes = changes.len(), failed = n,
                "state store write failed: these changes (retained messages, sessions) are kept in memory only");
        }
        // Resolved also after a failure: the acknowledgement is not held forever.
        shared.committed.send_replace(last);
    }
}

fn commit(shared: &Shared, changes: &[Change], value: &mut Vec<u8>) -> Result<(), redb::Error> {
    let mut txn = shared.db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    {
        let mut table = txn.open_table(RETAINED)?;
        let mut sessions = txn.open_table(SESSIONS)?;
        let mut deliveries = txn.open_table(DELIVERIES)?;
        let (now, now_ms) = (Instant::now(), record::unix_ms_now());
        let mut key = Vec::new();
        for change in changes {
            match change {
                Change::Put(message) => {
                    record::encode(message, now, now_ms, value);
                    table.insert(message.topic_str(), value.as_slice())?;
                }
                Change::Clear(topic) => {
                    table.remove(&**topic)?;
                }
                Change::Session(record, replace) => {
                    kept::encode_key(&record.key, &mut key);
                    kept::encode_record(record, now, now_ms, value);
                    sessions.insert(key.as_slice(), value.as_slice())?;
                    if let Some(replace) = replace {
                        deliveries.retain_in(
                            (key.as_slice(), 0)..=(key.as_slice(), u64::MAX),
                            |_, _| false,
                        )?;
                        for (position, d) in (0u64..).zip(replace) {
                            kept::encode_delivery(d, now, now_ms, value);
                            deliveries.insert((key.as_slice(), position), value.as_slice())?;
                        }
                    }
                }
                Change::Append(session, position, delivery) => {
                    kept::encode_key(session, &mut key);
                    kept::encode_delivery(&Kept::Queued(delivery.clone()), now, now_ms, value);
                    deliveries.insert((key.as_slice(), *position), value.as_slice())?;
                }
                Change::Remove(session) => {
                    kept::encode_key(session, &mut key);
                    sessions.remove(key.as_slice())?;
                    deliveries
                        .retain_in((key.as_slice(), 0)..=(key.as_slice(), u64::MAX), |_, _| {
                            false
                        })?;
                }
            }
        }
    }
    txn.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::Origin;

    fn retained(topic: &'static str, payload: &'static str) -> Arc<Message> {
        Message::new(topic.into(), payload.into(), 1, true, Origin::Bus)
    }

    fn topics(state: &LocalState) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = state
            .load_retained()
            .expect("load")
            .iter()
            .map(|m| {
                (
                    m.topic_str().to_owned(),
                    String::from_utf8_lossy(&m.payload).into_owned(),
                )
            })
            .collect();
        out.sort_unstable();
        out
    }

    #[tokio::test]
    async fn changes_are_kept_in_order_across_a_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = LocalState::open(dir.path()).expect("open");
        state.put_retained(&retained("a", "1"));
        state.put_retained(&retained("b", "1"));
        state.put_retained(&retained("a", "2"));
        state.clear_retained("b");
        state.put_retained(&retained("c", "1")).wait().await;
        assert_eq!(
            topics(&state),
            [("a".into(), "2".into()), ("c".into(), "1".into())]
        );
        state.clear_retained("never-held").wait().await;
        drop(state);
        let again = LocalState::open(dir.path()).expect("reopen");
        assert_eq!(
            topics(&again),
            [("a".into(), "2".into()), ("c".into(), "1".into())]
        );
        assert_eq!(again.failed_writes(), 0);
    }

    #[tokio::test]
    async fn a_ticket_resolves_once_its_change_is_committed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let state = LocalState::open(dir.path()).expect("open");
        let ticket = state.put_retained(&retained("t", "v"));
        ticket.waiter().await;
        assert!(ticket.is_done());
        state.close();
        assert!(
            state.put_retained(&retained("u", "v")).is_done(),
            "after close: nothing to wait for"
        );
    }
}
