//! The `mqtt-bench` command line: one subcommand per scenario, the connection and load options
//! they share.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::config::parse_duration;

/// Load and latency benchmarks for MQTT brokers (the adapter, Mosquitto, rumqttd, ...).
#[derive(Debug, Parser)]
#[command(name = "mqtt-bench", version)]
pub struct Cli {
    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Debug, Subcommand)]
pub enum Scenario {
    /// N publishers -> 1 subscriber (messages/s the broker can collect).
    FanIn(Throughput),
    /// 1 publisher -> N subscribers (deliveries/s the broker can spread).
    FanOut(Throughput),
    /// N independent publisher/subscriber pairs, each on its own topic.
    Pairs(Throughput),
    /// N clients connect with credentials at a target rate, each holding its connection for a while.
    ///
    /// MQTT 3.1.1 over TCP uses a lean client (CONNECT, CONNACK, PINGREQ during the hold,
    /// DISCONNECT; no event loop), so the load generator costs less than the broker under test.
    ConnectStorm(Storm),
    /// One publisher at a fixed rate, one subscriber: publish -> deliver percentiles.
    Latency(Latency),
}

impl Scenario {
    pub fn name(&self) -> &'static str {
        match self {
            Scenario::FanIn(_) => "fan-in",
            Scenario::FanOut(_) => "fan-out",
            Scenario::Pairs(_) => "pairs",
            Scenario::ConnectStorm(_) => "connect-storm",
            Scenario::Latency(_) => "latency",
        }
    }

    pub fn common(&self) -> &Common {
        match self {
            Scenario::FanIn(t) | Scenario::FanOut(t) | Scenario::Pairs(t) => &t.common,
            Scenario::ConnectStorm(s) => &s.common,
            Scenario::Latency(l) => &l.common,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
pub enum MqttVersion {
    #[value(name = "3.1.1", alias = "4")]
    #[serde(rename = "3.1.1")]
    V311,
    #[value(name = "5")]
    #[serde(rename = "5")]
    V5,
}

/// Where and how every client of a run connects.
#[derive(Debug, Args)]
pub struct Common {
    /// Broker host.
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Broker port.
    #[arg(long, short = 'p', default_value_t = 1883)]
    pub port: u16,
    /// MQTT protocol version.
    #[arg(
        long = "mqtt-version",
        short = 'V',
        value_enum,
        default_value = "3.1.1"
    )]
    pub version: MqttVersion,
    /// Connect over TLS, trusting the CA certificate in this PEM file.
    #[arg(long = "tls-ca", value_name = "PEM")]
    pub tls_ca: Option<PathBuf>,
    /// Username for every client (with --password).
    #[arg(long, short = 'u')]
    pub username: Option<String>,
    /// Password for every client.
    #[arg(long, short = 'P')]
    pub password: Option<String>,
    /// File of `username:password` lines; client i uses line i (wrapping). Overrides -u/-P.
    #[arg(long, value_name = "FILE")]
    pub credentials_file: Option<PathBuf>,
    /// Keep-alive in seconds (some brokers refuse 0).
    #[arg(long, default_value_t = 60)]
    pub keep_alive: u64,
    /// Client identifier prefix; client ids are `<prefix>-<role>-<n>`.
    #[arg(long, default_value = "bench")]
    pub client_prefix: String,
    /// Print one JSON object with the results instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// Message load: what each publisher sends and for how long.
#[derive(Debug, Args)]
pub struct Load {
    /// QoS of publishes and subscriptions.
    #[arg(long, short = 'q', default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub qos: u8,
    /// Payload size in bytes (at least 24: a sequence number and a send timestamp).
    #[arg(long, short = 's', default_value_t = 64)]
    pub payload_size: usize,
    /// Topic template: {domain}, {channel} and {n} (the publisher or pair number) are replaced.
    #[arg(long, short = 't', default_value = "m/{domain}/c/{channel}/bench/{n}")]
    pub topic: String,
    /// Value of {domain} in the topic template.
    #[arg(long, default_value = "bench-domain")]
    pub domain: String,
    /// Value of {channel} in the topic template.
    #[arg(long, default_value = "bench-channel")]
    pub channel: String,
    /// How long to wait for outstanding deliveries after the last publish before counting them
    /// lost (seconds, or with a unit: `500ms`, `2m`).
    #[arg(long, value_parser = parse_duration, default_value = "3")]
    pub drain: Duration,
    /// Unacknowledged QoS 1/2 publishes a client may have in flight.
    #[arg(long, default_value_t = 100)]
    pub inflight: u16,
}

/// fan-in, fan-out, pairs.
#[derive(Debug, Args)]
pub struct Throughput {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub load: Load,
    /// Number of publishers (fan-in), subscribers (fan-out) or pairs.
    #[arg(long, short = 'n', default_value_t = 10)]
    pub clients: usize,
    /// Messages to publish in all (split over the publishers).
    #[arg(
        long,
        short = 'c',
        default_value_t = 100_000,
        conflicts_with = "duration"
    )]
    pub count: u64,
    /// Publish this long instead of a message count (seconds, or with a unit: `500ms`, `2m`).
    #[arg(long, short = 'd', value_parser = parse_duration)]
    pub duration: Option<Duration>,
}

