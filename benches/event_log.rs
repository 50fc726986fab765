//! The durable event log (not a test; `cargo bench --bench event_log`, see benches/README.md).
//!
//! 1. **Connect storm**: `BENCH_SESSIONS` (5,000) devices at `BENCH_CONCURRENCY` (50) in flight
//!    against the release adapter with events to a private `redis-server` at each
//!    `SMQ_MQTT_ADAPTER_EVENT_FSYNC` mode (`off`, `interval`, `always`), beside the stdout sink
//!    (no log) and a Mosquitto started on a free port, all anonymous. `BENCH_ROUNDS` (3) rounds,
//!    the order rotating each round; medians are printed.
//! 2. **Start-up after a crash** with `BENCH_OPEN_SESSIONS` (100,000) sessions open: a data
//!    directory is written through the library's `EventLog` exactly as a killed adapter leaves it
//!    (every `connect` delivered, none closed), then the release adapter starts on it with Redis
//!    up. Printed: the time from spawn to the listeners accepting, the adapter's own figure for
//!    opening the log and logging the recovery, and the time until Redis holds every recovery
//!    `disconnect`.
//!
//! Under `cargo test --all-targets` it runs once as a small smoke pass.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "common/storm.rs"]
mod storm;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::stores::{StoreKind, StoreServer};
use common::{free_port, Adapter};
use mqtt_adapter::events::{
    ConnectionEvent, DataDir, EventDetails, EventLog, EventSink, EventType, FsyncMode, LogSettings,
    SinkError,
};
use storm::{pct, storm, Storm};
use tokio_util::sync::CancellationToken;

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Every device may connect: the anonymous section admits CONNECTs with no username.
const CLIENTS: &str = "[anonymous]\ntopics = [\"#\"]\n";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    Stdout,
    Redis(&'static str),
    Mosquitto,
}

impl Target {
    fn label(self) -> String {
        match self {
            Target::Stdout => "adapter, stdout sink".into(),
            Target::Redis(fsync) => format!("adapter, Redis, fsync {fsync}"),
            Target::Mosquitto => "Mosquitto".into(),
        }
    }
}

fn mosquitto_bin() -> Option<&'static str> {
    [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .into_iter()
    .find(|p| Path::new(p).exists())
}

