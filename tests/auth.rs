//! Authentication of CONNECT and authorization of PUBLISH / SUBSCRIBE against the static clients file:
//! exact CONNACK / PUBACK / SUBACK codes on both MQTT versions, refused messages never delivered.

mod common;

use common::*;
use rumqttc::QoS;

/// A 3.1.1 subscriber on all of `d1/ch1`, to observe what is and is not delivered.
async fn ch1_watcher(adapter: &mut Adapter, id: &str) -> V4Client {
    let mut sub = V4Client::connect(adapter.port, id, "c2", "s2").await;
    adapter.expect_connect("c2").await;
    sub.subscribe("m/d1/c/ch1/#", QoS::AtLeastOnce).await;
    sub
}

/// Publishes `marker` on `d1/ch1` as `c3` and asserts it is the watcher's next message, which proves
/// nothing refused before it was delivered.
async fn assert_next_delivery_is_marker(
    adapter: &mut Adapter,
    watcher: &mut V4Client,
    marker: &str,
) {
    let mut publisher = V4Client::connect(adapter.port, "marker-pub", "c3", "s3").await;
    adapter.expect_connect("c3").await;
    publisher
        .publish(
            "m/d1/c/ch1/marker",
            QoS::AtLeastOnce,
            false,
            marker.as_bytes(),
        )
        .await;
    let got = watcher.next_publish().await;
    assert_eq!(
        String::from_utf8_lossy(&got.payload),
        marker,
        "a refused message was delivered (topic {})",
        got.topic
    );
}

async fn refused_connect(port: u16, connect: Connect<'_>) -> u8 {
    let (mut client, code) = RawClient::connect(port, &connect).await;
    if code != 0 {
        client.expect_closed().await;
    }
    code
}

#[tokio::test]
async fn wrong_password_is_refused_on_both_versions_without_an_event() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let v311 = refused_connect(adapter.port, Connect::new(V311, "bad-pw-4", "c1", "wrong")).await;
    assert_eq!(v311, 0x05, "3.1.1 CONNACK return code for a wrong password");
    let v5 = refused_connect(adapter.port, Connect::new(V5, "bad-pw-5", "c1", "wrong")).await;
    assert_eq!(v5, 0x86, "MQTT 5 CONNACK reason code for a wrong password");
    assert_next_event_is_sentinel(&mut adapter).await;
}

#[tokio::test]
async fn unknown_client_is_refused_on_both_versions_without_an_event() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let v311 = refused_connect(adapter.port, Connect::new(V311, "ghost-4", "ghost", "s1")).await;
    assert_eq!(
        v311, 0x05,
        "3.1.1 CONNACK return code for an unknown client"
    );
    let v5 = refused_connect(adapter.port, Connect::new(V5, "ghost-5", "ghost", "s1")).await;
    assert_eq!(v5, 0x86, "MQTT 5 CONNACK reason code for an unknown client");
    assert_next_event_is_sentinel(&mut adapter).await;
}

#[tokio::test]
async fn missing_username_is_refused_without_anonymous_section() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let mut anonymous = Connect::new(V311, "anon-4", "", "");
    anonymous.username = None;
    anonymous.password = None;
    assert_eq!(refused_connect(adapter.port, anonymous).await, 0x05);

    let mut anonymous = Connect::new(V5, "anon-5", "", "");
    anonymous.username = None;
    anonymous.password = None;
    let code = refused_connect(adapter.port, anonymous).await;
    assert!(
        code == 0x86 || code == 0x87,
        "MQTT 5 CONNACK reason code with no username: {code:#x} (want 0x86 or 0x87)"
    );
    assert_next_event_is_sentinel(&mut adapter).await;
}

#[tokio::test]
async fn rumqttc_sees_refusal_as_not_authorized() {
    let adapter = Adapter::start(CLIENTS).await;
    match V4Client::try_connect(v4_options(adapter.port, "rq-bad", "c2", "nope")).await {
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, rumqttc::ConnectReturnCode::NotAuthorized)
        }
        Err(other) => panic!("expected a refused CONNECT, got {other}"),
        Ok(_) => panic!("CONNECT with a wrong password was accepted"),
    }
}