/// connect-storm.
#[derive(Debug, Args)]
pub struct Storm {
    #[command(flatten)]
    pub common: Common,
    /// Clients to connect.
    #[arg(long, short = 'n', default_value_t = 1000)]
    pub clients: usize,
    /// Target connects per second (0: as fast as --concurrency allows).
    #[arg(long, short = 'r', default_value_t = 0)]
    pub rate: u64,
    /// CONNECT handshakes in progress at once.
    #[arg(long, default_value_t = 50)]
    pub concurrency: usize,
    /// How long each client stays connected before it disconnects (seconds, or with a unit).
    #[arg(long, value_parser = parse_duration, default_value = "1")]
    pub hold: Duration,
    /// Bind the clients' sockets to these source addresses, round-robin (client n uses the
    /// n-th, wrapping): a comma list of addresses and IPv4 ranges, e.g. `127.0.0.2-127.0.0.9`
    /// or `127.0.0.2,127.0.0.3`. One source address has ~28,000 ephemeral ports towards one
    /// broker port; each address added gives as many more. TCP only (not with --tls-ca).
    #[arg(long, value_name = "ADDRS", value_parser = parse_sources)]
    pub source: Option<Sources>,
}

/// Source addresses the storm's clients bind to, in round-robin order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sources(Vec<IpAddr>);

/// Addresses one `--source` may name (a range of a /16 at most).
const MAX_SOURCES: u32 = 65_536;

impl Sources {
    /// The source address of client number `n`.
    pub fn for_client(&self, n: usize) -> IpAddr {
        self.0[n % self.0.len()]
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Parses `--source`: comma-separated addresses (IPv4 or IPv6) and IPv4 ranges `first-last`.
pub fn parse_sources(text: &str) -> Result<Sources, String> {
    let mut out = Vec::new();
    for item in text.split(',').map(str::trim) {
        if item.is_empty() {
            return Err(format!("empty address in {text:?}"));
        }
        match item.split_once('-') {
            None => out.push(
                item.parse::<IpAddr>()
                    .map_err(|_| format!("{item:?} is not an IP address"))?,
            ),
            Some((first, last)) => {
                let parse = |a: &str| {
                    a.trim()
                        .parse::<Ipv4Addr>()
                        .map(u32::from)
                        .map_err(|_| format!("{a:?} in range {item:?} is not an IPv4 address"))
                };
                let (first, last) = (parse(first)?, parse(last)?);
                if first > last {
                    return Err(format!("range {item:?} ends before it starts"));
                }
                if last - first >= MAX_SOURCES {
                    return Err(format!(
                        "range {item:?} has more than {MAX_SOURCES} addresses"
                    ));
                }
                out.extend((first..=last).map(|a| IpAddr::V4(Ipv4Addr::from(a))));
            }
        }
    }
    Ok(Sources(out))
}

/// latency.
#[derive(Debug, Args)]
pub struct Latency {
    #[command(flatten)]
    pub common: Common,
    #[command(flatten)]
    pub load: Load,
    /// Publishes per second.
    #[arg(long, short = 'r', default_value_t = 1000)]
    pub rate: u64,
    /// Messages to publish in all.
    #[arg(
        long,
        short = 'c',
        default_value_t = 10_000,
        conflicts_with = "duration"
    )]
    pub count: u64,
    /// Publish this long instead of a message count (seconds, or with a unit: `500ms`, `2m`).
    #[arg(long, short = 'd', value_parser = parse_duration)]
    pub duration: Option<Duration>,
}

/// What every client needs to open its connection, resolved from [`Common`].
#[derive(Debug, Clone)]
pub struct Connection {
    pub host: String,
    pub port: u16,
    pub version: MqttVersion,
    pub keep_alive: u64,
    pub tls_ca: Option<Vec<u8>>,
    pub inflight: u16,
    pub credentials: Vec<(String, String)>,
    pub client_prefix: String,
    /// Source addresses to bind to (connect-storm's `--source`); `None`: the system's choice.
    pub sources: Option<Sources>,
}

