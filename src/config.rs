//! Start-up configuration: every setting is an environment variable with the SuperMQ name and a
//! command-line flag of the same meaning; `--help` lists them with their defaults. The binary's
//! tool subcommands (`presence`) have their own arguments and ignore the adapter's.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{CommandFactory, Parser, ValueEnum};

pub use crate::events::{EventLayout, FsyncMode};
pub use crate::state::StateBackend;

/// Which backend authenticates CONNECTs and authorizes channel access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AuthBackend {
    /// A TOML registry file (SMQ_MQTT_ADAPTER_CLIENTS_FILE), or the built-in demo registry.
    Static,
    /// The platform's clients and channels gRPC services.
    Supermq,
}

/// The adapter's configuration, read from flags and environment variables.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "mqtt-adapter",
    version,
    about = "MQTT adapter for SuperMQ-family IoT platforms",
    after_help = "Durations: a bare number is seconds (30, 0.5); units are accepted for every \
                  duration setting (500ms, 30s, 5m, 1h).\n\n\
                  Subcommands:\n  presence  who is online, rebuilt from the event stream \
                  (mqtt-adapter presence --help)"
)]
pub struct Config {
    /// Address the listeners bind to.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_HOST", default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    pub host: IpAddr,

    /// MQTT (3.1.1 and 5) over TCP port; 0 picks a free port.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_MQTT_PORT", default_value_t = 1883)]
    pub mqtt_port: u16,

    /// Name of this adapter instance, copied into every connection event.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_INSTANCE", default_value = "")]
    pub instance: String,

    /// Log filter (tracing syntax: `info`, `debug`, `mqtt_adapter=debug,warn`).
    #[arg(long, env = "SMQ_MQTT_ADAPTER_LOG_LEVEL", default_value = "info")]
    pub log_level: String,

    /// Authentication and authorization backend.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_AUTH", value_enum, default_value_t = AuthBackend::Static)]
    pub auth: AuthBackend,

    /// Registry file of the static backend (TOML); unset: a built-in demo registry.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_CLIENTS_FILE")]
    pub clients_file: Option<PathBuf>,

    /// Event store URL (redis://, nats://, amqp://); unset: events go to stdout as JSON lines.
    #[arg(long, env = "SMQ_ES_URL")]
    pub es_url: Option<String>,

    /// The clients service's event store (redis://, nats://, amqp://, as SMQ_ES_URL): disabling a
    /// client, rotating its secret, disabling a channel or deleting a connection ends the
    /// affected sessions at once. Unset: off (revocations take effect when caches expire).
    #[arg(long, env = "SMQ_MQTT_ADAPTER_PLATFORM_EVENTS_URL")]
    pub platform_events_url: Option<String>,

    /// Time from accept to a complete CONNECT (TLS and WebSocket handshakes included), however
    /// the device paces its bytes; then the socket is closed.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_CONNECT_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub connect_timeout: Duration,

    /// Largest MQTT packet accepted from a device, in bytes.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_MAX_PACKET_SIZE", default_value_t = 1024 * 1024, value_parser = clap::value_parser!(u32).range(64..=268_435_455))]
    pub max_packet_size: u32,

    /// Largest CONNECT accepted, in bytes: until a device is authenticated it may make the
    /// adapter hold no more than this (over WebSocket, this plus 16 KiB for the upgrade request
    /// and framing). Beyond: the socket is closed. At most the maximum packet size.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_MAX_CONNECT_SIZE", default_value_t = 64 * 1024, value_parser = clap::value_parser!(u32).range(64..=268_435_455))]
    pub max_connect_size: u32,

    /// Connection events queued in memory: for stdout, while it is slow; with a store, those
    /// handed to the event log's writer and not yet written. Beyond it they are counted as
    /// dropped.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_EVENT_BUFFER", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub event_buffer: u64,

    /// How long a shutdown waits for sessions to close and events to flush.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_SHUTDOWN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,

    /// Directory of the durable event log (with SMQ_ES_URL), the bridge's message log (with
    /// SMQ_MESSAGE_BROKER_URL) and the `local` state store (`state/`); created if missing; one
    /// adapter process per directory.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Where MQTT state that outlives the process (retained messages) is kept: `local` (on disk
    /// in SMQ_MQTT_ADAPTER_DATA_DIR/state: survives a restart and a kill -9; a retained QoS 1/2
    /// PUBLISH is acknowledged once it is there), `memory` (a restart forgets it) or `nats`
    /// (a JetStream key-value bucket on SMQ_MQTT_ADAPTER_STATE_URL or SMQ_MESSAGE_BROKER_URL,
    /// shared by every instance; nats-server 2.10 or newer with JetStream).
    #[arg(long, env = "SMQ_MQTT_ADAPTER_STATE", value_enum, default_value_t = StateBackend::Local)]
    pub state: StateBackend,