#[tokio::test]
async fn anonymous_section_admits_clients_without_username_on_its_topics_only() {
    let clients = format!("{CLIENTS}\n[anonymous]\ntopics = [\"public/#\"]\n");
    let mut adapter = Adapter::start(&clients).await;
    let mut connect = Connect::new(V311, "anon-dev", "", "");
    connect.username = None;
    connect.password = None;
    let mut anon = RawClient::connect_ok(adapter.port, &connect).await;
    let connected = adapter.expect_connect("").await;

    let codes = anon.subscribe(V311, 1, &[("public/news", 1)]).await;
    assert!(
        codes.len() == 1 && codes[0] <= 1,
        "SUBACK on an [anonymous] topic: {codes:?}"
    );
    assert_eq!(
        anon.subscribe(V311, 2, &[("m/d1/c/ch1/x", 1)]).await,
        vec![0x80],
        "anonymous sessions may only use the [anonymous] topics"
    );
    anon.send(&raw::publish(V311, "public/news", 1, 3, b"extra", &[]))
        .await;
    let delivered = anon.expect_kind(raw::PUBLISH).await.publish_v311();
    assert_eq!(delivered, ("public/news".to_string(), b"extra".to_vec()));

    anon.send(&raw::disconnect(V311)).await;
    anon.expect_closed().await;
    let disconnected = adapter.expect_disconnect("").await;
    assert_session(&connected, &disconnected);
}

#[tokio::test]
async fn v311_qos0_publish_to_unconnected_channel_closes_and_is_not_delivered() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let mut watcher = ch1_watcher(&mut adapter, "watch-v311").await;

    let mut outsider = RawClient::connect_ok(
        adapter.port,
        &Connect::new(V311, "outsider-4", "outsider", "so"),
    )
    .await;
    let connected = adapter.expect_connect("outsider").await;
    outsider
        .send(&raw::publish(
            V311,
            "m/d1/c/ch1/stolen",
            0,
            0,
            b"stolen",
            &[],
        ))
        .await;
    outsider.expect_closed().await;
    let disconnected = adapter.expect_disconnect("outsider").await;
    assert_session(&connected, &disconnected);

    assert_next_delivery_is_marker(&mut adapter, &mut watcher, "marker-after-v311").await;
}

#[tokio::test]
async fn v5_qos1_publish_to_unconnected_channel_gets_0x87_and_session_stays() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let mut watcher = ch1_watcher(&mut adapter, "watch-v5").await;

    // A client with no connection to ch1 at all.
    let mut outsider = RawClient::connect_ok(
        adapter.port,
        &Connect::new(V5, "outsider-5", "outsider", "so"),
    )
    .await;
    adapter.expect_connect("outsider").await;
    outsider
        .send(&raw::publish(
            V5,
            "m/d1/c/ch1/stolen",
            1,
            11,
            b"stolen",
            &[],
        ))
        .await;
    let ack = outsider.expect_kind(raw::PUBACK).await;
    assert_eq!(
        ack.puback_reason(),
        0x87,
        "PUBACK reason for an unauthorized publish"
    );
    outsider.ping().await;

    // A client connected to ch1 but not to ch9: refused there, served on ch1 in the same session.
    let mut c3 = RawClient::connect_ok(adapter.port, &Connect::new(V5, "c3-dev", "c3", "s3")).await;
    adapter.expect_connect("c3").await;
    c3.send(&raw::publish(V5, "m/d1/c/ch9/x", 1, 1, b"nope", &[]))
        .await;
    assert_eq!(c3.expect_kind(raw::PUBACK).await.puback_reason(), 0x87);
    c3.send(&raw::publish(
        V5,
        "m/d2/c/ch1/x",
        1,
        2,
        b"wrong-domain",
        &[],
    ))
    .await;
    assert_eq!(
        c3.expect_kind(raw::PUBACK).await.puback_reason(),
        0x87,
        "ch1 is connected in domain d1, not d2"
    );
    c3.send(&raw::publish(V5, "m/d1/c/ch1/after", 1, 3, b"after", &[]))
        .await;
    let ack = c3.expect_kind(raw::PUBACK).await;
    assert!(
        ack.puback_reason() < 0x80,
        "PUBACK reason {:#x}",
        ack.puback_reason()
    );

    let got = watcher.next_publish().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("m/d1/c/ch1/after", &b"after"[..]),
        "only the authorized publish may be delivered"
    );
}

