//! Message delivery through the adapter: both MQTT versions and across them, QoS 0/1/2, retained
//! messages, wills, persistent sessions, keep-alive 0, and the mosquitto command-line clients.

mod common;

use common::*;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::QoS;

#[tokio::test]
async fn v311_round_trip_at_qos_0_1_2() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let topic = "m/d1/c/ch1/rt/v311";
    let mut sub = V4Client::connect(adapter.port, "sub-v311", "c1", "s1").await;
    adapter.expect_connect("c1").await;
    sub.subscribe(topic, QoS::ExactlyOnce).await;
    let mut publisher = V4Client::connect(adapter.port, "pub-v311", "c2", "s2").await;
    adapter.expect_connect("c2").await;

    for (qos, payload) in [
        (QoS::AtMostOnce, "q0"),
        (QoS::AtLeastOnce, "q1"),
        (QoS::ExactlyOnce, "q2"),
    ] {
        publisher
            .publish(topic, qos, false, payload.as_bytes())
            .await;
        let got = sub.next_publish().await;
        assert_eq!(got.topic, topic);
        assert_eq!(
            &got.payload[..],
            payload.as_bytes(),
            "payload sent at {qos:?}"
        );
    }

    publisher.disconnect().await;
    adapter.expect_disconnect("c2").await;
    sub.disconnect().await;
    adapter.expect_disconnect("c1").await;
    adapter.shutdown().await;
}

#[tokio::test]
async fn v5_round_trip_at_qos_0_1_2() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let topic = "m/d1/c/ch1/rt/v5";
    let mut sub = V5Client::connect(adapter.port, "sub-v5", "c1", "s1").await;
    adapter.expect_connect("c1").await;
    sub.subscribe(topic, QoS5::ExactlyOnce).await;
    let mut publisher = V5Client::connect(adapter.port, "pub-v5", "c2", "s2").await;
    adapter.expect_connect("c2").await;

    for (qos, payload) in [
        (QoS5::AtMostOnce, "q0"),
        (QoS5::AtLeastOnce, "q1"),
        (QoS5::ExactlyOnce, "q2"),
    ] {
        publisher
            .publish(topic, qos, false, payload.as_bytes(), &[])
            .await;
        let got = sub.next_publish().await;
        assert_eq!(&got.topic[..], topic.as_bytes());
        assert_eq!(
            &got.payload[..],
            payload.as_bytes(),
            "payload sent at {qos:?}"
        );
    }

    publisher.disconnect().await;
    adapter.expect_disconnect("c2").await;
    sub.disconnect().await;
    adapter.expect_disconnect("c1").await;
}

#[tokio::test]
async fn subscription_wildcards_in_the_subtopic_match() {
    let adapter = Adapter::start(CLIENTS).await;
    let mut sub = V4Client::connect(adapter.port, "sub-wild", "c1", "s1").await;
    sub.subscribe("m/d1/c/ch1/wild/+/temp", QoS::AtLeastOnce)
        .await;
    sub.subscribe("m/d1/c/ch1/deep/#", QoS::AtLeastOnce).await;
    let mut publisher = V4Client::connect(adapter.port, "pub-wild", "c2", "s2").await;

    publisher
        .publish(
            "m/d1/c/ch1/wild/room1/temp",
            QoS::AtLeastOnce,
            false,
            b"plus",
        )
        .await;
    assert_eq!(&sub.next_publish().await.payload[..], b"plus");
    publisher
        .publish("m/d1/c/ch1/deep/a/b/c", QoS::AtLeastOnce, false, b"hash")
        .await;
    assert_eq!(&sub.next_publish().await.payload[..], b"hash");
}

#[tokio::test]
async fn retained_message_reaches_a_later_subscriber() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let topic = "m/d1/c/ch1/retained";
    let mut publisher = V4Client::connect(adapter.port, "pub-ret", "c1", "s1").await;
    adapter.expect_connect("c1").await;
    publisher
        .publish(topic, QoS::AtLeastOnce, true, b"last-known")
        .await;
    publisher.disconnect().await;
    adapter.expect_disconnect("c1").await;

    let mut sub = V5Client::connect(adapter.port, "sub-ret", "c2", "s2").await;
    adapter.expect_connect("c2").await;
    sub.subscribe(topic, QoS5::AtLeastOnce).await;
    let got = sub.next_publish().await;
    assert_eq!(&got.payload[..], b"last-known");
    assert!(
        got.retain,
        "a retained message delivered on subscribe must carry RETAIN"
    );
}

