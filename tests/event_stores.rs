//! Connection events in the real event stores (SPEC §4, §6): Redis Streams, NATS JetStream and
//! RabbitMQ receive exactly the seed's format; a store that is down delays events without losing
//! any (they wait in the durable event log, across an adapter restart); a `kill -9` leaves no
//! phantom session, because the next start emits the missing `disconnect`s.
//!
//! Redis and NATS are private servers on free ports (tests stop and restart them); RabbitMQ is the
//! machine's, read through a unique queue and filtered by a unique instance name.

mod common;

use std::collections::BTreeMap;

use common::stores::{
    devices_file, es_env, path_str, without_repeats, AmqpQueue, StoreKind, StoreServer, StoredEvent,
};
use common::*;

async fn connect_device(port: u16, i: usize) -> RawClient {
    let id = format!("dev-{i}");
    let secret = format!("s-{i}");
    let version = if i.is_multiple_of(2) { V311 } else { V5 };
    RawClient::connect_ok(port, &Connect::new(version, &id, &id, &secret)).await
}

/// Connects and cleanly disconnects devices `range`, one after the other.
async fn short_sessions(port: u16, range: std::ops::Range<usize>) {
    for i in range {
        let version = if i.is_multiple_of(2) { V311 } else { V5 };
        let mut device = connect_device(port, i).await;
        device.send(&raw::disconnect(version)).await;
        device.expect_closed().await;
    }
}

/// Asserts that the `connect` and `disconnect` of one session follow each other.
fn assert_pair(connect: &StoredEvent, disconnect: &StoredEvent) {
    assert_session(&connect.event, &disconnect.event);
    assert_eq!(connect.event.instance, disconnect.event.instance);
}

/// Per client, in stream order: exactly one connect, then one disconnect.
fn assert_one_session_per_client(events: &[StoredEvent], clients: &[String]) {
    let mut by_client: BTreeMap<&str, Vec<&StoredEvent>> = BTreeMap::new();
    for e in events {
        by_client
            .entry(e.event.client_id.as_str())
            .or_default()
            .push(e);
    }
    for client in clients {
        let got = by_client
            .get(client.as_str())
            .unwrap_or_else(|| panic!("no events for {client}"));
        let kinds: Vec<&str> = got.iter().map(|e| e.event.event_type.as_str()).collect();
        assert_eq!(kinds, ["connect", "disconnect"], "events of {client}");
        assert_pair(got[0], got[1]);
    }
}

async fn seed_format_in(kind: StoreKind) {
    let store = StoreServer::start(kind).await;
    let url = store.url();
    let adapter = Adapter::start_with(CLIENTS, &[("SMQ_ES_URL", url.as_str())]).await;

    let device = V4Client::connect(adapter.port, "fmt-dev", "c1", "s1").await;
    device.disconnect().await;

    let events = store.wait_events(2).await;
    assert_eq!(events.len(), 2, "{events:?}");
    for e in &events {
        assert_eq!(
            e.keys,
            ["client_id", "event_type", "instance", "occurred_at"],
            "stored fields and their order"
        );
        e.assert_seed_format();
        assert_eq!(e.event.client_id, "c1");
        assert_eq!(e.event.instance, "test-inst");
    }
    assert_pair(&events[0], &events[1]);
    let rest = adapter.shutdown().await;
    assert!(
        rest.is_empty(),
        "no events on stdout with a store: {rest:?}"
    );
}

#[tokio::test]
async fn redis_stream_entries_are_exactly_the_seed_format() {
    seed_format_in(StoreKind::Redis).await;
}

#[tokio::test]
async fn nats_jetstream_messages_are_exactly_the_seed_format() {
    seed_format_in(StoreKind::Nats).await;
}

