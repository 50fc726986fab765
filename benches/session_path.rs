//! The adapter's message path end to end, in process: a PUBLISH read from a device socket, checked
//! against the registry, routed by the broker core, written to a subscriber's socket. One publisher and
//! one subscriber on loopback TCP, MQTT 3.1.1, QoS 0; per message alone (latency) and in batches of
//! 100 (throughput). Connection events go to this process's stdout.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use criterion::{Criterion, Throughput};
use mqtt_adapter::{Config, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Mutex;

const REGISTRY: &str = r#"
[[clients]]
id = "bench"
secret = "bench-secret"
[[connections]]
client = "bench"
domain = "d"
channel = "ch"
actions = ["publish", "subscribe"]
"#;
const TOPIC: &str = "m/d/c/ch/bench";
const PAYLOAD: [u8; 64] = [b'x'; 64];

fn string(s: &[u8]) -> Vec<u8> {
    let mut out = (s.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(s);
    out
}

/// A packet with a one-byte remaining length (every packet here is < 128 bytes).
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 128);
    let mut out = vec![first, body.len() as u8];
    out.extend_from_slice(body);
    out
}

fn connect(client_id: &str) -> Vec<u8> {
    let mut body = string(b"MQTT");
    body.extend_from_slice(&[4, 0xC2, 0, 60]); // 3.1.1, username + password + clean, keep-alive 60
    body.extend(string(client_id.as_bytes()));
    body.extend(string(b"bench"));
    body.extend(string(b"bench-secret"));
    packet(0x10, &body)
}

fn publish() -> Vec<u8> {
    let mut body = string(TOPIC.as_bytes());
    body.extend_from_slice(&PAYLOAD);
    packet(0x30, &body)
}

async fn open(port: u16, client_id: &str) -> TcpStream {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the in-process adapter");
    stream.set_nodelay(true).expect("nodelay");
    stream
        .write_all(&connect(client_id))
        .await
        .expect("CONNECT");
    let mut connack = [0u8; 4];
    stream.read_exact(&mut connack).await.expect("CONNACK");
    assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK refused");
    stream
}

struct Pair {
    publisher: TcpStream,
    subscriber: TcpStream,
}

fn session_path(c: &mut Criterion) {
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let clients = dir.path().join("clients.toml");
    std::fs::write(&clients, REGISTRY).expect("write registry");
    let config = Config::parse_from([
        "mqtt-adapter",
        "--host",
        "127.0.0.1",
        "--mqtt-port",
        "0",
        "--log-level",
        "warn",
        "--clients-file",
        clients.to_str().expect("utf-8 temp path"),
    ]);
    let (server, pair) = runtime.block_on(async {
        let server = Server::start(&config).await.expect("start the adapter");
        let port = server.mqtt_addr().port();
        let mut subscriber = open(port, "bench-sub").await;
        let mut body = 1u16.to_be_bytes().to_vec();
        body.extend(string(TOPIC.as_bytes()));
        body.push(0);
        subscriber
            .write_all(&packet(0x82, &body))
            .await
            .expect("SUBSCRIBE");
        let mut suback = [0u8; 5];
        subscriber.read_exact(&mut suback).await.expect("SUBACK");
        assert_eq!(suback, [0x90, 3, 0, 1, 0], "SUBACK refused");
        let publisher = open(port, "bench-pub").await;
        (
            server,
            Arc::new(Mutex::new(Pair {
                publisher,
                subscriber,
            })),
        )
    });
    let one = publish();

    let mut group = c.benchmark_group("session_path");
    if common::benchmarking() {
        group.measurement_time(Duration::from_secs(5));
    }
    for batch in [1usize, 100] {
        let burst: Vec<u8> = one.repeat(batch);
        group.throughput(Throughput::Elements(batch as u64));
        group.bench_function(format!("qos0_publish_to_delivery_x{batch}"), |b| {
            b.to_async(&runtime).iter_custom(|iters| {
                let (pair, burst) = (pair.clone(), burst.clone());
                async move {
                    let mut pair = pair.lock().await;
                    let mut delivered = vec![0u8; burst.len()];
                    let start = Instant::now();
                    for _ in 0..iters {
                        pair.publisher.write_all(&burst).await.expect("PUBLISH");
                        // Deliveries are byte-identical to what was published (3.1.1, QoS 0).
                        pair.subscriber
                            .read_exact(&mut delivered)
                            .await
                            .expect("delivery");
                    }
                    let elapsed = start.elapsed();
                    assert_eq!(delivered, burst, "delivered bytes differ from the publish");
                    elapsed
                }
            })
        });
    }
    group.finish();
    drop(pair);
    runtime.block_on(server.shutdown());
}

fn main() {
    let mut criterion = common::criterion();
    session_path(&mut criterion);
    criterion.final_summary();
}
