//! Retained messages shared by adapter instances through JetStream
//! (`SMQ_MQTT_ADAPTER_STATE=nats`): two real adapters A and B, each with its own data directory
//! and ports, on one test nats-server. A retained message published through one is delivered
//! by the other, over MQTT 3.1.1 and 5; a clear through one is followed by the other; both
//! restarted (SIGTERM) still hold what the bucket holds; two instances writing one topic at
//! once end with the same message; an old nats-server, or one without JetStream, is refused
//! at start-up with one error line naming the setting.
//!
//! What another instance wrote arrives through the bucket's watch, so "B has it" is polled
//! with a deadline, never waited for by time. "Not delivered" is asserted by order: the
//! subscriber subscribes to the topic that must be empty, then to a marker topic the same
//! instance holds; retained deliveries come subscription by subscription, so the first PUBLISH
//! is the marker only if the first topic held nothing.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use base64::Engine;
use common::nats::NatsServer;
use common::{adapter_command, free_port, run_to_exit, Adapter, V4Client, V5Client, CLIENTS};
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::QoS;

/// How long another instance may take to show a change.
const FOLLOW_WAIT: Duration = Duration::from_secs(10);

async fn start(nats: &NatsServer, data_dir: &Path) -> Adapter {
    start_with(nats, data_dir, &[]).await
}

async fn start_with(nats: &NatsServer, data_dir: &Path, extra: &[(&str, &str)]) -> Adapter {
    let dir = data_dir.to_string_lossy().into_owned();
    let url = nats.url();
    let mut env = vec![
        ("SMQ_MQTT_ADAPTER_DATA_DIR", dir.as_str()),
        ("SMQ_MQTT_ADAPTER_STATE", "nats"),
        ("SMQ_MESSAGE_BROKER_URL", url.as_str()),
    ];
    env.extend_from_slice(extra);
    Adapter::start_with(CLIENTS, &env).await
}

/// A test nats-server and two instances on it, each with its own data directory.
struct Pair {
    nats: NatsServer,
    dirs: [tempfile::TempDir; 2],
    a: Adapter,
    b: Adapter,
}

async fn pair() -> Pair {
    let nats = NatsServer::start().await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let a = start(&nats, dirs[0].path()).await;
    let b = start(&nats, dirs[1].path()).await;
    Pair { nats, dirs, a, b }
}

async fn restart(mut adapter: Adapter, nats: &NatsServer, data_dir: &Path) -> Adapter {
    adapter.terminate();
    assert!(adapter.wait_exit().await.success(), "exit 0 on SIGTERM");
    start(nats, data_dir).await
}

/// A device of either MQTT version.
enum Device {
    V4(V4Client),
    V5(Box<V5Client>),
}

impl Device {
    async fn connect(adapter: &Adapter, version: u8, id: &str) -> Device {
        match version {
            4 => Device::V4(V4Client::connect(adapter.port, id, "c1", "s1").await),
            _ => Device::V5(Box::new(
                V5Client::connect(adapter.port, id, "c1", "s1").await,
            )),
        }
    }

    /// Publishes a retained QoS 1 message (empty: a clear) and waits for its PUBACK.
    async fn retain(&mut self, topic: &str, payload: &[u8]) {
        match self {
            Device::V4(c) => c.publish(topic, QoS::AtLeastOnce, true, payload).await,
            Device::V5(c) => {
                c.publish(topic, QoS5::AtLeastOnce, true, payload, &[])
                    .await
            }
        }
    }

    async fn subscribe(&mut self, filter: &str) {
        match self {
            Device::V4(c) => c.subscribe(filter, QoS::AtLeastOnce).await,
            Device::V5(c) => c.subscribe(filter, QoS5::AtLeastOnce).await,
        }
    }

    /// Topic, payload and RETAIN flag of the next PUBLISH.
    async fn next_publish(&mut self) -> (String, Vec<u8>, bool) {
        match self {
            Device::V4(c) => {
                let p = c.next_publish().await;
                (p.topic, p.payload.to_vec(), p.retain)
            }
            Device::V5(c) => {
                let p = c.next_publish().await;
                let topic = String::from_utf8(p.topic.to_vec()).expect("utf-8 topic");
                (topic, p.payload.to_vec(), p.retain)
            }
        }
    }

    async fn disconnect(self) {
        match self {
            Device::V4(c) => c.disconnect().await,
            Device::V5(c) => c.disconnect().await,
        }
    }
}