#[tokio::test]
async fn rabbitmq_messages_are_exactly_the_seed_format() {
    let mut queue = AmqpQueue::bind().await;
    let instance = format!("amqp-{}", uuid::Uuid::new_v4());
    let url = common::stores::amqp_url();
    let mut adapter = Adapter::start_with(
        CLIENTS,
        &[
            ("SMQ_ES_URL", url.as_str()),
            ("SMQ_MQTT_ADAPTER_INSTANCE", instance.as_str()),
        ],
    )
    .await;
    let device = V5Client::connect(adapter.port, "amqp-dev", "c2", "s2").await;
    device.disconnect().await;

    let events = queue.events(&instance, 2).await;
    for e in &events {
        e.assert_seed_format();
        assert_eq!(e.event.client_id, "c2");
    }
    assert_pair(&events[0], &events[1]);
    adapter.signal(libc::SIGTERM);
    assert!(adapter.wait_exit().await.success());
}

/// The store goes down, 200 devices come and go, the store comes back on the same port: all 400
/// events arrive, in per-client order, from the event log.
async fn outage_loses_nothing(kind: StoreKind) {
    let mut store = StoreServer::start(kind).await;
    let url = store.url();
    let data = tempfile::tempdir().expect("temp dir");
    let data_dir = path_str(data.path());
    let env = es_env(&url, &data_dir);
    let clients = devices_file(200);
    let adapter = Adapter::start_with(&clients, &env).await;

    // The store is reached (and, for NATS, the stream created) before the outage.
    short_sessions(adapter.port, 0..1).await;
    assert_eq!(store.wait_events(2).await.len(), 2);

    store.stop();
    short_sessions(adapter.port, 1..200).await;
    store.start_again().await;

    let events = without_repeats(store.wait_events(400).await);
    assert_eq!(events.len(), 400, "events after the outage");
    let ids: Vec<String> = (0..200).map(|i| format!("dev-{i}")).collect();
    assert_one_session_per_client(&events, &ids);
    for e in &events {
        e.assert_seed_format();
    }
    adapter.shutdown().await;
}

#[tokio::test]
async fn redis_outage_delays_events_and_loses_none() {
    outage_loses_nothing(StoreKind::Redis).await;
}

#[tokio::test]
async fn nats_outage_delays_events_and_loses_none() {
    outage_loses_nothing(StoreKind::Nats).await;
}

/// Store unreachable from the start (not fatal), the adapter restarts while it is still down: the
/// first run's events wait in the event log and are delivered, before the second run's, once it
/// is up.
#[tokio::test]
async fn spooled_events_are_delivered_after_an_adapter_restart() {
    let mut store = StoreServer::start(StoreKind::Nats).await;
    store.stop();
    let url = store.url();
    let data = tempfile::tempdir().expect("temp dir");
    let data_dir = path_str(data.path());
    let env = es_env(&url, &data_dir);
    let clients = devices_file(20);

    let mut first = Adapter::start_with(&clients, &env).await;
    short_sessions(first.port, 0..20).await;
    // SIGTERM while the store is down: exit 0, undelivered events kept in the event log.
    first.terminate();
    assert!(first.wait_exit().await.success());
    assert!(
        first.stderr().contains("stay in the event log"),
        "{}",
        first.stderr_tail()
    );

    let mut second = Adapter::start_with(&clients, &env).await;
    let late = V4Client::connect(second.port, "late-dev", "late", "sl").await;
    late.disconnect().await;
    store.start_again().await;

    let events = without_repeats(store.wait_events(42).await);
    assert_eq!(events.len(), 42);
    let ids: Vec<String> = (0..20).map(|i| format!("dev-{i}")).collect();
    assert_one_session_per_client(&events[..40], &ids);
    let last: Vec<(&str, &str)> = events[40..]
        .iter()
        .map(|e| (e.event.client_id.as_str(), e.event.event_type.as_str()))
        .collect();
    assert_eq!(
        last,
        [("late", "connect"), ("late", "disconnect")],
        "the second run's events come after the first run's"
    );
    second.terminate();
    assert!(second.wait_exit().await.success());
}

