//! `mqtt-adapter presence --once --json` over a stream of `BENCH_EVENTS` connection events
//! (1,000,000 under `cargo bench`): how long the release binary takes to replay them from a
//! private `redis-server` and from a private `nats-server -js`, and its peak RSS. The stream is
//! a seeded random mix of connects and disconnects of 50,000 client ids on 4 instances, written
//! as the adapter writes it (details on); the result is checked against a model of the same mix.
//!
//! Under `cargo test` it runs once with 2,000 events, so the program stays working.
//! `BENCH_EVENTS` and `BENCH_RUNS` override the size and the number of replays per store;
//! `BENCH_PRESENCE_BIN` replays with another build of the binary (e.g. `target/release/…` from a
//! debug-built bench, which skips building the dev-dependencies in release).

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::process::Command;
use std::time::Instant;

use common::stores::{StoreKind, StoreServer};
use mqtt_adapter::events::{ConnectionEvent, EventDetails, EventType};

const CLIENTS: u64 = 50_000;
const INSTANCES: u64 = 4;
/// Events written per Redis pipeline.
const WRITE_BATCH: usize = 10_000;
/// JetStream publishes sent before their acks are awaited.
const ACK_WINDOW: usize = 1_000;

/// A small deterministic generator (xorshift64*), so every run writes the same stream.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// `n` events and the number of (instance, client id) keys left online.
fn workload(n: usize) -> (Vec<ConnectionEvent>, usize) {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut open: Vec<(u64, u64)> = Vec::new();
    let mut model: HashMap<(u64, u64), u32> = HashMap::new();
    let mut events = Vec::with_capacity(n);
    let base = 1_800_000_000_000_000_000i64;
    for i in 0..n {
        // Slightly more connects than disconnects, so the online set grows over the run.
        let connect = open.is_empty() || rng.next() % 100 < 52;
        let (instance, client, event_type, reason) = if connect {
            let key = (rng.next() % INSTANCES, rng.next() % CLIENTS);
            open.push(key);
            *model.entry(key).or_default() += 1;
            (key.0, key.1, EventType::Connect, None)
        } else {
            let at = (rng.next() % open.len() as u64) as usize;
            let key = open.swap_remove(at);
            let count = model.get_mut(&key).expect("open session in the model");
            *count -= 1;
            if *count == 0 {
                model.remove(&key);
            }
            (
                key.0,
                key.1,
                EventType::Disconnect,
                Some("client_disconnect"),
            )
        };
        events.push(ConnectionEvent {
            client_id: format!("client-{client:05}"),
            event_type,
            instance: format!("mqtt-{instance}"),
            occurred_at: base + i as i64,
            details: EventDetails {
                reason: reason.map(str::to_owned),
                mqtt_client_id: connect.then(|| format!("dev-{client:05}")),
                ..EventDetails::default()
            },
        });
    }
    (events, model.len())
}

async fn fill(store: &StoreServer, events: &[ConnectionEvent]) {
    match store.kind {
        StoreKind::Redis => {
            let client = redis::Client::open(store.url()).expect("redis url");
            // A 10,000-command pipeline takes longer than the client's default reply timeout.
            let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
            let mut conn = client
                .get_multiplexed_async_connection_with_config(&config)
                .await
                .expect("connect to redis");
            for chunk in events.chunks(WRITE_BATCH) {
                let mut pipe = redis::pipe();
                for event in chunk {
                    let cmd = pipe.cmd("XADD").arg("supermq.mqtt").arg("*");
                    for (field, value) in event.fields() {
                        cmd.arg(field).arg(value);
                    }
                }
                let _: Vec<String> = pipe.query_async(&mut conn).await.expect("XADD batch");
            }
        }
        StoreKind::Nats => {
            let client = async_nats::connect(store.url())
                .await
                .expect("connect to nats");
            let js = async_nats::jetstream::new(client);
            js.get_or_create_stream(async_nats::jetstream::stream::Config {
                name: "events".into(),
                subjects: vec!["events.>".into()],
                ..Default::default()
            })
            .await
            .expect("create stream events");
            // The client holds at most a few thousand unacknowledged publishes (and then waits
            // for acks), so collect them in smaller windows.
            for chunk in events.chunks(ACK_WINDOW) {
                let mut acks = Vec::with_capacity(chunk.len());
                for event in chunk {
                    acks.push(
                        js.publish("events.supermq.mqtt", event.to_json().into())
                            .await
                            .expect("publish"),
                    );
                }
                for ack in acks {
                    ack.await.expect("ack");
                }
            }
        }
    }
}

/// Runs `presence --once --json`; returns seconds and the parsed output.
fn replay(url: &str) -> (f64, serde_json::Value) {
    let binary = std::env::var("BENCH_PRESENCE_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_mqtt-adapter").to_owned());
    let started = Instant::now();
    let output = Command::new(binary)
        .args(["presence", "--once", "--json"])
        .env("SMQ_ES_URL", url)
        .output()
        .expect("run mqtt-adapter presence");
    let seconds = started.elapsed().as_secs_f64();
    assert!(
        output.status.success(),
        "presence failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let value = serde_json::from_slice(&output.stdout).expect("presence prints JSON");
    (seconds, value)
}

/// Peak RSS in MB of the largest child waited for so far (the presence runs).
fn children_max_rss_mb() -> f64 {
    // SAFETY: getrusage fills the struct we pass and touches nothing else.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    usage.ru_maxrss as f64 / 1024.0
}

#[tokio::main]
async fn main() {
    let benchmarking = std::env::args().any(|a| a == "--bench");
    let n: usize = match std::env::var("BENCH_EVENTS") {
        Ok(v) => v.parse().expect("BENCH_EVENTS is a number"),
        Err(_) if benchmarking => 1_000_000,
        Err(_) => 2_000,
    };
    let runs: usize = match std::env::var("BENCH_RUNS") {
        Ok(v) => v.parse().expect("BENCH_RUNS is a number"),
        Err(_) if benchmarking => 3,
        Err(_) => 1,
    };
    let (events, online) = workload(n);
    println!("presence --once --json over {n} events ({online} client ids online at the end)");
    for kind in [StoreKind::Redis, StoreKind::Nats] {
        let store = StoreServer::start(kind).await;
        let started = Instant::now();
        fill(&store, &events).await;
        println!(
            "{kind:?}: wrote {n} events in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        for run in 1..=runs {
            let (seconds, value) = replay(&store.url());
            assert_eq!(value["events"]["read"], n as u64, "every event read");
            let got = value["online"].as_array().expect("online array").len();
            assert_eq!(got, online, "online set matches the model");
            println!(
                "{kind:?} run {run}: {seconds:.2} s, {:.0} events/s",
                n as f64 / seconds
            );
        }
    }
    println!("peak RSS of presence: {:.0} MB", children_max_rss_mb());
}
