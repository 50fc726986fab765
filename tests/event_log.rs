//! The durable event log under the failures it exists for (issue #11): `kill -9` in the middle of
//! a connect storm (store up, store down, Redis and NATS JetStream), a torn last record, and the
//! `always` fsync mode, whose `connect` is on disk before CONNACK.
//!
//! The storm is what an operator would try: clients with their own ids, 50 in flight, each
//! disconnecting right after CONNACK; the adapter is killed once a third of them got a CONNACK
//! and started again on the same data directory. Then, per client in the store: every client
//! that got a CONNACK has its `connect`, and every client's connects and disconnects pair up.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use common::stores::{
    devices_file, es_env, path_str, without_repeats, StoreKind, StoreServer, StoredEvent,
    STORE_WAIT,
};
use common::*;
use tokio::sync::watch;

const STORM_CLIENTS: usize = 3000;
const IN_FLIGHT: usize = 50;
const KILL_AFTER: usize = 1000;

/// Clients `dev-0..n`, `IN_FLIGHT` at a time, each sending DISCONNECT right after its CONNACK,
/// until the adapter stops answering. Every CONNACK success is recorded and counted on `acked`.
async fn storm(port: u16, n: usize, acked: watch::Sender<BTreeSet<usize>>) {
    let next = Arc::new(Mutex::new(0usize));
    let acked = Arc::new(acked);
    let mut workers = Vec::new();
    for _ in 0..IN_FLIGHT {
        let (next, acked) = (next.clone(), acked.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = {
                    let mut next = next.lock().unwrap();
                    if *next == n {
                        return;
                    }
                    *next += 1;
                    *next - 1
                };
                let id = format!("dev-{i}");
                let secret = format!("s-{i}");
                let version = if i.is_multiple_of(2) { V311 } else { V5 };
                let connect = Connect::new(version, &id, &id, &secret);
                let Some((mut device, code)) = RawClient::try_connect(port, &connect).await else {
                    // The adapter is gone: this worker's part of the storm is over.
                    return;
                };
                assert_eq!(code, 0, "CONNACK for {id}");
                acked.send_modify(|a| {
                    a.insert(i);
                });
                device.send(&raw::disconnect(version)).await;
                // Closed by the adapter after the DISCONNECT, or by its death.
                let _ = device.read_packet(WAIT).await;
            }
        }));
    }
    for w in workers {
        w.await.expect("storm worker");
    }
}

/// Starts a storm on `adapter`, `kill -9`s it once `KILL_AFTER` clients got a CONNACK, and
/// returns the clients that got one.
async fn storm_and_kill(adapter: Adapter) -> BTreeSet<usize> {
    let (acked_tx, mut acked) = watch::channel(BTreeSet::new());
    let storm = tokio::spawn(storm(adapter.port, STORM_CLIENTS, acked_tx));
    acked
        .wait_for(|a| a.len() >= KILL_AFTER)
        .await
        .expect("the storm reports its CONNACKs");
    adapter.kill().await;
    storm.await.expect("storm");
    let acked = acked.borrow().clone();
    assert!(
        acked.len() < STORM_CLIENTS,
        "the kill must land in the middle of the storm ({} CONNACKs)",
        acked.len()
    );
    acked
}

