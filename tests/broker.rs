//! The broker core seen from devices: sessions belong to their owner, persistent sessions queue
//! and redeliver, QoS is min(publish, subscription) for every pair, overlapping subscriptions
//! deliver once, a slow subscriber loses exactly what `/metrics` counts, wills fire on every
//! abnormal end, and malformed input is refused as the specification says.

mod common;

use common::raw::{self, Connect, RawClient, ReadEnd, PUBACK, PUBLISH, SUBACK, UNSUBACK, V311, V5};
use common::*;
use rumqttc::QoS;

/// Session present, from a CONNACK.
fn session_present(connack: &raw::Packet) -> bool {
    connack.body[0] & 1 == 1
}

async fn connect_persistent(
    port: u16,
    version: u8,
    mqtt_id: &str,
    user: &str,
    pass: &str,
) -> (RawClient, bool) {
    let mut connect = Connect::new(version, mqtt_id, user, pass);
    connect.clean = false;
    if version == V5 {
        connect.properties = raw::session_expiry(300);
    }
    let mut client = RawClient::open(port).await;
    client.send(&connect.encode()).await;
    let ack = client.expect_packet().await;
    assert_eq!(ack.connack_code(), 0, "CONNACK of {mqtt_id} as {user}");
    let present = session_present(&ack);
    (client, present)
}

/// Reads PUBLISHes until a PINGRESP: proves nothing else was queued before the ping.
async fn publishes_before_ping(client: &mut RawClient) -> Vec<raw::Packet> {
    client.send(&raw::pingreq()).await;
    let mut got = Vec::new();
    loop {
        let p = client.expect_packet().await;
        match p.kind {
            raw::PINGRESP => return got,
            PUBLISH => got.push(p),
            _ => {}
        }
    }
}

/// Topic and payload of a PUBLISH of either version (MQTT 5 with empty properties).
fn topic_payload(p: &raw::Packet, version: u8) -> (String, Vec<u8>) {
    let len = u16::from_be_bytes([p.body[0], p.body[1]]) as usize;
    let topic = String::from_utf8_lossy(&p.body[2..2 + len]).into_owned();
    let mut at = 2 + len + if p.publish_qos() > 0 { 2 } else { 0 };
    if version == V5 {
        let (plen, used) = raw::read_varint(&p.body[at..]).expect("property length");
        at += used + plen;
    }
    (topic, p.body[at..].to_vec())
}

#[tokio::test]
async fn another_identity_never_resumes_nor_kicks_a_session() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let port = adapter.port;
    for (version, id) in [(V311, "dev-42"), (V5, "dev-43")] {
        // c3 owns d1/ch3; c1 has no grant for it.
        let (mut victim, _) = connect_persistent(port, version, id, "c3", "s3").await;
        adapter.expect_connect("c3").await;
        assert_eq!(
            victim.subscribe(version, 1, &[("m/d1/c/ch3/#", 1)]).await,
            [1]
        );

        // While the victim is online: the same MQTT client id as c1 is another session, and
        // connecting with it does not end the victim's connection.
        let mut thief = RawClient::connect_ok(port, &Connect::new(version, id, "c1", "s1")).await;
        adapter.expect_connect("c1").await;
        thief.ping().await;
        victim.ping().await;
        thief.send(&raw::disconnect(version)).await;
        adapter.expect_disconnect("c1").await;

        // While the victim is offline: its queue fills and c1 cannot take it.
        victim.send(&raw::disconnect(version)).await;
        adapter.expect_disconnect("c3").await;
        mosquitto_pub(
            port,
            "mqttv311",
            "c3-pub",
            "c3",
            "s3",
            "m/d1/c/ch3/temp",
            "secret",
            1,
        )
        .await;
        adapter.expect_connect("c3").await;
        adapter.expect_disconnect("c3").await;
        let (mut thief, present) = connect_persistent(port, version, id, "c1", "s1").await;
        adapter.expect_connect("c1").await;
        assert!(!present, "c1 must not resume c3's offline session");
        assert!(
            publishes_before_ping(&mut thief).await.is_empty(),
            "c1 got c3's queue"
        );
        // A clean start by the thief only discards its own session.
        thief.send(&raw::disconnect(version)).await;
        adapter.expect_disconnect("c1").await;
        let mut clean = Connect::new(version, id, "c1", "s1");
        clean.clean = true;
        let mut wiper = RawClient::connect_ok(port, &clean).await;
        adapter.expect_connect("c1").await;
        wiper.send(&raw::disconnect(version)).await;
        adapter.expect_disconnect("c1").await;

        let (mut back, present) = connect_persistent(port, version, id, "c3", "s3").await;
        adapter.expect_connect("c3").await;
        assert!(present, "the owner resumes its session");
        let got = publishes_before_ping(&mut back).await;
        assert_eq!(got.len(), 1, "the owner's queue is intact");
        assert_eq!(
            topic_payload(&got[0], version),
            ("m/d1/c/ch3/temp".into(), b"secret".to_vec())
        );
        back.send(&raw::puback(got[0].publish_pkid())).await;
        back.send(&raw::disconnect(version)).await;
        adapter.expect_disconnect("c3").await;
    }
    adapter.shutdown().await;
}

