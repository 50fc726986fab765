//! Shared helpers for the black-box tests: start the real binary, read its events, talk MQTT to it.
#![allow(dead_code, unused_imports)]

pub mod adapter;
pub mod clients;
pub mod nats;
pub mod ops;
pub mod platform;
pub mod raw;
pub mod stores;
pub mod supermq_events;

pub use adapter::{
    adapter_command, assert_paired, assert_session, free_port, lower_file_limit, open_fds,
    run_to_exit, Adapter, Event, WAIT,
};
pub use clients::{
    mosquitto_pub, run_paho, v4_options, v5_options, MosquittoSub, V4Client, V5Client,
};
pub use ops::{http_get, metric, TestPki};
pub use raw::{Connect, RawClient, V311, V5};

/// The static clients file most tests use (SPEC §3):
/// - `c1`, `c2`, `c3` may publish and subscribe on `d1/ch1`; `c3` also owns `d1/ch3`;
/// - `c1` may only subscribe on `d1/ro`, and has the plain topics `sensors/#` through `[[acl]]`;
/// - `outsider` is a valid client with no connection at all; `sentinel` marks "nothing happened before".
pub const CLIENTS: &str = r#"
[[clients]]
id = "c1"
secret = "s1"
name = "sensor-1"

[[clients]]
id = "c2"
secret = "s2"

[[clients]]
id = "c3"
secret = "s3"

[[clients]]
id = "outsider"
secret = "so"

[[clients]]
id = "sentinel"
secret = "ss"

[[connections]]
client = "c1"
domain = "d1"
channel = "ch1"
actions = ["publish", "subscribe"]

[[connections]]
client = "c2"
domain = "d1"
channel = "ch1"
actions = ["publish", "subscribe"]

[[connections]]
client = "c3"
domain = "d1"
channel = "ch1"
actions = ["publish", "subscribe"]

[[connections]]
client = "c3"
domain = "d1"
channel = "ch3"
actions = ["publish", "subscribe"]

[[connections]]
client = "c1"
domain = "d1"
channel = "ro"
actions = ["subscribe"]

[[connections]]
client = "sentinel"
domain = "d1"
channel = "ch1"
actions = ["publish", "subscribe"]

[[acl]]
client = "c1"
topics = ["sensors/#"]
actions = ["publish", "subscribe"]
"#;

/// Proves the adapter still serves devices: a fresh subscriber and publisher round-trip one message
/// on `d1/ch1`, and both sessions' connect and disconnect events come in order.
/// Call it when no other session is connecting or ending, so the next events are its own.
pub async fn assert_round_trip(adapter: &mut Adapter, tag: &str) {
    let topic = format!("m/d1/c/ch1/check/{tag}");
    let mut sub = V4Client::connect(adapter.port, &format!("chk-sub-{tag}"), "c2", "s2").await;
    adapter.expect_connect("c2").await;
    sub.subscribe(&topic, rumqttc::QoS::AtLeastOnce).await;
    let mut publisher =
        V5Client::connect(adapter.port, &format!("chk-pub-{tag}"), "c3", "s3").await;
    adapter.expect_connect("c3").await;
    publisher
        .publish(
            &topic,
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            tag.as_bytes(),
            &[],
        )
        .await;
    let got = sub.next_publish().await;
    assert_eq!(got.topic, topic);
    assert_eq!(&got.payload[..], tag.as_bytes());
    publisher.disconnect().await;
    adapter.expect_disconnect("c3").await;
    sub.disconnect().await;
    adapter.expect_disconnect("c2").await;
}

/// Connects `sentinel` and asserts its connect is the very next event: whatever the test did before
/// (a refused CONNECT, a dropped publish) emitted nothing.
pub async fn assert_next_event_is_sentinel(adapter: &mut Adapter) {
    let sentinel = V4Client::connect(adapter.port, "sentinel-dev", "sentinel", "ss").await;
    adapter.expect_connect("sentinel").await;
    sentinel.disconnect().await;
    adapter.expect_disconnect("sentinel").await;
}
