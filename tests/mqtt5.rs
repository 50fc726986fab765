//! MQTT 5 features of the broker core with real v5 clients (rumqttc, and paho-mqtt through
//! tests/mqtt5_paho.py): subscription identifiers, No Local, Retain As Published, Retain Handling,
//! the device's Maximum Packet Size, Server Keep Alive, Message Expiry on queued messages, shared
//! subscriptions, topic aliases and the Will Delay Interval.

mod common;

use common::*;
use rumqttc::v5::mqttbytes::v5::{
    ConnectProperties, Filter, LastWill, LastWillProperties, PublishProperties, RetainForwardRule,
    SubscribeProperties,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::Event;
use std::collections::HashMap;
use std::time::{Duration, Instant};

type V5Packet = rumqttc::v5::mqttbytes::v5::Packet;

fn filter(path: &str, nolocal: bool, rap: bool, rule: RetainForwardRule) -> Filter {
    Filter {
        path: path.into(),
        qos: QoS::AtLeastOnce,
        nolocal,
        preserve_retain: rap,
        retain_forward_rule: rule,
    }
}

async fn subscribe(client: &mut V5Client, filters: Vec<Filter>, id: Option<usize>) {
    let props = SubscribeProperties {
        id,
        user_properties: Vec::new(),
    };
    client
        .client
        .subscribe_many_with_properties(filters, props)
        .await
        .expect("queue SUBSCRIBE");
    client
        .wait_for(|e| match e {
            Event::Incoming(V5Packet::SubAck(_)) => Some(()),
            _ => None,
        })
        .await;
}

#[tokio::test]
async fn subscription_identifiers_no_local_and_retain_as_published() {
    let adapter = Adapter::start(CLIENTS).await;
    let mut a = V5Client::connect(adapter.port, "v5-a", "c1", "s1").await;
    let available = a
        .connack
        .properties
        .as_ref()
        .and_then(|p| p.subscription_identifiers_available);
    assert_eq!(available, Some(1));
    let rule = RetainForwardRule::OnEverySubscribe;
    subscribe(
        &mut a,
        vec![filter("m/d1/c/ch1/v5/#", true, true, rule.clone())],
        Some(11),
    )
    .await;
    subscribe(
        &mut a,
        vec![filter("m/d1/c/ch1/v5/+", false, false, rule)],
        Some(22),
    )
    .await;

    // Its own message comes back only through the subscription without No Local.
    a.publish("m/d1/c/ch1/v5/x", QoS::AtLeastOnce, true, b"own", &[])
        .await;
    let own = a.next_publish().await;
    assert_eq!(&own.payload[..], b"own");
    let ids = own
        .properties
        .map(|p| p.subscription_identifiers)
        .unwrap_or_default();
    assert_eq!(ids, [22]);
    assert!(
        !own.retain,
        "forwarded through a subscription without Retain As Published"
    );

    let mut b = V5Client::connect(adapter.port, "v5-b", "c2", "s2").await;
    b.publish("m/d1/c/ch1/v5/x", QoS::AtLeastOnce, true, b"other", &[])
        .await;
    let other = a.next_publish().await;
    assert_eq!(&other.payload[..], b"other");
    let mut ids = other
        .properties
        .map(|p| p.subscription_identifiers)
        .unwrap_or_default();
    ids.sort_unstable();
    assert_eq!(ids, [11, 22], "one identifier per matching subscription");
    assert!(other.retain, "Retain As Published keeps RETAIN");
}

#[tokio::test]
async fn retain_handling_decides_when_retained_messages_are_sent() {
    let adapter = Adapter::start(CLIENTS).await;
    let mut publisher = V5Client::connect(adapter.port, "rh-pub", "c1", "s1").await;
    publisher
        .publish("m/d1/c/ch1/rh", QoS::AtLeastOnce, true, b"kept", &[])
        .await;
    let mut sub = V5Client::connect(adapter.port, "rh-sub", "c2", "s2").await;
    // 2: never.
    subscribe(
        &mut sub,
        vec![filter(
            "m/d1/c/ch1/rh",
            false,
            false,
            RetainForwardRule::Never,
        )],
        None,
    )
    .await;
    // 1: only for a new subscription; the filter is new here only the first time.
    let once = || {
        filter(
            "m/d1/c/ch1/+",
            false,
            false,
            RetainForwardRule::OnNewSubscribe,
        )
    };
    subscribe(&mut sub, vec![once()], None).await;
    let first = sub.next_publish().await;
    assert_eq!((&first.payload[..], first.retain), (&b"kept"[..], true));
    subscribe(&mut sub, vec![once()], None).await;
    publisher
        .publish("m/d1/c/ch1/rh", QoS::AtLeastOnce, false, b"marker", &[])
        .await;
    let next = sub.next_publish().await;
    assert_eq!(
        &next.payload[..],
        b"marker",
        "no retained message after retain handling 1 again or 2"
    );
}

#[tokio::test]
async fn publishes_over_the_devices_maximum_packet_size_are_dropped_and_counted() {
    let adapter = Adapter::start(CLIENTS).await;
    let mut opts = common::clients::v5_options(adapter.port, "small", "c2", "s2");
    opts.set_max_packet_size(Some(100));
    let mut small = V5Client::connect_with(opts).await;
    small.subscribe("m/d1/c/ch1/size", QoS::AtLeastOnce).await;
    let mut publisher = V5Client::connect(adapter.port, "size-pub", "c1", "s1").await;
    publisher
        .publish(
            "m/d1/c/ch1/size",
            QoS::AtLeastOnce,
            false,
            &[b'x'; 200],
            &[],
        )
        .await;
    publisher
        .publish("m/d1/c/ch1/size", QoS::AtLeastOnce, false, b"fits", &[])
        .await;
    let got = small.next_publish().await;
    assert_eq!(&got.payload[..], b"fits");
    let metrics = http_get(adapter.ports.http, "/metrics").await.1;
    assert_eq!(
        metric(
            &metrics,
            "mqtt_adapter_messages_dropped_total{reason=\"too_large\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn server_keep_alive_clamps_what_the_device_asks() {
    let adapter = Adapter::start_with(CLIENTS, &[("SMQ_MQTT_ADAPTER_MAX_KEEP_ALIVE", "10")]).await;
    for (asked, told) in [(60u64, Some(10u16)), (5, None)] {
        let mut opts = common::clients::v5_options(adapter.port, "ka", "c1", "s1");
        opts.set_keep_alive(std::time::Duration::from_secs(asked));
        let client = V5Client::connect_with(opts).await;
        let server = client
            .connack
            .properties
            .as_ref()
            .and_then(|p| p.server_keep_alive);
        assert_eq!(server, told, "device asked for {asked} s");
        client.disconnect().await;
    }
    // Keep-alive 0 (none) is clamped too: raw, since the client library refuses to ask for it.
    let mut connect = raw::Connect::new(raw::V5, "ka-0", "c1", "s1");
    connect.keep_alive = 0;
    let mut c = raw::RawClient::open(adapter.port).await;
    c.send(&connect.encode()).await;
    let ack = c.expect_packet().await;
    assert_eq!(ack.connack_code(), 0);
    // Server Keep Alive is property 0x13 with a two-byte value.
    let at = ack.body.windows(3).position(|w| w == [0x13, 0, 10]);
    assert!(
        at.is_some(),
        "CONNACK carries Server Keep Alive 10: {ack:?}"
    );
}

#[tokio::test]
async fn queued_messages_expire_and_late_ones_carry_the_remaining_interval() {
    let adapter = Adapter::start(CLIENTS).await;
    let persistent = || {
        let mut opts = common::clients::v5_options(adapter.port, "exp-sub", "c2", "s2");
        opts.set_clean_start(false);
        opts.set_connect_properties(ConnectProperties {
            session_expiry_interval: Some(300),
            ..ConnectProperties::new()
        });
        opts
    };
    let mut sub = V5Client::connect_with(persistent()).await;
    sub.subscribe("m/d1/c/ch1/exp", QoS::AtLeastOnce).await;
    sub.disconnect().await;
    let mut publisher = V5Client::connect(adapter.port, "exp-pub", "c1", "s1").await;
    for (payload, expiry) in [(&b"short"[..], 1u32), (&b"long"[..], 600)] {
        let props = PublishProperties {
            message_expiry_interval: Some(expiry),
            ..Default::default()
        };
        publisher
            .client
            .publish_with_properties(
                "m/d1/c/ch1/exp",
                QoS::AtLeastOnce,
                false,
                payload.to_vec(),
                props,
            )
            .await
            .expect("queue PUBLISH");
        publisher
            .wait_for(|e| matches!(e, Event::Incoming(V5Packet::PubAck(_))).then_some(()))
            .await;
    }
    // Longer than the short one's interval: it expires in the queue, whatever the timing.
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    let mut back = V5Client::connect_with(persistent()).await;
    assert!(back.connack.session_present);
    let got = back.next_publish().await;
    assert_eq!(
        &got.payload[..],
        b"long",
        "the expired message is not delivered"
    );
    let left = got
        .properties
        .and_then(|p| p.message_expiry_interval)
        .expect("interval");
    assert!(
        (1..=600).contains(&left) && left < 600,
        "remaining interval {left}"
    );
    let metrics = http_get(adapter.ports.http, "/metrics").await.1;
    assert_eq!(
        metric(
            &metrics,
            "mqtt_adapter_messages_dropped_total{reason=\"expired\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}

/// Publishes with a topic alias (and the topic, unless `topic` is empty) and waits for PUBACK.
async fn publish_aliased(client: &mut V5Client, topic: &str, alias: u16, payload: &[u8]) {
    let props = PublishProperties {
        topic_alias: Some(alias),
        user_properties: vec![("k".into(), "v".into())],
        ..Default::default()
    };
    client
        .client
        .publish_with_properties(topic, QoS::AtLeastOnce, false, payload.to_vec(), props)
        .await
        .expect("queue PUBLISH");
    client
        .wait_for(|e| matches!(e, Event::Incoming(V5Packet::PubAck(_))).then_some(()))
        .await;
}

/// Reads a v5 client's deliveries up to the payload `mark`, returning those before it.
async fn publishes_until(client: &mut V5Client, mark: &[u8]) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    loop {
        let p = client.next_publish().await;
        if p.payload[..] == *mark {
            return got;
        }
        got.push(p.payload.to_vec());
    }
}

#[tokio::test]
async fn a_shared_group_of_three_gets_every_message_once_including_a_311_member() {
    let adapter = Adapter::start(CLIENTS).await;
    let group = "$share/workers/m/d1/c/ch1/sh/+";
    let mark = "m/d1/c/ch1/sh-mark";
    let mut a = V5Client::connect(adapter.port, "sh-a", "c1", "s1").await;
    let available = a
        .connack
        .properties
        .as_ref()
        .and_then(|p| p.shared_subscription_available);
    assert_eq!(available, Some(1));
    let mut b = V5Client::connect(adapter.port, "sh-b", "c2", "s2").await;
    for m in [&mut a, &mut b] {
        m.subscribe(group, QoS::AtLeastOnce).await;
        m.subscribe(mark, QoS::AtLeastOnce).await;
    }
    // The MQTT 3.1.1 member reads raw packets: they must carry no MQTT 5 properties.
    let mut c = RawClient::connect_ok(adapter.port, &Connect::new(V311, "sh-c", "c3", "s3")).await;
    assert_eq!(c.subscribe(V311, 1, &[(group, 0), (mark, 0)]).await, [0, 0]);

    let mut publisher = V5Client::connect(adapter.port, "sh-pub", "c1", "s1").await;
    let sent: Vec<Vec<u8>> = (0..30).map(|i| format!("job-{i}").into_bytes()).collect();
    // With a topic alias and a user property: neither may reach the 3.1.1 member.
    publish_aliased(&mut publisher, "m/d1/c/ch1/sh/x", 1, &sent[0]).await;
    for payload in &sent[1..] {
        publish_aliased(&mut publisher, "", 1, payload).await;
    }
    // Each member's queue is in order: the mark comes after every job it was given.
    publisher
        .publish(mark, QoS::AtLeastOnce, false, b"mark", &[])
        .await;
    let got_a = publishes_until(&mut a, b"mark").await;
    let got_b = publishes_until(&mut b, b"mark").await;
    let mut got_c = Vec::new();
    loop {
        let (topic, payload) = c.expect_kind(raw::PUBLISH).await.publish_v311();
        if payload == b"mark" {
            break;
        }
        assert_eq!(topic, "m/d1/c/ch1/sh/x", "full topic, no properties");
        got_c.push(payload);
    }
    for (name, got) in [("a", &got_a), ("b", &got_b), ("c", &got_c)] {
        assert!(!got.is_empty(), "member {name} got nothing");
    }
    let mut all: Vec<Vec<u8>> = [got_a, got_b, got_c].concat();
    all.sort_unstable();
    let mut expected = sent.clone();
    expected.sort_unstable();
    assert_eq!(all, expected, "together all, each exactly once");
}

#[tokio::test]
async fn shared_subscriptions_authorize_the_inner_filter_and_skip_retained_messages() {
    let adapter = Adapter::start(CLIENTS).await;
    let mut publisher = V5Client::connect(adapter.port, "shr-pub", "c1", "s1").await;
    publisher
        .publish("m/d1/c/ch1/shr", QoS::AtLeastOnce, true, b"retained", &[])
        .await;
    // Raw, since rumqttc ends the connection on a refused filter.
    let mut sub =
        RawClient::connect_ok(adapter.port, &Connect::new(V5, "shr-sub", "c2", "s2")).await;
    let filters = [
        ("$share/g/m/d1/c/ch1/shr", 1),
        ("$share/g/m/d1/c/ch2/x", 1),
        ("$share//m/d1/c/ch1/x", 1),
        ("$share/g/", 1),
    ];
    assert_eq!(sub.subscribe(V5, 1, &filters).await, [1, 0x87, 0x8F, 0x8F]);
    publisher
        .publish("m/d1/c/ch1/shr", QoS::AtMostOnce, false, b"live", &[])
        .await;
    let first = sub.expect_kind(raw::PUBLISH).await;
    assert!(
        first.body.ends_with(b"live"),
        "no retained message on a shared subscribe: {first:?}"
    );

    // No Local (option bit 2) on a shared subscription is a protocol error (MQTT 3.8.3.1).
    sub.send(&raw::subscribe(
        V5,
        2,
        &[("$share/g/m/d1/c/ch1/nl", 1 | 0x04)],
    ))
    .await;
    assert_eq!(expect_disconnect_reason(&mut sub).await, 0x82);
}

#[tokio::test]
async fn a_leaving_member_hands_its_queued_messages_to_the_others() {
    let adapter = Adapter::start(CLIENTS).await;
    let group = "$share/g/m/d1/c/ch1/hand";
    // `a` never acknowledges and takes one unacknowledged PUBLISH at a time: the rest of its share
    // waits in its queue.
    let mut opts = common::clients::v5_options(adapter.port, "hand-a", "c1", "s1");
    opts.set_manual_acks(true).set_receive_maximum(Some(1));
    let mut a = V5Client::connect_with(opts).await;
    a.subscribe(group, QoS::AtLeastOnce).await;
    let mut b = V5Client::connect(adapter.port, "hand-b", "c2", "s2").await;
    b.subscribe(group, QoS::AtLeastOnce).await;
    let mut publisher = V5Client::connect(adapter.port, "hand-pub", "c3", "s3").await;
    for i in 0..10 {
        publisher
            .publish(
                "m/d1/c/ch1/hand",
                QoS::AtLeastOnce,
                false,
                format!("{i}").as_bytes(),
                &[],
            )
            .await;
    }
    let held = a.next_publish().await;
    drop(a);
    let mut got: HashMap<Vec<u8>, usize> = HashMap::new();
    while got.len() < 10 {
        let p = b.next_publish().await;
        *got.entry(p.payload.to_vec()).or_default() += 1;
    }
    assert!(got.values().all(|&n| n == 1), "{got:?}");
    assert!(
        got.contains_key(&held.payload[..]),
        "the unacknowledged one too"
    );
    let metrics = http_get(adapter.ports.http, "/metrics").await.1;
    let lost = metric(
        &metrics,
        "mqtt_adapter_messages_dropped_total{reason=\"session_ended\"}",
    );
    assert_eq!(lost, Some(0.0), "{metrics}");
}

#[tokio::test]
async fn topic_aliases_from_devices_and_to_devices_that_ask() {
    let adapter = Adapter::start(CLIENTS).await;
    let topic = "m/d1/c/ch1/alias/x";
    let mut opts = common::clients::v5_options(adapter.port, "al-sub", "c2", "s2");
    opts.set_topic_alias_max(Some(4));
    let mut asks = V5Client::connect_with(opts).await;
    asks.subscribe(topic, QoS::AtLeastOnce).await;
    let mut plain = V5Client::connect(adapter.port, "al-plain", "c3", "s3").await;
    plain.subscribe(topic, QoS::AtLeastOnce).await;
    let mut publisher = V5Client::connect(adapter.port, "al-pub", "c1", "s1").await;
    let advertised = publisher
        .connack
        .properties
        .as_ref()
        .and_then(|p| p.topic_alias_max);
    assert_eq!(advertised, Some(64));
    publish_aliased(&mut publisher, topic, 7, b"one").await;
    publish_aliased(&mut publisher, "", 7, b"two").await;
    let mut aliases = Vec::new();
    for payload in [&b"one"[..], b"two"] {
        let p = plain.next_publish().await;
        assert_eq!((&p.topic[..], &p.payload[..]), (topic.as_bytes(), payload));
        assert_eq!(p.properties.and_then(|p| p.topic_alias), None);
        // rumqttc resolves the alias itself; the alias property shows that one was used.
        let p = asks.next_publish().await;
        assert_eq!((&p.topic[..], &p.payload[..]), (topic.as_bytes(), payload));
        aliases.push(p.properties.and_then(|p| p.topic_alias));
    }
    assert!(matches!(aliases[0], Some(1..=4)), "{aliases:?}");
    assert_eq!(aliases[0], aliases[1]);

    // An alias never set up on this connection ends it with 0x94.
    publish_unacked(&mut publisher, 9).await;
    let closed = publisher.expect_closed().await;
    assert!(closed.contains("TopicAliasInvalid"), "{closed}");
}

async fn publish_unacked(client: &mut V5Client, alias: u16) {
    let props = PublishProperties {
        topic_alias: Some(alias),
        ..Default::default()
    };
    client
        .client
        .publish_with_properties("", QoS::AtLeastOnce, false, b"x".to_vec(), props)
        .await
        .expect("queue PUBLISH");
}

/// A QoS 0 PUBLISH with a Topic Alias property (0x23).
fn raw_aliased_publish(topic: &str, alias: u16) -> Vec<u8> {
    let mut body = raw::string(topic);
    body.extend([3, 0x23]);
    body.extend(alias.to_be_bytes());
    body.extend(b"p");
    raw::packet(0x30, &body)
}

/// The reason code of the DISCONNECT the adapter sends, which also carries a Reason String
/// (0x1F) and is the last thing on the connection.
async fn expect_disconnect_reason(client: &mut RawClient) -> u8 {
    let packet = client.expect_packet().await;
    assert_eq!(packet.kind, 14, "expected DISCONNECT, got {packet:?}");
    assert_eq!(packet.body.get(2), Some(&0x1F), "reason string: {packet:?}");
    let after = client.read_packet(WAIT).await;
    assert_eq!(
        after.err(),
        Some(raw::ReadEnd::Closed),
        "nothing after DISCONNECT"
    );
    packet.body[0]
}

#[tokio::test]
async fn bad_topic_aliases_end_the_connection_with_0x94() {
    let adapter =
        Adapter::start_with(CLIENTS, &[("SMQ_MQTT_ADAPTER_TOPIC_ALIAS_MAXIMUM", "2")]).await;
    for (case, topic, alias) in [
        ("unknown", "", 1),
        ("zero", "m/d1/c/ch1/a", 0),
        ("above the maximum", "m/d1/c/ch1/a", 3),
    ] {
        let mut c =
            RawClient::connect_ok(adapter.port, &Connect::new(V5, "al-bad", "c1", "s1")).await;
        c.send(&raw_aliased_publish(topic, alias)).await;
        assert_eq!(expect_disconnect_reason(&mut c).await, 0x94, "{case}");
    }
    // Within the maximum it works.
    let mut c = RawClient::connect_ok(adapter.port, &Connect::new(V5, "al-ok", "c1", "s1")).await;
    c.send(&raw_aliased_publish("m/d1/c/ch1/a", 2)).await;
    c.send(&raw_aliased_publish("", 2)).await;
    c.ping().await;

    // 0: none advertised, every alias refused.
    let none = Adapter::start_with(CLIENTS, &[("SMQ_MQTT_ADAPTER_TOPIC_ALIAS_MAXIMUM", "0")]).await;
    let v5 = V5Client::connect(none.port, "al-none", "c1", "s1").await;
    let advertised = v5
        .connack
        .properties
        .as_ref()
        .and_then(|p| p.topic_alias_max);
    assert_eq!(advertised, None, "absent means 0");
    let mut c = RawClient::connect_ok(none.port, &Connect::new(V5, "al-none2", "c1", "s1")).await;
    c.send(&raw_aliased_publish("m/d1/c/ch1/a", 1)).await;
    assert_eq!(expect_disconnect_reason(&mut c).await, 0x94);
}

/// A v5 device with a session expiry interval and a will on `topic` delayed `delay` seconds.
fn will_options(
    port: u16,
    id: &str,
    topic: &str,
    expiry: u32,
    delay: u32,
) -> rumqttc::v5::MqttOptions {
    let mut opts = common::clients::v5_options(port, id, "c1", "s1");
    opts.set_clean_start(false);
    opts.set_connect_properties(ConnectProperties {
        session_expiry_interval: Some(expiry),
        ..ConnectProperties::new()
    });
    let props = LastWillProperties {
        delay_interval: Some(delay),
        payload_format_indicator: None,
        message_expiry_interval: None,
        content_type: None,
        response_topic: None,
        correlation_data: None,
        user_properties: Vec::new(),
    };
    opts.set_last_will(LastWill::new(
        topic,
        "gone",
        QoS::AtLeastOnce,
        false,
        Some(props),
    ));
    opts
}

async fn watcher(port: u16, id: &str, topic: &str) -> V5Client {
    let mut w = V5Client::connect(port, id, "c2", "s2").await;
    w.subscribe(topic, QoS::AtLeastOnce).await;
    w
}

#[tokio::test]
async fn a_delayed_will_is_published_once_after_its_delay() {
    let adapter = Adapter::start(CLIENTS).await;
    let topic = "m/d1/c/ch1/will/delayed";
    let mut w = watcher(adapter.port, "wd-watch", topic).await;
    let device = V5Client::connect_with(will_options(adapter.port, "wd-dev", topic, 60, 2)).await;
    let lost_at = Instant::now();
    // Dropped without DISCONNECT: the will is due.
    drop(device);
    let will = w.next_publish().await;
    assert_eq!(&will.payload[..], b"gone");
    assert!(
        lost_at.elapsed() >= Duration::from_millis(1900),
        "published {:?} after the connection ended, before its 2 s delay",
        lost_at.elapsed()
    );
    w.publish(topic, QoS::AtLeastOnce, false, b"mark", &[])
        .await;
    assert_eq!(
        &w.next_publish().await.payload[..],
        b"mark",
        "the will came once"
    );
}

#[tokio::test]
async fn a_resumed_session_cancels_its_delayed_will() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let topic = "m/d1/c/ch1/will/resumed";
    let mut w = watcher(adapter.port, "wr-watch", topic).await;
    let port = adapter.port;
    let opts = || will_options(port, "wr-dev", topic, 60, 2);
    drop(V5Client::connect_with(opts()).await);
    adapter.expect_connect("c2").await;
    adapter.expect_connect("c1").await;
    adapter.expect_disconnect("c1").await;
    let back = V5Client::connect_with(opts()).await;
    assert!(back.connack.session_present);
    // Past the delay: a will not cancelled would have been published by now.
    tokio::time::sleep(Duration::from_secs(3)).await;
    w.publish(topic, QoS::AtLeastOnce, false, b"mark", &[])
        .await;
    assert_eq!(&w.next_publish().await.payload[..], b"mark", "no will");
}

#[tokio::test]
async fn a_will_is_published_at_session_expiry_when_that_is_sooner() {
    let adapter = Adapter::start(CLIENTS).await;
    let topic = "m/d1/c/ch1/will/expiry";
    let mut w = watcher(adapter.port, "we-watch", topic).await;
    drop(V5Client::connect_with(will_options(adapter.port, "we-dev", topic, 1, 3600)).await);
    let will = w.next_publish().await;
    assert_eq!(
        &will.payload[..],
        b"gone",
        "published when the session expired"
    );
}

async fn paho_scenario(scenario: &str) {
    let adapter = Adapter::start(CLIENTS).await;
    let port = adapter.port.to_string();
    run_paho("mqtt5_paho.py", &[&port, scenario], WAIT * 6, scenario).await;
}

#[tokio::test]
async fn paho_shared_subscription_with_a_311_member() {
    paho_scenario("shared").await;
}

#[tokio::test]
async fn paho_topic_aliases() {
    paho_scenario("alias").await;
}

#[tokio::test]
async fn paho_will_delay_resume_and_expiry() {
    for scenario in ["will-delay", "will-resumed", "will-expiry"] {
        paho_scenario(scenario).await;
    }
}

/// The next message on the bus subscription, decoded.
async fn next_bus(sub: &mut async_nats::Subscriber) -> mqtt_adapter::bridge::message::Message {
    use futures_util::StreamExt;
    use prost::Message as _;
    let m = tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("no bus message within the wait")
        .expect("NATS subscription ended");
    mqtt_adapter::bridge::message::Message::decode(m.payload).expect("messaging.Message")
}

#[tokio::test]
async fn a_will_still_delayed_at_shutdown_is_published_to_the_bus() {
    let nats = common::nats::NatsServer::start().await;
    let mut adapter =
        Adapter::start_with(CLIENTS, &[("SMQ_MESSAGE_BROKER_URL", &nats.url())]).await;
    let bus = nats.client().await;
    let mut sub = bus.subscribe("m.d1.c.ch1.will.>").await.expect("subscribe");
    bus.flush().await.expect("flush");
    // Once a device message reached the bus, the bridge is up.
    let mut probe = V5Client::connect(adapter.port, "wsd-probe", "c2", "s2").await;
    probe
        .publish(
            "m/d1/c/ch1/will/ready",
            QoS::AtLeastOnce,
            false,
            b"ready",
            &[],
        )
        .await;
    assert_eq!(&next_bus(&mut sub).await.payload[..], b"ready");
    adapter.expect_connect("c2").await;
    let topic = "m/d1/c/ch1/will/shutdown";
    drop(V5Client::connect_with(will_options(adapter.port, "wsd-dev", topic, 600, 600)).await);
    adapter.expect_connect("c1").await;
    adapter.expect_disconnect("c1").await;
    adapter.terminate();
    let will = next_bus(&mut sub).await;
    assert_eq!(
        (will.subtopic.as_str(), &will.payload[..]),
        ("will.shutdown", &b"gone"[..])
    );
}

#[tokio::test]
async fn enhanced_authentication_is_refused_with_0x8c() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let mut connect = Connect::new(V5, "auth-method", "c1", "s1");
    // Authentication Method (0x15) "SCRAM-SHA-1".
    connect.properties = [0x15]
        .into_iter()
        .chain(raw::string("SCRAM-SHA-1"))
        .collect();
    let (_, code) = RawClient::connect(adapter.port, &connect).await;
    assert_eq!(code, 0x8C, "bad authentication method");
    // Refused before any session: no event; the next one is this sentinel's.
    common::assert_next_event_is_sentinel(&mut adapter).await;
}
