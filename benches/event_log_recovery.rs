//! Start-up after a crash with many sessions open (not a test; `cargo bench --bench
//! event_log_recovery`, see benches/README.md, section "Event log").
//!
//! A data directory is written through the library's `EventLog` exactly as an adapter killed
//! with `BENCH_OPEN_SESSIONS` (100,000) sessions open leaves it: every `connect` written and
//! delivered, none closed. The adapter then starts on it with a private Redis up. Printed: the
//! time from spawn to the listeners accepting, the adapter's own figure for opening the log and
//! logging every recovery `disconnect` (`event log ready took_ms`), and the time until Redis
//! holds them all. `BENCH_ADAPTER_BIN` runs another adapter binary (e.g. the release one from a
//! debug build of this bench). Under `cargo test --all-targets` it is a 100-session smoke pass.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use common::stores::{StoreKind, StoreServer};
use common::{adapter_command, free_port};
use mqtt_adapter::events::{
    ConnectionEvent, DataDir, EventDetails, EventLog, EventSink, EventType, FsyncMode, LogSettings,
    SinkError,
};
use tokio_util::sync::CancellationToken;

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
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
    let clients = data.path().join("clients.toml");
    std::fs::write(&clients, "[anonymous]\ntopics = [\"#\"]\n").expect("clients file");
    let port = free_port();
    let template = adapter_command(
        port,
        Some(&clients),
        &[
            ("SMQ_ES_URL", url.as_str()),
            ("SMQ_MQTT_ADAPTER_DATA_DIR", data_dir.as_str()),
            ("SMQ_MQTT_ADAPTER_HOST", "127.0.0.1"),
        ],
    );
    let bin =
        std::env::var_os("BENCH_ADAPTER_BIN").unwrap_or_else(|| template.get_program().to_owned());
    let mut cmd = Command::new(&bin);
    for (key, value) in template.get_envs() {
        match value {
            Some(value) => cmd.env(key, value),
            None => cmd.env_remove(key),
        };
    }
    let stderr_path = data.path().join("adapter.stderr");
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr_path).expect("stderr file"));

    let spawned = Instant::now();
    let mut child = cmd.spawn().expect("spawn mqtt-adapter");
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(
            child.try_wait().expect("child status").is_none(),
            "the adapter exited: {}",
            std::fs::read_to_string(&stderr_path).unwrap_or_default()
        );
        assert!(
            spawned.elapsed() < Duration::from_secs(300),
            "never listened"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let ready = spawned.elapsed();
    let stored = wait_count(&store, open as u64).await - spawned;
    let stderr = std::fs::read_to_string(&stderr_path).unwrap_or_default();
    let took_ms = stderr
        .lines()
        .find(|l| l.contains("event log ready"))
        .and_then(|l| l.split("took_ms=").nth(1))
        .and_then(|v| v.split_whitespace().next())
        .unwrap_or("?")
        .to_owned();
    println!(
        "start-up after a crash with {open} open sessions ({:.1} MB of log), {}:\n  listeners accepting {:.2} s after spawn (the adapter's own figure for opening the log and logging {open} disconnects: {took_ms} ms)\n  all {open} disconnects in Redis {:.2} s after spawn",
        log_bytes as f64 / 1e6,
        Path::new(&bin).display(),
        ready.as_secs_f64(),
        stored.as_secs_f64()
    );
    let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
    // SAFETY: kill(2) on a child we spawned and have not reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let status = child.wait().expect("adapter exit");
    assert!(status.success(), "adapter exit status {status}");
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this as a smoke run.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let open = knob("BENCH_OPEN_SESSIONS", if smoke { 100 } else { 100_000 });
    startup_after_crash(open).await;
}