/// A bad option value, naming the option to change.
#[derive(Debug, thiserror::Error)]
pub enum OptionError {
    #[error("--tls-ca {path}: {source}")]
    TlsCa {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--credentials-file {path}: {message}")]
    Credentials { path: PathBuf, message: String },
    #[error("--username and --password go together: give both or neither")]
    HalfCredentials,
    #[error("--payload-size must be at least {min} bytes (sequence number and timestamp)")]
    PayloadTooSmall { min: usize },
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("--source binds TCP connections: leave out --tls-ca, or --source")]
    SourceWithTls,
}

impl Connection {
    pub fn resolve(common: &Common, inflight: u16) -> Result<Connection, OptionError> {
        let tls_ca = match &common.tls_ca {
            None => None,
            Some(path) => Some(std::fs::read(path).map_err(|source| OptionError::TlsCa {
                path: path.clone(),
                source,
            })?),
        };
        let credentials = match (&common.credentials_file, &common.username, &common.password) {
            (Some(path), _, _) => read_credentials(path)?,
            (None, Some(user), Some(pass)) => vec![(user.clone(), pass.clone())],
            (None, None, None) => Vec::new(),
            (None, _, _) => return Err(OptionError::HalfCredentials),
        };
        Ok(Connection {
            host: common.host.clone(),
            port: common.port,
            version: common.version,
            keep_alive: common.keep_alive,
            tls_ca,
            inflight: inflight.max(1),
            credentials,
            client_prefix: common.client_prefix.clone(),
            sources: None,
        })
    }

    /// The credentials of client number `n`, if any were given.
    pub fn credentials_for(&self, n: usize) -> Option<(&str, &str)> {
        if self.credentials.is_empty() {
            return None;
        }
        let (user, pass) = &self.credentials[n % self.credentials.len()];
        Some((user.as_str(), pass.as_str()))
    }

    pub fn client_id(&self, role: &str, n: usize) -> String {
        format!("{}-{role}-{n}", self.client_prefix)
    }
}

fn read_credentials(path: &PathBuf) -> Result<Vec<(String, String)>, OptionError> {
    let bad = |message: String| OptionError::Credentials {
        path: path.clone(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (user, pass) = line
            .split_once(':')
            .ok_or_else(|| bad(format!("line {}: expected username:password", i + 1)))?;
        out.push((user.to_owned(), pass.to_owned()));
    }
    if out.is_empty() {
        return Err(bad("no username:password line".into()));
    }
    Ok(out)
}

impl Load {
    /// The topic of publisher (or pair) `n`.
    pub fn topic(&self, n: usize) -> String {
        self.topic
            .replace("{domain}", &self.domain)
            .replace("{channel}", &self.channel)
            .replace("{n}", &n.to_string())
    }

    /// A filter matching every publisher's topic: the template with `{n}` (and what follows) as `#`.
    pub fn filter_all(&self) -> String {
        let template = match self.topic.find("{n}") {
            Some(at) => format!("{}#", &self.topic[..at]),
            None => self.topic.clone(),
        };
        template
            .replace("{domain}", &self.domain)
            .replace("{channel}", &self.channel)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_are_lists_and_ranges_in_order() {
        let s = parse_sources("127.0.0.2-127.0.0.4,10.0.0.1, ::1").expect("valid");
        let all: Vec<String> = (0..s.len()).map(|n| s.for_client(n).to_string()).collect();
        assert_eq!(
            all,
            ["127.0.0.2", "127.0.0.3", "127.0.0.4", "10.0.0.1", "::1"]
        );
        assert_eq!(
            s.for_client(5).to_string(),
            "127.0.0.2",
            "round-robin wraps"
        );
        assert_eq!(parse_sources("127.0.0.9-127.0.0.9").expect("one").len(), 1);
    }

    #[test]
    fn bad_sources_say_what_is_wrong() {
        for (bad, says) in [
            ("127.0.0.9-127.0.0.2", "ends before it starts"),
            ("localhost", "not an IP address"),
            ("127.0.0.2-::1", "not an IPv4 address"),
            ("127.0.0.2,", "empty address"),
            ("10.0.0.0-10.1.0.0", "more than"),
        ] {
            let e = parse_sources(bad).expect_err(bad);
            assert!(e.contains(says), "{bad}: {e}");
        }
    }
}
