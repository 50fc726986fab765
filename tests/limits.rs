//! Limits (issue #5): the concurrent connection cap (CONNACK 0x03 / 0x97 beyond it), the packet
//! size (closed; MQTT 5 DISCONNECT 0x95), the per-session publish rate (MQTT 5 DISCONNECT 0x96 /
//! closed on 3.1.1) without slowing other devices, and the per-IP connect rate; each counted in
//! `/metrics` when it bites.

mod common;

use common::raw::{self, Connect};
use common::*;
use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as V5Code;
use rumqttc::v5::ConnectionError as V5Error;
use rumqttc::{ConnectReturnCode, ConnectionError, QoS};

/// MQTT control packet type of DISCONNECT.
const DISCONNECT: u8 = 14;

async fn scrape(adapter: &Adapter) -> String {
    let (status, body) = http_get(adapter.ports.http, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

#[tokio::test]
async fn connection_limit_refuses_the_next_connect() {
    let mut adapter =
        Adapter::start_with(CLIENTS, &[("SMQ_MQTT_ADAPTER_MAX_CONNECTIONS", "3")]).await;
    let port = adapter.port;
    let mut open = Vec::new();
    for i in 0..3 {
        open.push(V4Client::connect(port, &format!("lim-{i}"), "c1", "s1").await);
        adapter.expect_connect("c1").await;
    }
    let v311 = V4Client::try_connect(v4_options(port, "lim-x", "c2", "s2")).await;
    assert!(
        matches!(
            v311,
            Err(ConnectionError::ConnectionRefused(
                ConnectReturnCode::ServiceUnavailable
            ))
        ),
        "3.1.1 CONNECT beyond the limit: {:?}",
        v311.err()
    );
    let v5 = V5Client::try_connect(v5_options(port, "lim-y", "c2", "s2")).await;
    assert!(
        matches!(v5, Err(V5Error::ConnectionRefused(V5Code::QuotaExceeded))),
        "MQTT 5 CONNECT beyond the limit: {:?}",
        v5.err()
    );
    let metrics = scrape(&adapter).await;
    assert_eq!(
        metric(
            &metrics,
            "mqtt_adapter_limit_hits_total{limit=\"connections\"}"
        ),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "mqtt_adapter_connections"),
        Some(3.0),
        "{metrics}"
    );

    // A freed slot is usable again.
    open.pop().expect("three clients").disconnect().await;
    adapter.expect_disconnect("c1").await;
    let again = V4Client::connect(port, "lim-z", "c2", "s2").await;
    adapter.expect_connect("c2").await;
    again.disconnect().await;
    adapter.expect_disconnect("c2").await;
    for client in open {
        client.disconnect().await;
        adapter.expect_disconnect("c1").await;
    }
    adapter.shutdown().await;
}

#[tokio::test]
async fn oversize_packet_closes_the_session() {
    let mut adapter =
        Adapter::start_with(CLIENTS, &[("SMQ_MQTT_ADAPTER_MAX_PACKET_SIZE", "1024")]).await;
    let port = adapter.port;
    let big = vec![b'x'; 2000];

    let mut v5 = RawClient::connect_ok(port, &Connect::new(V5, "big-5", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    v5.send(&raw::publish(V5, "m/d1/c/ch1/big", 0, 0, &big, &[]))
        .await;
    let packet = v5.expect_kind(DISCONNECT).await;
    assert_eq!(
        packet.body.first(),
        Some(&0x95),
        "DISCONNECT reason: {packet:?}"
    );
    v5.expect_closed().await;
    adapter.expect_disconnect("c1").await;

    let mut v311 = RawClient::connect_ok(port, &Connect::new(V311, "big-4", "c2", "s2")).await;
    adapter.expect_connect("c2").await;
    v311.send(&raw::publish(V311, "m/d1/c/ch1/big", 0, 0, &big, &[]))
        .await;
    v311.expect_closed().await;
    adapter.expect_disconnect("c2").await;

    let metrics = scrape(&adapter).await;
    assert_eq!(
        metric(
            &metrics,
            "mqtt_adapter_packet_errors_total{kind=\"too_large\"}"
        ),
        Some(2.0),
        "{metrics}"
    );
    // A packet just under the limit still passes.
    assert_round_trip(&mut adapter, "small").await;
    adapter.shutdown().await;
}

#[tokio::test]
async fn flooding_publisher_is_cut_off_while_others_are_served() {
    let mut adapter =
        Adapter::start_with(CLIENTS, &[("SMQ_MQTT_ADAPTER_PUBLISH_RATE", "50")]).await;
    let port = adapter.port;

    let mut flooder = RawClient::connect_ok(port, &Connect::new(V5, "flood-5", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    let mut sub = V4Client::connect(port, "calm-sub", "c2", "s2").await;
    adapter.expect_connect("c2").await;
    sub.subscribe("m/d1/c/ch1/calm", QoS::AtLeastOnce).await;
    let mut calm = V4Client::connect(port, "calm-pub", "c3", "s3").await;
    adapter.expect_connect("c3").await;

    // The flood and the calm pair's round trip run at the same time.
    let burst: Vec<u8> = (0..500)
        .flat_map(|_| raw::publish(V5, "m/d1/c/ch1/flood", 0, 0, b"flood", &[]))
        .collect();
    let flood = async {
        flooder.send(&burst).await;
        let packet = flooder.expect_kind(DISCONNECT).await;
        assert_eq!(
            packet.body.first(),
            Some(&0x96),
            "DISCONNECT reason: {packet:?}"
        );
        flooder.expect_closed().await;
    };
    let round_trip = async {
        calm.publish("m/d1/c/ch1/calm", QoS::AtLeastOnce, false, b"still-served")
            .await;
        assert_eq!(&sub.next_publish().await.payload[..], b"still-served");
    };
    tokio::join!(flood, round_trip);
    adapter.expect_disconnect("c1").await;
    let metrics = scrape(&adapter).await;
    assert_eq!(
        metric(
            &metrics,
            "mqtt_adapter_limit_hits_total{limit=\"publish_rate\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    // Messages within the rate went through; the rest of the burst was never routed.
    let routed = metric(&metrics, "mqtt_adapter_messages_total{direction=\"in\"}").unwrap_or(0.0);
    assert!(routed < 500.0, "{metrics}");

    // A 3.1.1 flooder is closed.
    let mut v311 = RawClient::connect_ok(port, &Connect::new(V311, "flood-4", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    let burst: Vec<u8> = (0..200)
        .flat_map(|_| raw::publish(V311, "m/d1/c/ch1/flood", 0, 0, b"x", &[]))
        .collect();
    v311.send(&burst).await;
    v311.expect_closed().await;
    adapter.expect_disconnect("c1").await;

    calm.disconnect().await;
    adapter.expect_disconnect("c3").await;
    sub.disconnect().await;
    adapter.expect_disconnect("c2").await;
    adapter.shutdown().await;
}

#[tokio::test]
async fn connect_rate_per_ip_closes_the_excess() {
    let mut adapter =
        Adapter::start_with(CLIENTS, &[("SMQ_MQTT_ADAPTER_CONNECT_RATE_PER_IP", "1")]).await;
    // The readiness probe used this IP's token; the bucket refills at one per second, so of 20
    // immediate attempts most are closed without a CONNACK.
    let mut accepted = 0;
    let mut clients = Vec::new();
    for i in 0..20 {
        let mut client = RawClient::open(adapter.port).await;
        client
            .send(&Connect::new(V311, &format!("rate-{i}"), "c1", "s1").encode())
            .await;
        match client.read_packet(WAIT).await {
            Ok(packet) => {
                assert_eq!(packet.connack_code(), 0);
                accepted += 1;
                adapter.expect_connect("c1").await;
                clients.push(client);
            }
            Err(raw::ReadEnd::Closed) => {}
            Err(raw::ReadEnd::Timeout) => panic!("neither CONNACK nor close"),
        }
    }
    assert!(accepted < 20, "every connection passed a 1/s per-IP limit");
    let metrics = scrape(&adapter).await;
    let hits = metric(
        &metrics,
        "mqtt_adapter_limit_hits_total{limit=\"connect_rate\"}",
    )
    .unwrap_or(0.0);
    // The readiness probe's extra attempts may also have been counted.
    assert!(hits as usize >= 20 - accepted, "{metrics}");
    drop(clients);
    for _ in 0..accepted {
        adapter.expect_disconnect("c1").await;
    }
    adapter.shutdown().await;
}

#[tokio::test]
async fn inflight_beyond_the_receive_maximum_closes_the_session() {
    let mut adapter = Adapter::start_with(CLIENTS, &[("SMQ_MQTT_ADAPTER_MAX_INFLIGHT", "2")]).await;
    let port = adapter.port;
    // QoS 2 PUBLISHes stay in flight until the device's PUBREL is completed; none is sent here.
    let mut v5 = RawClient::connect_ok(port, &Connect::new(V5, "infl-5", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    for pkid in 1..=3u16 {
        v5.send(&raw::publish(V5, "m/d1/c/ch1/infl", 2, pkid, b"q2", &[]))
            .await;
    }
    let packet = v5.expect_kind(DISCONNECT).await;
    assert_eq!(
        packet.body.first(),
        Some(&0x93),
        "DISCONNECT reason: {packet:?}"
    );
    adapter.expect_disconnect("c1").await;

    // Completed flows free their slots: many QoS 1 round trips with a limit of 2 stay connected.
    let mut ok = V4Client::connect(port, "infl-4", "c2", "s2").await;
    adapter.expect_connect("c2").await;
    for i in 0..10u8 {
        ok.publish("m/d1/c/ch1/infl", QoS::AtLeastOnce, false, &[i])
            .await;
    }
    ok.disconnect().await;
    adapter.expect_disconnect("c2").await;
    let metrics = scrape(&adapter).await;
    assert_eq!(
        metric(
            &metrics,
            "mqtt_adapter_limit_hits_total{limit=\"inflight\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    adapter.shutdown().await;
}