#[tokio::test]
async fn session_theft_over_websocket_gets_nothing() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let ws = adapter.ports.ws;
    let opts = |user: &str, pass: &str| {
        let mut o = rumqttc::MqttOptions::new("ws-dev", format!("ws://127.0.0.1:{ws}/mqtt"), ws);
        o.set_credentials(user, pass)
            .set_clean_session(false)
            .set_transport(rumqttc::Transport::Ws);
        o
    };
    let mut victim = V4Client::connect_with(opts("c3", "s3")).await;
    adapter.expect_connect("c3").await;
    victim.subscribe("m/d1/c/ch3/#", QoS::AtLeastOnce).await;
    victim.disconnect().await;
    adapter.expect_disconnect("c3").await;
    mosquitto_pub(
        adapter.port,
        "mqttv5",
        "c3-pub",
        "c3",
        "s3",
        "m/d1/c/ch3/t",
        "ws-secret",
        1,
    )
    .await;
    adapter.expect_connect("c3").await;
    adapter.expect_disconnect("c3").await;

    let mut thief = V4Client::connect_with(opts("c1", "s1")).await;
    adapter.expect_connect("c1").await;
    assert!(!thief.connack.session_present);
    thief.subscribe("m/d1/c/ch1/x", QoS::AtLeastOnce).await;
    thief
        .publish("m/d1/c/ch1/x", QoS::AtLeastOnce, false, b"marker")
        .await;
    let first = thief.next_publish().await;
    assert_eq!(
        &first.payload[..],
        b"marker",
        "the thief received {first:?}"
    );
    thief.disconnect().await;
    adapter.expect_disconnect("c1").await;

    let mut owner = V4Client::connect_with(opts("c3", "s3")).await;
    adapter.expect_connect("c3").await;
    assert!(owner.connack.session_present);
    let got = owner.next_publish().await;
    assert_eq!(&got.payload[..], b"ws-secret");
    owner.disconnect().await;
    adapter.expect_disconnect("c3").await;
    adapter.shutdown().await;
}