    /// NATS URL of the `nats` state store (e.g. nats://localhost:4222); unset: SMQ_MESSAGE_BROKER_URL.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_STATE_URL")]
    pub state_url: Option<String>,

    /// Largest size in bytes of the on-disk event log; when full, the oldest undelivered events
    /// are dropped (counted and logged).
    #[arg(long, env = "SMQ_MQTT_ADAPTER_EVENT_SPOOL_SIZE", default_value_t = 256 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..))]
    pub event_spool_size: u64,

    /// When the event log reaches the disk: `off` (page cache only: survives a crash of the
    /// process, not a power loss), `interval` (fsync at most every EVENT_FSYNC_INTERVAL) or
    /// `always` (CONNACK waits for the fsync of its `connect`).
    #[arg(long, env = "SMQ_MQTT_ADAPTER_EVENT_FSYNC", value_enum, default_value_t = FsyncMode::Off)]
    pub event_fsync: FsyncMode,

    /// Longest time between two fsyncs of the event log with `--event-fsync interval`.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_EVENT_FSYNC_INTERVAL", default_value = "100ms", value_parser = parse_duration)]
    pub event_fsync_interval: Duration,

    /// Adds `reason` to `disconnect` events and `remote_addr`, `protocol_version`,
    /// `mqtt_client_id` to `connect` events (off: exactly the seed's four fields).
    #[arg(long, env = "SMQ_MQTT_ADAPTER_EVENT_DETAILS", default_value_t = false, action = clap::ArgAction::Set)]
    pub event_details: bool,

    /// How events are written to the store: `seed` (stream supermq.mqtt, four fields) or
    /// `supermq` (SuperMQ's MQTT adapter layout: streams supermq.mqtt.client_connect,
    /// …client_disconnect, …client_subscribe; a JSON `data` field / protobuf body).
    #[arg(long, env = "SMQ_MQTT_ADAPTER_EVENT_LAYOUT", value_enum, default_value_t = EventLayout::Seed)]
    pub event_layout: EventLayout,

    /// MQTT over TLS port (opened only when the server certificate and key are set).
    #[arg(long, env = "SMQ_MQTT_ADAPTER_MQTTS_PORT", default_value_t = 8883)]
    pub mqtts_port: u16,

    /// MQTT over WebSocket port (path /mqtt, subprotocol mqtt).
    #[arg(long, env = "SMQ_MQTT_ADAPTER_WS_PORT", default_value_t = 8080)]
    pub ws_port: u16,

    /// MQTT over secure WebSocket port (opened only when the server certificate and key are set).
    #[arg(long, env = "SMQ_MQTT_ADAPTER_WSS_PORT", default_value_t = 8084)]
    pub wss_port: u16,

    /// HTTP port of /health and /metrics.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_HTTP_PORT", default_value_t = 9090)]
    pub http_port: u16,

    /// Server certificate chain (PEM) for the TLS listeners.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_SERVER_CERT")]
    pub server_cert: Option<PathBuf>,

    /// Server private key (PEM) for the TLS listeners.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_SERVER_KEY")]
    pub server_key: Option<PathBuf>,

    /// CA certificates (PEM) that sign client certificates; set: TLS clients must present one (mTLS).
    #[arg(long, env = "SMQ_MQTT_ADAPTER_CLIENT_CA_CERTS")]
    pub client_ca_certs: Option<PathBuf>,

    /// Refuse a TLS CONNECT whose username differs from its client certificate's common name.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_CERT_CN_AS_USERNAME", default_value_t = false, action = clap::ArgAction::Set)]
    pub cert_cn_as_username: bool,

    /// How long a TLS or WebSocket handshake may take.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_positive_duration)]
    pub handshake_timeout: Duration,

    /// Concurrent MQTT sessions; beyond it CONNECT gets 0x03 (3.1.1) / 0x97 (5).
    #[arg(long, env = "SMQ_MQTT_ADAPTER_MAX_CONNECTIONS", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_connections: u64,

    /// QoS 1/2 PUBLISHes a device may have unacknowledged (MQTT 5 receive maximum); beyond it the
    /// session is closed (MQTT 5: DISCONNECT 0x93).
    #[arg(long, env = "SMQ_MQTT_ADAPTER_MAX_INFLIGHT", default_value_t = 1000, value_parser = clap::value_parser!(u16).range(1..))]
    pub max_inflight: u16,