#[tokio::test]
async fn last_will_is_published_when_the_socket_drops() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let topic = "m/d1/c/ch1/will";
    let mut sub = V4Client::connect(adapter.port, "will-watcher", "c2", "s2").await;
    adapter.expect_connect("c2").await;
    sub.subscribe(topic, QoS::AtLeastOnce).await;

    let mut connect = Connect::new(V311, "will-dev", "c1", "s1");
    connect.will = Some(raw::Will {
        topic,
        payload: b"gone",
        qos: 1,
        retain: false,
    });
    let device = RawClient::connect_ok(adapter.port, &connect).await;
    let connected = adapter.expect_connect("c1").await;
    drop(device);

    let got = sub.next_publish().await;
    assert_eq!(got.topic, topic);
    assert_eq!(&got.payload[..], b"gone");
    let disconnected = adapter.expect_disconnect("c1").await;
    assert_session(&connected, &disconnected);
}

/// Every valid encoding of a normal DISCONNECT ends the session cleanly: the will is discarded.
#[tokio::test]
async fn will_is_not_published_after_a_clean_disconnect() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let topic = "m/d1/c/ch1/will2";
    let mut sub = V4Client::connect(adapter.port, "will-watcher2", "c2", "s2").await;
    adapter.expect_connect("c2").await;
    sub.subscribe(topic, QoS::AtLeastOnce).await;
    let mut marker = V4Client::connect(adapter.port, "marker", "c3", "s3").await;
    adapter.expect_connect("c3").await;

    let forms: [(&str, u8, &[u8]); 4] = [
        ("3.1.1 DISCONNECT", V311, &[0xE0, 0x00]),
        ("MQTT 5 DISCONNECT, remaining length 0", V5, &[0xE0, 0x00]),
        (
            "MQTT 5 DISCONNECT, reason 0x00 only (remaining length 1)",
            V5,
            &[0xE0, 0x01, 0x00],
        ),
        (
            "MQTT 5 DISCONNECT, reason 0x00 + empty properties",
            V5,
            &[0xE0, 0x02, 0x00, 0x00],
        ),
    ];
    for (form, version, disconnect) in forms {
        let mut connect = Connect::new(version, "will-dev2", "c1", "s1");
        connect.will = Some(raw::Will {
            topic,
            payload: form.as_bytes(),
            qos: 1,
            retain: false,
        });
        let mut device = RawClient::connect_ok(adapter.port, &connect).await;
        adapter.expect_connect("c1").await;
        device.send(disconnect).await;
        device.expect_closed().await;
        adapter.expect_disconnect("c1").await;

        // A marker published afterwards must be the first thing the watcher sees.
        marker
            .publish(topic, QoS::AtLeastOnce, false, b"marker")
            .await;
        let got = sub.next_publish().await;
        assert_eq!(
            String::from_utf8_lossy(&got.payload),
            "marker",
            "will published after a normal disconnect sent as: {form}"
        );
    }
}

#[tokio::test]
async fn v311_publish_reaches_v5_subscriber() {
    let adapter = Adapter::start(CLIENTS).await;
    let topic = "m/d1/c/ch1/x/v4-to-v5";
    let mut sub = V5Client::connect(adapter.port, "sub-x5", "c1", "s1").await;
    sub.subscribe(topic, QoS5::AtLeastOnce).await;
    let mut publisher = V4Client::connect(adapter.port, "pub-x4", "c2", "s2").await;
    publisher
        .publish(topic, QoS::AtLeastOnce, false, b"from-v311")
        .await;
    let got = sub.next_publish().await;
    assert_eq!(&got.topic[..], topic.as_bytes());
    assert_eq!(&got.payload[..], b"from-v311");
}

#[tokio::test]
async fn v5_publish_with_user_properties_reaches_v311_subscriber_without_them() {
    let adapter = Adapter::start(CLIENTS).await;
    let topic = "m/d1/c/ch1/x/v5-to-v4";
    // A raw 3.1.1 subscriber sees the exact bytes: a property block leaking into a 3.1.1 PUBLISH would
    // show up in the payload.
    let mut sub =
        RawClient::connect_ok(adapter.port, &Connect::new(V311, "sub-x4", "c1", "s1")).await;
    assert_eq!(sub.subscribe(V311, 1, &[(topic, 0)]).await, vec![0]);
    let mut publisher = V5Client::connect(adapter.port, "pub-x5", "c2", "s2").await;
    publisher
        .publish(
            topic,
            QoS5::AtLeastOnce,
            false,
            b"from-v5",
            &[("unit", "celsius"), ("trace", "abc")],
        )
        .await;
    let (got_topic, got_payload) = sub.expect_kind(raw::PUBLISH).await.publish_v311();
    assert_eq!(got_topic, topic);
    assert_eq!(got_payload, b"from-v5");
    sub.ping().await;
}

