//! Assembles the adapter from its configuration (auth backend, event sink, router, listeners)
//! and shuts it down in order: stop accepting, end every session, flush events.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::auth::ban::{AuthBans, MAX_TRACKED_IPS};
use crate::auth::cache::CacheSettings;
use crate::auth::grpc::{GrpcConfigError, GrpcService, PlatformAuth, PlatformAuthMetrics};
use crate::auth::static_registry::RegistryError;
use crate::auth::{Authenticator, Authorizer, StaticRegistry};
use crate::bridge::{Bridge, BridgeError, BridgeMetrics, BridgeSettings};
use crate::broker::{Broker, BrokerConfig, QueueLimits};
use crate::config::{AuthBackend, Config};
use crate::events::store::is_external;
use crate::events::{
    DataDir, DataDirError, EventLog, EventPipeline, EventSettings, EventStartError, LogSettings,
    StoreUrlError,
};
use crate::hooks::{ConnectionEvents, Hooks};
use crate::http::{self, Health, Phase};
use crate::listener::descriptors::OpenSockets;
use crate::listener::tls::{self, ServerIdentity, TlsConfigError};
use crate::listener::{self, Accepting, ConnectRate, Transport};
use crate::metrics::{Metrics, TimedAuthenticator};
use crate::revocation::{self, DecisionCaches, PlatformEventsError, Reactions, RightsEpoch};
use crate::session::limits::{Limits, SessionBounds};
use crate::session::SessionContext;
use crate::state::{StateBackend, StateError};
use crate::topic::TopicBounds;

/// Longest life of one HTTP connection: a scraper's keep-alive connection is renewed this often.
const HTTP_CONNECTION_AGE: Duration = Duration::from_secs(60);