/// A Mosquitto we started on a free loopback port (anonymous, no persistence).
struct Mosquitto {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    async fn start() -> Mosquitto {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        // As root Mosquitto switches to user `mosquitto`; it reads nothing after that here.
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_connections -1\n"),
        )
        .expect("write mosquitto.conf");
        let bin = mosquitto_bin().expect("mosquitto installed");
        let child = Command::new(bin)
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto (apt-get install mosquitto)");
        let deadline = Instant::now() + Duration::from_secs(20);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "mosquitto did not listen");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Mosquitto {
            child,
            port,
            _dir: dir,
        }
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn wait_count(store: &StoreServer, n: u64) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if matches!(store.count().await, Ok(c) if c >= n) {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "events never arrived in the store"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

struct Run {
    connects_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Seconds from the first CONNECT until every event was in Redis.
    stored_after: Option<f64>,
}

fn run_of(s: &Storm, sessions: usize, stored: Option<Instant>) -> Run {
    Run {
        connects_per_s: sessions as f64 / (s.finished - s.started).as_secs_f64(),
        p50_ms: pct(&s.latencies, 0.50),
        p99_ms: pct(&s.latencies, 0.99),
        stored_after: stored.map(|t| (t - s.started).as_secs_f64()),
    }
}

async fn storm_once(target: Target, sessions: usize, concurrency: usize) -> Run {
    let base_env = [
        ("SMQ_MQTT_ADAPTER_LOG_LEVEL", "warn"),
        ("SMQ_MQTT_ADAPTER_CONNECT_RATE_PER_IP", "0"),
    ];
    match target {
        Target::Mosquitto => {
            let broker = Mosquitto::start().await;
            let s = storm(broker.port, sessions, concurrency).await;
            run_of(&s, sessions, None)
        }
        Target::Stdout => {
            let adapter = Adapter::start_with(CLIENTS, &base_env).await;
            let s = storm(adapter.port, sessions, concurrency).await;
            adapter.shutdown().await;
            run_of(&s, sessions, None)
        }
        Target::Redis(fsync) => {
            let store = StoreServer::start(StoreKind::Redis).await;
            let url = store.url();
            let data = tempfile::tempdir().expect("temp dir");
            let data_dir = data.path().to_string_lossy().into_owned();
            let mut env = base_env.to_vec();
            env.extend([
                ("SMQ_ES_URL", url.as_str()),
                ("SMQ_MQTT_ADAPTER_DATA_DIR", data_dir.as_str()),
                ("SMQ_MQTT_ADAPTER_EVENT_FSYNC", fsync),
            ]);
            let adapter = Adapter::start_with(CLIENTS, &env).await;
            let s = storm(adapter.port, sessions, concurrency).await;
            let stored = wait_count(&store, 2 * sessions as u64).await;
            adapter.shutdown().await;
            run_of(&s, sessions, Some(stored))
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

async fn connect_storms(sessions: usize, concurrency: usize, rounds: usize) {
    let mut targets = vec![
        Target::Stdout,
        Target::Redis("off"),
        Target::Redis("interval"),
        Target::Redis("always"),
    ];
    if mosquitto_bin().is_some() {
        targets.push(Target::Mosquitto);
    } else {
        println!("mosquitto is not installed: the comparison runs without it");
    }
    println!(
        "connect storm: {sessions} sessions, {concurrency} in flight, {rounds} rounds (medians)"
    );
    let mut runs: Vec<Vec<Run>> = targets.iter().map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for k in 0..targets.len() {
            let i = (k + round) % targets.len();
            runs[i].push(storm_once(targets[i], sessions, concurrency).await);
        }
    }
    let stdout_rate = median(runs[0].iter().map(|r| r.connects_per_s).collect());
    println!(
        "{:<32} {:>11} {:>9} {:>9} {:>10} {:>9}",
        "target", "connects/s", "p50 ms", "p99 ms", "stored s", "vs stdout"
    );
    for (target, runs) in targets.iter().zip(&runs) {
        let rate = median(runs.iter().map(|r| r.connects_per_s).collect());
        let stored = runs
            .iter()
            .map(|r| r.stored_after)
            .collect::<Option<Vec<_>>>()
            .map(|v| format!("{:.2}", median(v)))
            .unwrap_or_else(|| "-".into());
        println!(
            "{:<32} {:>11.0} {:>9.2} {:>9.2} {:>10} {:>8.0}%",
            target.label(),
            rate,
            median(runs.iter().map(|r| r.p50_ms).collect()),
            median(runs.iter().map(|r| r.p99_ms).collect()),
            stored,
            100.0 * rate / stdout_rate
        );
    }
}

/// Takes everything at once, as a store that is up.
struct Discard;

#[async_trait]
impl EventSink for Discard {
    fn name(&self) -> &'static str {
        "discard"
    }
    async fn publish(&mut self, _batch: &[ConnectionEvent]) -> Result<(), SinkError> {
        Ok(())
    }
}

/// A data directory as an adapter killed with `open` sessions leaves it: their `connect`s
/// written and delivered, no `disconnect`.
async fn crashed_data_dir(dir: &Path, open: usize) {
    let data = DataDir::open(dir).expect("data dir");
    let settings = LogSettings {
        max_bytes: 256 << 20,
        fsync: FsyncMode::Off,
        fsync_interval: Duration::from_millis(100),
        max_pending: open + 1,
    };
    let (log, _) = EventLog::open(&data, settings).expect("open the log");
    let stop = CancellationToken::new();
    let delivery = log.deliver(Box::new(Discard), stop.clone());
    for i in 0..open {
        let event = ConnectionEvent {
            client_id: format!("device-{i}"),
            event_type: EventType::Connect,
            instance: String::new(),
            occurred_at: 0,
            details: EventDetails::default(),
        };
        let peer = format!(
            "127.0.{}.{}:{}",
            (i >> 16) & 0xff,
            (i >> 8) & 0xff,
            10_000 + (i & 0xff)
        );
        let _ = log.append(format!("{peer} device-{i}"), event);
    }
    assert!(
        log.flush(Duration::from_secs(120)).await,
        "written and delivered"
    );
    stop.cancel();
    delivery.await.expect("delivery task");
    // No close: the process "dies" here, with everything written.
}

async fn startup_after_crash(open: usize) {
    let data = tempfile::tempdir().expect("temp dir");
    crashed_data_dir(data.path(), open).await;
    let log_bytes: u64 = std::fs::read_dir(data.path())
        .expect("data dir")
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    let store = StoreServer::start(StoreKind::Redis).await;
    let url = store.url();
    let data_dir = data.path().to_string_lossy().into_owned();
    let env = [
        ("SMQ_ES_URL", url.as_str()),
        ("SMQ_MQTT_ADAPTER_DATA_DIR", data_dir.as_str()),
        ("SMQ_MQTT_ADAPTER_LOG_LEVEL", "info"),
    ];
    let spawned = Instant::now();
    let adapter = Adapter::start_with(CLIENTS, &env).await;
    let ready = spawned.elapsed();
    let stored = wait_count(&store, open as u64).await - spawned;
    let took_ms = adapter
        .stderr()
        .lines()
        .find(|l| l.contains("event log ready"))
        .and_then(|l| l.split("took_ms=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or("?")
        .to_owned();
    println!(
        "start-up after a crash with {open} open sessions ({:.1} MB of log): listeners accepting {:.2} s after spawn (log opened and {open} disconnects logged: {took_ms} ms); all {open} disconnects in Redis {:.2} s after spawn",
        log_bytes as f64 / 1e6,
        ready.as_secs_f64(),
        stored.as_secs_f64()
    );
    adapter.shutdown().await;
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this as a smoke run.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let sessions = knob("BENCH_SESSIONS", if smoke { 20 } else { 5000 });
    let concurrency = knob("BENCH_CONCURRENCY", if smoke { 4 } else { 50 });
    let rounds = knob("BENCH_ROUNDS", if smoke { 1 } else { 3 });
    let open = knob("BENCH_OPEN_SESSIONS", if smoke { 100 } else { 100_000 });
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "storm" {
        connect_storms(sessions, concurrency, rounds).await;
    }
    if only.is_empty() || only == "startup" {
        startup_after_crash(open).await;
    }
}
