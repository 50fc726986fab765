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

    /// Directory for the event spool and the session journal (used when SMQ_ES_URL is set);
    /// one adapter process per directory.
    #[arg(long, env = "SMQ_MQTT_ADAPTER_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,

    /// Largest size in bytes of the on-disk event spool; when full, the oldest events are
    /// dropped (counted and logged).
    #[arg(long, env = "SMQ_MQTT_ADAPTER_EVENT_SPOOL_SIZE", default_value_t = 256 * 1024 * 1024, value_parser = clap::value_parser!(u64).range(1024..))]
    pub event_spool_size: u64,

    /// Adds `reason` to `disconnect` events and `remote_addr`, `protocol_version`,
    /// `mqtt_client_id` to `connect` events (off: exactly the seed's four fields).
    #[arg(long, env = "SMQ_MQTT_ADAPTER_EVENT_DETAILS", default_value_t = false, action = clap::ArgAction::Set)]
    pub event_details: bool,
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
    fn defaults_match_the_spec() {
        let config = Config::try_parse_from(["mqtt-adapter"]).expect("defaults parse");
        assert_eq!(config.mqtt_port, 1883);
        assert_eq!(config.instance, "");
        assert_eq!(config.auth, AuthBackend::Static);
        assert_eq!(config.connect_timeout(), Duration::from_secs(10));
        assert_eq!(config.data_dir, PathBuf::from("./data"));
        assert!(!config.event_details);
    }

    #[test]
    fn bad_port_names_the_flag() {
        let err = Config::try_parse_from(["mqtt-adapter", "--mqtt-port", "99999"]).unwrap_err();
        assert!(err.to_string().contains("--mqtt-port"), "{err}");
    }
}
