//! Every device message reaches the bus stream (issue #20), against a real `nats-server -js`
//! on a free port with a JetStream stream `m` on `m.>` (file storage), as SuperMQ sets it up:
//! bursts at QoS 1 and 0 land once each; a NATS outage, and a `kill -9` of the adapter during
//! one, lose nothing that was acknowledged and duplicate nothing; a full message log pushes the
//! publisher back instead of dropping; an instance subscribes on the bus only to what its
//! subscribers need and never gets its own messages back.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use mqtt_adapter::bridge::message::Message;
use prost::Message as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::nats::NatsServer;
use common::raw;
use common::{http_get, metric, Adapter, Connect, RawClient, CLIENTS, V311, V5, WAIT};

/// Creates the stream SuperMQ's message bus uses.
async fn stream_m(nats: &NatsServer) -> jetstream::Context {
    let js = jetstream::new(nats.client().await);
    js.create_stream(jetstream::stream::Config {
        name: "m".into(),
        subjects: vec!["m.>".into()],
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .expect("create stream m");
    js
}

/// Waits (bounded) until stream `m` holds `n` messages, then returns how often each payload is
/// in it.
async fn stream_payloads(js: &jetstream::Context, n: u64, wait: Duration) -> BTreeMap<String, u32> {
    let mut stream = js.get_stream("m").await.expect("stream m");
    let deadline = Instant::now() + wait;
    loop {
        let held = stream.info().await.expect("stream info").state.messages;
        if held >= n {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "stream m holds {held} of {n} messages after {wait:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let info = stream.info().await.expect("stream info").state.clone();
    let mut counts = BTreeMap::new();
    for seq in info.first_sequence..=info.last_sequence {
        let raw = stream.get_raw_message(seq).await.expect("stored message");
        let message = Message::decode(raw.payload).expect("a messaging.Message");
        // The payload's name, without the padding some tests add.
        let name = message
            .payload
            .split(|&b| b == b'|')
            .next()
            .unwrap_or_default();
        *counts
            .entry(String::from_utf8_lossy(name).into_owned())
            .or_insert(0u32) += 1;
    }
    counts
}

/// The payloads `prefix-0` … `prefix-(n-1)`, each once.
fn expected(prefix: &str, n: usize) -> BTreeMap<String, u32> {
    (0..n).map(|i| (format!("{prefix}-{i}"), 1)).collect()
}

/// Asserts `got` is exactly `want`, naming a few missing, extra and repeated payloads.
fn assert_once_each(got: &BTreeMap<String, u32>, want: &BTreeMap<String, u32>) {
    let missing: Vec<&String> = want.keys().filter(|k| !got.contains_key(*k)).collect();
    let extra: Vec<&String> = got.keys().filter(|k| !want.contains_key(*k)).collect();
    let repeated: Vec<(&String, &u32)> = got.iter().filter(|(_, &c)| c > 1).collect();
    assert!(
        missing.is_empty() && extra.is_empty() && repeated.is_empty(),
        "{} missing (e.g. {:?}), {} unexpected (e.g. {:?}), {} repeated (e.g. {:?})",
        missing.len(),
        &missing[..missing.len().min(5)],
        extra.len(),
        &extra[..extra.len().min(5)],
        repeated.len(),
        &repeated[..repeated.len().min(5)]
    );
}

async fn metric_of(adapter: &Adapter, series: &str) -> f64 {
    let (_, text) = http_get(adapter.ports.http, "/metrics").await;
    metric(&text, series).unwrap_or(0.0)
}

/// Waits (bounded) until `series` on `adapter` satisfies `ok`.
async fn wait_metric(adapter: &Adapter, series: &str, ok: impl Fn(f64) -> bool) -> f64 {
    let deadline = Instant::now() + WAIT;
    loop {
        let value = metric_of(adapter, series).await;
        if ok(value) {
            return value;
        }
        assert!(Instant::now() < deadline, "{series} stayed at {value}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const FAILED: &str = "mqtt_adapter_bridge_messages_total{direction=\"out\",result=\"failed\"}";
const IN_DELIVERED: &str =
    "mqtt_adapter_bridge_messages_total{direction=\"in\",result=\"delivered\"}";

/// A device that writes PUBLISHes in bulk from one task and counts PUBACKs in another.
struct BulkPublisher {
    writer: tokio::task::JoinHandle<()>,
    acks: tokio::sync::watch::Receiver<usize>,
}

impl BulkPublisher {
    /// Connects `client_id` (as c1, MQTT 3.1.1) and sends `n` QoS `qos` PUBLISHes on `topic`
    /// with payloads `prefix-<i>` padded to `size` bytes.
    async fn start(
        port: u16,
        client_id: &str,
        topic: &str,
        qos: u8,
        n: usize,
        prefix: &str,
        size: usize,
    ) -> BulkPublisher {
        let client = RawClient::connect_ok(port, &Connect::new(V311, client_id, "c1", "s1")).await;
        let (mut read, mut write) = client.into_stream().into_split();
        let mut bytes = Vec::new();
        for i in 0..n {
            let mut payload = format!("{prefix}-{i}").into_bytes();
            if payload.len() < size {
                payload.push(b'|');
                payload.resize(size, b'.');
            }
            let pkid = (i % 60_000) as u16 + 1;
            bytes.extend(raw::publish(V311, topic, qos, pkid, &payload, &[]));
        }
        bytes.extend(raw::pingreq());
        let writer = tokio::spawn(async move {
            write.write_all(&bytes).await.expect("write PUBLISHes");
            // Keep the socket open until the test ends.
            std::future::pending::<()>().await;
        });
        let (tx, acks) = tokio::sync::watch::channel(0usize);
        tokio::spawn(async move {
            let mut buf = Vec::new();
            let mut chunk = [0u8; 8192];
            let mut acked = 0;
            loop {
                let Ok(n) = read.read(&mut chunk).await else {
                    return;
                };
                if n == 0 {
                    return;
                }
                buf.extend_from_slice(&chunk[..n]);
                let mut at = 0;
                while let Some((len, used)) = buf.get(at + 1..).and_then(raw::read_varint) {
                    let end = at + 1 + used + len;
                    if end > buf.len() {
                        break;
                    }
                    if buf[at] >> 4 == raw::PUBACK {
                        acked += 1;
                    }
                    at = end;
                }
                buf.drain(..at);
                tx.send_replace(acked);
            }
        });
        BulkPublisher { writer, acks }
    }

    /// Waits (bounded by `wait`) until `n` PUBACKs came.
    async fn wait_acks(&mut self, n: usize, wait: Duration) {
        let got = tokio::time::timeout(wait, self.acks.wait_for(|&a| a >= n))
            .await
            .map(|r| r.is_ok());
        assert!(
            got.is_ok(),
            "{} of {n} PUBACKs within {wait:?}",
            *self.acks.borrow()
        );
    }
}

impl Drop for BulkPublisher {
    fn drop(&mut self) {
        self.writer.abort();
    }
}

#[tokio::test]
async fn a_burst_at_qos_1_and_at_qos_0_lands_in_the_stream_once_each() {
    let nats = NatsServer::start().await;
    let js = stream_m(&nats).await;
    let adapter = Adapter::start_with(CLIENTS, &[("SMQ_MESSAGE_BROKER_URL", &nats.url())]).await;
    const N: usize = 3000;
    let mut qos1 =
        BulkPublisher::start(adapter.port, "burst-1", "m/d1/c/ch1/burst", 1, N, "one", 64).await;
    let qos0 = BulkPublisher::start(
        adapter.port,
        "burst-0",
        "m/d1/c/ch1/burst",
        0,
        N,
        "zero",
        64,
    )
    .await;
    qos1.wait_acks(N, WAIT).await;
    let mut want = expected("one", N);
    want.extend(expected("zero", N));
    let got = stream_payloads(&js, 2 * N as u64, WAIT).await;
    assert_once_each(&got, &want);
    drop((qos1, qos0));
}

#[tokio::test]
async fn a_nats_outage_loses_no_acknowledged_message_and_duplicates_none() {
    let mut nats = NatsServer::start().await;
    let js = stream_m(&nats).await;
    let adapter = Adapter::start_with(CLIENTS, &[("SMQ_MESSAGE_BROKER_URL", &nats.url())]).await;
    let mut before =
        BulkPublisher::start(adapter.port, "before", "m/d1/c/ch1/o", 1, 100, "before", 32).await;
    before.wait_acks(100, WAIT).await;
    stream_payloads(&js, 100, WAIT).await;

    nats.kill();
    let mut during =
        BulkPublisher::start(adapter.port, "during", "m/d1/c/ch1/o", 1, 500, "during", 32).await;
    during.wait_acks(500, WAIT).await;
    // The adapter has tried and failed to deliver while NATS was away.
    wait_metric(&adapter, FAILED, |v| v > 0.0).await;
    nats.restart().await;
    let js = jetstream::new(nats.client().await);
    let mut want = expected("before", 100);
    want.extend(expected("during", 500));
    let got = stream_payloads(&js, 600, Duration::from_secs(60)).await;
    assert_once_each(&got, &want);
}

#[tokio::test]
async fn messages_acknowledged_before_a_kill_9_during_an_outage_reach_the_stream_after_restart() {
    let mut nats = NatsServer::start().await;
    stream_m(&nats).await;
    let data = tempfile::tempdir().expect("data dir");
    let data_dir = data.path().to_string_lossy().into_owned();
    let env = [
        ("SMQ_MESSAGE_BROKER_URL", nats.url()),
        ("SMQ_MQTT_ADAPTER_DATA_DIR", data_dir.clone()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let adapter = Adapter::start_with(CLIENTS, &env).await;
    nats.kill();
    let mut device =
        BulkPublisher::start(adapter.port, "victim", "m/d1/c/ch1/k", 1, 400, "kept", 32).await;
    device.wait_acks(400, WAIT).await;
    drop(device);
    adapter.kill().await;

    let restarted = Adapter::start_with(CLIENTS, &env).await;
    nats.restart().await;
    let js = jetstream::new(nats.client().await);
    let got = stream_payloads(&js, 400, Duration::from_secs(60)).await;
    assert_once_each(&got, &expected("kept", 400));
    drop(restarted);
}

#[tokio::test]
async fn a_full_message_log_pushes_the_publisher_back_and_drops_nothing() {
    let mut nats = NatsServer::start().await;
    stream_m(&nats).await;
    let adapter = Adapter::start_with(
        CLIENTS,
        &[
            ("SMQ_MESSAGE_BROKER_URL", &nats.url()),
            ("SMQ_MQTT_ADAPTER_BRIDGE_LOG_SIZE", "65536"),
        ],
    )
    .await;
    // A subscriber-only session on the same instance is never pushed back.
    let mut listener =
        RawClient::connect_ok(adapter.port, &Connect::new(V5, "listener", "c2", "s2")).await;
    nats.kill();
    const N: usize = 2000;
    let mut device =
        BulkPublisher::start(adapter.port, "pushed", "m/d1/c/ch1/p", 1, N, "p", 1024).await;
    wait_metric(&adapter, "mqtt_adapter_bridge_pushback", |v| v == 1.0).await;
    let acked = *device.acks.borrow();
    assert!(acked < N, "all {N} PUBACKs came although the log is full");
    assert_eq!(
        metric_of(&adapter, "mqtt_adapter_bridge_pushback_episodes_total").await,
        1.0
    );
    listener.ping().await;

    nats.restart().await;
    device.wait_acks(N, Duration::from_secs(60)).await;
    let js = jetstream::new(nats.client().await);
    let got = stream_payloads(&js, N as u64, Duration::from_secs(60)).await;
    assert_eq!(got.len(), N, "distinct messages in stream m");
    assert!(
        got.values().all(|&c| c == 1),
        "a message is in the stream twice"
    );
    wait_metric(&adapter, "mqtt_adapter_bridge_pushback", |v| v == 0.0).await;
}

#[tokio::test]
async fn an_instance_receives_from_the_bus_only_what_its_subscribers_need_and_never_its_own() {
    let nats = NatsServer::start().await;
    let url = nats.url();
    let a = Adapter::start_with(CLIENTS, &[("SMQ_MESSAGE_BROKER_URL", &url)]).await;
    let b = Adapter::start_with(CLIENTS, &[("SMQ_MESSAGE_BROKER_URL", &url)]).await;
    // A's own subscriber on A: it gets A's messages from the core, never again from the bus.
    let mut local = RawClient::connect_ok(a.port, &Connect::new(V311, "local", "c2", "s2")).await;
    assert_eq!(
        local.subscribe(V311, 1, &[("m/d1/c/ch1/#", 0)]).await,
        vec![0]
    );
    let mut device = RawClient::connect_ok(a.port, &Connect::new(V5, "dev", "c1", "s1")).await;
    for i in 0..50u16 {
        device
            .send(&raw::publish(V5, "m/d1/c/ch1/quiet", 1, i + 1, b"q", &[]))
            .await;
        assert_eq!(device.expect_kind(raw::PUBACK).await.puback_reason(), 0);
    }
    for _ in 0..50 {
        assert_eq!(local.expect_kind(raw::PUBLISH).await.publish_v311().1, b"q");
    }
    assert_eq!(
        metric_of(&b, "mqtt_adapter_bridge_subscriptions").await,
        0.0
    );

    // Now B gets a subscriber; its SUBACK waits until B subscribed on the bus.
    let mut remote = RawClient::connect_ok(b.port, &Connect::new(V311, "remote", "c2", "s2")).await;
    assert_eq!(
        remote.subscribe(V311, 1, &[("m/d1/c/ch1/fence", 0)]).await,
        vec![0]
    );
    device
        .send(&raw::publish(V5, "m/d1/c/ch1/fence", 1, 100, b"fence", &[]))
        .await;
    assert_eq!(device.expect_kind(raw::PUBACK).await.puback_reason(), 0);
    assert_eq!(
        remote.expect_kind(raw::PUBLISH).await.publish_v311(),
        ("m/d1/c/ch1/fence".to_owned(), b"fence".to_vec())
    );
    assert_eq!(
        local.expect_kind(raw::PUBLISH).await.publish_v311().1,
        b"fence"
    );
    // B took in exactly the fence; A, whose subscriber matched all 51, took in none of them.
    assert_eq!(metric_of(&b, IN_DELIVERED).await, 1.0);
    assert_eq!(
        metric_of(&b, "mqtt_adapter_bridge_subscriptions").await,
        1.0
    );
    local.ping().await;
    assert_eq!(metric_of(&a, IN_DELIVERED).await, 0.0);

    // The last subscriber leaving ends B's subscription on the bus.
    drop(remote);
    wait_metric(&b, "mqtt_adapter_bridge_subscriptions", |v| v == 0.0).await;
}

/// Debian's nats-server (2.9), which `.ci/run` installs beside the current one
/// (`SMQ_TEST_OLD_NATS_SERVER` names another).
fn old_nats_server() -> String {
    std::env::var("SMQ_TEST_OLD_NATS_SERVER").unwrap_or_else(|_| "/usr/sbin/nats-server".into())
}

#[tokio::test]
async fn an_older_nats_server_is_refused_at_start_up() {
    let binary = old_nats_server();
    let version = std::process::Command::new(&binary)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("{binary} (an old nats-server, see .ci/run): {e}"));
    let version = String::from_utf8_lossy(&version.stdout).to_string();
    assert!(
        version.contains("v2.9."),
        "{binary} is not a 2.9 server: {version}"
    );
    let port = common::free_port();
    let mut old = std::process::Command::new(&binary)
        .args(["-a", "127.0.0.1", "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the old nats-server");
    let deadline = Instant::now() + WAIT;
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "old nats-server did not listen");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let url = format!("nats://127.0.0.1:{port}");
    let dir = tempfile::tempdir().expect("dir");
    let (status, _, stderr) = common::run_to_exit(common::adapter_command(
        common::free_port(),
        None,
        &[
            ("SMQ_MESSAGE_BROKER_URL", url.as_str()),
            ("SMQ_MQTT_ADAPTER_DATA_DIR", &dir.path().to_string_lossy()),
        ],
    ))
    .await;
    let _ = old.kill();
    let _ = old.wait();
    assert!(
        !status.success(),
        "started against nats-server 2.9: {stderr}"
    );
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
    assert!(
        errors.len() == 1
            && errors[0].contains("SMQ_MESSAGE_BROKER_URL")
            && errors[0].contains("2.10"),
        "want one error naming the variable and the version needed: {stderr}"
    );
}
