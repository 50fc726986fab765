//! Start-up configuration: every setting is an environment variable with the SuperMQ name and a
//! command-line flag of the same meaning; `--help` lists them with their defaults.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{CommandFactory, Parser, ValueEnum};

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
}

impl Config {
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs(self.connect_timeout)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout)
    }

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
    fn defaults_match_the_spec() {
        let config = Config::try_parse_from(["mqtt-adapter"]).expect("defaults parse");
        assert_eq!(config.mqtt_port, 1883);
        assert_eq!(config.instance, "");
        assert_eq!(config.auth, AuthBackend::Static);
        assert_eq!(config.connect_timeout(), Duration::from_secs(10));
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