/// Waits until the adapter reports no undelivered event (everything in its log is stored).
async fn wait_all_delivered(adapter: &Adapter) {
    let deadline = Instant::now() + STORE_WAIT;
    loop {
        if let Ok((200, text)) = common::ops::try_http_get(adapter.ports.http, "/metrics").await {
            if metric(&text, "mqtt_adapter_events_pending") == Some(0.0) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "events still pending after {STORE_WAIT:?}: {}",
            adapter.stderr_tail()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Everything in the store; a read that fails (a loaded machine can time one out) is retried.
async fn read_store(store: &StoreServer) -> Vec<StoredEvent> {
    let deadline = Instant::now() + STORE_WAIT;
    loop {
        match store.entries().await {
            Ok(events) => return events,
            Err(e) => assert!(Instant::now() < deadline, "cannot read the store: {e}"),
        }
    }
}

/// Per client: exactly one `connect` then one `disconnect` (repeats of one event, which
/// at-least-once delivery allows after a kill, set aside), later than it; every client that got
/// a CONNACK among them. Returns how many disconnects were crash recoveries.
fn assert_pairs(stored: Vec<StoredEvent>, acked: &BTreeSet<usize>) -> usize {
    let events = without_repeats(stored);
    let mut by_client: BTreeMap<String, Vec<&StoredEvent>> = BTreeMap::new();
    for e in &events {
        by_client
            .entry(e.event.client_id.clone())
            .or_default()
            .push(e);
    }
    for i in acked {
        assert!(
            by_client.contains_key(&format!("dev-{i}")),
            "dev-{i} got a CONNACK but its connect is not in the store"
        );
    }
    let mut recovered = 0;
    for (client, got) in &by_client {
        let kinds: Vec<&str> = got.iter().map(|e| e.event.event_type.as_str()).collect();
        assert_eq!(
            kinds,
            ["connect", "disconnect"],
            "events of {client}: {got:?}"
        );
        assert_session(&got[0].event, &got[1].event);
        if got[1].extra.get("reason").map(String::as_str) == Some("crash_recovery") {
            recovered += 1;
        }
    }
    recovered
}

/// The storm with the store up the whole time.
async fn kill_9_in_a_storm_with_the_store_up(kind: StoreKind) {
    let store = StoreServer::start(kind).await;
    let url = store.url();
    let data = tempfile::tempdir().expect("temp dir");
    let data_dir = path_str(data.path());
    let mut env = es_env(&url, &data_dir);
    env.push(("SMQ_MQTT_ADAPTER_CONNECT_RATE_PER_IP", "0"));
    env.push(("SMQ_MQTT_ADAPTER_EVENT_DETAILS", "true"));
    env.push(("SMQ_MQTT_ADAPTER_LOG_LEVEL", "warn"));
    let clients = devices_file(STORM_CLIENTS);

    let crashed = Adapter::start_with(&clients, &env).await;
    let acked = storm_and_kill(crashed).await;

    let restarted = Adapter::start_with(&clients, &env).await;
    wait_all_delivered(&restarted).await;
    assert_pairs(read_store(&store).await, &acked);
    restarted.shutdown().await;
}

#[tokio::test]
async fn kill_9_in_a_connect_storm_pairs_every_session_in_redis() {
    kill_9_in_a_storm_with_the_store_up(StoreKind::Redis).await;
}

#[tokio::test]
async fn kill_9_in_a_connect_storm_pairs_every_session_in_nats_jetstream() {
    kill_9_in_a_storm_with_the_store_up(StoreKind::Nats).await;
}

/// The store is down during the storm and the kill, and comes back only after the restart:
/// the recovery's disconnects wait in the log with the storm's events.
async fn kill_9_in_a_storm_with_the_store_down(kind: StoreKind) {
    let mut store = StoreServer::start(kind).await;
    let url = store.url();
    let data = tempfile::tempdir().expect("temp dir");
    let data_dir = path_str(data.path());
    let mut env = es_env(&url, &data_dir);
    env.push(("SMQ_MQTT_ADAPTER_CONNECT_RATE_PER_IP", "0"));
    env.push(("SMQ_MQTT_ADAPTER_EVENT_DETAILS", "true"));
    env.push(("SMQ_MQTT_ADAPTER_LOG_LEVEL", "warn"));
    let clients = devices_file(STORM_CLIENTS);

    let crashed = Adapter::start_with(&clients, &env).await;
    store.stop();
    let acked = storm_and_kill(crashed).await;

    let restarted = Adapter::start_with(&clients, &env).await;
    store.start_again().await;
    wait_all_delivered(&restarted).await;
    assert_pairs(read_store(&store).await, &acked);
    restarted.shutdown().await;
}

#[tokio::test]
async fn kill_9_in_a_connect_storm_with_redis_down_pairs_every_session_once_it_is_back() {
    kill_9_in_a_storm_with_the_store_down(StoreKind::Redis).await;
}

#[tokio::test]
async fn kill_9_in_a_connect_storm_with_nats_down_pairs_every_session_once_it_is_back() {
    kill_9_in_a_storm_with_the_store_down(StoreKind::Nats).await;
}

/// A record torn by a power cut at the end of the log: start-up cuts it (saying how many bytes),
/// delivers every good record before it and goes on writing after them.
#[tokio::test]
async fn a_torn_last_record_is_cut_at_start_up_and_the_rest_delivered() {
    let mut store = StoreServer::start(StoreKind::Redis).await;
    store.stop();
    let url = store.url();
    let data = tempfile::tempdir().expect("temp dir");
    let data_dir = path_str(data.path());
    let env = es_env(&url, &data_dir);
    let clients = devices_file(5);

    let first = Adapter::start_with(&clients, &env).await;
    for i in 0..5 {
        let id = format!("dev-{i}");
        let secret = format!("s-{i}");
        let mut device =
            RawClient::connect_ok(first.port, &Connect::new(V311, &id, &id, &secret)).await;
        device.send(&raw::disconnect(V311)).await;
        device.expect_closed().await;
    }
    first.kill().await;

    let mut segments: Vec<_> = std::fs::read_dir(data.path())
        .expect("data dir")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    segments.sort();
    let last = segments.pop().expect("a log segment");
    // A header announcing 300 bytes, and only the first few of them.
    let mut torn = 300u32.to_le_bytes().to_vec();
    torn.extend_from_slice(&[0x5a; 4]);
    torn.extend_from_slice(br#"{"event":{"sess"#);
    {
        use std::io::Write;
        std::fs::OpenOptions::new()
            .append(true)
            .open(&last)
            .expect("open the segment")
            .write_all(&torn)
            .expect("tear it");
    }

    store.start_again().await;
    let second = Adapter::start_with(&clients, &env).await;
    let cut_line = format!("cut {} bytes", torn.len());
    assert!(
        second.stderr().contains(&cut_line),
        "a warning naming the {} bytes cut: {}",
        torn.len(),
        second.stderr_tail()
    );
    let events = store.wait_events(10).await;
    assert_eq!(events.len(), 10, "{events:?}");
    let acked: BTreeSet<usize> = (0..5).collect();
    assert_eq!(assert_pairs(events, &acked), 0);
    // Writing goes on after the cut: a new session reaches the store too.
    let mut late =
        RawClient::connect_ok(second.port, &Connect::new(V5, "late-dev", "late", "sl")).await;
    late.send(&raw::disconnect(V5)).await;
    late.expect_closed().await;
    let events = store.wait_events(12).await;
    assert_eq!(events[10].event.client_id, "late");
    let (_, metrics) = http_get(second.ports.http, "/metrics").await;
    assert!(
        metric(&metrics, "mqtt_adapter_events_log_bytes").is_some_and(|b| b > 0.0),
        "{metrics}"
    );
    assert!(
        metric(&metrics, "mqtt_adapter_events_oldest_undelivered_seconds").is_some(),
        "{metrics}"
    );
    second.shutdown().await;
}

/// An in-process adapter on the demo registry whose event store is unreachable (the log holds
/// the events), with `fsync`.
async fn in_process(fsync: &str, data_dir: &str) -> mqtt_adapter::Server {
    let dead_store = format!("redis://127.0.0.1:{}", free_port());
    use clap::Parser;
    let config = mqtt_adapter::Config::try_parse_from([
        "mqtt-adapter",
        "--host",
        "127.0.0.1",
        "--mqtt-port",
        "0",
        "--ws-port",
        "0",
        "--http-port",
        "0",
        "--shutdown-timeout",
        "1",
        "--es-url",
        &dead_store,
        "--data-dir",
        data_dir,
        "--event-fsync",
        fsync,
    ])
    .expect("flags parse");
    mqtt_adapter::Server::start(&config)
        .await
        .expect("start the adapter")
}

/// The `connect`s on disk (fsynced) when `client` got its CONNACK.
async fn synced_connects_at_connack(server: &mqtt_adapter::Server) -> Vec<String> {
    let port = server.mqtt_addr().port();
    let mut device = RawClient::connect_ok(
        port,
        &Connect::new(V311, "fsync-dev", "demo-sensor", "demo-sensor-secret"),
    )
    .await;
    let log = server.event_log().expect("a store is configured: the log");
    let synced: Vec<String> = log
        .synced_events()
        .expect("read the log")
        .into_iter()
        .filter(|e| e.event_type == mqtt_adapter::events::EventType::Connect)
        .map(|e| e.client_id)
        .collect();
    device.send(&raw::disconnect(V311)).await;
    device.expect_closed().await;
    synced
}

#[tokio::test]
async fn with_fsync_always_the_connect_is_on_disk_before_connack() {
    let data = tempfile::tempdir().expect("temp dir");
    let server = in_process("always", &path_str(data.path())).await;
    assert_eq!(synced_connects_at_connack(&server).await, ["demo-sensor"]);
    server.shutdown().await;

    // The same check can fail: with `off` nothing is ever fsynced.
    let data = tempfile::tempdir().expect("temp dir");
    let server = in_process("off", &path_str(data.path())).await;
    assert!(synced_connects_at_connack(&server).await.is_empty());
    server.shutdown().await;
}
