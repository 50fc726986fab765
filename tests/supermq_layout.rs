//! `SMQ_MQTT_ADAPTER_EVENT_LAYOUT=supermq` in each real store (a private redis-server and
//! nats-server, the machine's RabbitMQ with a unique queue): a connect, a SUBSCRIBE granting two
//! channel filters (one named by route) and refusing a third, and a disconnect produce exactly
//! SuperMQ's entries, field by field. With the default `seed` layout the same session writes the
//! seed's two entries and nothing else.

mod common;

use common::raw;
use common::stores::{StoreKind, StoreServer};
use common::supermq_events::{wait_store_entries, SupermqEntry, SupermqQueue};
use common::{Adapter, Connect, RawClient, V311};
use serde_json::json;

/// c3 may use `d1/ch1` and `d1/ch3`, the latter also by the routes `home` / `lab`.
const CLIENTS: &str = r#"
[[clients]]
id = "c3"
secret = "s3"

[[connections]]
client = "c3"
domain = "d1"
channel = "ch1"
actions = ["publish", "subscribe"]

[[connections]]
client = "c3"
domain = "d1"
channel = "ch3"
domain_route = "home"
channel_route = "lab"
actions = ["publish", "subscribe"]
"#;

/// Connect, subscribe to two granted channel filters and one refused, disconnect.
async fn session(port: u16, mqtt_id: &str) {
    let mut dev = RawClient::connect_ok(port, &Connect::new(V311, mqtt_id, "c3", "s3")).await;
    let codes = dev
        .subscribe(
            V311,
            1,
            &[
                ("m/d1/c/ch1/a/+", 0),
                ("m/home/c/lab/#", 1),
                ("m/d1/c/nope", 0),
            ],
        )
        .await;
    assert_eq!(codes, vec![0, 1, 0x80]);
    dev.send(&raw::disconnect(V311)).await;
    dev.expect_closed().await;
}

/// Exactly the session's four entries, in time order, each exactly SuperMQ's object.
fn assert_supermq_entries(entries: Vec<SupermqEntry>, mqtt_id: &str, instance: &str) {
    let mut mine: Vec<SupermqEntry> = entries
        .into_iter()
        .filter(|e| e.subscriber_id() == mqtt_id)
        .collect();
    mine.sort_by_key(SupermqEntry::occurred_at);
    let streams: Vec<&str> = mine.iter().map(|e| e.stream.as_str()).collect();
    assert_eq!(
        streams,
        [
            "supermq.mqtt.client_connect",
            "supermq.mqtt.client_subscribe",
            "supermq.mqtt.client_subscribe",
            "supermq.mqtt.client_disconnect"
        ],
        "{mine:?}"
    );
    let times: Vec<u64> = mine.iter().map(SupermqEntry::occurred_at).collect();
    assert!(times.windows(2).all(|w| w[0] < w[1]), "{times:?}");
    let expected = [
        json!({"operation": "mqtt.client_connect", "client_id": "c3", "subscriber_id": mqtt_id,
               "instance": instance, "occurred_at": times[0]}),
        json!({"operation": "mqtt.client_subscribe", "client_id": "c3", "subscriber_id": mqtt_id,
               "domainID": "d1", "channel_id": "ch1", "subtopic": "a.*", "occurred_at": times[1]}),
        json!({"operation": "mqtt.client_subscribe", "client_id": "c3", "subscriber_id": mqtt_id,
               "domainID": "d1", "channel_id": "ch3", "subtopic": ">", "occurred_at": times[2]}),
        json!({"operation": "mqtt.client_disconnect", "client_id": "c3", "subscriber_id": mqtt_id,
               "instance": instance, "occurred_at": times[3]}),
    ];
    for (got, want) in mine.iter().zip(expected) {
        assert_eq!(got.data, want);
    }
}

async fn supermq_layout_in(kind: StoreKind) {
    let store = StoreServer::start(kind).await;
    let url = store.url();
    let adapter = Adapter::start_with(
        CLIENTS,
        &[
            ("SMQ_ES_URL", url.as_str()),
            ("SMQ_MQTT_ADAPTER_EVENT_LAYOUT", "supermq"),
        ],
    )
    .await;
    session(adapter.port, "layout-dev").await;
    let entries = wait_store_entries(&store, 4).await;
    assert_eq!(entries.len(), 4, "{entries:?}");
    assert_supermq_entries(entries, "layout-dev", common::adapter::INSTANCE);
    let rest = adapter.shutdown().await;
    assert!(rest.is_empty(), "nothing on stdout with a store: {rest:?}");
}

#[tokio::test]
async fn redis_streams_hold_exactly_supermq_entries() {
    supermq_layout_in(StoreKind::Redis).await;
}

#[tokio::test]
async fn nats_jetstream_holds_exactly_supermq_messages() {
    supermq_layout_in(StoreKind::Nats).await;
}

#[tokio::test]
async fn rabbitmq_gets_exactly_supermq_messages() {
    let mut queue = SupermqQueue::bind().await;
    let mqtt_id = format!("amqp-{}", uuid::Uuid::new_v4());
    let url = common::stores::amqp_url();
    let mut adapter = Adapter::start_with(
        CLIENTS,
        &[
            ("SMQ_ES_URL", url.as_str()),
            ("SMQ_MQTT_ADAPTER_EVENT_LAYOUT", "supermq"),
        ],
    )
    .await;
    session(adapter.port, &mqtt_id).await;
    let entries = queue.entries(&mqtt_id, 4).await;
    assert_supermq_entries(entries, &mqtt_id, common::adapter::INSTANCE);
    adapter.signal(libc::SIGTERM);
    assert!(adapter.wait_exit().await.success());
}

#[tokio::test]
async fn seed_layout_writes_no_subscribe_events() {
    let store = StoreServer::start(StoreKind::Redis).await;
    let url = store.url();
    let adapter = Adapter::start_with(CLIENTS, &[("SMQ_ES_URL", url.as_str())]).await;
    session(adapter.port, "seed-dev").await;
    // A second session afterwards: once its events are in, the first one's are complete.
    session(adapter.port, "seed-dev-2").await;
    let events = store.wait_events(4).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.event.event_type.as_str()).collect();
    assert_eq!(kinds, ["connect", "disconnect", "connect", "disconnect"]);
    for e in &events {
        e.assert_seed_format();
    }
    let client = redis::Client::open(url.as_str()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut conn)
        .await
        .expect("KEYS");
    assert_eq!(keys, ["supermq.mqtt"], "no other stream is written");
    adapter.shutdown().await;
}