/// Publishes one retained message through `adapter`.
async fn retain(adapter: &Adapter, version: u8, topic: &str, payload: &[u8]) {
    let mut device = Device::connect(adapter, version, &format!("pub-{}", adapter.port)).await;
    device.retain(topic, payload).await;
    device.disconnect().await;
}

/// Subscribes to `topic`, then to `marker` (a topic `adapter` holds a retained message of),
/// and returns the first PUBLISH: `topic`'s retained message if it has one, else the marker's.
async fn first_retained(
    adapter: &Adapter,
    version: u8,
    topic: &str,
    marker: &str,
) -> (String, Vec<u8>) {
    let mut device = Device::connect(adapter, version, &format!("sub-{}", adapter.port)).await;
    device.subscribe(topic).await;
    device.subscribe(marker).await;
    let (got, payload, retain) = device.next_publish().await;
    assert!(retain, "a retained delivery has RETAIN set");
    device.disconnect().await;
    (got, payload)
}

/// Polls `adapter` until `topic` holds `payload` (`None`: nothing), within [`FOLLOW_WAIT`].
async fn until_holds(
    adapter: &Adapter,
    version: u8,
    topic: &str,
    marker: &str,
    payload: Option<&[u8]>,
) {
    let want = match payload {
        Some(p) => (topic.to_owned(), p.to_vec()),
        None => (marker.to_owned(), b"marker".to_vec()),
    };
    let deadline = Instant::now() + FOLLOW_WAIT;
    loop {
        let got = first_retained(adapter, version, topic, marker).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "MQTT {version}: {topic} still gives {got:?}, not {want:?}, after {FOLLOW_WAIT:?}; stderr:\n{}",
            adapter.stderr_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_retained_message_published_through_one_instance_is_served_by_the_other() {
    let Pair {
        nats: _nats,
        dirs: _dirs,
        a,
        b,
    } = pair().await;
    for version in [4u8, 5] {
        let topic = format!("m/d1/c/ch1/state/v{version}");
        let (marker_a, marker_b) = (
            format!("m/d1/c/ch1/marker-a/v{version}"),
            format!("m/d1/c/ch1/marker-b/v{version}"),
        );
        retain(&a, version, &marker_a, b"marker").await;
        retain(&b, version, &marker_b, b"marker").await;

        retain(&a, version, &topic, b"on").await;
        until_holds(&b, version, &topic, &marker_b, Some(b"on")).await;

        // Cleared through B: gone on B at once, and on A once it followed.
        retain(&b, version, &topic, b"").await;
        assert_eq!(
            first_retained(&b, version, &topic, &marker_b).await.0,
            marker_b
        );
        until_holds(&a, version, &topic, &marker_a, None).await;
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn both_instances_restarted_still_hold_what_the_bucket_holds() {
    let Pair { nats, dirs, a, b } = pair().await;
    for version in [4u8, 5] {
        let (kept, cleared) = (
            format!("m/d1/c/ch1/kept/v{version}"),
            format!("m/d1/c/ch1/cleared/v{version}"),
        );
        retain(&a, version, &kept, b"kept").await;
        retain(&a, version, &cleared, b"soon gone").await;
        // B clears what A wrote (B may not have followed A's write yet: the clear is later in
        // the bucket all the same).
        retain(&b, version, &cleared, b"").await;
        until_holds(&b, version, &kept, &cleared, Some(b"kept")).await;
    }
    let a = restart(a, &nats, dirs[0].path()).await;
    let b = restart(b, &nats, dirs[1].path()).await;
    for adapter in [&a, &b] {
        for version in [4u8, 5] {
            let (kept, cleared) = (
                format!("m/d1/c/ch1/kept/v{version}"),
                format!("m/d1/c/ch1/cleared/v{version}"),
            );
            // Loaded before the listeners accept: no polling.
            assert_eq!(
                first_retained(adapter, version, &cleared, &kept).await,
                (kept.clone(), b"kept".to_vec()),
                "MQTT {version}: the kept message is there and the cleared one is not"
            );
        }
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn the_watch_resumes_after_nats_restarts() {
    let Pair {
        mut nats,
        dirs: _dirs,
        a,
        b,
    } = pair().await;
    let (topic, marker_a, marker_b) = (
        "m/d1/c/ch1/after-restart",
        "m/d1/c/ch1/marker-a",
        "m/d1/c/ch1/marker-b",
    );
    retain(&a, 4, marker_a, b"marker").await;
    retain(&b, 4, marker_b, b"marker").await;
    retain(&a, 4, topic, b"before").await;
    until_holds(&b, 4, topic, marker_b, Some(b"before")).await;

    // The same server (and store) again on the same port: both instances reconnect.
    nats.restart().await;
    let reconnected = "nats state store event=connected";
    a.wait_log(reconnected, FOLLOW_WAIT).await;
    b.wait_log(reconnected, FOLLOW_WAIT).await;
    retain(&a, 4, topic, b"after").await;
    until_holds(&b, 4, topic, marker_b, Some(b"after")).await;
    retain(&b, 4, topic, b"").await;
    until_holds(&a, 4, topic, marker_a, None).await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn writes_nats_does_not_acknowledge_are_counted_and_logged_once() {
    let Pair {
        mut nats,
        dirs: _dirs,
        a,
        b,
    } = pair().await;
    nats.kill();
    // Three retained changes while NATS is away (QoS 0: nothing to wait for); each write
    // fails once its acknowledgement does not come.
    let mut device = V4Client::connect(a.port, "down", "c1", "s1").await;
    for i in 0..3 {
        let topic = format!("sensors/down/{i}");
        device.publish(&topic, QoS::AtMostOnce, true, b"v").await;
    }
    let series = "mqtt_adapter_state_write_errors_total";
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, exposition) = common::http_get(a.ports.http, "/metrics").await;
        if common::metric(&exposition, series) == Some(3.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{series} did not reach 3:\n{exposition}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let failed = "nats state store write failed";
    assert_eq!(
        a.stderr().matches(failed).count(),
        1,
        "one line per episode:\n{}",
        a.stderr_tail()
    );
    // NATS back: the next write succeeds, and that ends the episode.
    nats.restart().await;
    a.wait_log("nats state store event=connected", FOLLOW_WAIT)
        .await;
    device
        .publish("sensors/down/0", QoS::AtLeastOnce, true, b"again")
        .await;
    a.wait_log("nats state store: writes succeed again", FOLLOW_WAIT)
        .await;
    device.disconnect().await;
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn a_retained_message_whose_expiry_passed_is_not_loaded() {
    let Pair { nats, dirs, a, b } = pair().await;
    let (short, long) = ("m/d1/c/ch1/short", "m/d1/c/ch1/long");
    let mut device = V5Client::connect(a.port, "expiring", "c1", "s1").await;
    let published_at = Instant::now();
    let properties = rumqttc::v5::mqttbytes::v5::PublishProperties {
        message_expiry_interval: Some(1),
        ..Default::default()
    };
    device
        .client
        .publish_with_properties(
            short,
            QoS5::AtLeastOnce,
            true,
            b"short".to_vec(),
            properties,
        )
        .await
        .expect("queue PUBLISH");
    device
        .wait_for(|e| {
            matches!(
                e,
                rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(_))
            )
            .then_some(())
        })
        .await;
    device.disconnect().await;
    retain(&a, 5, long, b"marker").await;
    // The expiry is wall-clock time: it runs out while both instances are stopped.
    let mut stopped = Vec::new();
    for mut adapter in [a, b] {
        adapter.terminate();
        assert!(adapter.wait_exit().await.success(), "exit 0 on SIGTERM");
        stopped.push(adapter);
    }
    let wait = Duration::from_millis(1500).saturating_sub(published_at.elapsed());
    tokio::time::sleep(wait).await;
    for dir in &dirs {
        let adapter = start(&nats, dir.path()).await;
        assert_eq!(
            first_retained(&adapter, 5, short, long).await,
            (long.to_owned(), b"marker".to_vec()),
            "the expired message is not loaded, the other one is"
        );
        adapter.shutdown().await;
    }
}

/// The payload the bucket holds for `topic` (a 3.1.1 record: an 11-byte head, then the
/// payload); `None` if cleared.
async fn bucket_payload(nats: &NatsServer, topic: &str) -> Option<Vec<u8>> {
    let js = async_nats::jetstream::new(nats.client().await);
    let kv = js.get_key_value("mqtt-retained").await.expect("the bucket");
    let key = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(topic);
    let value = kv.get(key).await.expect("read the bucket")?;
    (!value.is_empty()).then(|| value[11..].to_vec())
}

#[tokio::test]
async fn two_instances_writing_one_topic_end_with_what_the_bucket_holds() {
    let Pair {
        nats,
        dirs: _dirs,
        a,
        b,
    } = pair().await;
    let topic = "m/d1/c/ch1/contended";
    let (marker_a, marker_b) = ("m/d1/c/ch1/marker-a", "m/d1/c/ch1/marker-b");
    retain(&a, 4, marker_a, b"marker").await;
    retain(&b, 4, marker_b, b"marker").await;
    // Both publish to one topic at once, many times, pipelined (QoS 0 needs no PUBACK wait).
    let mut writers = Vec::new();
    for (adapter, name) in [(&a, "a"), (&b, "b")] {
        let mut device = V4Client::connect(adapter.port, &format!("w-{name}"), "c1", "s1").await;
        writers.push(async move {
            for i in 0..300 {
                let payload = format!("{name}-{i}");
                device
                    .publish(topic, QoS::AtMostOnce, true, payload.as_bytes())
                    .await;
            }
            // The last one acknowledged: everything before it was handed to the store.
            device
                .publish(
                    topic,
                    QoS::AtLeastOnce,
                    true,
                    format!("{name}-last").as_bytes(),
                )
                .await;
            device.disconnect().await;
        });
    }
    futures_util::future::join_all(writers).await;
    let held = bucket_payload(&nats, topic)
        .await
        .expect("the bucket holds the topic");
    assert!(
        held == b"a-last" || held == b"b-last",
        "{:?}",
        String::from_utf8_lossy(&held)
    );
    for (adapter, marker) in [(&a, marker_a), (&b, marker_b)] {
        until_holds(adapter, 4, topic, marker, Some(&held)).await;
    }
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test]
async fn a_nats_server_older_than_2_10_is_refused_with_one_line() {
    let old = "/usr/sbin/nats-server";
    if !Path::new(old).exists() {
        eprintln!("skipped: no {old} (nats-server 2.9)");
        return;
    }
    let nats = NatsServer::start_binary(old, free_port(), true).await;
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().to_string_lossy().into_owned();
    let url = nats.url();
    let cmd = adapter_command(
        free_port(),
        None,
        &[
            ("SMQ_MQTT_ADAPTER_DATA_DIR", dir.as_str()),
            ("SMQ_MQTT_ADAPTER_STATE", "nats"),
            ("SMQ_MESSAGE_BROKER_URL", url.as_str()),
        ],
    );
    let (status, stdout, stderr) = run_to_exit(cmd).await;
    assert!(!status.success(), "exit status {status}");
    assert!(stdout.is_empty(), "stdout {stdout:?}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "one error line, got {stderr:?}");
    for needle in [
        "SMQ_MQTT_ADAPTER_STATE",
        "SMQ_MESSAGE_BROKER_URL",
        "2.9",
        "2.10",
    ] {
        assert!(lines[0].contains(needle), "{needle:?} in {stderr:?}");
    }
}

#[tokio::test]
async fn a_nats_server_without_jetstream_is_refused_with_one_line() {
    let nats = NatsServer::start_binary("nats-server", free_port(), false).await;
    let url = nats.url();
    let cmd = adapter_command(
        free_port(),
        None,
        &[
            ("SMQ_MQTT_ADAPTER_STATE", "nats"),
            ("SMQ_MQTT_ADAPTER_STATE_URL", url.as_str()),
        ],
    );
    let (status, _, stderr) = run_to_exit(cmd).await;
    assert!(!status.success(), "exit status {status}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert_eq!(lines.len(), 1, "one error line, got {stderr:?}");
    for needle in ["SMQ_MQTT_ADAPTER_STATE_URL", "JetStream"] {
        assert!(lines[0].contains(needle), "{needle:?} in {stderr:?}");
    }
}

/// Retained QoS 0 writes on distinct topics through one MQTT connection, then one QoS 1 whose
/// PUBACK waits for every write before it (tickets resolve in order); returns writes per second.
async fn measure_writes(port: u16, writes: u32) -> f64 {
    let mut device = V4Client::connect(port, "writer", "c1", "s1").await;
    let payload = [b'x'; 200];
    let started = Instant::now();
    for i in 0..writes {
        let topic = format!("sensors/w/{i}");
        device
            .publish(&topic, QoS::AtMostOnce, true, &payload)
            .await;
    }
    device
        .publish("sensors/w/last", QoS::AtLeastOnce, true, &payload)
        .await;
    let rate = f64::from(writes + 1) / started.elapsed().as_secs_f64();
    device.disconnect().await;
    rate
}

/// An adapter binary started with `nats` state on `url` (no bus, no data directory), timed
/// from its spawn to its MQTT listener accepting; returns the time and the running process.
async fn timed_start(binary: &str, url: &str, log: &Path) -> (Duration, std::process::Child, u16) {
    let port = free_port();
    let mut cmd = std::process::Command::new(binary);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SMQ_") {
            cmd.env_remove(key);
        }
    }
    for var in [
        "SMQ_MQTT_ADAPTER_WS_PORT",
        "SMQ_MQTT_ADAPTER_HTTP_PORT",
        "SMQ_MQTT_ADAPTER_MQTTS_PORT",
        "SMQ_MQTT_ADAPTER_WSS_PORT",
    ] {
        cmd.env(var, free_port().to_string());
    }
    let clients = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(clients.path(), CLIENTS).unwrap();
    cmd.env("SMQ_MQTT_ADAPTER_MQTT_PORT", port.to_string())
        .env("SMQ_MQTT_ADAPTER_CLIENTS_FILE", clients.path())
        .env("SMQ_MQTT_ADAPTER_STATE", "nats")
        .env("SMQ_MQTT_ADAPTER_STATE_URL", url)
        .env("SMQ_MQTT_ADAPTER_MAX_RETAINED", "1000000")
        .env("SMQ_MQTT_ADAPTER_PUBLISH_RATE", "0")
        .env("SMQ_MQTT_ADAPTER_LOG_LEVEL", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(log).expect("log file"));
    let started = Instant::now();
    let child = cmd.spawn().expect("spawn the adapter");
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(started.elapsed() < Duration::from_secs(120), "never ready");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    (started.elapsed(), child, port)
}

/// Not a test, a measurement (`cargo test --test nats_retained_state -- --ignored --nocapture`;
/// `SMQ_TEST_MEASURE_ADAPTER=target/release/mqtt-adapter` measures that binary, else the debug
/// one): retained writes per second through `nats`, and the start-up of an instance with
/// 100,000 retained messages in the bucket.
#[tokio::test]
#[ignore]
async fn measure_writes_and_a_start_up_with_100_000_retained() {
    let binary = std::env::var("SMQ_TEST_MEASURE_ADAPTER")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_mqtt-adapter").to_owned());
    let nats = NatsServer::start().await;
    let logs = tempfile::tempdir().unwrap();
    let (took, mut empty, port) = timed_start(&binary, &nats.url(), &logs.path().join("a")).await;
    eprintln!("{binary}: start-up with an empty bucket: {took:?}");
    let writes = 20_000;
    let rate = measure_writes(port, writes).await;
    eprintln!("{} retained writes through nats: {rate:.0}/s", writes + 1);
    let _ = empty.kill();
    let _ = empty.wait();

    // 100,000 retained messages written straight into the bucket (60-byte topics, 200-byte
    // payloads), pipelined.
    let js = async_nats::jetstream::new(nats.client().await);
    let mut value = vec![1u8, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0];
    value.extend_from_slice(&[b'x'; 200]);
    let value = bytes::Bytes::from(value);
    let total = 100_000;
    let mut acks = Vec::new();
    for i in 0..total {
        let topic = format!("m/d1/c/ch1/sensors/building-7/floor-3/room/{i:08}/temperature");
        let key = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(topic);
        acks.push(
            js.publish(format!("$KV.mqtt-retained.{key}"), value.clone())
                .await
                .expect("publish"),
        );
        if acks.len() == 1000 {
            for ack in acks.drain(..) {
                ack.await.expect("ack");
            }
        }
    }
    for ack in acks.drain(..) {
        ack.await.expect("ack");
    }
    let info = js
        .get_stream("KV_mqtt-retained")
        .await
        .expect("the bucket's stream")
        .get_info()
        .await
        .expect("stream info");
    eprintln!(
        "bucket: {} messages, {} bytes",
        info.state.messages, info.state.bytes
    );
    let log = logs.path().join("b");
    let (took, mut full, _) = timed_start(&binary, &nats.url(), &log).await;
    eprintln!(
        "{binary}: start-up with {} retained (spawn to MQTT accept): {took:?}",
        info.state.messages
    );
    let _ = full.kill();
    let _ = full.wait();
    let log = std::fs::read_to_string(&log).unwrap_or_default();
    for line in log.lines().filter(|l| {
        l.contains("bucket read") || l.contains("MQTT state loaded") || l.contains("ready")
    }) {
        eprintln!("{line}");
    }
}
