//! Assembles the adapter from its configuration (auth backend, event sink, router, listeners)
//! and shuts it down in order: stop accepting, end every session, flush events.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::static_registry::RegistryError;
use crate::auth::StaticRegistry;
use crate::broker::{Broker, BrokerConfig};
use crate::config::{AuthBackend, Config};
use crate::events::store::is_external;
use crate::events::{
    event_sink, ConnectionEvent, DataDir, DataDirError, EventClock, EventDetails, EventType,
    Outbox, SessionJournal, Spool, StoreUrlError,
};
use crate::hooks::{ConnectionEvents, DisconnectReason, Hooks};
use crate::listener;
use crate::session::registry::SessionRegistry;
use crate::session::SessionContext;

/// A configuration the adapter cannot start with; the message names what to change.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("SMQ_MQTT_ADAPTER_CLIENTS_FILE: {0}")]
    Registry(#[from] RegistryError),
    #[error("{var}: cannot listen on {addr}: {source}")]
    Bind {
        var: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("SMQ_ES_URL: {0}")]
    EventStore(#[from] StoreUrlError),
    #[error("SMQ_MQTT_ADAPTER_DATA_DIR: {0}")]
    DataDir(#[from] DataDirError),
    #[error("SMQ_MQTT_ADAPTER_AUTH: {0}")]
    Auth(String),
}

/// A running adapter.
pub struct Server {
    ctx: Arc<SessionContext>,
    mqtt_addr: SocketAddr,
    sessions: TaskTracker,
    accept_tasks: Vec<JoinHandle<()>>,
    outbox: Outbox,
    outbox_task: JoinHandle<()>,
    shutdown_timeout: Duration,
    demo_registry: bool,
    /// Holds the data directory's lock while the adapter runs (external event stores only).
    _data_dir: Option<DataDir>,
}

impl Server {
    /// Binds the listeners and starts serving.
    pub async fn start(config: &Config) -> Result<Server, StartError> {
        let (registry, demo_registry) = match (&config.auth, &config.clients_file) {
            (AuthBackend::Static, Some(path)) => (StaticRegistry::from_file(path)?, false),
            (AuthBackend::Static, None) => (StaticRegistry::demo(), true),
            (AuthBackend::Supermq, _) => {
                return Err(StartError::Auth(
                    "the supermq backend is not available in this build; use static".into(),
                ))
            }
        };
        let registry = Arc::new(registry);

        let sink = event_sink(config.es_url.as_deref())?;
        let buffer = config.event_buffer as usize;
        // An external store gets the disk spool and the session journal; stdout has no one to
        // redeliver to after a restart, so it keeps events in memory only.
        let (outbox, outbox_task, journal, data_dir) = if is_external(config.es_url.as_deref()) {
            let data_dir = DataDir::open(&config.data_dir)?;
            let mut spool = Spool::open(&data_dir, config.event_spool_size)?;
            let journal = recover_sessions(&data_dir, &mut spool, config)?;
            let (outbox, task) = Outbox::start_with_spool(sink, buffer, spool);
            (outbox, task, Some(journal), Some(data_dir))
        } else {
            let (outbox, task) = Outbox::start(sink, buffer);
            (outbox, task, None, None)
        };
        let mut hooks = Hooks::new(registry.clone(), registry);
        // The journal observes first: once a `connect` is in the store, its session is on disk.
        if let Some(journal) = journal {
            hooks = hooks.with_observer(Arc::new(journal));
        }
        hooks = hooks.with_observer(Arc::new(
            ConnectionEvents::new(outbox.clone(), config.instance.clone())
                .with_details(config.event_details),
        ));

        let addr = SocketAddr::new(config.host, config.mqtt_port);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind {
                var: "SMQ_MQTT_ADAPTER_MQTT_PORT",
                addr,
                source,
            })?;
        let mqtt_addr = listener.local_addr().map_err(|source| StartError::Bind {
            var: "SMQ_MQTT_ADAPTER_MQTT_PORT",
            addr,
            source,
        })?;

        let ctx = Arc::new(SessionContext {
            broker: Broker::start(&BrokerConfig::default()),
            hooks,
            registry: SessionRegistry::default(),
            connect_timeout: config.connect_timeout(),
            max_packet_size: config.max_packet_size as usize,
            shutdown: CancellationToken::new(),
        });
        let sessions = TaskTracker::new();
        let accept_tasks = vec![tokio::spawn(listener::serve_tcp(
            listener,
            ctx.clone(),
            sessions.clone(),
        ))];
        tracing::info!(addr = %mqtt_addr, "MQTT listener ready (MQTT 3.1.1 and 5)");
        Ok(Server {
            ctx,
            mqtt_addr,
            sessions,
            accept_tasks,
            outbox,
            outbox_task,
            shutdown_timeout: config.shutdown_timeout(),
            demo_registry,
            _data_dir: data_dir,
        })
    }

    pub fn mqtt_addr(&self) -> SocketAddr {
        self.mqtt_addr
    }

    /// Whether the built-in demo registry is in use (no clients file given).
    pub fn uses_demo_registry(&self) -> bool {
        self.demo_registry
    }

    /// Stops accepting, ends every session (each emits its `disconnect`) and flushes events.
    /// Returns whether everything finished within the shutdown timeout.
    pub async fn shutdown(self) -> bool {
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        self.ctx.shutdown.cancel();
        for task in self.accept_tasks {
            let _ = task.await;
        }
        self.sessions.close();
        let sessions_done = tokio::time::timeout_at(deadline, self.sessions.wait())
            .await
            .is_ok();
        if !sessions_done {
            tracing::warn!("sessions still open at the shutdown deadline");
        }
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        let flushed = self
            .outbox
            .flush(remaining.max(Duration::from_millis(100)))
            .await;
        if !flushed {
            tracing::warn!("events still pending at the shutdown deadline");
        }
        let stats = self.outbox.stats();
        drop(self.outbox);
        drop(self.ctx);
        // With every sender gone the outbox saves what is undelivered to the spool and ends;
        // that is file I/O only, so a short bound suffices.
        let ended = tokio::time::timeout(Duration::from_secs(5), self.outbox_task)
            .await
            .is_ok();
        // Events saved to the spool are delivered by the next start: nothing is lost.
        let saved =
            ended && stats.pending.load(Ordering::Relaxed) == stats.spooled.load(Ordering::Relaxed);
        if !flushed && saved {
            tracing::info!(
                events = stats.spooled.load(Ordering::Relaxed),
                "event store unreachable: undelivered events stay in the spool for the next start"
            );
        } else if !saved {
            tracing::warn!("the event outbox did not finish: undelivered events are lost");
        }
        sessions_done && (flushed || saved)
    }
}

/// Reads the session journal; every session the previous run left open (it was killed) gets
/// its `disconnect`, written to the spool before the journal forgets it, so the event survives
/// even another crash. Runs before the listener accepts anything.
fn recover_sessions(
    data_dir: &DataDir,
    spool: &mut Spool,
    config: &Config,
) -> Result<SessionJournal, DataDirError> {
    let (journal, orphans) = SessionJournal::open(data_dir)?;
    if orphans.is_empty() {
        return Ok(journal);
    }
    let clock = EventClock::default();
    let details = EventDetails {
        reason: config
            .event_details
            .then(|| DisconnectReason::CrashRecovery.as_str().to_owned()),
        ..EventDetails::default()
    };
    let events: Vec<ConnectionEvent> = orphans
        .iter()
        .map(|orphan| ConnectionEvent {
            client_id: orphan.client_id.clone(),
            event_type: EventType::Disconnect,
            instance: config.instance.clone(),
            occurred_at: clock.now(),
            details: details.clone(),
        })
        .collect();
    spool
        .append(&events)
        .map_err(|e| DataDirError::io(data_dir.path(), e))?;
    tracing::warn!(
        sessions = events.len(),
        "the previous run ended without closing its sessions (crash or kill): their disconnect events are queued"
    );
    journal.forget_orphans()?;
    Ok(journal)
}