#[tokio::test]
async fn persistent_session_queues_in_order_and_redelivers_unacknowledged() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let port = adapter.port;
    for (version, id) in [(V311, "keep-4"), (V5, "keep-5")] {
        let topic = format!("m/d1/c/ch1/{id}");
        let (mut sub, _) = connect_persistent(port, version, id, "c2", "s2").await;
        adapter.expect_connect("c2").await;
        assert_eq!(sub.subscribe(version, 1, &[(&topic, 1)]).await, [1]);
        sub.send(&raw::disconnect(version)).await;
        adapter.expect_disconnect("c2").await;

        let mut publisher =
            RawClient::connect_ok(port, &Connect::new(V311, "keep-pub", "c1", "s1")).await;
        adapter.expect_connect("c1").await;
        for i in 0..5u16 {
            publisher
                .send(&raw::publish(
                    V311,
                    &topic,
                    1,
                    i + 1,
                    format!("p{i}").as_bytes(),
                    &[],
                ))
                .await;
            publisher.expect_kind(PUBACK).await;
        }
        publisher.send(&raw::disconnect(V311)).await;
        adapter.expect_disconnect("c1").await;

        // Received in order, never acknowledged, then the connection drops.
        let (mut sub, present) = connect_persistent(port, version, id, "c2", "s2").await;
        adapter.expect_connect("c2").await;
        assert!(present);
        let first = publishes_before_ping(&mut sub).await;
        let payloads = |ps: &[raw::Packet]| -> Vec<Vec<u8>> {
            ps.iter().map(|p| topic_payload(p, version).1).collect()
        };
        let expected: Vec<Vec<u8>> = (0..5).map(|i| format!("p{i}").into_bytes()).collect();
        assert_eq!(payloads(&first), expected);
        assert!(
            first.iter().all(|p| p.flags & 0x08 == 0),
            "first delivery without DUP"
        );
        drop(sub);
        adapter.expect_disconnect("c2").await;

        // Redelivered with DUP, same packet ids, same order; acknowledged this time.
        let (mut sub, present) = connect_persistent(port, version, id, "c2", "s2").await;
        adapter.expect_connect("c2").await;
        assert!(present);
        let again = publishes_before_ping(&mut sub).await;
        assert_eq!(payloads(&again), expected);
        assert!(
            again.iter().all(|p| p.flags & 0x08 != 0),
            "redelivery sets DUP"
        );
        let ids: Vec<u16> = first.iter().map(raw::Packet::publish_pkid).collect();
        assert_eq!(
            again
                .iter()
                .map(raw::Packet::publish_pkid)
                .collect::<Vec<_>>(),
            ids
        );
        for id in ids {
            sub.send(&raw::puback(id)).await;
        }
        sub.send(&raw::disconnect(version)).await;
        adapter.expect_disconnect("c2").await;

        let (mut sub, present) = connect_persistent(port, version, id, "c2", "s2").await;
        adapter.expect_connect("c2").await;
        assert!(present);
        assert!(
            publishes_before_ping(&mut sub).await.is_empty(),
            "nothing left after the acks"
        );
        // A clean start ends the persistent session.
        sub.send(&raw::disconnect(version)).await;
        adapter.expect_disconnect("c2").await;
        let mut clean = RawClient::connect_ok(port, &Connect::new(version, id, "c2", "s2")).await;
        adapter.expect_connect("c2").await;
        clean.send(&raw::disconnect(version)).await;
        adapter.expect_disconnect("c2").await;
        let (mut sub, present) = connect_persistent(port, version, id, "c2", "s2").await;
        assert!(!present, "a clean start discarded the session");
        adapter.expect_connect("c2").await;
        sub.send(&raw::disconnect(version)).await;
        adapter.expect_disconnect("c2").await;
    }
    adapter.shutdown().await;
}

#[tokio::test]
async fn delivery_qos_is_the_minimum_of_publish_and_subscription_for_every_pair() {
    let adapter = Adapter::start(CLIENTS).await;
    let port = adapter.port;
    let mut subs = Vec::new();
    for sub_qos in 0..=2u8 {
        let mut s = RawClient::connect_ok(
            port,
            &Connect::new(V311, &format!("min-{sub_qos}"), "c2", "s2"),
        )
        .await;
        assert_eq!(
            s.subscribe(V311, 1, &[("m/d1/c/ch1/min", sub_qos)]).await,
            [sub_qos]
        );
        subs.push(s);
    }
    let mut publisher = RawClient::connect_ok(port, &Connect::new(V5, "min-pub", "c1", "s1")).await;
    for pub_qos in 0..=2u8 {
        let pkid = 10 + u16::from(pub_qos);
        publisher
            .send(&raw::publish(
                V5,
                "m/d1/c/ch1/min",
                pub_qos,
                pkid,
                b"m",
                &[],
            ))
            .await;
        if pub_qos == 2 {
            // Routed once the PUBREL releases it.
            publisher.expect_kind(raw::PUBREC).await;
            let mut rel = vec![0x62, 0x02];
            rel.extend_from_slice(&pkid.to_be_bytes());
            publisher.send(&rel).await;
        }
        for (sub_qos, s) in subs.iter_mut().enumerate() {
            let p = s.expect_kind(PUBLISH).await;
            assert_eq!(
                p.publish_qos(),
                pub_qos.min(sub_qos as u8),
                "publish QoS {pub_qos} to subscription QoS {sub_qos}"
            );
            match p.publish_qos() {
                1 => s.send(&raw::puback(p.publish_pkid())).await,
                2 => {
                    let mut rec = vec![0x50, 0x02];
                    rec.extend_from_slice(&p.publish_pkid().to_be_bytes());
                    s.send(&rec).await;
                    let rel = s.expect_packet().await;
                    assert_eq!((rel.kind, rel.flags), (6, 2), "PUBREL after PUBREC");
                    let mut comp = vec![0x70, 0x02];
                    comp.extend_from_slice(&p.publish_pkid().to_be_bytes());
                    s.send(&comp).await;
                }
                _ => {}
            }
        }
    }
    for s in &mut subs {
        assert!(
            publishes_before_ping(s).await.is_empty(),
            "each message delivered once"
        );
    }
}