/// `kill -9` with 50 sessions open: the next start emits their 50 `disconnect`s (reason
/// `crash_recovery`) before accepting devices, so no session stays online in the store.
#[tokio::test]
async fn kill_9_leaves_no_phantom_sessions() {
    let store = StoreServer::start(StoreKind::Redis).await;
    let url = store.url();
    let data = tempfile::tempdir().expect("temp dir");
    let data_dir = path_str(data.path());
    let mut env = es_env(&url, &data_dir);
    env.push(("SMQ_MQTT_ADAPTER_EVENT_DETAILS", "true"));
    let clients = devices_file(50);

    let crashed = Adapter::start_with(&clients, &env).await;
    let mut devices = Vec::new();
    for i in 0..50 {
        devices.push(connect_device(crashed.port, i).await);
    }
    let connects = store.wait_events(50).await;
    for e in &connects {
        assert_eq!(e.event.event_type, "connect");
        let mut extra: Vec<&str> = e.extra.keys().map(String::as_str).collect();
        extra.sort_unstable();
        assert_eq!(
            extra,
            ["mqtt_client_id", "protocol_version", "remote_addr"],
            "connect details: {e:?}"
        );
        let i: usize = e.event.client_id["dev-".len()..]
            .parse()
            .expect("device number");
        let version = if i.is_multiple_of(2) { "3.1.1" } else { "5" };
        assert_eq!(e.extra["protocol_version"], version, "{e:?}");
        assert_eq!(e.extra["mqtt_client_id"], e.event.client_id);
    }
    crashed.kill().await;
    drop(devices);

    let restarted = Adapter::start_with(&clients, &env).await;
    let events = store.wait_events(100).await;
    assert_eq!(events.len(), 100, "exactly one disconnect per open session");
    let ids: Vec<String> = (0..50).map(|i| format!("dev-{i}")).collect();
    assert_one_session_per_client(&events, &ids);
    for e in &events[50..] {
        assert_eq!(e.event.event_type, "disconnect");
        assert_eq!(
            e.extra.get("reason").map(String::as_str),
            Some("crash_recovery"),
            "{e:?}"
        );
    }

    // The recovery's disconnects are in the log: a clean restart reports nothing more.
    restarted.shutdown().await;
    let again = Adapter::start_with(&clients, &env).await;
    short_sessions(again.port, 0..1).await;
    let events = store.wait_events(102).await;
    assert_eq!(events.len(), 102);
    assert_eq!(events[100].event.event_type, "connect");
    assert_eq!(
        events[101].extra.get("reason").map(String::as_str),
        Some("client_disconnect")
    );
    again.shutdown().await;
}

#[tokio::test]
async fn unusable_event_store_urls_stop_startup_with_one_line() {
    for url in [
        "kafka://127.0.0.1:9092",
        "127.0.0.1:6379",
        "redis://127.0.0.1:notaport",
    ] {
        let cmd = adapter_command(free_port(), None, &[("SMQ_ES_URL", url)]);
        let (status, stdout, stderr) = run_to_exit(cmd).await;
        assert!(!status.success(), "{url}: exit status {status}");
        assert!(stdout.is_empty(), "{url}: stdout {stdout:?}");
        let lines: Vec<&str> = stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{url}: one line on stderr, got {stderr:?}");
        assert!(lines[0].contains("SMQ_ES_URL"), "{url}: {stderr:?}");
    }
}

/// An existing `events` stream that does not cover `events.supermq.mqtt` is reported clearly
/// (events cannot be stored there) instead of being silently changed.
#[tokio::test]
async fn nats_stream_not_covering_the_subject_is_reported() {
    let store = StoreServer::start(StoreKind::Nats).await;
    let client = async_nats::connect(store.url())
        .await
        .expect("connect NATS");
    async_nats::jetstream::new(client)
        .create_stream(async_nats::jetstream::stream::Config {
            name: "events".into(),
            subjects: vec!["other.>".into()],
            ..Default::default()
        })
        .await
        .expect("create stream");
    let url = store.url();
    let adapter = Adapter::start_with(CLIENTS, &[("SMQ_ES_URL", url.as_str())]).await;
    let device = V4Client::connect(adapter.port, "uncovered", "c1", "s1").await;
    device.disconnect().await;

    let deadline = std::time::Instant::now() + common::stores::STORE_WAIT;
    while !adapter
        .stderr()
        .contains("does not cover the events subject")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no log line about the stream's subjects: {}",
            adapter.stderr_tail()
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
