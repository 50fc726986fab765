//! Start-up configuration: every setting is an environment variable with the SuperMQ name and a
//! command-line flag of the same meaning; `--help` lists them with their defaults.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

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
    about = "MQTT adapter for SuperMQ-family IoT platforms"
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

    /// Seconds a new socket may take to send its CONNECT before it is closed.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_CONNECT_TIMEOUT", default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub connect_timeout: u64,

    /// Largest MQTT packet accepted from a device, in bytes.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_MAX_PACKET_SIZE", default_value_t = 1024 * 1024, value_parser = clap::value_parser!(u32).range(64..=268_435_455))]
    pub max_packet_size: u32,

    /// Connection events buffered in memory while the event store is slow; beyond it they are
    /// counted as dropped.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_EVENT_BUFFER", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub event_buffer: u64,

    /// Seconds a shutdown waits for sessions to close and events to flush.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_SHUTDOWN_TIMEOUT", default_value_t = 10)]
    pub shutdown_timeout: u64,

    /// URL of the platform's clients service (Authenticate), e.g. http://clients:7005 (https:// for TLS); required with
    /// `--auth supermq`.
    #[arg(long, env = "SMQ_CLIENTS_GRPC_URL")]
    pub clients_grpc_url: Option<String>,

    /// Deadline of one call to the clients service (Authenticate) (`1s`, `500ms`).
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

    /// Deadline of one call to the channels service (Authorize) (`1s`, `500ms`).
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

    /// How long a positive answer of the platform's auth services is cached (`10s`).
    #[arg(long, env = "SMQ_MQTT_ADAPTER_AUTH_CACHE_ALLOW_TTL", default_value = "10s", value_parser = parse_duration)]
    pub auth_cache_allow_ttl: Duration,

    /// How long a negative answer of the platform's auth services is cached (`2s`).
    #[arg(long, env = "SMQ_MQTT_ADAPTER_AUTH_CACHE_DENY_TTL", default_value = "2s", value_parser = parse_duration)]
    pub auth_cache_deny_ttl: Duration,

    /// Most answers each auth cache (authenticate, authorize) keeps.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_AUTH_CACHE_SIZE", default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub auth_cache_size: u64,

    /// Message bus (NATS) URL for the message bridge, e.g. nats://localhost:4222; unset: no bridge.
    #[arg(long, env = "SMQ_MESSAGE_BROKER_URL")]
    pub message_broker_url: Option<String>,

    /// Messages the bridge queues in each direction while NATS or the router is slow; beyond it
    /// they are counted as dropped.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_BRIDGE_BUFFER", default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
    pub bridge_buffer: u64,
}

/// Parses a duration written as SuperMQ writes them (`1s`, `500ms`, `2m`).
fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{e}; write a duration such as 1s or 500ms"))
}

impl Config {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout)
    }

    /// A configuration with every default, for embedding the server in tests and tools.
    pub fn defaults() -> Self {
        Config::parse_from(["mqtt-adapter"])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_take_go_style_durations() {
        let config =
            Config::try_parse_from(["mqtt-adapter", "--clients-grpc-timeout", "250ms"]).unwrap();
        assert_eq!(config.clients_grpc_timeout, Duration::from_millis(250));
        let err = Config::try_parse_from(["mqtt-adapter", "--channels-grpc-timeout", "5"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--channels-grpc-timeout") && err.contains("1s"),
            "{err}"
        );
    }

    #[test]
    fn defaults_match_the_spec() {
        let config = Config::try_parse_from(["mqtt-adapter"]).expect("defaults parse");
        assert_eq!(config.mqtt_port, 1883);
        assert_eq!(config.instance, "");
        assert_eq!(config.auth, AuthBackend::Static);
        assert_eq!(config.connect_timeout(), Duration::from_secs(10));
        assert_eq!(config.clients_grpc_timeout, Duration::from_secs(1));
        assert_eq!(config.channels_grpc_timeout, Duration::from_secs(1));
        assert_eq!(config.auth_cache_allow_ttl, Duration::from_secs(10));
        assert_eq!(config.auth_cache_deny_ttl, Duration::from_secs(2));
        assert_eq!(config.message_broker_url, None);
    }

    #[test]
    fn bad_port_names_the_flag() {
        let err = Config::try_parse_from(["mqtt-adapter", "--mqtt-port", "99999"]).unwrap_err();
        assert!(err.to_string().contains("--mqtt-port"), "{err}");
    }
}