#[tokio::test]
async fn overlapping_subscriptions_deliver_once_at_the_highest_granted_qos() {
    let adapter = Adapter::start(CLIENTS).await;
    let mut sub =
        RawClient::connect_ok(adapter.port, &Connect::new(V311, "overlap", "c2", "s2")).await;
    let codes = sub
        .subscribe(
            V311,
            1,
            &[
                ("m/d1/c/ch1/ov/#", 0),
                ("m/d1/c/ch1/ov/+", 2),
                ("m/d1/c/ch1/ov/x", 1),
            ],
        )
        .await;
    assert_eq!(codes, [0, 2, 1]);
    let mut publisher = V4Client::connect(adapter.port, "ov-pub", "c1", "s1").await;
    publisher
        .publish("m/d1/c/ch1/ov/x", QoS::ExactlyOnce, false, b"once")
        .await;
    let got = sub.expect_kind(PUBLISH).await;
    assert_eq!(got.publish_qos(), 2);
    assert!(
        publishes_before_ping(&mut sub).await.is_empty(),
        "delivered once"
    );
}

#[tokio::test]
async fn qos2_retained_after_qos1_retained_keeps_the_session() {
    let adapter = Adapter::start(CLIENTS).await;
    let mut publisher = V4Client::connect(adapter.port, "ret-pub", "c1", "s1").await;
    publisher
        .publish("m/d1/c/ch1/ret/a", QoS::AtLeastOnce, true, b"one")
        .await;
    publisher
        .publish("m/d1/c/ch1/ret/b", QoS::ExactlyOnce, true, b"two")
        .await;
    let mut sub = V4Client::connect(adapter.port, "ret-sub", "c2", "s2").await;
    sub.subscribe("m/d1/c/ch1/ret/a", QoS::ExactlyOnce).await;
    sub.subscribe("m/d1/c/ch1/ret/b", QoS::ExactlyOnce).await;
    let a = sub.next_publish().await;
    let b = sub.next_publish().await;
    assert_eq!(
        (a.qos, a.retain, &a.payload[..]),
        (QoS::AtLeastOnce, true, &b"one"[..])
    );
    assert_eq!(
        (b.qos, b.retain, &b.payload[..]),
        (QoS::ExactlyOnce, true, &b"two"[..])
    );
    publisher
        .publish("m/d1/c/ch1/ret/b", QoS::ExactlyOnce, false, b"live")
        .await;
    let live = sub.next_publish().await;
    assert_eq!(
        (live.qos, live.retain, &live.payload[..]),
        (QoS::ExactlyOnce, false, &b"live"[..])
    );
    // An empty retained payload clears the topic for later subscribers.
    publisher
        .publish("m/d1/c/ch1/ret/a", QoS::AtLeastOnce, true, b"")
        .await;
    let mut late =
        RawClient::connect_ok(adapter.port, &Connect::new(V311, "ret-late", "c2", "s2")).await;
    assert_eq!(
        late.subscribe(V311, 1, &[("m/d1/c/ch1/ret/+", 1)]).await,
        [1]
    );
    let retained = publishes_before_ping(&mut late).await;
    assert_eq!(retained.len(), 1);
    assert_eq!(retained[0].publish_v311().1, b"two");
}