    /// New connections per second from one IP address (token bucket, burst of the same size); 0: unlimited.
    #[arg(
        long,
        env = "SMQ_MQTT_ADAPTER_CONNECT_RATE_PER_IP",
        default_value_t = 1000
    )]
    pub connect_rate_per_ip: u32,

    /// Failed CONNECTs (bad or missing credentials) from one IP within a minute after which that
    /// IP's new sockets are closed for SMQ_MQTT_ADAPTER_AUTH_BAN; 0: off.
    #[arg(
        long,
        env = "SMQ_MQTT_ADAPTER_AUTH_FAILURES_PER_IP",
        default_value_t = 20
    )]
    pub auth_failures_per_ip: u32,

    /// How long an IP stays banned after too many failed CONNECTs.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_AUTH_BAN", default_value = "60s", value_parser = parse_duration)]
    pub auth_ban: Duration,

    /// Subscriptions one session may hold; beyond, SUBACK 0x97 (5) / 0x80 (3.1.1).
    #[arg(long, env = "SMQ_MQTT_ADAPTER_MAX_SUBSCRIPTIONS", default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_subscriptions: u64,

    /// Longest PUBLISH topic, will topic or SUBSCRIBE filter, bytes as sent; beyond, refused as
    /// a malformed topic.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_MAX_TOPIC_LENGTH", default_value_t = 1024, value_parser = clap::value_parser!(u32).range(16..=65535))]
    pub max_topic_length: u32,

    /// Most levels (`a/b/c` has three) in a PUBLISH topic, will topic or SUBSCRIBE filter;
    /// beyond, refused as a malformed topic.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_MAX_TOPIC_LEVELS", default_value_t = 32, value_parser = clap::value_parser!(u32).range(4..=65535))]
    pub max_topic_levels: u32,

    /// PUBLISH packets per second from one session (token bucket, burst of the same size); beyond it
    /// the session is closed (MQTT 5: DISCONNECT 0x96). 0: unlimited.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_PUBLISH_RATE", default_value_t = 10_000)]
    pub publish_rate: u32,

    /// How long /health reports 503 before sessions are closed on SIGTERM, so load balancers
    /// stop sending new devices first; a second signal ends the wait.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_DRAIN_GRACE", default_value = "0s", value_parser = parse_duration)]
    pub drain_grace: Duration,

    /// Longest keep-alive granted to an MQTT 5 device (whole seconds, at most 65535): a device
    /// asking for more, or for none (0), is told this value in CONNACK (Server Keep Alive). 0:
    /// accept what it asks. Held in seconds, as MQTT carries it.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_MAX_KEEP_ALIVE", default_value = "0s", value_parser = parse_keep_alive)]
    pub max_keep_alive: u16,

    /// MQTT 5 Topic Alias Maximum advertised to devices: topic aliases a device may set up per
    /// connection (1..=this); 0 advertises none and refuses every alias.
    #[arg(
        long,
        env = "SMQ_MQTT_ADAPTER_TOPIC_ALIAS_MAXIMUM",
        default_value_t = 64
    )]
    pub topic_alias_maximum: u16,

    /// Concurrent connections to the HTTP port (/health, /metrics, admin API); beyond, a new
    /// socket is closed at accept. They sit inside the file descriptors kept from device
    /// sockets: the reserve is 64 for the adapter's own files plus this cap, each at most a
    /// quarter of the open file limit (a lower limit lowers the cap with it).
    #[arg(long, env = "SMQ_MQTT_ADAPTER_HTTP_MAX_CONNECTIONS", default_value_t = 64, value_parser = clap::value_parser!(u16).range(1..))]
    pub http_max_connections: u16,

    /// Time from accept until an HTTP connection's first request headers are read (`10s`,
    /// `500ms`); then the connection is closed.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub http_header_timeout: Duration,

    /// Time a keep-alive HTTP connection may wait, after an answer, until its next request's
    /// headers are read (`30s`, `500ms`, `5m`); then it is closed.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_HTTP_IDLE_TIMEOUT", default_value = "30s", value_parser = parse_positive_duration)]
    pub http_idle_timeout: Duration,

    /// Bearer token of the admin API (`GET /clients`, `GET/DELETE /clients/{mqtt_client_id}` on
    /// the HTTP port); unset: those endpoints answer 404.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,

    /// Deliveries queued per session (live or offline) for its device. When full, a QoS 1/2
    /// message evicts the oldest queued QoS 0 one; otherwise the new message is dropped for that
    /// session (counted in mqtt_adapter_messages_dropped_total{reason="queue_full"}).
    #[arg(long, env = "SMQ_MQTT_ADAPTER_MAX_QUEUED_MESSAGES", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_queued_messages: u64,

    /// Bytes (topic + payload) queued per session; a single message larger than this is still
    /// queued when the queue is empty.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_MAX_QUEUED_BYTES", default_value_t = 64 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_queued_bytes: u64,

    /// Retained topics kept in memory (none is evicted); beyond it a retained PUBLISH on a new
    /// topic is refused with 0x97 on MQTT 5 QoS 1/2, and delivered but not retained on 3.1.1 and
    /// QoS 0 (both counted).
    #[arg(long, env = "SMQ_MQTT_ADAPTER_MAX_RETAINED", default_value_t = 100_000)]
    pub max_retained: u64,

    /// Bytes of retained messages kept in memory (topic, payload and MQTT 5 properties); beyond
    /// it a retained PUBLISH is refused as for SMQ_MQTT_ADAPTER_MAX_RETAINED.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_MAX_RETAINED_BYTES", default_value_t = 256 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1..))]
    pub max_retained_bytes: u64,

    /// Offline persistent sessions one client id keeps (each MQTT client identifier is a
    /// session); when one more goes offline, the client's oldest offline session is discarded
    /// (what it queued is counted as dropped, its will published).
    #[arg(long, env = "SMQ_MQTT_ADAPTER_MAX_OFFLINE_SESSIONS", default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_offline_sessions: u32,

    /// The share (percent) of SMQ_MQTT_ADAPTER_MAX_RETAINED and _MAX_RETAINED_BYTES one client
    /// id may hold, so one tenant filling the store leaves room for the others; 100: no share.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_RETAINED_CLIENT_SHARE", default_value_t = 25, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub retained_client_share: u8,

    /// URL of the platform's clients service (Authenticate), e.g. http://clients:7005 (https:// for TLS); required with
    /// `--auth supermq`.
    #[arg(long, env = "SMQ_CLIENTS_GRPC_URL")]
    pub clients_grpc_url: Option<String>,

    /// Deadline of one call to the clients service (Authenticate).
    #[arg(long, env = "SMQ_CLIENTS_GRPC_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub clients_grpc_timeout: Duration,

    /// Client certificate (PEM) for mTLS to the clients service (Authenticate).
    #[arg(long, env = "SMQ_CLIENTS_GRPC_CLIENT_CERT")]
    pub clients_grpc_client_cert: Option<PathBuf>,

    /// Client key (PEM) for mTLS to the clients service (Authenticate).
    #[arg(long, env = "SMQ_CLIENTS_GRPC_CLIENT_KEY")]
    pub clients_grpc_client_key: Option<PathBuf>,

    /// CA certificates (PEM) that sign the clients service (Authenticate)'s certificate; unset: the system roots.
    #[arg(long, env = "SMQ_CLIENTS_GRPC_CLIENT_CA_CERTS")]
    pub clients_grpc_client_ca_certs: Option<PathBuf>,

    /// URL of the platform's channels service (Authorize), e.g. http://channels:7005 (https:// for TLS); required with
    /// `--auth supermq`.
    #[arg(long, env = "SMQ_CHANNELS_GRPC_URL")]
    pub channels_grpc_url: Option<String>,

    /// Deadline of one call to the channels service (Authorize).
    #[arg(long, env = "SMQ_CHANNELS_GRPC_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub channels_grpc_timeout: Duration,

    /// Client certificate (PEM) for mTLS to the channels service (Authorize).
    #[arg(long, env = "SMQ_CHANNELS_GRPC_CLIENT_CERT")]
    pub channels_grpc_client_cert: Option<PathBuf>,

    /// Client key (PEM) for mTLS to the channels service (Authorize).
    #[arg(long, env = "SMQ_CHANNELS_GRPC_CLIENT_KEY")]
    pub channels_grpc_client_key: Option<PathBuf>,

    /// CA certificates (PEM) that sign the channels service (Authorize)'s certificate; unset: the system roots.
    #[arg(long, env = "SMQ_CHANNELS_GRPC_CLIENT_CA_CERTS")]
    pub channels_grpc_client_ca_certs: Option<PathBuf>,

    /// URL of the platform's domains service (RetrieveIDByRoute), e.g. http://domains:7003; set
    /// with `--auth supermq`: a topic's non-UUID domain or channel is a route, resolved to its id
    /// (channel routes through the channels service). Unset: topics name ids only.
    #[arg(long, env = "SMQ_DOMAINS_GRPC_URL")]
    pub domains_grpc_url: Option<String>,

    /// Deadline of one call to the domains service (RetrieveIDByRoute).
    #[arg(long, env = "SMQ_DOMAINS_GRPC_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub domains_grpc_timeout: Duration,

    /// Client certificate (PEM) for mTLS to the domains service.
    #[arg(long, env = "SMQ_DOMAINS_GRPC_CLIENT_CERT")]
    pub domains_grpc_client_cert: Option<PathBuf>,

    /// Client key (PEM) for mTLS to the domains service.
    #[arg(long, env = "SMQ_DOMAINS_GRPC_CLIENT_KEY")]
    pub domains_grpc_client_key: Option<PathBuf>,

    /// CA certificates (PEM) that sign the domains service's certificate; unset: the system roots.
    #[arg(long, env = "SMQ_DOMAINS_GRPC_CLIENT_CA_CERTS")]
    pub domains_grpc_client_ca_certs: Option<PathBuf>,

    /// How long a positive answer of the platform's auth services is cached.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_AUTH_CACHE_ALLOW_TTL", default_value = "10s", value_parser = parse_duration)]
    pub auth_cache_allow_ttl: Duration,

    /// How long a negative answer of the platform's auth services is cached.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_AUTH_CACHE_DENY_TTL", default_value = "2s", value_parser = parse_duration)]
    pub auth_cache_deny_ttl: Duration,

    /// Most answers each auth cache (authenticate, authorize) keeps.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_AUTH_CACHE_SIZE", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub auth_cache_size: u64,

    /// Message bus (NATS) URL for the message bridge, e.g. nats://localhost:4222; unset: no bridge.
    #[arg(long, env = "SMQ_MESSAGE_BROKER_URL")]
    pub message_broker_url: Option<String>,

    /// JetStream publishes the bridge keeps in flight (awaiting their acks) at most, and session
    /// announcements queued for NATS.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_BRIDGE_BUFFER", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub bridge_buffer: u64,

    /// Bytes of undelivered device messages the bridge's message log keeps on disk (in the data
    /// directory). When full, sessions that publish to channels are pushed back (their sockets
    /// are not read) until NATS takes messages again; nothing is dropped.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_BRIDGE_LOG_SIZE", default_value_t = 1024 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..))]
    pub bridge_log_size: u64,

    /// When the message log reaches the disk, as SMQ_MQTT_ADAPTER_EVENT_FSYNC: `off` (a PUBLISH
    /// is acknowledged once written: survives a crash of the process, not a power loss),
    /// `interval` (fsync at most every BRIDGE_FSYNC_INTERVAL) or `always` (PUBACK/PUBREC wait
    /// for the fsync).
    #[arg(long, env = "SMQ_MQTT_ADAPTER_BRIDGE_FSYNC", value_enum, default_value_t = FsyncMode::Off)]
    pub bridge_fsync: FsyncMode,

    /// Longest time between two fsyncs of the message log with `--bridge-fsync interval`.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_BRIDGE_FSYNC_INTERVAL", default_value = "100ms", value_parser = parse_duration)]
    pub bridge_fsync_interval: Duration,
}

