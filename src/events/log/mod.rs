//! The event log: connection events kept in the durable [`Log`](crate::log::Log) in front of
//! every external store. An event counts as emitted once it is written here, and the delivery
//! task reads only from here, so a `kill -9` loses nothing emitted and the store never gets an
//! event the log does not have.
//!
//! Each record is a JSON [`EventRecord`]: an event of a session, or (heading each segment) a
//! session open when the segment began. The log's state is the set of open sessions: what a
//! start after a crash closes with `disconnect` events.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{ConnectionEvent, EventClock, EventSink, EventType};
use crate::log::{DataDir, DataDirError, Kind, Log, LogSink, LogStats, WhenFull};

pub use crate::log::{Committed, FsyncMode, LogSettings, LogTicket};

/// What the event log keeps, one record each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventRecord {
    /// An emitted event of the session keyed `session` (unique among open sessions; its
    /// `connect` and `disconnect` carry the same key).
    Event {
        session: String,
        event: ConnectionEvent,
    },
    /// A session open when this segment began: not an event, never delivered. With these at
    /// its head, a segment does not need the ones before it to tell which sessions are open.
    Open {
        session: String,
        client_id: String,
        since: i64,
    },
}

/// The sessions open in the log, by key: (client id, connect time).
pub type OpenSessions = HashMap<String, (String, i64)>;

/// The event log's [`Kind`]: it stamps `occurred_at` in log order.
pub struct Events {
    clock: EventClock,
}

impl Kind for Events {
    type Record = EventRecord;
    type State = OpenSessions;

    const FILES: &'static str = "events";
    const WHAT: &'static str = "event";
    const WHEN_FULL: WhenFull = WhenFull::DropOldest;
    const DELIVER_UNSYNCED: bool = false;
    const MAX_BATCH: usize = 512;

    fn encode(record: &EventRecord, out: &mut Vec<u8>) {
        serde_json::to_writer(out, record).expect("records always serialize");
    }

    fn decode(payload: &[u8]) -> Option<EventRecord> {
        serde_json::from_slice(payload).ok()
    }

    fn delivered(record: &EventRecord) -> bool {
        matches!(record, EventRecord::Event { .. })
    }

    fn time(record: &EventRecord) -> i64 {
        match record {
            EventRecord::Event { event, .. } => event.occurred_at,
            EventRecord::Open { since, .. } => *since,
        }
    }

    fn size(record: &EventRecord) -> usize {
        match record {
            EventRecord::Event { event, .. } => event.client_id.len() + 64,
            EventRecord::Open { client_id, .. } => client_id.len() + 64,
        }
    }

    fn apply(open: &mut OpenSessions, record: &EventRecord) {
        match record {
            EventRecord::Event { session, event } => match event.event_type {
                EventType::Connect => {
                    open.insert(
                        session.clone(),
                        (event.client_id.clone(), event.occurred_at),
                    );
                }
                EventType::Disconnect => {
                    open.remove(session);
                }
                // Inside a session: opens and closes nothing.
                EventType::Subscribe => {}
            },
            EventRecord::Open {
                session,
                client_id,
                since,
            } => {
                open.insert(session.clone(), (client_id.clone(), *since));
            }
        }
    }

    fn snapshot(open: &OpenSessions) -> Vec<EventRecord> {
        let mut open: Vec<_> = open.iter().collect();
        open.sort_by_key(|(_, (_, since))| *since);
        open.into_iter()
            .map(|(session, (client_id, since))| EventRecord::Open {
                session: session.clone(),
                client_id: client_id.clone(),
                since: *since,
            })
            .collect()
    }

    fn stamp(&self, record: &mut EventRecord) {
        if let EventRecord::Event { event, .. } = record {
            event.occurred_at = self.clock.now();
        }
    }
}

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

/// The event log; cheap to clone, shared by every session.
#[derive(Clone)]
pub struct EventLog {
    log: Log<Events>,
}

