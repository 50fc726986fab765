//! MQTT 5 session lifetime: clean start and the session expiry interval decide whether a
//! session's subscriptions and queued messages outlive the connection.

mod common;

use common::adapter::Adapter;
use common::clients::{v5_options, V4Client, V5Client};
use common::CLIENTS;
use rumqttc::v5::mqttbytes::v5::ConnectProperties;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::QoS;

const TOPIC: &str = "m/d1/c/ch1/expiry";

fn persistent_options(port: u16, id: &str, expiry: Option<u32>) -> rumqttc::v5::MqttOptions {
    let mut opts = v5_options(port, id, "c1", "s1");
    opts.set_clean_start(false);
    let mut props = ConnectProperties::new();
    props.session_expiry_interval = expiry;
    opts.set_connect_properties(props);
    opts
}

/// Subscribes with a persistent session, disconnects, lets another client publish, reconnects.
async fn resume(adapter: &mut Adapter, id: &str, expiry: Option<u32>) -> V5Client {
    let mut sub = V5Client::connect_with(persistent_options(adapter.port, id, expiry)).await;
    adapter.expect_connect("c1").await;
    sub.subscribe(TOPIC, QoS5::AtLeastOnce).await;
    sub.disconnect().await;
    adapter.expect_disconnect("c1").await;

    let mut publisher = V4Client::connect(adapter.port, "expiry-pub", "c2", "s2").await;
    adapter.expect_connect("c2").await;
    publisher
        .publish(TOPIC, QoS::AtLeastOnce, false, b"while-offline")
        .await;
    publisher.disconnect().await;
    adapter.expect_disconnect("c2").await;

    let again = V5Client::connect_with(persistent_options(adapter.port, id, expiry)).await;
    adapter.expect_connect("c1").await;
    again
}

#[tokio::test]
async fn session_with_expiry_interval_is_resumed_with_its_queued_message() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let mut sub = resume(&mut adapter, "expiry-300", Some(300)).await;
    assert!(sub.connack.session_present, "session_present on resume");
    assert_eq!(&sub.next_publish().await.payload[..], b"while-offline");
}

#[tokio::test]
async fn session_without_expiry_interval_ends_with_the_connection() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let mut sub = resume(&mut adapter, "expiry-0", None).await;
    assert!(
        !sub.connack.session_present,
        "an MQTT 5 session with expiry interval 0 must not be resumed"
    );
    // The old subscription is gone: only what the new subscription sees arrives.
    sub.subscribe(TOPIC, QoS5::AtLeastOnce).await;
    let mut publisher = V4Client::connect(adapter.port, "expiry-pub2", "c2", "s2").await;
    publisher
        .publish(TOPIC, QoS::AtLeastOnce, false, b"marker")
        .await;
    assert_eq!(&sub.next_publish().await.payload[..], b"marker");
}

#[tokio::test]
async fn clean_start_discards_a_kept_session() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let sub = resume(&mut adapter, "expiry-clean", Some(300)).await;
    assert!(sub.connack.session_present);
    sub.disconnect().await;
    adapter.expect_disconnect("c1").await;

    let mut opts = persistent_options(adapter.port, "expiry-clean", Some(300));
    opts.set_clean_start(true);
    let fresh = V5Client::connect_with(opts).await;
    assert!(
        !fresh.connack.session_present,
        "clean start must not resume the kept session"
    );
}

/// Found by fuzzing: a subtopic with a `%` (`a%25` is kept as `a%`) must survive its
/// re-authorization at resume. (`a%2555`, kept as `a%55`, which would read `aU` when parsed
/// again, is now refused at SUBSCRIBE: see `topic::tests`.)
#[tokio::test]
async fn a_kept_subscription_with_a_percent_in_its_subtopic_survives_the_resume() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let topic = "m/d1/c/ch1/a%25";
    let port = adapter.port;
    let opts = || persistent_options(port, "expiry-percent", Some(300));
    let mut sub = V5Client::connect_with(opts()).await;
    adapter.expect_connect("c1").await;
    sub.subscribe(topic, QoS5::AtLeastOnce).await;
    sub.disconnect().await;
    adapter.expect_disconnect("c1").await;

    let mut again = V5Client::connect_with(opts()).await;
    assert!(again.connack.session_present, "session_present on resume");
    let mut publisher = V4Client::connect(adapter.port, "percent-pub", "c2", "s2").await;
    publisher
        .publish(topic, QoS::AtLeastOnce, false, b"kept")
        .await;
    assert_eq!(&again.next_publish().await.payload[..], b"kept");
}