/// Variables of SuperMQ's Go MQTT adapter that this adapter reads under another name, and that
/// name: an env file ported unchanged would otherwise lose TLS settings without a word.
pub const RENAMED_SUPERMQ_VARS: [(&str, &str); 7] = [
    (
        "SMQ_MQTT_ADAPTER_CERT_FILE",
        "SMQ_MQTT_ADAPTER_SERVER_CERT (TLS is served on SMQ_MQTT_ADAPTER_MQTTS_PORT)",
    ),
    ("SMQ_MQTT_ADAPTER_KEY_FILE", "SMQ_MQTT_ADAPTER_SERVER_KEY"),
    (
        "SMQ_MQTT_ADAPTER_CLIENT_CA_FILE",
        "SMQ_MQTT_ADAPTER_CLIENT_CA_CERTS",
    ),
    (
        "SMQ_MQTT_ADAPTER_SERVER_CA_FILE",
        "SMQ_MQTT_ADAPTER_SERVER_CERT (append the intermediate CAs to the chain)",
    ),
    (
        "SMQ_CLIENTS_GRPC_SERVER_CA_CERTS",
        "SMQ_CLIENTS_GRPC_CLIENT_CA_CERTS",
    ),
    (
        "SMQ_CHANNELS_GRPC_SERVER_CA_CERTS",
        "SMQ_CHANNELS_GRPC_CLIENT_CA_CERTS",
    ),
    (
        "SMQ_DOMAINS_GRPC_SERVER_CA_CERTS",
        "SMQ_DOMAINS_GRPC_CLIENT_CA_CERTS",
    ),
];

