//! Assembles the adapter from its configuration (auth backend, event sink, router, listeners)
//! and shuts it down in order: stop accepting, end every session, flush events.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::cache::CacheSettings;
use crate::auth::grpc::{GrpcConfigError, GrpcService, PlatformAuth, PlatformAuthMetrics};
use crate::auth::static_registry::RegistryError;
use crate::auth::{Authenticator, Authorizer, StaticRegistry};
use crate::bridge::{Bridge, BridgeError, BridgeMetrics, BridgeSettings};
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
    #[error(transparent)]
    Grpc(#[from] GrpcConfigError),
    #[error(transparent)]
    Bridge(#[from] BridgeError),
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
    bridge: Option<Bridge>,
    platform_auth_metrics: Option<PlatformAuthMetrics>,
    instance_id: String,
}

impl Server {
    /// Binds the listeners and starts serving.
    pub async fn start(config: &Config) -> Result<Server, StartError> {
        let mut demo_registry = false;
        let mut platform_auth_metrics = None;
        let (authenticator, authorizer): (Arc<dyn Authenticator>, Arc<dyn Authorizer>) =
            match (&config.auth, &config.clients_file) {
                (AuthBackend::Static, Some(path)) => {
                    let registry = Arc::new(StaticRegistry::from_file(path)?);
                    (registry.clone(), registry)
                }
                (AuthBackend::Static, None) => {
                    demo_registry = true;
                    let registry = Arc::new(StaticRegistry::demo());
                    (registry.clone(), registry)
                }
                (AuthBackend::Supermq, _) => {
                    let platform = Arc::new(platform_auth(config)?);
                    platform_auth_metrics = Some(platform.metrics());
                    (platform.clone(), platform)
                }
            };

        let instance_id = uuid::Uuid::new_v4().to_string();
        let broker = Broker::start(&BrokerConfig::default());
        let bridge = match config.message_broker_url.as_deref() {
            None | Some("") => None,
            Some(url) => {
                let settings = BridgeSettings {
                    url: url.to_owned(),
                    buffer: config.bridge_buffer as usize,
                    instance_id: instance_id.clone(),
                };
                Some(Bridge::start(&settings, &broker).await?)
            }
        };

        let sink = event_sink(config.es_url.as_deref())?;
        let (outbox, outbox_task) = Outbox::start(sink, config.event_buffer as usize);
        let mut hooks = Hooks::new(authenticator, authorizer).with_observer(Arc::new(
            ConnectionEvents::new(outbox.clone(), config.instance.clone()),
        ));
        if let Some(bridge) = &bridge {
            hooks = hooks.with_observer(bridge.publisher());
        }

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
            broker,
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
            bridge,
            platform_auth_metrics,
            instance_id,
        })
    }

    /// This process's UUID (the bus bridge's loop-prevention header).
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// The bus bridge's counters, when the bridge is on.
    pub fn bridge_metrics(&self) -> Option<Arc<BridgeMetrics>> {
        self.bridge.as_ref().map(Bridge::metrics)
    }

    /// Hit/miss counters of the platform auth caches, with `--auth supermq`.
    pub fn platform_auth_metrics(&self) -> Option<PlatformAuthMetrics> {
        self.platform_auth_metrics.clone()
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
        let bridged = match self.bridge {
            None => true,
            Some(bridge) => {
                let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
                let done = bridge
                    .shutdown(remaining.max(Duration::from_millis(100)))
                    .await;
                if !done {
                    tracing::warn!("bridged messages still queued at the shutdown deadline");
                }
                done
            }
        };
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
        sessions_done && bridged && flushed
    }
}

/// The `supermq` backend from the gRPC settings.
fn platform_auth(config: &Config) -> Result<PlatformAuth, StartError> {
    let clients = GrpcService {
        var_prefix: "SMQ_CLIENTS_GRPC",
        url: config.clients_grpc_url.clone(),
        timeout: config.clients_grpc_timeout,
        client_cert: config.clients_grpc_client_cert.clone(),
        client_key: config.clients_grpc_client_key.clone(),
        ca_certs: config.clients_grpc_client_ca_certs.clone(),
    };
    let channels = GrpcService {
        var_prefix: "SMQ_CHANNELS_GRPC",
        url: config.channels_grpc_url.clone(),
        timeout: config.channels_grpc_timeout,
        client_cert: config.channels_grpc_client_cert.clone(),
        client_key: config.channels_grpc_client_key.clone(),
        ca_certs: config.channels_grpc_client_ca_certs.clone(),
    };
    let cache = CacheSettings {
        allow_ttl: config.auth_cache_allow_ttl,
        deny_ttl: config.auth_cache_deny_ttl,
        max_entries: config.auth_cache_size,
    };
    Ok(PlatformAuth::new(&clients, &channels, cache)?)
}

fn event_sink(url: Option<&str>) -> Result<Box<dyn EventSink>, StartError> {
    match url {
        None | Some("") => Ok(Box::new(StdoutSink::new())),
        Some(url) => Err(StartError::EventStore(format!(
            "{url:?}: no event store of this kind is available in this build (leave SMQ_ES_URL unset for stdout)"
        ))),
    }
}
