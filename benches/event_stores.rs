//! Event stores under a connection storm (not a test; run with `cargo bench --bench event_stores`).
//!
//! For each store (a private `redis-server` / `nats-server -js` on a free port, the machine's
//! RabbitMQ) the release adapter runs with `SMQ_ES_URL` set, and `SESSIONS` devices connect and
//! disconnect, `CONCURRENCY` at a time. Reported:
//! - connect latency (CONNECT written -> CONNACK read), p50 / p99 / max;
//! - sustained events/s into the store: 2 × SESSIONS events over the time from the first CONNECT
//!   to the last event stored;
//! - the same storm with the store down (Redis and NATS: stopped before the storm), whose connect
//!   latency must match the store-up figure, then the replay rate once the store is back.
//!
//! Knobs (environment): BENCH_SESSIONS (default 5000), BENCH_CONCURRENCY (50),
//! BENCH_STORES (redis,nats,amqp), BENCH_EVENT_BUFFER (the event log writer's intake in the
//! store-down run).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "common/storm.rs"]
mod storm;

use std::time::{Duration, Instant};

use common::stores::{amqp_url, AmqpQueue, StoreKind, StoreServer};
use common::Adapter;
use storm::{pct, storm, Storm};

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Every device may connect: the anonymous section admits CONNECTs with no username.
const CLIENTS: &str = "[anonymous]\ntopics = [\"#\"]\n";

/// One line per run; `stored_at` (when the last event was stored) only when the store was up.
fn report(label: &str, storm: &Storm, sessions: usize, stored_at: Option<Instant>) {
    let l = &storm.latencies;
    let storm_secs = (storm.finished - storm.started).as_secs_f64();
    let events = match stored_at {
        Some(at) => {
            let secs = (at - storm.started).as_secs_f64();
            format!(
                "events/s {:>7.0} ({} events stored {:.2} s after the first CONNECT)",
                (2 * sessions) as f64 / secs,
                2 * sessions,
                secs
            )
        }
        None => "events kept in the event log".to_owned(),
    };
    println!(
        "{label:<20} connects/s {:>6.0}  CONNACK ms p50 {:>6.2} p99 {:>6.2} max {:>7.2}  {events}",
        sessions as f64 / storm_secs,
        pct(l, 0.50),
        pct(l, 0.99),
        pct(l, 1.0),
    );
}

async fn wait_count(store: &StoreServer, n: u64) -> Instant {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if matches!(store.count().await, Ok(c) if c >= n) {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "{:?}: events never arrived",
            store.kind
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn bench_store(kind: StoreKind, sessions: usize, concurrency: usize) {
    let data = tempfile::tempdir().expect("temp dir");
    let data_dir = data.path().join("up").to_string_lossy().into_owned();
    let store = StoreServer::start(kind).await;
    let url = store.url();
    let env = [
        ("SMQ_ES_URL", url.as_str()),
        ("SMQ_MQTT_ADAPTER_DATA_DIR", data_dir.as_str()),
        ("SMQ_MQTT_ADAPTER_LOG_LEVEL", "warn"),
        ("SMQ_MQTT_ADAPTER_CONNECT_RATE_PER_IP", "0"),
    ];
    let adapter = Adapter::start_with(CLIENTS, &env).await;
    let up = storm(adapter.port, sessions, concurrency).await;
    let stored = wait_count(&store, 2 * sessions as u64).await;
    report(&format!("{kind:?} up"), &up, sessions, Some(stored));
    adapter.shutdown().await;
    drop(store);

    let mut store = StoreServer::start(kind).await;
    store.stop();
    let url = store.url();
    let data_dir = data.path().join("down").to_string_lossy().into_owned();
    let buffer = knob("BENCH_EVENT_BUFFER", 100_000).to_string();
    let env = [
        ("SMQ_ES_URL", url.as_str()),
        ("SMQ_MQTT_ADAPTER_DATA_DIR", data_dir.as_str()),
        ("SMQ_MQTT_ADAPTER_LOG_LEVEL", "error"),
        ("SMQ_MQTT_ADAPTER_CONNECT_RATE_PER_IP", "0"),
        ("SMQ_MQTT_ADAPTER_EVENT_BUFFER", buffer.as_str()),
    ];
    let adapter = Adapter::start_with(CLIENTS, &env).await;
    let down = storm(adapter.port, sessions, concurrency).await;
    report(&format!("{kind:?} down"), &down, sessions, None);
    let back = Instant::now();
    store.start_again().await;
    let stored = wait_count(&store, 2 * sessions as u64).await;
    let secs = (stored - back).as_secs_f64();
    println!(
        "{:<20} store back: {} events delivered in {secs:.2} s ({:.0} events/s, restart included)",
        format!("{kind:?} replay"),
        2 * sessions,
        (2 * sessions) as f64 / secs
    );
    adapter.shutdown().await;
}

async fn bench_amqp(sessions: usize, concurrency: usize) {
    let mut queue = AmqpQueue::bind().await;
    let instance = format!("bench-{}", uuid::Uuid::new_v4());
    let data = tempfile::tempdir().expect("temp dir");
    let data_dir = data.path().to_string_lossy().into_owned();
    let url = amqp_url();
    let env = [
        ("SMQ_ES_URL", url.as_str()),
        ("SMQ_MQTT_ADAPTER_DATA_DIR", data_dir.as_str()),
        ("SMQ_MQTT_ADAPTER_INSTANCE", instance.as_str()),
        ("SMQ_MQTT_ADAPTER_LOG_LEVEL", "warn"),
        ("SMQ_MQTT_ADAPTER_CONNECT_RATE_PER_IP", "0"),
    ];
    let mut adapter = Adapter::start_with(CLIENTS, &env).await;
    let up = storm(adapter.port, sessions, concurrency).await;
    queue.count_until(&instance, 2 * sessions).await;
    report("Amqp up", &up, sessions, Some(Instant::now()));
    adapter.terminate();
    adapter.wait_exit().await;
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this as a smoke run.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let sessions = knob("BENCH_SESSIONS", if smoke { 20 } else { 5000 });
    let concurrency = knob("BENCH_CONCURRENCY", if smoke { 4 } else { 50 });
    let stores = std::env::var("BENCH_STORES").unwrap_or_else(|_| "redis,nats,amqp".into());
    println!("event stores bench: {sessions} sessions, {concurrency} in flight");
    for store in stores.split(',') {
        match store.trim() {
            "redis" => bench_store(StoreKind::Redis, sessions, concurrency).await,
            "nats" => bench_store(StoreKind::Nats, sessions, concurrency).await,
            "amqp" => bench_amqp(sessions, concurrency).await,
            other => panic!("BENCH_STORES: unknown store {other:?} (redis, nats, amqp)"),
        }
    }
}