async fn mosquitto_cli_round_trip(version: &str) {
    let mut adapter = Adapter::start(CLIENTS).await;
    let topic = format!("m/d1/c/ch1/cli/{version}");
    // QoS 1 first, then mosquitto_pub's default QoS 0 (publish then DISCONNECT at once).
    for qos in [1, 0] {
        let payload = format!("hello-{version}-q{qos}");
        let sub = MosquittoSub::start(adapter.port, version, "cli-sub", "c1", "s1", &topic).await;
        adapter.expect_connect("c1").await;
        mosquitto_pub(
            adapter.port,
            version,
            "cli-pub",
            "c2",
            "s2",
            &topic,
            &payload,
            qos,
        )
        .await;
        sub.expect_message(&payload).await;
        adapter
            .expect_events_unordered(&[
                ("c2", "connect"),
                ("c2", "disconnect"),
                ("c1", "disconnect"),
            ])
            .await;
    }
    adapter.shutdown().await;
}

#[tokio::test]
async fn mosquitto_cli_round_trip_v311() {
    mosquitto_cli_round_trip("mqttv311").await;
}

#[tokio::test]
async fn mosquitto_cli_round_trip_v5() {
    mosquitto_cli_round_trip("mqttv5").await;
}

/// A device that publishes at QoS 0 and disconnects at once (one TCP write) must not lose the message.
#[tokio::test]
async fn qos0_publish_immediately_followed_by_disconnect_is_delivered() {
    let adapter = Adapter::start(CLIENTS).await;
    let topic = "m/d1/c/ch1/fire-and-forget";
    let mut sub = V4Client::connect(adapter.port, "ff-sub", "c1", "s1").await;
    sub.subscribe(topic, QoS::AtLeastOnce).await;
    for version in [V311, V5] {
        let payload = format!("last-words-v{version}");
        let mut device =
            RawClient::connect_ok(adapter.port, &Connect::new(version, "ff-dev", "c2", "s2")).await;
        let mut bytes = raw::publish(version, topic, 0, 0, payload.as_bytes(), &[]);
        bytes.extend(raw::disconnect(version));
        device.send(&bytes).await;
        device.expect_closed().await;
        let got = sub.next_publish().await;
        assert_eq!(
            String::from_utf8_lossy(&got.payload),
            payload,
            "QoS 0 PUBLISH + DISCONNECT in one write (protocol level {version})"
        );
    }
}

#[tokio::test]
async fn keep_alive_zero_is_accepted() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let topic = "m/d1/c/ch1/ka0";
    let mut opts = v4_options(adapter.port, "ka0-v311", "c1", "s1");
    opts.set_keep_alive(std::time::Duration::ZERO);
    let mut sub = V4Client::connect_with(opts).await;
    adapter.expect_connect("c1").await;
    sub.subscribe(topic, QoS::AtLeastOnce).await;

    let mut connect = Connect::new(V5, "ka0-v5", "c2", "s2");
    connect.keep_alive = 0;
    let mut raw5 = RawClient::connect_ok(adapter.port, &connect).await;
    adapter.expect_connect("c2").await;
    raw5.send(&raw::publish(V5, topic, 1, 7, b"ka0", &[])).await;
    let ack = raw5.expect_kind(raw::PUBACK).await;
    assert!(
        ack.puback_reason() < 0x80,
        "PUBACK reason {:#x}",
        ack.puback_reason()
    );
    assert_eq!(&sub.next_publish().await.payload[..], b"ka0");
}

#[tokio::test]
async fn persistent_session_receives_qos1_message_published_while_offline() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let topic = "m/d1/c/ch1/persist";
    let mut opts = v4_options(adapter.port, "persist-dev", "c1", "s1");
    opts.set_clean_session(false);
    let mut sub = V4Client::connect_with(opts.clone()).await;
    adapter.expect_connect("c1").await;
    sub.subscribe(topic, QoS::AtLeastOnce).await;
    sub.disconnect().await;
    adapter.expect_disconnect("c1").await;

    let mut publisher = V4Client::connect(adapter.port, "persist-pub", "c2", "s2").await;
    adapter.expect_connect("c2").await;
    publisher
        .publish(topic, QoS::AtLeastOnce, false, b"while-offline")
        .await;

    let mut sub = V4Client::connect_with(opts).await;
    adapter.expect_connect("c1").await;
    let got = sub.next_publish().await;
    assert_eq!(&got.payload[..], b"while-offline");
    assert!(
        sub.connack.session_present,
        "CONNACK session_present must be set when resuming a persistent session"
    );
}