impl EventLog {
    /// Opens the log in `dir` (creating it), cuts a torn or corrupt tail (with a warning naming
    /// the bytes) and tells which sessions the previous run left open. Starts the writer
    /// thread; delivery starts with [`EventLog::deliver`].
    pub fn open(
        dir: &DataDir,
        settings: LogSettings,
    ) -> Result<(EventLog, Recovery), DataDirError> {
        let clock = EventClock::default();
        let (log, opened) = Log::open(Events { clock }, dir, settings)?;
        // Later than anything logged, so occurred_at keeps increasing across restarts.
        log.kind().clock.advance_past(opened.latest);
        let mut open_sessions: Vec<OpenSession> = opened
            .state
            .into_iter()
            .map(|(session, (client_id, since))| OpenSession {
                session,
                client_id,
                since,
            })
            .collect();
        open_sessions.sort_by(|a, b| (a.since, &a.session).cmp(&(b.since, &b.session)));
        let recovery = Recovery {
            open_sessions,
            undelivered: opened.undelivered,
            cut_bytes: opened.cut_bytes,
        };
        Ok((EventLog { log }, recovery))
    }

    /// Hands an event over for writing; never blocks on the store or the disk. Its
    /// `occurred_at` is stamped here: strictly increasing in log order, across restarts too.
    /// `session` keys the session among the open ones (same key on `connect` and `disconnect`).
    pub fn append(&self, session: String, event: ConnectionEvent) -> LogTicket {
        self.log.append(EventRecord::Event { session, event })
    }

    /// Like [`EventLog::append`] for several events at once (one group, e.g. the crash
    /// recovery's `disconnect`s); the ticket resolves once all are written.
    pub fn append_all(&self, events: Vec<(String, ConnectionEvent)>) -> LogTicket {
        self.log.append_all(
            events
                .into_iter()
                .map(|(session, event)| EventRecord::Event { session, event })
                .collect(),
        )
    }

    /// The counters shared with the metrics.
    pub fn stats(&self) -> std::sync::Arc<LogStats> {
        self.log.stats()
    }

    /// How far writes and fsyncs have got.
    pub fn committed(&self) -> Committed {
        self.log.committed()
    }

    /// The delivered position (what the store acknowledged).
    pub fn delivered(&self) -> u64 {
        self.log.delivered()
    }

    /// The events in the kept log up to its last fsync, oldest first: what a start after a
    /// power cut would find (delivered ones included while their segment is kept).
    pub fn synced_events(&self) -> std::io::Result<Vec<ConnectionEvent>> {
        Ok(self
            .log
            .synced_records()?
            .into_iter()
            .filter_map(|r| match r {
                EventRecord::Event { event, .. } => Some(event),
                EventRecord::Open { .. } => None,
            })
            .collect())
    }

    /// Waits until every event handed over before this call is delivered (or dropped), or the
    /// timeout passes. Returns whether everything was delivered.
    pub async fn flush(&self, timeout: Duration) -> bool {
        self.log.flush(timeout).await
    }

    /// Writes what was handed over, fsyncs (unless `off`) and stops the writer; later events
    /// are dropped. Returns whether the writer ended cleanly.
    pub fn close(&self) -> bool {
        self.log.close()
    }

    /// Starts the delivery task: reads the log from the delivered position and hands it to
    /// `sink` in batches, retrying each until the store acknowledges it, until `stop` is
    /// cancelled. What it has not delivered stays in the log for the next start.
    pub fn deliver(&self, sink: Box<dyn EventSink>, stop: CancellationToken) -> JoinHandle<()> {
        self.log.deliver(Box::new(StoreDelivery { sink }), stop)
    }
}

/// Hands the log's events to an event store.
struct StoreDelivery {
    sink: Box<dyn EventSink>,
}

#[async_trait]
impl LogSink<EventRecord> for StoreDelivery {
    fn name(&self) -> &'static str {
        self.sink.name()
    }

    async fn deliver(&mut self, batch: &[EventRecord]) -> Result<(), String> {
        let events: Vec<ConnectionEvent> = batch
            .iter()
            .filter_map(|r| match r {
                EventRecord::Event { event, .. } => Some(event.clone()),
                EventRecord::Open { .. } => None,
            })
            .collect();
        self.sink.publish(&events).await.map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests;
