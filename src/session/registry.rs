//! Live sessions by MQTT client identifier, so a second CONNECT with the same identifier takes
//! the first session over: the old session is told to end and has emitted its `disconnect`
//! before the new one is accepted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

struct Entry {
    id: u64,
    takeover: CancellationToken,
    done: watch::Receiver<()>,
}

#[derive(Default)]
pub struct SessionRegistry {
    sessions: Mutex<HashMap<String, Entry>>,
    next_id: AtomicU64,
}

/// A session's place in the registry; the session holds it until it has fully ended.
pub struct Registration {
    pub id: u64,
    /// Cancelled when another session takes this client identifier over.
    pub takeover: CancellationToken,
    /// Dropped when the session has ended, which wakes the session taking over.
    _done: watch::Sender<()>,
}

const TAKEOVER_WAIT: Duration = Duration::from_secs(10);

impl SessionRegistry {
    /// Registers a session for `client_id`, first ending any session holding it. The session's
    /// takeover token is a child of `shutdown`, so one signal ends every session.
    pub async fn register(&self, client_id: &str, shutdown: &CancellationToken) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        loop {
            let (old_id, mut previous) = {
                let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
                match sessions.get(client_id) {
                    Some(old) => {
                        old.takeover.cancel();
                        (old.id, old.done.clone())
                    }
                    None => return insert(&mut sessions, client_id, id, shutdown),
                }
            };
            // `changed` errors once the old session drops its Registration.
            if tokio::time::timeout(TAKEOVER_WAIT, previous.changed())
                .await
                .is_err()
            {
                tracing::error!(
                    client_id,
                    "previous session did not end in time; replacing it"
                );
            }
            // Normally the old session has unregistered itself; never wait on it twice.
            self.unregister(client_id, old_id);
        }
    }

    /// Registers `client_id` only if no session holds it.
    pub fn try_register(
        &self,
        client_id: &str,
        shutdown: &CancellationToken,
    ) -> Option<Registration> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if sessions.contains_key(client_id) {
            return None;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        Some(insert(&mut sessions, client_id, id, shutdown))
    }

    /// Removes the entry if it still belongs to session `id`.
    pub fn unregister(&self, client_id: &str, id: u64) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if sessions.get(client_id).is_some_and(|e| e.id == id) {
            sessions.remove(client_id);
        }
    }
}

fn insert(
    sessions: &mut HashMap<String, Entry>,
    client_id: &str,
    id: u64,
    shutdown: &CancellationToken,
) -> Registration {
    let takeover = shutdown.child_token();
    let (done_tx, done_rx) = watch::channel(());
    sessions.insert(
        client_id.to_owned(),
        Entry {
            id,
            takeover: takeover.clone(),
            done: done_rx,
        },
    );
    Registration {
        id,
        takeover,
        _done: done_tx,
    }
}