#[tokio::test]
async fn a_slow_subscriber_loses_exactly_what_metrics_count_and_slows_nobody() {
    const N: usize = 50_000;
    let adapter = Adapter::start_with(
        CLIENTS,
        &[
            ("SMQ_MQTT_ADAPTER_MAX_QUEUED_MESSAGES", "1000"),
            ("SMQ_MQTT_ADAPTER_PUBLISH_RATE", "0"),
        ],
    )
    .await;
    let port = adapter.port;
    let topic = "m/d1/c/ch1/slow";
    // Subscribes, then reads nothing until every message is published.
    // Keep-alive 0: this one stays silent for as long as the flood lasts.
    let mut silent = Connect::new(V311, "slow", "c2", "s2");
    silent.keep_alive = 0;
    let mut slow = RawClient::connect_ok(port, &silent).await;
    assert_eq!(slow.subscribe(V311, 1, &[(topic, 1)]).await, [1]);
    let mut fast = RawClient::connect_ok(port, &Connect::new(V311, "fast", "c3", "s3")).await;
    assert_eq!(fast.subscribe(V311, 1, &[(topic, 1)]).await, [1]);

    // Rounds of 500: the publisher is never slowed (every PUBACK comes at once), and a round
    // ends when the second subscriber has it all, so that one never lags by a queue's worth.
    let mut flood = Connect::new(V311, "flood", "c1", "s1");
    flood.keep_alive = 0;
    let mut publisher = RawClient::connect_ok(port, &flood).await;
    const ROUND: usize = 500;
    for round in 0..N / ROUND {
        let mut batch = Vec::new();
        for i in round * ROUND..(round + 1) * ROUND {
            let pkid = (i % ROUND + 1) as u16;
            batch.extend(raw::publish(
                V311,
                topic,
                1,
                pkid,
                &(i as u32).to_be_bytes(),
                &[],
            ));
        }
        publisher.send(&batch).await;
        for _ in 0..ROUND {
            publisher.expect_kind(PUBACK).await;
        }
        let mut acks = Vec::new();
        for i in round * ROUND..(round + 1) * ROUND {
            let got = fast.expect_kind(PUBLISH).await;
            assert_eq!(
                got.publish_v311().1,
                (i as u32).to_be_bytes(),
                "second subscriber, message {i}"
            );
            acks.extend(raw::puback(got.publish_pkid()));
        }
        fast.send(&acks).await;
    }

    let metrics = http_get(adapter.ports.http, "/metrics").await.1;
    let dropped = metric(
        &metrics,
        "mqtt_adapter_messages_dropped_total{reason=\"queue_full\"}",
    )
    .expect("dropped counter") as usize;
    assert!(
        dropped > 0,
        "a subscriber that never read must have lost some: {metrics}"
    );
    let mut received = 0;
    let mut last = None;
    while received < N - dropped {
        let p = slow.expect_kind(PUBLISH).await;
        slow.send(&raw::puback(p.publish_pkid())).await;
        let seq = u32::from_be_bytes(p.publish_v311().1[..4].try_into().expect("4 bytes"));
        assert!(last < Some(seq), "in order: {seq} after {last:?}");
        last = Some(seq);
        received += 1;
    }
    assert!(
        publishes_before_ping(&mut slow).await.is_empty(),
        "received + dropped = published"
    );
}

