//! Hostile or odd input must cost only the offending socket: garbage, a first packet that is not
//! CONNECT, oversize packets, silent sockets, client ids with `/`, properties towards 3.1.1 devices.
//! After each, a fresh pair of clients still round-trips a message and the run's events pair up.

mod common;

use std::time::Duration;

use common::*;
use rumqttc::QoS;

#[tokio::test]
async fn garbage_bytes_close_the_socket_and_others_are_served() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let mut garbage = RawClient::open(adapter.port).await;
    garbage
        .send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n\xff\xff\xff\xff\xff\xff")
        .await;
    garbage.expect_closed().await;

    let mut noise = RawClient::open(adapter.port).await;
    noise.send(&[0xFF; 64]).await;
    noise.expect_closed().await;

    assert_round_trip(&mut adapter, "after-garbage").await;
    let rest = adapter.shutdown().await;
    assert!(rest.is_empty(), "events after all sessions ended: {rest:?}");
}

#[tokio::test]
async fn first_packet_not_connect_closes_the_socket() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let mut pinger = RawClient::open(adapter.port).await;
    pinger.send(&raw::pingreq()).await;
    pinger.expect_closed().await;

    let mut publisher = RawClient::open(adapter.port).await;
    publisher
        .send(&raw::publish(
            V311,
            "m/d1/c/ch1/x",
            0,
            0,
            b"no-connect",
            &[],
        ))
        .await;
    publisher.expect_closed().await;

    let mut subscriber = RawClient::open(adapter.port).await;
    subscriber
        .send(&raw::subscribe(V311, 1, &[("m/d1/c/ch1/#", 0)]))
        .await;
    subscriber.expect_closed().await;

    assert_round_trip(&mut adapter, "after-no-connect").await;
    let rest = adapter.shutdown().await;
    assert!(rest.is_empty(), "events after all sessions ended: {rest:?}");
}

#[tokio::test]
async fn unsupported_protocol_level_is_refused() {
    let mut adapter = Adapter::start(CLIENTS).await;
    // Protocol level 3 (MQTT 3.1): 3.1.1 says answer CONNACK 0x01 and close; closing at once is fine too.
    let mut connect = Connect::new(V311, "old-proto", "c1", "s1").encode();
    connect[8] = 3;
    let mut old = RawClient::open(adapter.port).await;
    old.send(&connect).await;
    match old.read_packet(WAIT).await {
        Ok(packet) => {
            assert_ne!(
                packet.connack_code(),
                0,
                "MQTT 3.1 CONNECT must not be accepted"
            );
            old.expect_closed().await;
        }
        Err(end) => assert_eq!(end, raw::ReadEnd::Closed),
    }
    assert_next_event_is_sentinel(&mut adapter).await;
}

#[tokio::test]
async fn oversize_remaining_length_closes_the_socket() {
    // A long connect timeout, so a close within the wait is the size check, not the connect timeout.
    let mut adapter = Adapter::start_with(
        CLIENTS,
        &[
            ("SMQ_MQTT_ADAPTER_MAX_PACKET_SIZE", "1024"),
            ("SMQ_MQTT_ADAPTER_CONNECT_TIMEOUT", "60"),
        ],
    )
    .await;

    // As the first packet: a CONNECT header announcing 100 000 bytes, body never sent.
    let mut huge_connect = RawClient::open(adapter.port).await;
    let mut header = vec![0x10];
    header.extend(raw::varint(100_000));
    huge_connect.send(&header).await;
    huge_connect.expect_closed().await;

    // Inside a session: a PUBLISH announcing 2 000 bytes (over the 1 024 limit), body never sent.
    let mut device =
        RawClient::connect_ok(adapter.port, &Connect::new(V311, "big-pub", "c1", "s1")).await;
    let connected = adapter.expect_connect("c1").await;
    let mut header = vec![0x30];
    header.extend(raw::varint(2_000));
    header.extend([0x00, 0x0C]);
    header.extend(b"m/d1/c/ch1/x");
    device.send(&header).await;
    device.expect_closed().await;
    let disconnected = adapter.expect_disconnect("c1").await;
    assert_session(&connected, &disconnected);

    // The maximum a remaining length can encode (268 435 455), as the first packet.
    let mut max_len = RawClient::open(adapter.port).await;
    max_len.send(&[0x10, 0xFF, 0xFF, 0xFF, 0x7F]).await;
    max_len.expect_closed().await;

    // A packet under the limit is fine.
    let mut ok =
        RawClient::connect_ok(adapter.port, &Connect::new(V311, "small-pub", "c2", "s2")).await;
    adapter.expect_connect("c2").await;
    ok.send(&raw::publish(V311, "m/d1/c/ch1/x", 1, 1, &[b'a'; 500], &[]))
        .await;
    ok.expect_kind(raw::PUBACK).await;
    ok.send(&raw::disconnect(V311)).await;
    ok.expect_closed().await;
    adapter.expect_disconnect("c2").await;

    assert_round_trip(&mut adapter, "after-oversize").await;
    let rest = adapter.shutdown().await;
    assert!(rest.is_empty(), "events after all sessions ended: {rest:?}");
}

#[tokio::test]
async fn silent_socket_is_closed_after_the_connect_timeout() {
    let mut adapter =
        Adapter::start_with(CLIENTS, &[("SMQ_MQTT_ADAPTER_CONNECT_TIMEOUT", "1")]).await;
    let mut silent = RawClient::open(adapter.port).await;
    // The close is the event awaited; the bound only turns "never" into a failure.
    silent.expect_closed_within(Duration::from_secs(8)).await;

    // A half-sent CONNECT is as silent as no CONNECT.
    let mut partial = RawClient::open(adapter.port).await;
    partial
        .send(&Connect::new(V311, "slow", "c1", "s1").encode()[..5])
        .await;
    partial.expect_closed_within(Duration::from_secs(8)).await;

    assert_round_trip(&mut adapter, "after-silence").await;
    let rest = adapter.shutdown().await;
    assert!(rest.is_empty(), "events after all sessions ended: {rest:?}");
}