/// The renamed SuperMQ variables `is_set` reports as set, with the name to use instead.
pub fn renamed_supermq_vars(
    is_set: impl Fn(&str) -> bool,
) -> impl Iterator<Item = (&'static str, &'static str)> {
    RENAMED_SUPERMQ_VARS
        .into_iter()
        .filter(move |(old, _)| is_set(old))
}

/// Parses a duration setting, the one rule for all of them: a bare number is seconds (`30`,
/// `0.5`); otherwise a number with its unit, as SuperMQ writes them (`500ms`, `30s`, `5m`, `1h`,
/// `1m30s`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if let Ok(secs) = text.parse::<f64>() {
        return Duration::try_from_secs_f64(secs)
            .map_err(|_| format!("{text:?} is not a number of seconds zero or above"));
    }
    humantime::parse_duration(text).map_err(|e| {
        format!("{e}; write seconds (30) or a duration with its unit (500ms, 30s, 5m)")
    })
}

/// A duration setting that must not be zero.
fn parse_positive_duration(text: &str) -> Result<Duration, String> {
    match parse_duration(text)? {
        d if d.is_zero() => Err("must be more than zero".into()),
        d => Ok(d),
    }
}

/// A keep-alive: whole seconds up to 65535, as MQTT carries it.
fn parse_keep_alive(text: &str) -> Result<u16, String> {
    let d = parse_duration(text)?;
    if d.subsec_nanos() != 0 {
        return Err("MQTT keep-alives are whole seconds".into());
    }
    u16::try_from(d.as_secs()).map_err(|_| "MQTT keep-alives are at most 65535 s".into())
}