#[tokio::test]
async fn wills_fire_on_close_keepalive_expiry_and_takeover() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let port = adapter.port;
    let mut watcher =
        RawClient::connect_ok(port, &Connect::new(V311, "will-watch", "c2", "s2")).await;
    assert_eq!(
        watcher
            .subscribe(V311, 1, &[("m/d1/c/ch1/will/#", 0)])
            .await,
        [0]
    );
    adapter.expect_connect("c2").await;
    let with_will = |id: &'static str, topic: &'static str, keep_alive: u16| {
        let mut c = Connect::new(V311, id, "c1", "s1");
        c.keep_alive = keep_alive;
        c.will = Some(raw::Will {
            topic,
            payload: b"gone",
            qos: 0,
            retain: false,
        });
        c
    };
    let closed =
        RawClient::connect_ok(port, &with_will("w-close", "m/d1/c/ch1/will/close", 30)).await;
    adapter.expect_connect("c1").await;
    drop(closed);
    assert_eq!(
        watcher.expect_kind(PUBLISH).await.publish_v311().0,
        "m/d1/c/ch1/will/close"
    );
    adapter.expect_disconnect("c1").await;

    let _silent = RawClient::connect_ok(port, &with_will("w-ka", "m/d1/c/ch1/will/ka", 1)).await;
    adapter.expect_connect("c1").await;
    assert_eq!(
        watcher.expect_kind(PUBLISH).await.publish_v311().0,
        "m/d1/c/ch1/will/ka"
    );
    adapter.expect_disconnect("c1").await;

    let mut first =
        RawClient::connect_ok(port, &with_will("w-take", "m/d1/c/ch1/will/take", 30)).await;
    adapter.expect_connect("c1").await;
    let _second = RawClient::connect_ok(port, &Connect::new(V311, "w-take", "c1", "s1")).await;
    assert_eq!(
        watcher.expect_kind(PUBLISH).await.publish_v311().0,
        "m/d1/c/ch1/will/take"
    );
    first.expect_closed().await;
    adapter.expect_disconnect("c1").await;
    adapter.expect_connect("c1").await;

    // A normal DISCONNECT publishes no will.
    let mut polite =
        RawClient::connect_ok(port, &with_will("w-ok", "m/d1/c/ch1/will/ok", 30)).await;
    adapter.expect_connect("c1").await;
    polite.send(&raw::disconnect(V311)).await;
    adapter.expect_disconnect("c1").await;
    assert!(
        publishes_before_ping(&mut watcher).await.is_empty(),
        "no will after DISCONNECT"
    );
}

#[tokio::test]
async fn null_characters_in_topics_and_filters_are_refused() {
    let adapter = Adapter::start(CLIENTS).await;
    let port = adapter.port;
    let mut watcher =
        RawClient::connect_ok(port, &Connect::new(V311, "nul-watch", "c2", "s2")).await;
    assert_eq!(
        watcher.subscribe(V311, 1, &[("m/d1/c/ch1/#", 0)]).await,
        [0]
    );
    let mut v5 = RawClient::connect_ok(port, &Connect::new(V5, "nul-5", "c1", "s1")).await;
    for topic in ["m/d1/c/ch1/a%00b", "m/d1/c/ch1/a\0b"] {
        v5.send(&raw::publish(V5, topic, 1, 7, b"x", &[])).await;
        assert_eq!(
            v5.expect_kind(PUBACK).await.puback_reason(),
            0x90,
            "{topic:?}"
        );
    }
    assert_eq!(
        v5.subscribe(V5, 2, &[("m/d1/c/ch1/a%00b", 0)]).await,
        [0x8F]
    );
    let mut v4 = RawClient::connect_ok(port, &Connect::new(V311, "nul-4", "c1", "s1")).await;
    v4.send(&raw::publish(V311, "m/d1/c/ch1/a%00b", 1, 1, b"x", &[]))
        .await;
    v4.expect_closed().await;
    assert!(
        publishes_before_ping(&mut watcher).await.is_empty(),
        "nothing was routed"
    );
    v5.ping().await;
}

#[tokio::test]
async fn every_unsubscribe_gets_its_unsuback() {
    let adapter = Adapter::start(CLIENTS).await;
    let mut v5 =
        RawClient::connect_ok(adapter.port, &Connect::new(V5, "unsub-5", "c1", "s1")).await;
    assert_eq!(v5.subscribe(V5, 1, &[("m/d1/c/ch1/u", 1)]).await, [1]);
    // One granted, one never granted, one the client may not even subscribe to.
    v5.send(&raw::unsubscribe(
        V5,
        2,
        &["m/d1/c/ch1/u", "m/d1/c/ch1/never", "m/d1/c/ch3/x"],
    ))
    .await;
    let ack = v5.expect_kind(UNSUBACK).await;
    assert_eq!(&ack.body[..2], &[0, 2]);
    assert_eq!(
        &ack.body[3..],
        &[0x00, 0x11, 0x11],
        "UNSUBACK reasons: {ack:?}"
    );
    let mut v4 =
        RawClient::connect_ok(adapter.port, &Connect::new(V311, "unsub-4", "c1", "s1")).await;
    v4.send(&raw::unsubscribe(V311, 9, &["m/d1/c/ch3/x"])).await;
    let ack = v4.expect_kind(UNSUBACK).await;
    assert_eq!(ack.body, [0, 9]);
}

