//! The events side of the server, assembled and shut down in one place: with an external store,
//! the data directory, the durable [`EventLog`] (and the crash recovery it makes possible) and
//! its delivery task; with stdout, the memory [`Outbox`].

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::store::{event_sink, is_external};
use super::{
    ConnectionEvent, DataDir, DataDirError, EventDetails, EventLayout, EventLog, EventQueue,
    EventType, LogSettings, Outbox, OutboxStats, Recovery, StoreUrlError,
};
use crate::hooks::{ConnectionEvents, DisconnectReason};

/// What the pipeline is built from (the event settings of the configuration).
#[derive(Debug, Clone)]
pub struct EventSettings<'a> {
    pub es_url: Option<&'a str>,
    /// The data directory, already open (and locked) when the bus bridge shares it.
    pub data_dir: Option<Arc<DataDir>>,
    /// Where to open it otherwise.
    pub data_dir_path: &'a Path,
    /// Memory queue (stdout) or log intake (stores), in events.
    pub buffer: usize,
    pub log: LogSettings,
    pub instance: &'a str,
    pub details: bool,
    /// How the sinks write events.
    pub layout: EventLayout,
}

/// A configuration the events cannot start with.
#[derive(Debug, thiserror::Error)]
pub enum EventStartError {
    #[error("SMQ_ES_URL: {0}")]
    Store(#[from] StoreUrlError),
    #[error("SMQ_MQTT_ADAPTER_DATA_DIR: {0}")]
    DataDir(#[from] DataDirError),
}

/// The running events pipeline.
pub struct EventPipeline {
    /// The sink's name (`redis`, `nats`, `amqp`, `stdout`).
    pub store: &'static str,
    inner: Inner,
}

enum Inner {
    Log {
        log: EventLog,
        delivery: JoinHandle<()>,
        stop: CancellationToken,
        /// Holds the directory's lock while the adapter runs.
        _data_dir: Arc<DataDir>,
    },
    Memory {
        outbox: Outbox,
        _task: JoinHandle<()>,
    },
}

impl EventPipeline {
    /// Starts the pipeline. With a store, the sessions a crashed previous run left open get
    /// their `disconnect` in the log before this returns, so before any listener accepts.
    pub async fn start(settings: &EventSettings<'_>) -> Result<EventPipeline, EventStartError> {
        let sink = event_sink(settings.es_url, settings.layout)?;
        let store = sink.name();
        if !is_external(settings.es_url) {
            let (outbox, task) = Outbox::start(sink, settings.buffer);
            return Ok(EventPipeline {
                store,
                inner: Inner::Memory {
                    outbox,
                    _task: task,
                },
            });
        }
        let started = Instant::now();
        let data_dir = match &settings.data_dir {
            Some(dir) => dir.clone(),
            None => Arc::new(DataDir::open(settings.data_dir_path)?),
        };
        let mut log_settings = settings.log.clone();
        log_settings.max_pending = settings.buffer;
        warn_about_older_files(&data_dir);
        let (log, recovery) = EventLog::open(&data_dir, log_settings)?;
        close_crashed_sessions(&log, &recovery, settings).await;
        tracing::info!(
            took_ms = started.elapsed().as_millis() as u64,
            undelivered = recovery.undelivered,
            sessions_closed = recovery.open_sessions.len(),
            fsync = ?settings.log.fsync,
            "event log ready"
        );
        let stop = CancellationToken::new();
        let delivery = log.deliver(sink, stop.clone());
        Ok(EventPipeline {
            store,
            inner: Inner::Log {
                log,
                delivery,
                stop,
                _data_dir: data_dir,
            },
        })
    }

    /// Where sessions hand their events.
    pub fn queue(&self) -> EventQueue {
        match &self.inner {
            Inner::Log { log, .. } => EventQueue::Log(log.clone()),
            Inner::Memory { outbox, .. } => EventQueue::memory(outbox.clone()),
        }
    }

    pub fn stats(&self) -> Arc<OutboxStats> {
        match &self.inner {
            Inner::Log { log, .. } => log.stats(),
            Inner::Memory { outbox, .. } => outbox.stats(),
        }
    }

    /// The durable log, when events go to a store.
    pub fn log(&self) -> Option<&EventLog> {
        match &self.inner {
            Inner::Log { log, .. } => Some(log),
            Inner::Memory { .. } => None,
        }
    }

    /// Delivers what is pending within `timeout`, then stops. With a store, what the store did
    /// not take stays in the log for the next start. Returns whether nothing was lost.
    pub async fn shutdown(self, timeout: Duration) -> bool {
        match self.inner {
            Inner::Memory { outbox, .. } => {
                let flushed = outbox.flush(timeout).await;
                if !flushed {
                    tracing::warn!("events still pending at the shutdown deadline");
                }
                flushed
            }
            Inner::Log {
                log,
                delivery,
                stop,
                _data_dir,
            } => {
                let flushed = log.flush(timeout).await;
                stop.cancel();
                let _ = delivery.await;
                let writer = log.clone();
                let closed = tokio::task::spawn_blocking(move || writer.close())
                    .await
                    .unwrap_or(false);
                let stats = log.stats();
                let pending = stats.pending.load(std::sync::atomic::Ordering::Relaxed);
                if !flushed && closed {
                    tracing::info!(
                        events = pending,
                        "event store unreachable: undelivered events stay in the event log for the next start"
                    );
                } else if !closed {
                    tracing::warn!(
                        "the event log writer did not finish: recent events may be lost"
                    );
                }
                closed
            }
        }
    }
}

/// Versions before the event log kept a spool and a session journal; this one does not read
/// them, so say so instead of ignoring what they may hold.
fn warn_about_older_files(data_dir: &DataDir) {
    for name in ["events.spool", "sessions.journal"] {
        let path = data_dir.file(name);
        if std::fs::metadata(&path).is_ok_and(|m| m.len() > 0) {
            tracing::warn!(file = %path.display(),
                "left by an older version and not read by this one: events still in it are not delivered, sessions in it are not closed; delete it once checked");
        }
    }
}

/// Every session the previous run left open (it was killed or crashed) gets its `disconnect`,
/// written to the log before the listeners open.
async fn close_crashed_sessions(log: &EventLog, recovery: &Recovery, settings: &EventSettings<'_>) {
    if recovery.open_sessions.is_empty() {
        return;
    }
    let details = EventDetails {
        reason: settings
            .details
            .then(|| DisconnectReason::CrashRecovery.as_str().to_owned()),
        ..EventDetails::default()
    };
    // In steps, so the writer's intake limit is never reached.
    for chunk in recovery.open_sessions.chunks(10_000) {
        let events = chunk
            .iter()
            .map(|open| {
                let mut details = details.clone();
                if settings.layout == EventLayout::Supermq {
                    // Its `subscriber_id`: the MQTT client identifier, kept in the session key.
                    details.mqtt_client_id =
                        ConnectionEvents::mqtt_client_id_of(&open.session).map(str::to_owned);
                }
                let event = ConnectionEvent {
                    client_id: open.client_id.clone(),
                    event_type: EventType::Disconnect,
                    instance: settings.instance.to_owned(),
                    occurred_at: 0,
                    details,
                };
                (open.session.clone(), event)
            })
            .collect();
        log.append_all(events).wait().await;
    }
    tracing::warn!(
        sessions = recovery.open_sessions.len(),
        "the previous run ended without closing its sessions (crash or kill): their disconnect events are in the event log"
    );
}