impl Config {
    /// Parses flags and environment; a bad value becomes one line naming both the variable and
    /// the flag (clap alone names only the flag, even when the value came from the environment).
    pub fn from_env_and_args() -> Result<Self, clap::Error> {
        Config::try_parse().map_err(name_the_variable)
    }

    /// A configuration with every default, for embedding the server in tests and tools.
    pub fn defaults() -> Self {
        Config::parse_from(["mqtt-adapter"])
    }
}

/// Arguments of `mqtt-adapter presence`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "mqtt-adapter presence",
    version,
    about = "Who is online, rebuilt from the connection events of every adapter instance \
             writing to the event stream",
    long_about = None
)]
pub struct PresenceArgs {
    /// Event store to read from its start: redis:// (stream supermq.mqtt) or nats:// (JetStream
    /// subject events.supermq.mqtt).
    #[arg(long, env = "SMQ_ES_URL")]
    pub es_url: Option<String>,

    /// The layout the adapters write (`seed` or `supermq`: then the streams
    /// supermq.mqtt.client_connect and …client_disconnect are read).
    #[arg(long, env = "SMQ_MQTT_ADAPTER_EVENT_LAYOUT", value_enum, default_value_t = EventLayout::Seed)]
    pub event_layout: EventLayout,

    /// Print who is online now and exit, instead of following the stream.
    #[arg(long)]
    pub once: bool,

    /// JSON: with --once one object {"online": [...], "instances": {...}}; else one object per
    /// change, a line each.
    #[arg(long)]
    pub json: bool,
}

/// What the command line asks for.
#[derive(Debug, Clone)]
pub enum Invocation {
    /// No subcommand: run the adapter.
    Adapter(Box<Config>),
    Presence(PresenceArgs),
}

impl Invocation {
    /// Reads the process's arguments and environment. A subcommand is the first argument; the
    /// adapter's settings (flags and `SMQ_*` variables) are read only when there is none, so a
    /// tool never fails on an adapter variable it does not use.
    pub fn from_env_and_args() -> Result<Invocation, clap::Error> {
        Self::parse_from(std::env::args_os())
    }

    pub fn parse_from<I, T>(args: I) -> Result<Invocation, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let args: Vec<std::ffi::OsString> = args.into_iter().map(Into::into).collect();
        if args.get(1).is_some_and(|a| a == "presence") {
            let rest = std::iter::once(std::ffi::OsString::from("mqtt-adapter presence"))
                .chain(args.into_iter().skip(2));
            return PresenceArgs::try_parse_from(rest).map(Invocation::Presence);
        }
        Config::try_parse_from(args)
            .map(|c| Invocation::Adapter(Box::new(c)))
            .map_err(name_the_variable)
    }
}