/// Sends `bytes` after a successful CONNECT and expects the session to be closed, MQTT 5 with
/// DISCONNECT 0x81 (malformed).
async fn expect_malformed(port: u16, version: u8, bytes: &[u8]) {
    let mut c = RawClient::connect_ok(port, &Connect::new(version, "strict", "c1", "s1")).await;
    c.send(bytes).await;
    if version == V5 {
        let p = c.expect_kind(14).await;
        assert_eq!(
            p.body.first(),
            Some(&0x81),
            "DISCONNECT reason after {bytes:?}"
        );
    }
    c.expect_closed().await;
}

#[tokio::test]
async fn malformed_packets_close_the_session() {
    let adapter = Adapter::start(CLIENTS).await;
    let port = adapter.port;
    for version in [V311, V5] {
        let props: &[u8] = if version == V5 { &[0] } else { &[] };
        let with_props = |head: &[u8], tail: &[u8]| -> Vec<u8> {
            let mut body = head.to_vec();
            body.extend_from_slice(props);
            body.extend_from_slice(tail);
            body
        };
        let mut filter = raw::string("m/d1/c/ch1/x");
        // SUBSCRIBE with fixed-header flags 0b0000.
        let mut ok_sub = filter.clone();
        ok_sub.push(1);
        expect_malformed(
            port,
            version,
            &raw::packet(0x80, &with_props(&[0, 1], &ok_sub)),
        )
        .await;
        // Reserved subscription option bits.
        filter.push(0xC1);
        expect_malformed(
            port,
            version,
            &raw::packet(0x82, &with_props(&[0, 1], &filter)),
        )
        .await;
        // SUBSCRIBE and UNSUBSCRIBE without a filter.
        expect_malformed(port, version, &raw::packet(0x82, &with_props(&[0, 1], &[]))).await;
        expect_malformed(port, version, &raw::packet(0xA2, &with_props(&[0, 1], &[]))).await;
    }
}

#[tokio::test]
async fn malformed_connects_are_refused() {
    let adapter = Adapter::start(CLIENTS).await;
    let port = adapter.port;
    for version in [V311, V5] {
        // The reserved connect flag (bit 0) set.
        let mut bytes = Connect::new(version, "reserved", "c1", "s1").encode();
        bytes[9] |= 0x01;
        let mut c = RawClient::open(port).await;
        c.send(&bytes).await;
        if version == V5 {
            assert_eq!(c.expect_packet().await.connack_code(), 0x81);
        }
        c.expect_closed().await;
    }
    // Receive Maximum 0 is a protocol error.
    let mut connect = Connect::new(V5, "recv-max-0", "c1", "s1");
    connect.properties = vec![0x21, 0, 0];
    let (mut c, code) = RawClient::connect(port, &connect).await;
    assert_eq!(code, 0x82);
    c.expect_closed().await;
}

#[tokio::test]
async fn passwords_are_binary_data() {
    let adapter = Adapter::start(CLIENTS).await;
    for (version, refused) in [(V311, 0x05), (V5, 0x86)] {
        let mut connect = Connect::new(version, "binary-pass", "c1", "s1");
        connect.password = Some(&[0xff, 0xfe, 0x00]);
        let (mut c, code) = RawClient::connect(adapter.port, &connect).await;
        assert_eq!(
            code, refused,
            "a non-UTF-8 password is a wrong password, not malformed"
        );
        assert!(matches!(c.read_packet(WAIT).await, Err(ReadEnd::Closed)));
    }
    let _ = SUBACK;
}
