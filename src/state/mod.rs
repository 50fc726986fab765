//! MQTT state that outlives a process (`SMQ_MQTT_ADAPTER_STATE`): one [`StateStore`] trait, one
//! implementation per place the state can live, the way the event sinks are built.
//!
//! - `memory.rs`: keeps nothing (a restart forgets everything, as before this module);
//! - `local.rs`: on disk in the data directory (`<data_dir>/state/`), in a redb database written
//!   by one thread with group commit;
//! - `nats.rs`: a JetStream key-value bucket shared by every instance, watched into memory
//!   (retained messages only so far);
//! - `record.rs`: how a retained message is written; `session.rs`: how a persistent session is.
//!
//! What is kept: retained messages and persistent sessions. The broker core writes each
//! retained change through the store while it holds its retained lock (so the store sees
//! changes in the order memory did) and a PUBACK waits for the change's [`StateTicket`]. A
//! persistent session is written on CONNECT, SUBSCRIBE, UNSUBSCRIBE, when its connection ends
//! and at checkpoints; a QoS 1/2 delivery to an offline session is appended before the
//! publisher's PUBACK. At start-up both are loaded before the listeners accept.

mod local;
mod memory;
pub mod nats;
mod record;
pub(crate) use record::unix_ms_now;
mod session;

use std::path::PathBuf;
use std::sync::{Arc, Weak};

use tokio::sync::watch;

use crate::broker::{Broker, Delivery, Kept, Message, SessionKey};
pub use local::LocalState;
pub use memory::MemoryState;
pub use nats::{NatsSettings, NatsState};
pub use session::{KeptWill, LoadedSession, SessionRecord, WillDue};

/// Where MQTT state lives (`SMQ_MQTT_ADAPTER_STATE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum StateBackend {
    /// On disk under SMQ_MQTT_ADAPTER_DATA_DIR (`state/`): survives restarts and `kill -9`.
    Local,
    /// JetStream key-value buckets shared by every instance (SMQ_MQTT_ADAPTER_STATE_URL, else
    /// SMQ_MESSAGE_BROKER_URL).
    Nats,
    /// In memory only: a restart forgets retained messages.
    Memory,
}

/// State that cannot be opened or read; the message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("cannot use the state store {path}: {reason}; point SMQ_MQTT_ADAPTER_DATA_DIR at a writable directory, or move the file away to start empty")]
    Local { path: PathBuf, reason: String },
    /// The `nats` backend cannot start; the message names the setting to change.
    #[error("{0}")]
    Nats(String),
}

/// The MQTT state that outlives a process. Writes never block: they are handed over, and the
/// returned ticket resolves once they are kept.
pub trait StateStore: Send + Sync + 'static {
    /// The backend's name for logs (`memory`, `local`).
    fn name(&self) -> &'static str;

    /// Every retained message kept, except those whose MQTT 5 message expiry passed (those are
    /// removed). Called once, at start-up.
    fn load_retained(&self) -> Result<Vec<Arc<Message>>, StateError>;

    /// Keeps `message` as its topic's retained message (replacing any).
    fn put_retained(&self, message: &Arc<Message>) -> StateTicket;

    /// Removes the retained message of `topic`, if any.
    fn clear_retained(&self, topic: &str) -> StateTicket;

    /// Whether persistent sessions are kept (the broker skips the session writes otherwise).
    fn keeps_sessions(&self) -> bool {
        false
    }

    /// Every persistent session kept, with its deliveries. Called once, at start-up.
    fn load_sessions(&self) -> Result<Vec<LoadedSession>, StateError> {
        Ok(Vec::new())
    }

    /// Keeps the session record; with `deliveries`, replaces the session's kept deliveries with
    /// them (positions 0 onwards; the session appends from `deliveries.len()`).
    fn put_session(&self, _record: SessionRecord, _deliveries: Option<Vec<Kept>>) -> StateTicket {
        StateTicket::done()
    }

    /// Appends a delivery to an offline session's kept deliveries, at `position`.
    fn append_delivery(
        &self,
        _key: &SessionKey,
        _position: u64,
        _delivery: &Delivery,
    ) -> StateTicket {
        StateTicket::done()
    }

    /// Removes the session and its deliveries.
    fn remove_session(&self, _key: &SessionKey) -> StateTicket {
        StateTicket::done()
    }

    /// Writes what was handed over and stops; later writes are not kept.
    fn close(&self);

    /// Writes that failed so far (their changes are in memory only).
    fn failed_writes(&self) -> u64 {
        0
    }

    /// Starts applying changes other instances make to the shared store into `broker`'s
    /// retained messages (after [`Broker::restore_retained`]); nothing for a store of one
    /// instance.
    fn follow(&self, _broker: Weak<Broker>) {}
}

/// Resolves once a write handed to a [`StateStore`] is kept (committed, and on disk for
/// `local`).
#[derive(Debug, Clone)]
pub struct StateTicket {
    /// `None`: nothing to wait for.
    wait: Option<(watch::Receiver<u64>, u64)>,
}

impl StateTicket {
    /// A ticket with nothing to wait for.
    pub fn done() -> Self {
        StateTicket { wait: None }
    }

    /// A ticket that resolves once `committed` reaches `ticket`.
    fn on(committed: watch::Receiver<u64>, ticket: u64) -> Self {
        StateTicket {
            wait: Some((committed, ticket)),
        }
    }

    /// Whether the write is kept already (never waits).
    pub fn is_done(&self) -> bool {
        match &self.wait {
            None => true,
            Some((committed, ticket)) => *committed.borrow() >= *ticket,
        }
    }

    /// Whichever of two tickets of one store resolves later (tickets of one store resolve in
    /// the order they were handed out).
    pub fn later(self, other: StateTicket) -> StateTicket {
        match (&self.wait, &other.wait) {
            (None, _) => other,
            (_, None) => self,
            (Some((_, a)), Some((_, b))) => {
                if b > a {
                    other
                } else {
                    self
                }
            }
        }
    }

    /// A future that resolves with the ticket, owning what it needs.
    pub fn waiter(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.clone().wait()
    }

    pub async fn wait(self) {
        let Some((mut committed, ticket)) = self.wait else {
            return;
        };
        // The writer resolves every ticket it was handed, also when it closes; a closed channel
        // (the store dropped) has nothing more to wait for.
        let _ = committed.wait_for(|&c| c >= ticket).await;
    }
}

/// Opens the state store `backend` names; `local` in `data_dir/state/`. `nats` connects, so it
/// is opened with the async [`NatsState::open`].
pub fn open(
    backend: StateBackend,
    data_dir: Option<&crate::log::DataDir>,
) -> Result<Arc<dyn StateStore>, StateError> {
    match (backend, data_dir) {
        (StateBackend::Memory, _) => Ok(Arc::new(MemoryState)),
        (StateBackend::Nats, _) => Err(StateError::Nats(
            "`nats` is opened with NatsState::open".to_owned(),
        )),
        (StateBackend::Local, Some(dir)) => Ok(Arc::new(LocalState::open(&dir.file("state"))?)),
        (StateBackend::Local, None) => Err(StateError::Local {
            path: PathBuf::from("state"),
            reason: "no data directory".to_owned(),
        }),
    }
}