fn name_the_variable(err: clap::Error) -> clap::Error {
    if !matches!(
        err.kind(),
        ErrorKind::ValueValidation | ErrorKind::InvalidValue
    ) {
        return err;
    }
    let Some(ContextValue::String(arg)) = err.get(ContextKind::InvalidArg) else {
        return err;
    };
    let long = arg
        .split_whitespace()
        .next()
        .unwrap_or("")
        .trim_start_matches("--");
    let command = Config::command();
    let Some(env) = command
        .get_arguments()
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env())
    else {
        return err;
    };
    let value = match err.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(v)) => v.clone(),
        _ => String::new(),
    };
    let text = err.to_string();
    let reason = text
        .lines()
        .next()
        .and_then(|l| l.rsplit_once(": "))
        .map(|(_, r)| r.to_owned())
        .unwrap_or_default();
    clap::Error::raw(
        err.kind(),
        format!(
            "{} (--{long}): invalid value {value:?}: {reason}\n",
            env.to_string_lossy()
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renamed_supermq_variables_are_named_with_their_replacement() {
        let set = [
            "SMQ_MQTT_ADAPTER_CERT_FILE",
            "SMQ_CLIENTS_GRPC_SERVER_CA_CERTS",
        ];
        let found: Vec<(&str, &str)> = renamed_supermq_vars(|name| set.contains(&name)).collect();
        assert_eq!(found.len(), 2);
        assert!(found[0].1.starts_with("SMQ_MQTT_ADAPTER_SERVER_CERT"));
        assert_eq!(found[1].1, "SMQ_CLIENTS_GRPC_CLIENT_CA_CERTS");
        assert_eq!(renamed_supermq_vars(|_| false).count(), 0);
    }

    #[test]
    fn event_layout_defaults_to_seed_and_takes_supermq() {
        assert_eq!(Config::defaults().event_layout, EventLayout::Seed);
        let config = Config::parse_from(["mqtt-adapter", "--event-layout", "supermq"]);
        assert_eq!(config.event_layout, EventLayout::Supermq);
        assert!(Config::try_parse_from(["mqtt-adapter", "--event-layout", "journal"]).is_err());
    }

    #[test]
    fn a_bare_number_is_seconds_and_units_are_accepted() {
        let cases = [
            ("30", Duration::from_secs(30)),
            ("0.5", Duration::from_millis(500)),
            ("0", Duration::ZERO),
            ("500ms", Duration::from_millis(500)),
            ("30s", Duration::from_secs(30)),
            ("5m", Duration::from_secs(300)),
            ("1h", Duration::from_secs(3600)),
            ("1m30s", Duration::from_secs(90)),
            (" 7 ", Duration::from_secs(7)),
        ];
        for (text, want) in cases {
            assert_eq!(parse_duration(text), Ok(want), "{text}");
        }
        for bad in ["", "-1", "soon", "5 parsecs", "NaN", "inf", "1e400"] {
            let err = parse_duration(bad).unwrap_err();
            assert!(!err.is_empty(), "{bad}");
        }
    }

    /// Every duration setting follows the one rule: the same value written as seconds or with
    /// a unit means the same.
    #[test]
    fn every_duration_setting_takes_seconds_and_units() {
        type Get = fn(&Config) -> Duration;
        let settings: [(&str, Get); 11] = [
            ("--connect-timeout", |c| c.connect_timeout),
            ("--shutdown-timeout", |c| c.shutdown_timeout),
            ("--handshake-timeout", |c| c.handshake_timeout),
            ("--drain-grace", |c| c.drain_grace),
            ("--auth-ban", |c| c.auth_ban),
            ("--event-fsync-interval", |c| c.event_fsync_interval),
            ("--clients-grpc-timeout", |c| c.clients_grpc_timeout),
            ("--channels-grpc-timeout", |c| c.channels_grpc_timeout),
            ("--domains-grpc-timeout", |c| c.domains_grpc_timeout),
            ("--auth-cache-allow-ttl", |c| c.auth_cache_allow_ttl),
            ("--auth-cache-deny-ttl", |c| c.auth_cache_deny_ttl),
        ];
        for (flag, get) in settings {
            for (text, want) in [
                ("30", Duration::from_secs(30)),
                ("30s", Duration::from_secs(30)),
                ("1500ms", Duration::from_millis(1500)),
                ("2m", Duration::from_secs(120)),
            ] {
                let config = Config::try_parse_from(["mqtt-adapter", flag, text])
                    .unwrap_or_else(|e| panic!("{flag} {text}: {e}"));
                assert_eq!(get(&config), want, "{flag} {text}");
            }
        }
        // Keep-alive is carried in whole seconds.
        for (text, want) in [("90", 90), ("90s", 90), ("2m", 120), ("0", 0)] {
            let config =
                Config::try_parse_from(["mqtt-adapter", "--max-keep-alive", text]).unwrap();
            assert_eq!(config.max_keep_alive, want, "{text}");
        }
        for bad in ["1500ms", "65536", "19h"] {
            assert!(
                Config::try_parse_from(["mqtt-adapter", "--max-keep-alive", bad]).is_err(),
                "{bad}"
            );
        }
        // Timeouts that would close every socket at once are refused.
        for flag in ["--connect-timeout", "--handshake-timeout"] {
            assert!(
                Config::try_parse_from(["mqtt-adapter", flag, "0"]).is_err(),
                "{flag}"
            );
            assert!(
                Config::try_parse_from(["mqtt-adapter", flag, "0ms"]).is_err(),
                "{flag}"
            );
        }
    }

    #[test]
    fn a_bad_duration_names_the_variable_and_the_rule() {
        let err = Config::try_parse_from(["mqtt-adapter", "--auth-ban", "soon"]).unwrap_err();
        let line = name_the_variable(err).to_string();
        assert!(
            line.contains("SMQ_MQTT_ADAPTER_AUTH_BAN (--auth-ban)") && line.contains("30s"),
            "{line}"
        );
    }

    #[test]
    fn help_states_the_duration_rule_once() {
        let help = Config::command().render_help().to_string();
        assert_eq!(
            help.matches("a bare number is seconds").count(),
            1,
            "{help}"
        );
    }

    #[test]
    fn defaults_match_the_spec() {
        let config = Config::try_parse_from(["mqtt-adapter"]).expect("defaults parse");
        assert_eq!(config.mqtt_port, 1883);
        assert_eq!(config.instance, "");
        assert_eq!(config.auth, AuthBackend::Static);
        assert_eq!(config.connect_timeout, Duration::from_secs(10));
        assert_eq!(config.handshake_timeout, Duration::from_secs(10));
        assert_eq!(config.shutdown_timeout, Duration::from_secs(10));
        assert_eq!(config.drain_grace, Duration::ZERO);
        assert_eq!(config.max_keep_alive, 0);
        assert_eq!(config.data_dir, PathBuf::from("./data"));
        assert_eq!(config.state, StateBackend::Local);
        assert!(!config.event_details);
        assert_eq!(config.event_fsync, FsyncMode::Off);
        assert_eq!(config.event_fsync_interval, Duration::from_millis(100));
        assert_eq!(
            (config.mqtts_port, config.ws_port, config.http_port),
            (8883, 8080, 9090)
        );
        assert!(config.server_cert.is_none() && !config.cert_cn_as_username);

        assert_eq!(config.clients_grpc_timeout, Duration::from_secs(1));
        assert_eq!(config.channels_grpc_timeout, Duration::from_secs(1));
        assert_eq!(config.auth_cache_allow_ttl, Duration::from_secs(10));
        assert_eq!(config.auth_cache_deny_ttl, Duration::from_secs(2));
        assert_eq!(config.message_broker_url, None);
        assert_eq!(config.auth_failures_per_ip, 20);
        assert_eq!(config.auth_ban, Duration::from_secs(60));
        assert_eq!(config.max_subscriptions, 1000);
        assert_eq!(
            (config.max_topic_length, config.max_topic_levels),
            (1024, 32)
        );
    }

    #[test]
    fn presence_is_a_subcommand_and_no_subcommand_runs_the_adapter() {
        let adapter = Invocation::parse_from(["mqtt-adapter", "--mqtt-port", "1884"]).unwrap();
        assert!(matches!(adapter, Invocation::Adapter(c) if c.mqtt_port == 1884));
        let presence = Invocation::parse_from([
            "mqtt-adapter",
            "presence",
            "--es-url",
            "redis://h:1",
            "--once",
            "--json",
        ])
        .unwrap();
        let Invocation::Presence(args) = presence else {
            panic!("not presence: {presence:?}");
        };
        assert_eq!(args.es_url.as_deref(), Some("redis://h:1"));
        assert!(args.once && args.json);
        // Adapter flags belong to the adapter.
        assert!(Invocation::parse_from(["mqtt-adapter", "presence", "--mqtt-port", "1"]).is_err());
    }

    #[test]
    fn bad_port_names_the_variable_and_the_flag() {
        let err = Config::try_parse_from(["mqtt-adapter", "--mqtt-port", "99999"]).unwrap_err();
        let line = name_the_variable(err).to_string();
        assert!(
            line.contains("SMQ_MQTT_ADAPTER_MQTT_PORT (--mqtt-port)"),
            "{line}"
        );
        assert!(line.contains("99999"), "{line}");
    }
}
