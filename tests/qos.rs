//! Delivery happens at min(publish QoS, subscription QoS), and the acknowledgements the adapter
//! answers for the router keep the flow going (no stall after the router's inflight window).

mod common;

use common::adapter::Adapter;
use common::clients::{V4Client, V5Client};
use common::CLIENTS;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::QoS;

const TOPIC: &str = "m/d1/c/ch1/qos";

#[tokio::test]
async fn qos0_publish_reaches_qos1_and_qos2_subscribers_at_qos0() {
    let adapter = Adapter::start(CLIENTS).await;
    let mut sub1 = V4Client::connect(adapter.port, "qos-sub1", "c1", "s1").await;
    sub1.subscribe(TOPIC, QoS::AtLeastOnce).await;
    let mut sub2 = V5Client::connect(adapter.port, "qos-sub2", "c1", "s1").await;
    sub2.subscribe(TOPIC, QoS5::ExactlyOnce).await;
    let mut publisher = V4Client::connect(adapter.port, "qos-pub", "c1", "s1").await;
    // More than the router's inflight window, so unanswered router acks would stall delivery.
    for i in 0..300 {
        publisher
            .publish(TOPIC, QoS::AtMostOnce, false, format!("m{i}").as_bytes())
            .await;
    }
    for i in 0..300 {
        let got = sub1.next_publish().await;
        assert_eq!(got.qos, QoS::AtMostOnce, "3.1.1 subscriber, message {i}");
        assert_eq!(got.payload, format!("m{i}").as_bytes());
        let got = sub2.next_publish().await;
        assert_eq!(got.qos, QoS5::AtMostOnce, "MQTT 5 subscriber, message {i}");
        assert_eq!(got.payload, format!("m{i}").as_bytes());
    }
}

#[tokio::test]
async fn qos1_publish_reaches_qos2_subscriber_at_qos1_and_qos2_publish_at_qos2() {
    let adapter = Adapter::start(CLIENTS).await;
    let mut sub = V4Client::connect(adapter.port, "qos-sub", "c1", "s1").await;
    sub.subscribe(TOPIC, QoS::ExactlyOnce).await;
    let mut publisher = V4Client::connect(adapter.port, "qos-pub", "c1", "s1").await;
    for i in 0..300 {
        publisher
            .publish(TOPIC, QoS::AtLeastOnce, false, format!("a{i}").as_bytes())
            .await;
    }
    for i in 0..300 {
        let got = sub.next_publish().await;
        assert_eq!(got.qos, QoS::AtLeastOnce, "message {i}");
        assert_eq!(got.payload, format!("a{i}").as_bytes());
    }
    publisher
        .publish(TOPIC, QoS::ExactlyOnce, false, b"exactly")
        .await;
    let got = sub.next_publish().await;
    assert_eq!(
        (got.qos, &got.payload[..]),
        (QoS::ExactlyOnce, &b"exactly"[..])
    );
}

#[tokio::test]
async fn qos1_subscriber_gets_qos1_from_qos1_publisher() {
    let adapter = Adapter::start(CLIENTS).await;
    let mut sub = V5Client::connect(adapter.port, "qos-sub", "c1", "s1").await;
    sub.subscribe(TOPIC, QoS5::AtLeastOnce).await;
    let mut publisher = V4Client::connect(adapter.port, "qos-pub", "c1", "s1").await;
    publisher
        .publish(TOPIC, QoS::AtLeastOnce, false, b"one")
        .await;
    publisher
        .publish(TOPIC, QoS::ExactlyOnce, false, b"two")
        .await;
    let got = sub.next_publish().await;
    assert_eq!(
        (got.qos, &got.payload[..]),
        (QoS5::AtLeastOnce, &b"one"[..])
    );
    let got = sub.next_publish().await;
    // min(2, 1) = 1
    assert_eq!(
        (got.qos, &got.payload[..]),
        (QoS5::AtLeastOnce, &b"two"[..])
    );
}
