//! NATS bridge throughput: device -> NATS and NATS -> device (msgs/s), and what the bridge costs
//! local device -> device routing (bridge on vs off). Starts its own `nats-server` and the real
//! adapter binary, drives them with raw MQTT 3.1.1 sockets (QoS 0, 100-byte payloads) and
//! async-nats, and keeps at most `WINDOW` messages in flight so the figures are loss-free
//! sustained rates rather than burst-and-drop.
//!
//! `cargo bench --bench bridge` runs 200,000 messages per scenario; under `cargo test` it runs a
//! 2,000-message smoke pass so the program stays working.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use mqtt_adapter::bridge::message::Message;
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::nats::NatsServer;
use common::{raw, Adapter, Connect, RawClient, CLIENTS, V311};

const WINDOW: u64 = 5_000;
const BATCH: usize = 500;
const PAYLOAD: [u8; 100] = [b'x'; 100];
// Each scenario has its own subtopic, so messages of one never count in another.
const LOCAL_TOPIC: &str = "m/d1/c/ch1/local";
const OUT_TOPIC: &str = "m/d1/c/ch1/out";
const OUT_SUBJECT: &str = "m.d1.c.ch1.out";
const IN_TOPIC: &str = "m/d1/c/ch1/in";
const IN_SUBJECT: &str = "m.d1.c.ch1.in";

/// Counts the PUBLISH frames arriving on an MQTT socket.
fn count_mqtt_publishes(client: RawClient, counter: Arc<AtomicU64>) {
    let mut stream: TcpStream = client.into_stream();
    tokio::spawn(async move {
        let mut buf = Vec::with_capacity(1 << 16);
        let mut chunk = vec![0u8; 1 << 16];
        loop {
            let n = match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            let mut at = 0;
            let mut count = 0;
            while let Some((len, used)) = buf.get(at + 1..).and_then(raw::read_varint) {
                let total = 1 + used + len;
                if buf.len() < at + total {
                    break;
                }
                if buf[at] >> 4 == raw::PUBLISH {
                    count += 1;
                }
                at += total;
            }
            buf.drain(..at);
            counter.fetch_add(count, Ordering::Relaxed);
        }
    });
}

/// Sends `n` messages in batches with at most `WINDOW` unreceived; returns (msgs/s, received).
async fn measure<F, Fut>(n: u64, received: &AtomicU64, mut send: F) -> (f64, u64)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let base = received.load(Ordering::Relaxed);
    let got = || received.load(Ordering::Relaxed) - base;
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < n {
        if sent - got() >= WINDOW {
            tokio::time::sleep(Duration::from_micros(200)).await;
            continue;
        }
        let k = (n - sent).min(BATCH as u64);
        send(k as usize).await;
        sent += k;
    }
    let mut last = (got(), Instant::now());
    while got() < n {
        tokio::time::sleep(Duration::from_millis(1)).await;
        if got() != last.0 {
            last = (got(), Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(3) {
            break; // stalled: report what arrived
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    (got() as f64 / elapsed, got())
}

fn mqtt_batch(topic: &str, k: usize) -> Vec<u8> {
    let one = raw::publish(V311, topic, 0, 0, &PAYLOAD, &[]);
    one.repeat(k)
}

/// A sender for [`measure`] writing `k` pre-encoded QoS 0 PUBLISHes per call.
fn write_batches(
    stream: TcpStream,
    topic: &'static str,
) -> impl FnMut(usize) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> {
    let stream = Arc::new(tokio::sync::Mutex::new(stream));
    move |k| {
        let stream = stream.clone();
        Box::pin(async move {
            let bytes = mqtt_batch(topic, k);
            stream.lock().await.write_all(&bytes).await.expect("write");
        })
    }
}

async fn subscriber(adapter: &Adapter, id: &str, topic: &str) -> Arc<AtomicU64> {
    let mut sub = RawClient::connect_ok(adapter.port, &Connect::new(V311, id, "c2", "s2")).await;
    assert_eq!(sub.subscribe(V311, 1, &[(topic, 0)]).await, vec![0]);
    let counter = Arc::new(AtomicU64::new(0));
    count_mqtt_publishes(sub, counter.clone());
    counter
}

async fn publisher(adapter: &Adapter, id: &str) -> TcpStream {
    RawClient::connect_ok(adapter.port, &Connect::new(V311, id, "c1", "s1"))
        .await
        .into_stream()
}

async fn device_to_device(adapter: &Adapter, n: u64, tag: &str) -> (f64, u64) {
    let counter = subscriber(adapter, &format!("sub-{tag}"), LOCAL_TOPIC).await;
    let publisher = publisher(adapter, &format!("pub-{tag}")).await;
    measure(n, &counter, write_batches(publisher, LOCAL_TOPIC)).await
}

fn report(label: &str, n: u64, (rate, got): (f64, u64)) {
    println!("{label:<44} {rate:>10.0} msgs/s  ({got} of {n} delivered)");
}

#[tokio::main]
async fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let n: u64 = if full { 200_000 } else { 2_000 };
    let nats = NatsServer::start().await;
    let bus = nats.client().await;

    let plain = Adapter::start(CLIENTS).await;
    report(
        "device -> device, bridge off",
        n,
        device_to_device(&plain, n, "off").await,
    );
    drop(plain);

    let bridged = Adapter::start_with(CLIENTS, &[("SMQ_MESSAGE_BROKER_URL", &nats.url())]).await;
    report(
        "device -> device, bridge on",
        n,
        device_to_device(&bridged, n, "on").await,
    );

    // device -> NATS
    let mut sub = bus.subscribe(OUT_SUBJECT).await.expect("subscribe");
    bus.flush().await.expect("flush");
    let on_bus = Arc::new(AtomicU64::new(0));
    let counter = on_bus.clone();
    let reader = tokio::spawn(async move {
        while let Some(m) = sub.next().await {
            debug_assert!(Message::decode(m.payload).is_ok());
            counter.fetch_add(1, Ordering::Relaxed);
        }
    });
    let publisher = publisher(&bridged, "pub-out").await;
    let out = measure(n, &on_bus, write_batches(publisher, OUT_TOPIC)).await;
    report("device -> NATS (bridge out)", n, out);
    reader.abort();

    // NATS -> device
    let counter = subscriber(&bridged, "sub-in", IN_TOPIC).await;
    let body: bytes::Bytes = Message {
        channel: "ch1".into(),
        domain: "d1".into(),
        subtopic: "in".into(),
        protocol: "http".into(),
        payload: PAYLOAD.to_vec().into(),
        ..Default::default()
    }
    .encode_to_vec()
    .into();
    let inbound = measure(n, &counter, |k| {
        let bus = &bus;
        let body = body.clone();
        async move {
            for _ in 0..k {
                bus.publish(IN_SUBJECT, body.clone())
                    .await
                    .expect("publish");
            }
            bus.flush().await.expect("flush");
        }
    })
    .await;
    report("NATS -> device (bridge in)", n, inbound);
}