#[tokio::test]
async fn delivery_qos_is_the_lower_of_publish_and_subscription() {
    let adapter = Adapter::start(CLIENTS).await;
    let mut sub =
        RawClient::connect_ok(adapter.port, &Connect::new(V311, "min-sub", "c1", "s1")).await;
    let codes = sub
        .subscribe(
            V311,
            1,
            &[("m/d1/c/ch1/min/one", 1), ("m/d1/c/ch1/min/zero", 0)],
        )
        .await;
    assert_eq!(codes, vec![1, 0]);
    let mut publisher = V4Client::connect(adapter.port, "min-pub", "c2", "s2").await;

    publisher
        .publish("m/d1/c/ch1/min/one", QoS::AtMostOnce, false, b"pub0-sub1")
        .await;
    let got = sub.expect_kind(raw::PUBLISH).await;
    assert_eq!(got.publish_v311().1, b"pub0-sub1");
    assert_eq!(
        got.publish_qos(),
        0,
        "QoS 0 publish to a QoS 1 subscription"
    );

    publisher
        .publish("m/d1/c/ch1/min/zero", QoS::AtLeastOnce, false, b"pub1-sub0")
        .await;
    let got = sub.expect_kind(raw::PUBLISH).await;
    assert_eq!(got.publish_v311().1, b"pub1-sub0");
    assert_eq!(
        got.publish_qos(),
        0,
        "QoS 1 publish to a QoS 0 subscription"
    );

    publisher
        .publish("m/d1/c/ch1/min/one", QoS::AtLeastOnce, false, b"pub1-sub1")
        .await;
    let got = sub.expect_kind(raw::PUBLISH).await;
    assert_eq!(got.publish_v311().1, b"pub1-sub1");
    assert_eq!(
        got.publish_qos(),
        1,
        "QoS 1 publish to a QoS 1 subscription"
    );
    sub.send(&raw::puback(got.publish_pkid())).await;
    sub.ping().await;
}

#[tokio::test]
async fn unsubscribe_stops_delivery() {
    let adapter = Adapter::start(CLIENTS).await;
    let mut sub =
        RawClient::connect_ok(adapter.port, &Connect::new(V5, "unsub-dev", "c1", "s1")).await;
    let codes = sub
        .subscribe(
            V5,
            1,
            &[("m/d1/c/ch1/unsub/a", 0), ("m/d1/c/ch1/unsub/b", 0)],
        )
        .await;
    assert_eq!(codes, vec![0, 0]);
    sub.send(&raw::unsubscribe(V5, 2, &["m/d1/c/ch1/unsub/a"]))
        .await;
    sub.expect_kind(raw::UNSUBACK).await;

    let mut publisher = V4Client::connect(adapter.port, "unsub-pub", "c2", "s2").await;
    publisher
        .publish("m/d1/c/ch1/unsub/a", QoS::AtLeastOnce, false, b"gone")
        .await;
    publisher
        .publish("m/d1/c/ch1/unsub/b", QoS::AtLeastOnce, false, b"marker")
        .await;
    let got = sub.expect_kind(raw::PUBLISH).await;
    let topic_len = u16::from_be_bytes([got.body[0], got.body[1]]) as usize;
    assert_eq!(
        &got.body[2..2 + topic_len],
        b"m/d1/c/ch1/unsub/b",
        "a message on an unsubscribed filter was delivered"
    );
}

/// Bytes the adapter read before the socket closed are a publish it received: it must be delivered.
#[tokio::test]
async fn qos0_publish_then_socket_close_is_delivered() {
    let adapter = Adapter::start(CLIENTS).await;
    let topic = "m/d1/c/ch1/then-gone";
    let mut sub = V4Client::connect(adapter.port, "gone-sub", "c1", "s1").await;
    sub.subscribe(topic, QoS::AtLeastOnce).await;
    let mut device =
        RawClient::connect_ok(adapter.port, &Connect::new(V311, "gone-dev", "c2", "s2")).await;
    device
        .send(&raw::publish(V311, topic, 0, 0, b"then-gone", &[]))
        .await;
    drop(device);
    assert_eq!(&sub.next_publish().await.payload[..], b"then-gone");
}