#[tokio::test]
async fn connection_actions_are_enforced_separately() {
    let mut adapter = Adapter::start(CLIENTS).await;
    // c1's connection to d1/ro allows subscribe only.
    let mut c1 = RawClient::connect_ok(adapter.port, &Connect::new(V5, "c1-ro", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    let codes = c1.subscribe(V5, 1, &[("m/d1/c/ro/#", 1)]).await;
    assert!(
        codes.len() == 1 && codes[0] < 0x80,
        "SUBACK for a subscribe-only channel: {codes:?}"
    );
    c1.send(&raw::publish(V5, "m/d1/c/ro/x", 1, 2, b"ro", &[]))
        .await;
    let ack = c1.expect_kind(raw::PUBACK).await;
    assert_eq!(
        ack.puback_reason(),
        0x87,
        "publish on a subscribe-only channel"
    );
    c1.ping().await;
}

#[tokio::test]
async fn subscribe_to_unconnected_channel_or_other_topic_is_refused() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let mut v311 =
        RawClient::connect_ok(adapter.port, &Connect::new(V311, "sub-4", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    let codes = v311
        .subscribe(
            V311,
            1,
            &[
                ("m/d1/c/ch1/ok", 1),
                ("m/d1/c/ch9/x", 1),
                ("random/topic", 0),
            ],
        )
        .await;
    assert_eq!(codes.len(), 3, "one SUBACK code per filter: {codes:?}");
    assert!(
        codes[0] <= 1,
        "granted QoS for an allowed filter: {codes:?}"
    );
    assert_eq!(&codes[1..], &[0x80, 0x80], "3.1.1 SUBACK codes: {codes:?}");

    let mut v5 =
        RawClient::connect_ok(adapter.port, &Connect::new(V5, "sub-5", "outsider", "so")).await;
    adapter.expect_connect("outsider").await;
    let codes = v5
        .subscribe(V5, 1, &[("m/d1/c/ch1/#", 1), ("random/topic", 0)])
        .await;
    assert_eq!(codes.len(), 2, "one SUBACK code per filter: {codes:?}");
    assert_eq!(
        codes[0], 0x87,
        "MQTT 5 SUBACK for an unconnected channel: {codes:?}"
    );
    assert!(
        codes[1] == 0x87 || codes[1] == 0x8F,
        "MQTT 5 SUBACK for a non-SuperMQ topic: {codes:?}"
    );
    // A refused subscription leaves the session working.
    v311.ping().await;
    v5.ping().await;
}

#[tokio::test]
async fn wildcards_in_domain_or_channel_of_a_subscription_are_refused() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let mut c1 =
        RawClient::connect_ok(adapter.port, &Connect::new(V311, "wild-sub", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    let codes = c1
        .subscribe(
            V311,
            1,
            &[("m/d1/c/+/x", 0), ("m/+/c/ch1/x", 0), ("m/d1/c/#", 0)],
        )
        .await;
    assert_eq!(codes, vec![0x80, 0x80, 0x80]);
    c1.ping().await;
}

#[tokio::test]
async fn wildcard_in_publish_subtopic_is_refused_and_not_delivered() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let mut watcher = ch1_watcher(&mut adapter, "watch-wild").await;

    let mut v5 =
        RawClient::connect_ok(adapter.port, &Connect::new(V5, "wild-pub-5", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    v5.send(&raw::publish(V5, "m/d1/c/ch1/a/+", 1, 1, b"plus", &[]))
        .await;
    // MQTT 5 allows either a failure PUBACK or closing the connection for a wildcard topic name.
    match v5.read_packet(WAIT).await {
        Ok(packet) => assert!(
            packet.kind == raw::PUBACK && packet.puback_reason() >= 0x80,
            "a publish to a wildcard topic must be refused, got {packet:?}"
        ),
        Err(end) => assert_eq!(end, raw::ReadEnd::Closed, "no answer to a wildcard publish"),
    }

    let mut v311 =
        RawClient::connect_ok(adapter.port, &Connect::new(V311, "wild-pub-4", "c1", "s1")).await;
    let connected = adapter.expect_connect("c1").await;
    v311.send(&raw::publish(V311, "m/d1/c/ch1/b/#", 0, 0, b"hash", &[]))
        .await;
    v311.expect_closed().await;
    let disconnected = adapter.expect_disconnect("c1").await;
    assert_session(&connected, &disconnected);

    assert_next_delivery_is_marker(&mut adapter, &mut watcher, "marker-after-wild").await;
}

#[tokio::test]
async fn health_topic_needs_no_channel() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let mut sub = V4Client::connect(adapter.port, "hc-sub", "c1", "s1").await;
    adapter.expect_connect("c1").await;
    sub.subscribe("hc/d1", QoS::AtLeastOnce).await;
    let mut publisher = V5Client::connect(adapter.port, "hc-pub", "c2", "s2").await;
    publisher
        .publish(
            "hc/d1",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            b"ok",
            &[],
        )
        .await;
    let got = sub.next_publish().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("hc/d1", &b"ok"[..])
    );
}

#[tokio::test]
async fn acl_topics_work_for_the_named_client_only() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let mut c1 = V4Client::connect(adapter.port, "acl-c1", "c1", "s1").await;
    adapter.expect_connect("c1").await;
    c1.subscribe("sensors/#", QoS::AtLeastOnce).await;

    let mut c2 = RawClient::connect_ok(adapter.port, &Connect::new(V5, "acl-c2", "c2", "s2")).await;
    adapter.expect_connect("c2").await;
    let codes = c2.subscribe(V5, 1, &[("sensors/#", 1)]).await;
    assert!(
        codes == [0x87] || codes == [0x8F],
        "MQTT 5 SUBACK for another client's acl topic: {codes:?}"
    );
    c2.send(&raw::publish(V5, "sensors/t1", 1, 2, b"not-c2s", &[]))
        .await;
    assert_eq!(c2.expect_kind(raw::PUBACK).await.puback_reason(), 0x87);

    c1.publish("sensors/t1", QoS::AtLeastOnce, false, b"21.5")
        .await;
    let got = c1.next_publish().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("sensors/t1", &b"21.5"[..]),
        "c1 must get its own acl message, and never c2's"
    );
}

#[tokio::test]
async fn v5_qos2_publish_to_unconnected_channel_gets_pubrec_0x87() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let mut watcher = ch1_watcher(&mut adapter, "watch-q2").await;
    let mut outsider = RawClient::connect_ok(
        adapter.port,
        &Connect::new(V5, "outsider-q2", "outsider", "so"),
    )
    .await;
    adapter.expect_connect("outsider").await;
    outsider
        .send(&raw::publish(V5, "m/d1/c/ch1/stolen", 2, 5, b"stolen", &[]))
        .await;
    let rec = outsider.expect_kind(raw::PUBREC).await;
    assert_eq!(
        rec.pubrec_reason(),
        0x87,
        "PUBREC reason for an unauthorized QoS 2 publish"
    );
    outsider.ping().await;
    assert_next_delivery_is_marker(&mut adapter, &mut watcher, "marker-after-q2").await;
}

#[tokio::test]
async fn subtopics_with_forbidden_characters_are_refused() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let mut watcher = ch1_watcher(&mut adapter, "watch-norm").await;
    let mut c1 =
        RawClient::connect_ok(adapter.port, &Connect::new(V5, "norm-dev", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    let forbidden = [
        "m/d1/c/ch1/a*b",
        "m/d1/c/ch1/a>b",
        "m/d1/c/ch1/a%20b",
        "m/d1/c/ch1/a//b",
    ];
    for (pkid, topic) in (1u16..).zip(forbidden) {
        c1.send(&raw::publish(V5, topic, 1, pkid, b"bad", &[]))
            .await;
        let ack = c1.expect_kind(raw::PUBACK).await;
        // 0x87 is what SPEC §2 asks for a refused publish; 0x90 (topic name invalid) is as precise.
        let reason = ack.puback_reason();
        assert!(
            reason == 0x87 || reason == 0x90,
            "PUBACK reason {reason:#x} for a publish to {topic:?} (want 0x87 or 0x90)"
        );
    }
    c1.ping().await;
    assert_next_delivery_is_marker(&mut adapter, &mut watcher, "marker-after-norm").await;
}