/// What a WebSocket may send before its CONNECT beyond the CONNECT itself: the HTTP upgrade
/// request and the frame headers.
const WS_UPGRADE_ALLOWANCE: usize = 16 * 1024;

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
    #[error(transparent)]
    Tls(#[from] TlsConfigError),
    #[error(transparent)]
    Grpc(#[from] GrpcConfigError),
    #[error(transparent)]
    Bridge(#[from] BridgeError),
    #[error(transparent)]
    PlatformEvents(#[from] PlatformEventsError),
    #[error("SMQ_MQTT_ADAPTER_STATE: {0}")]
    State(#[from] StateError),
}

impl From<EventStartError> for StartError {
    fn from(e: EventStartError) -> Self {
        match e {
            EventStartError::Store(e) => StartError::EventStore(e),
            EventStartError::DataDir(e) => StartError::DataDir(e),
        }
    }
}

/// Opens the `nats` state store on SMQ_MQTT_ADAPTER_STATE_URL, else SMQ_MESSAGE_BROKER_URL.
async fn nats_state(
    config: &Config,
    bus_url: Option<&str>,
    instance_id: &str,
) -> Result<Arc<dyn crate::state::StateStore>, StateError> {
    let (url, setting) = match (config.state_url.as_deref(), bus_url) {
        (Some(url), _) if !url.is_empty() => (url, "SMQ_MQTT_ADAPTER_STATE_URL"),
        (_, Some(url)) => (url, "SMQ_MESSAGE_BROKER_URL"),
        _ => {
            return Err(StateError::Nats(
                "`nats` needs SMQ_MQTT_ADAPTER_STATE_URL or SMQ_MESSAGE_BROKER_URL (a NATS URL with JetStream)".to_owned(),
            ))
        }
    };
    let settings = crate::state::NatsSettings {
        url: url.to_owned(),
        setting,
        bucket: crate::state::nats::BUCKET.to_owned(),
        instance_id: instance_id.to_owned(),
    };
    Ok(Arc::new(crate::state::NatsState::open(&settings).await?))
}

/// A running adapter.
pub struct Server {
    ctx: Arc<SessionContext>,
    mqtt_addr: SocketAddr,
    sessions: TaskTracker,
    accept_tasks: Vec<JoinHandle<()>>,
    events: EventPipeline,
    shutdown_timeout: Duration,
    demo_registry: bool,
    addrs: ListenerAddrs,
    health: Arc<Health>,
    http_stop: CancellationToken,
    http_task: JoinHandle<()>,
    bridge: Option<Bridge>,
    platform_auth_metrics: Option<PlatformAuthMetrics>,
    instance_id: String,
    /// The static registry and its file, reloaded on SIGHUP.
    registry: Option<(Arc<StaticRegistry>, PathBuf)>,
    tls_identity: Option<Arc<ServerIdentity>>,
    reactions: Arc<Reactions>,
    platform_events: Option<(CancellationToken, JoinHandle<()>)>,
}

/// Where each listener ended up (ports may be 0 in the configuration).
#[derive(Debug, Clone, Copy)]
pub struct ListenerAddrs {
    pub mqtt: SocketAddr,
    pub mqtts: Option<SocketAddr>,
    pub ws: SocketAddr,
    pub wss: Option<SocketAddr>,
    pub http: SocketAddr,
}

impl Server {
    /// Binds the listeners and starts serving.
    pub async fn start(config: &Config) -> Result<Server, StartError> {
        let mut demo_registry = false;
        let mut platform_auth_metrics = None;
        let mut reloadable = None;
        let mut caches: Option<Arc<dyn DecisionCaches>> = None;
        let (authenticator, authorizer): (Arc<dyn Authenticator>, Arc<dyn Authorizer>) = match (
            &config.auth,
            &config.clients_file,
        ) {
            (AuthBackend::Static, Some(path)) => {
                let registry = Arc::new(StaticRegistry::from_file(path)?);
                if registry.clients() == 0 {
                    tracing::warn!(file = %path.display(),
                            "the clients file has no [[clients]]: every CONNECT with credentials is refused; a SIGHUP reload will need at least one client");
                }
                reloadable = Some((registry.clone(), path.clone()));
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
                caches = Some(platform.clone());
                (platform.clone(), platform)
            }
        };

        let instance_id = uuid::Uuid::new_v4().to_string();
        let bus_url = config
            .message_broker_url
            .as_deref()
            .filter(|url| !url.is_empty());
        // One process per data directory: the event log, the message log and the local state
        // share its lock.
        let data_dir = if bus_url.is_some()
            || is_external(config.es_url.as_deref())
            || config.state == StateBackend::Local
        {
            Some(Arc::new(DataDir::open(&config.data_dir)?))
        } else {
            None
        };
        let state = match config.state {
            StateBackend::Nats => nats_state(config, bus_url, &instance_id).await?,
            backend => crate::state::open(backend, data_dir.as_deref())?,
        };
        let broker = Broker::with_state(
            BrokerConfig {
                queue: QueueLimits {
                    max_messages: usize::try_from(config.max_queued_messages).unwrap_or(usize::MAX),
                    max_bytes: usize::try_from(config.max_queued_bytes).unwrap_or(usize::MAX),
                },
                max_retained: usize::try_from(config.max_retained).unwrap_or(usize::MAX),
                max_retained_bytes: usize::try_from(config.max_retained_bytes)
                    .unwrap_or(usize::MAX),
                retained_client_share: config.retained_client_share,
                max_offline_sessions: usize::try_from(config.max_offline_sessions)
                    .unwrap_or(usize::MAX),
            },
            state,
        );
        let bridge = match (bus_url, &data_dir) {
            (Some(url), Some(data_dir)) => {
                let settings = BridgeSettings {
                    url: url.to_owned(),
                    buffer: config.bridge_buffer as usize,
                    instance_id: instance_id.clone(),
                    log: LogSettings {
                        max_bytes: config.bridge_log_size,
                        fsync: config.bridge_fsync,
                        fsync_interval: config.bridge_fsync_interval,
                        max_pending: usize::MAX,
                    },
                };
                Some(Bridge::start(&settings, data_dir, &broker).await?)
            }
            _ => None,
        };

        let (tls, tls_identity) = match (&config.server_cert, &config.server_key) {
            (Some(cert), Some(key)) => {
                let (acceptor, identity) =
                    tls::acceptor(cert, key, config.client_ca_certs.as_deref())?;
                (Some(acceptor), Some(identity))
            }
            (None, None) => (None, None),
            _ => return Err(TlsConfigError::Incomplete.into()),
        };

        let metrics = Metrics::new();
        // With a store, sessions left open by a crashed run are closed here, before listening.
        let events = EventPipeline::start(&EventSettings {
            es_url: config.es_url.as_deref(),
            data_dir: data_dir.clone(),
            data_dir_path: &config.data_dir,
            buffer: config.event_buffer as usize,
            log: LogSettings {
                max_bytes: config.event_spool_size,
                fsync: config.event_fsync,
                fsync_interval: config.event_fsync_interval,
                max_pending: config.event_buffer as usize,
            },
            instance: &config.instance,
            details: config.event_details,
            layout: config.event_layout,
        })
        .await?;
        // Before any listener accepts (the first SUBSCRIBE already gets what was retained), and
        // after every setting that can stop start-up was checked: a bad one is the only line.
        let loading = std::time::Instant::now();
        let retained = broker.restore_retained()?;
        tracing::info!(
            state = broker.state().name(),
            retained,
            took_ms = loading.elapsed().as_millis() as u64,
            "MQTT state loaded"
        );
        metrics.watch_outbox(events.store, events.stats());
        metrics.watch_broker(&broker);
        broker.state().follow(Arc::downgrade(&broker));
        metrics.watch_state(broker.state().clone());
        let authenticator = Arc::new(TimedAuthenticator::new(authenticator, metrics.clone()));
        let mut hooks = Hooks::new(authenticator, authorizer)
            .with_events(Arc::new(
                ConnectionEvents::new(events.queue(), config.instance.clone())
                    .with_details(config.event_details)
                    .with_layout(config.event_layout),
            ))
            .with_observer(metrics.clone());
        if let Some(bridge) = &bridge {
            hooks = hooks
                .with_bus(bridge.publisher())
                .with_observer(bridge.takeover_announcer());
            metrics.watch_bridge(bridge.metrics());
        }

        let (listener, mqtt_addr) =
            bind(config, "SMQ_MQTT_ADAPTER_MQTT_PORT", config.mqtt_port).await?;
        let (ws_listener, ws_addr) =
            bind(config, "SMQ_MQTT_ADAPTER_WS_PORT", config.ws_port).await?;
        let (http_listener, http_addr) =
            bind(config, "SMQ_MQTT_ADAPTER_HTTP_PORT", config.http_port).await?;
        let mut secure = Vec::new();
        let (mut mqtts_addr, mut wss_addr) = (None, None);
        if let Some(acceptor) = &tls {
            let (l, a) = bind(config, "SMQ_MQTT_ADAPTER_MQTTS_PORT", config.mqtts_port).await?;
            mqtts_addr = Some(a);
            secure.push((l, Transport::Tls(acceptor.clone())));
            let (l, a) = bind(config, "SMQ_MQTT_ADAPTER_WSS_PORT", config.wss_port).await?;
            wss_addr = Some(a);
            secure.push((l, Transport::Wss(acceptor.clone())));
        }
        let mut limits = Limits::new(
            usize::try_from(config.max_connections).unwrap_or(usize::MAX),
            config.max_inflight,
            NonZeroU32::new(config.publish_rate),
            config.cert_cn_as_username,
        )
        .with_session_bounds(SessionBounds {
            max_subscriptions: usize::try_from(config.max_subscriptions).unwrap_or(usize::MAX),
            topic: TopicBounds {
                max_length: config.max_topic_length as usize,
                max_levels: config.max_topic_levels as usize,
            },
        });
        if let Some(failures) = NonZeroU32::new(config.auth_failures_per_ip) {
            limits =
                limits.with_auth_bans(AuthBans::new(failures, config.auth_ban, MAX_TRACKED_IPS));
        }

        let rights = Arc::new(RightsEpoch::default());
        let ctx = Arc::new(SessionContext {
            broker: broker.clone(),
            hooks,
            connect_timeout: config.connect_timeout,
            max_packet_size: config.max_packet_size as usize,
            max_connect_size: config.max_connect_size as usize,
            max_keep_alive: config.max_keep_alive,
            topic_alias_maximum: config.topic_alias_maximum,
            shutdown: CancellationToken::new(),
            metrics: metrics.clone(),
            limits,
            rights: rights.clone(),
            keep_alive: crate::session::keep_alive::KeepAliveWheel::new(),
        });
        tokio::spawn(ctx.keep_alive.clone().run(ctx.shutdown.clone()));
        // Persistent sessions are held again before any listener accepts: a device that
        // resumes finds its session, and wills that fell due while the process was down go out.
        let loading = std::time::Instant::now();
        let restored =
            broker.restore_sessions(crate::session::kept_will_route(Arc::downgrade(&ctx)))?;
        if restored != crate::broker::Restored::default() {
            tracing::info!(
                sessions = restored.sessions,
                deliveries = restored.deliveries,
                expired = restored.expired,
                wills = restored.wills,
                took_ms = loading.elapsed().as_millis() as u64,
                "persistent sessions restored"
            );
        }
        broker.start_checkpoints();
        let reactions = Arc::new(Reactions::new(
            broker.clone(),
            caches,
            rights,
            metrics.revocations.clone(),
            metrics.platform_events.clone(),
        ));
        let platform_events = match config.platform_events_url.as_deref() {
            None | Some("") => None,
            Some(url) => {
                let stop = CancellationToken::new();
                let task = revocation::start(url, reactions.clone(), stop.clone())?;
                Some((stop, task))
            }
        };
        let sessions = TaskTracker::new();
        // Device and HTTP sockets in one account, so neither takes the other's descriptors.
        let open_sockets = OpenSockets::new(usize::from(config.http_max_connections));
        let accepting = Arc::new(Accepting {
            ctx: ctx.clone(),
            sessions: sessions.clone(),
            metrics: metrics.clone(),
            handshake_timeout: config.handshake_timeout,
            // A WebSocket message carries at most one MQTT packet's worth, plus framing slack.
            max_ws_message: config.max_packet_size as usize + 1024,
            ws_connect_budget: config.max_connect_size.min(config.max_packet_size) as usize
                + WS_UPGRADE_ALLOWANCE,
            connect_rate: NonZeroU32::new(config.connect_rate_per_ip).map(ConnectRate::new),
            open_sockets: open_sockets.clone(),
        });
        let mut accept_tasks = Vec::new();
        for (l, transport) in [(listener, Transport::Tcp), (ws_listener, Transport::Ws)]
            .into_iter()
            .chain(secure)
        {
            accept_tasks.push(tokio::spawn(listener::serve(
                l,
                transport,
                accepting.clone(),
            )));
        }
        let addrs = ListenerAddrs {
            mqtt: mqtt_addr,
            mqtts: mqtts_addr,
            ws: ws_addr,
            wss: wss_addr,
            http: http_addr,
        };
        tracing::info!(mqtt = %mqtt_addr, ws = %ws_addr, mqtts = ?mqtts_addr, wss = ?wss_addr,
            mtls = config.client_ca_certs.is_some(), "MQTT listeners ready (MQTT 3.1.1 and 5)");

        let health = Health::new(uuid::Uuid::new_v4().to_string());
        let http_stop = CancellationToken::new();
        let admin = config
            .admin_token
            .as_deref()
            .filter(|t| !t.is_empty())
            .map(|token| crate::admin::routes(token, ctx.broker.clone()));
        let http_limits = http::HttpLimits {
            header_timeout: config.http_header_timeout,
            idle_timeout: config.http_idle_timeout,
            max_connection_age: HTTP_CONNECTION_AGE,
        };
        let http_task = tokio::spawn(http::serve(
            http_listener,
            health.clone(),
            metrics,
            admin,
            http_limits,
            open_sockets,
            http_stop.clone(),
        ));
        tracing::info!(addr = %http_addr, "HTTP /health and /metrics ready");
        health.set(Phase::Serving);
        Ok(Server {
            ctx,
            mqtt_addr,
            sessions,
            accept_tasks,
            events,
            shutdown_timeout: config.shutdown_timeout,
            demo_registry,
            addrs,
            health,
            http_stop,
            http_task,
            bridge,
            platform_auth_metrics,
            instance_id,
            registry: reloadable,
            tls_identity,
            reactions,
            platform_events,
        })
    }

    /// SIGHUP: reads the clients file (static backend) and the TLS certificate and key again.
    /// A file that cannot be used is refused (logged with file and line) and the old content
    /// stays; what a new registry no longer grants is revoked at once, as a platform event would.
    pub async fn reload(&self) {
        if let Some((registry, path)) = &self.registry {
            match registry.reload(path) {
                Err(e) => tracing::error!(error = %e,
                    "reload refused: the previous clients registry stays in force"),
                Ok(lost) => {
                    self.reactions.forget_session_decisions();
                    let mut sessions = 0;
                    for revocation in &lost {
                        sessions += self.reactions.apply(revocation).await;
                        self.ctx
                            .metrics
                            .revocations
                            .with_label_values(&["reload"])
                            .inc();
                    }
                    tracing::info!(file = %path.display(), revoked = lost.len(), sessions,
                        "clients registry reloaded");
                }
            }
        }
        if let Some(identity) = &self.tls_identity {
            match identity.reload() {
                Ok(()) => {
                    tracing::info!("TLS certificate and key reloaded (new handshakes use them)")
                }
                Err(e) => tracing::error!(error = %e,
                    "TLS reload refused: the previous certificate and key stay in use"),
            }
        }
    }

    /// Every listener's bound address.
    pub fn addrs(&self) -> ListenerAddrs {
        self.addrs
    }

    /// Starts draining: `/health` answers 503 while devices are still served, so load
    /// balancers stop sending new ones before [`Server::shutdown`] closes the sessions.
    pub fn begin_drain(&self) {
        self.health.set(Phase::Draining);
    }

    /// The broker core (sessions, subscriptions, retained messages).
    pub fn broker(&self) -> Arc<Broker> {
        self.ctx.broker.clone()
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

    /// The durable event log (with an external event store).
    pub fn event_log(&self) -> Option<&EventLog> {
        self.events.log()
    }

    /// Whether the built-in demo registry is in use (no clients file given).
    pub fn uses_demo_registry(&self) -> bool {
        self.demo_registry
    }

    /// Stops accepting, ends every session (each emits its `disconnect`) and flushes events.
    /// Returns whether everything finished within the shutdown timeout.
    pub async fn shutdown(self) -> bool {
        let deadline = tokio::time::Instant::now() + self.shutdown_timeout;
        self.health.set(Phase::Draining);
        self.ctx.shutdown.cancel();
        // After the token: a session attaching from now on starts cancelled.
        self.ctx.broker.cancel_connections();
        for task in self.accept_tasks {
            let _ = task.await;
        }
        self.sessions.close();
        self.ctx.broker.stop();
        if let Some((stop, task)) = self.platform_events {
            stop.cancel();
            let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
        }
        let sessions_done = tokio::time::timeout_at(deadline, self.sessions.wait())
            .await
            .is_ok();
        if !sessions_done {
            tracing::warn!("sessions still open at the shutdown deadline");
        }
        // Every session ends with the process: wills still delayed go out now, before the
        // bridge closes, so the bus gets them.
        let wills = self.ctx.broker.publish_pending_wills();
        if wills > 0 {
            tracing::info!(wills, "delayed wills published at shutdown");
        }
        // Every retained change handed over (wills included) is committed before exit.
        let state = self.ctx.broker.state().clone();
        if tokio::task::spawn_blocking(move || state.close())
            .await
            .is_err()
        {
            tracing::error!("the state store did not close cleanly");
        }
        let bridged = match self.bridge {
            None => true,
            Some(bridge) => {
                let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
                let done = bridge
                    .shutdown(remaining.max(Duration::from_millis(100)))
                    .await;
                if !done {
                    tracing::warn!("message log did not close cleanly at shutdown");
                }
                done
            }
        };
        let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
        drop(self.ctx);
        // Delivers what it can in the time left; with a store, the rest stays in the event log.
        let events_kept = self
            .events
            .shutdown(remaining.max(Duration::from_millis(100)))
            .await;
        self.http_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(1), self.http_task).await;
        sessions_done && bridged && events_kept
    }
}

/// Binds one listener; the error names the variable that chose the port.
async fn bind(
    config: &Config,
    var: &'static str,
    port: u16,
) -> Result<(TcpListener, SocketAddr), StartError> {
    let addr = SocketAddr::new(config.host, port);
    let bind_error = |source| StartError::Bind { var, addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_error)?;
    let local = listener.local_addr().map_err(bind_error)?;
    Ok((listener, local))
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
    let domains = GrpcService {
        var_prefix: "SMQ_DOMAINS_GRPC",
        url: config.domains_grpc_url.clone(),
        timeout: config.domains_grpc_timeout,
        client_cert: config.domains_grpc_client_cert.clone(),
        client_key: config.domains_grpc_client_key.clone(),
        ca_certs: config.domains_grpc_client_ca_certs.clone(),
    };
    Ok(PlatformAuth::new(&clients, &channels, &domains, cache)?)
}