#[tokio::test]
async fn client_id_with_slashes_reconnects_and_others_are_served() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let topic = "m/d1/c/ch1/slash";
    for round in 0..3 {
        let mut device = V4Client::connect(adapter.port, "site/a/dev-1", "c1", "s1").await;
        let connected = adapter.expect_connect("c1").await;
        device.subscribe(topic, QoS::AtLeastOnce).await;
        device
            .publish(
                topic,
                QoS::AtLeastOnce,
                false,
                format!("round-{round}").as_bytes(),
            )
            .await;
        let got = device.next_publish().await;
        assert_eq!(got.payload, format!("round-{round}").as_bytes());
        device.disconnect().await;
        let disconnected = adapter.expect_disconnect("c1").await;
        assert_session(&connected, &disconnected);
    }
    // The same id on MQTT 5, and a takeover of it.
    let _first = V5Client::connect(adapter.port, "site/a/dev-1", "c1", "s1").await;
    adapter.expect_connect("c1").await;
    let second = V5Client::connect(adapter.port, "site/a/dev-1", "c1", "s1").await;
    adapter.expect_disconnect("c1").await;
    adapter.expect_connect("c1").await;
    second.disconnect().await;
    adapter.expect_disconnect("c1").await;

    assert_round_trip(&mut adapter, "after-slashes").await;
    let rest = adapter.shutdown().await;
    assert!(rest.is_empty(), "events after all sessions ended: {rest:?}");
}

#[tokio::test]
async fn v5_user_properties_to_v311_subscriber_keep_everyone_served() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let topic = "m/d1/c/ch1/props";
    let mut v311_sub = V4Client::connect(adapter.port, "props-sub-4", "c1", "s1").await;
    adapter.expect_connect("c1").await;
    v311_sub.subscribe(topic, QoS::AtLeastOnce).await;
    let mut v5_sub = V5Client::connect(adapter.port, "props-sub-5", "c3", "s3").await;
    adapter.expect_connect("c3").await;
    v5_sub
        .subscribe(topic, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await;
    let mut publisher = V5Client::connect(adapter.port, "props-pub", "c2", "s2").await;
    adapter.expect_connect("c2").await;

    for i in 0..3 {
        let payload = format!("with-props-{i}");
        publisher
            .publish(
                topic,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                payload.as_bytes(),
                &[("k", "v"), ("i", &i.to_string())],
            )
            .await;
        assert_eq!(v311_sub.next_publish().await.payload, payload.as_bytes());
        assert_eq!(v5_sub.next_publish().await.payload, payload.as_bytes());
    }
    // Property-free traffic still flows to both afterwards.
    publisher
        .publish(
            topic,
            rumqttc::v5::mqttbytes::QoS::AtMostOnce,
            false,
            b"plain",
            &[],
        )
        .await;
    assert_eq!(&v311_sub.next_publish().await.payload[..], b"plain");
    assert_eq!(&v5_sub.next_publish().await.payload[..], b"plain");

    publisher.disconnect().await;
    adapter.expect_disconnect("c2").await;
    v5_sub.disconnect().await;
    adapter.expect_disconnect("c3").await;
    v311_sub.disconnect().await;
    adapter.expect_disconnect("c1").await;

    assert_round_trip(&mut adapter, "after-props").await;
    let rest = adapter.shutdown().await;
    assert!(rest.is_empty(), "events after all sessions ended: {rest:?}");
}

#[tokio::test]
async fn bad_sockets_do_not_disturb_an_open_session() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let topic = "m/d1/c/ch1/steady";
    let mut steady = V4Client::connect(adapter.port, "steady", "c1", "s1").await;
    adapter.expect_connect("c1").await;
    steady.subscribe(topic, QoS::AtLeastOnce).await;

    for bytes in [
        &[0xFFu8; 16][..],
        &raw::pingreq()[..],
        &[0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..],
    ] {
        let mut bad = RawClient::open(adapter.port).await;
        bad.send(bytes).await;
        bad.expect_closed().await;
    }
    steady
        .publish(topic, QoS::AtLeastOnce, false, b"still-here")
        .await;
    assert_eq!(&steady.next_publish().await.payload[..], b"still-here");
    steady.disconnect().await;
    adapter.expect_disconnect("c1").await;
    let rest = adapter.shutdown().await;
    assert!(rest.is_empty(), "events after all sessions ended: {rest:?}");
}

#[tokio::test]
async fn empty_client_identifiers_do_not_take_each_other_over() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let mut first = RawClient::connect_ok(adapter.port, &Connect::new(V311, "", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    let mut second = RawClient::connect_ok(adapter.port, &Connect::new(V5, "", "c2", "s2")).await;
    // Were both "" the same session, c1's disconnect would come first.
    adapter.expect_connect("c2").await;
    first.ping().await;
    second.ping().await;
}

#[tokio::test]
async fn empty_client_identifier_without_clean_session_is_refused_on_v311() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let mut connect = Connect::new(V311, "", "c1", "s1");
    connect.clean = false;
    let (mut client, code) = RawClient::connect(adapter.port, &connect).await;
    assert_eq!(code, 0x02, "MQTT 3.1.1 [MQTT-3.1.3-8]: identifier rejected");
    client.expect_closed().await;
    assert_next_event_is_sentinel(&mut adapter).await;
}
