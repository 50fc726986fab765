//! MQTT 5 features of the broker core with a real v5 client (rumqttc): subscription identifiers,
//! No Local, Retain As Published, Retain Handling, the device's Maximum Packet Size, Server Keep
//! Alive and Message Expiry on queued messages.

mod common;

use common::*;
use rumqttc::v5::mqttbytes::v5::{
    ConnectProperties, Filter, PublishProperties, RetainForwardRule, SubscribeProperties,
};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::Event;

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
