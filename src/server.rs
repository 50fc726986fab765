//! Assembles the adapter from its configuration (auth backend, event sink, router, listeners)
//! and shuts it down in order: stop accepting, end every session, flush events.

use std::net::SocketAddr;
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
use crate::events::{EventSink, Outbox, StdoutSink};
use crate::hooks::{ConnectionEvents, Hooks};
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
    EventStore(String),
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
        let (outbox, outbox_task) = Outbox::start(sink, config.event_buffer as usize);
        let hooks = Hooks::new(registry.clone(), registry).with_observer(Arc::new(
            ConnectionEvents::new(outbox.clone(), config.instance.clone()),
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
        drop(self.outbox);
        drop(self.ctx);
        if flushed {
            let _ = self.outbox_task.await;
        }
        sessions_done && flushed
    }
}

fn event_sink(url: Option<&str>) -> Result<Box<dyn EventSink>, StartError> {
    match url {
        None | Some("") => Ok(Box::new(StdoutSink::new())),
        Some(url) => Err(StartError::EventStore(format!(
            "{url:?}: no event store of this kind is available in this build (leave SMQ_ES_URL unset for stdout)"
        ))),
    }
}
