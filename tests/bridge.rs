//! The NATS message bridge against a real `nats-server -js` started by each test: device
//! messages arrive on the bus as `messaging.Message`, bus messages reach MQTT subscribers, two
//! adapter instances sharing one NATS deliver each message exactly once, and a NATS restart
//! restores the bridge by itself.
//!
//! Readiness without sleeps: the adapter subscribes `m.>` before it publishes anything on the
//! same NATS connection, so once a device message from an adapter has reached the test's own
//! subscriber, that adapter's bridge is established in both directions.

mod common;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use mqtt_adapter::bridge::message::Message;
use mqtt_adapter::bridge::INSTANCE_HEADER;
use prost::Message as _;

use common::nats::NatsServer;
use common::raw;
use common::{
    adapter_command, free_port, http_get, metric, run_to_exit, Adapter, Connect, RawClient,
    CLIENTS, V311, V5, WAIT,
};

async fn adapter_on(nats: &NatsServer) -> Adapter {
    Adapter::start_with(CLIENTS, &[("SMQ_MESSAGE_BROKER_URL", &nats.url())]).await
}

/// The next bus message on `sub`, bounded by `WAIT`.
async fn next_bus(sub: &mut async_nats::Subscriber) -> async_nats::Message {
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("no NATS message within the wait")
        .expect("NATS subscription ended")
}

/// The next PUBLISH a raw 3.1.1 subscriber gets: (topic, payload).
async fn next_mqtt(client: &mut RawClient) -> (String, Vec<u8>) {
    let (topic, payload) = client.expect_kind(raw::PUBLISH).await.publish_v311();
    (topic, payload)
}

/// Waits until `adapter`'s bridge is up: a device message from it reaches the test's NATS
/// subscriber (on `m.d1.c.ch3.ready`, a channel no test device listens to).
async fn wait_bridge_ready(adapter: &Adapter, nats: &async_nats::Client) {
    let mut sub = nats.subscribe("m.d1.c.ch3.ready").await.expect("subscribe");
    nats.flush().await.expect("flush");
    let mut dev =
        RawClient::connect_ok(adapter.port, &Connect::new(V5, "ready-probe", "c3", "s3")).await;
    dev.send(&raw::publish(V5, "m/d1/c/ch3/ready", 1, 1, b"ready", &[]))
        .await;
    assert_eq!(dev.expect_kind(raw::PUBACK).await.puback_reason(), 0);
    next_bus(&mut sub).await;
    dev.send(&raw::disconnect(V5)).await;
}

fn unix_nanos() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as i64
}

#[tokio::test]
async fn device_publish_arrives_on_nats_as_the_exact_message() {
    let nats = NatsServer::start().await;
    let bus = nats.client().await;
    let mut sub = bus.subscribe("m.>").await.expect("subscribe");
    bus.flush().await.expect("flush");
    let mut adapter = adapter_on(&nats).await;

    let mut dev = RawClient::connect_ok(adapter.port, &Connect::new(V5, "dev-1", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    let before = unix_nanos();
    dev.send(&raw::publish(V5, "m/d1/c/ch1/a/b", 1, 1, b"hello", &[]))
        .await;
    assert_eq!(dev.expect_kind(raw::PUBACK).await.puback_reason(), 0);
    let got = next_bus(&mut sub).await;
    let after = unix_nanos();
    assert_eq!(got.subject.as_str(), "m.d1.c.ch1.a.b");
    let message = Message::decode(got.payload.clone()).expect("payload is a messaging.Message");
    assert!(
        (before..=after).contains(&message.created),
        "created {} not within [{before}, {after}] ns",
        message.created
    );
    assert_eq!(
        message,
        Message {
            channel: "ch1".into(),
            domain: "d1".into(),
            subtopic: "a.b".into(),
            publisher: "c1".into(),
            protocol: "mqtt".into(),
            payload: "hello".into(),
            created: message.created,
            client_id: "dev-1".into(),
        }
    );
    let instance = got
        .headers
        .as_ref()
        .and_then(|h| h.get(INSTANCE_HEADER))
        .expect("instance header")
        .to_string();
    uuid::Uuid::parse_str(&instance).expect("the instance header is a UUID");

    // hc/ and plain ACL topics stay local: the next bus message is the channel fence.
    dev.send(&raw::publish(V5, "hc/d1", 1, 2, b"health", &[]))
        .await;
    assert_eq!(dev.expect_kind(raw::PUBACK).await.puback_reason(), 0);
    let mut plain =
        RawClient::connect_ok(adapter.port, &Connect::new(V311, "dev-2", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    plain
        .send(&raw::publish(V311, "sensors/x", 0, 0, b"plain", &[]))
        .await;
    plain.ping().await;
    dev.send(&raw::publish(V5, "m/d1/c/ch1", 1, 3, b"fence", &[]))
        .await;
    assert_eq!(dev.expect_kind(raw::PUBACK).await.puback_reason(), 0);
    let got = next_bus(&mut sub).await;
    assert_eq!(
        got.subject.as_str(),
        "m.d1.c.ch1",
        "hc/ or plain topic was bridged"
    );
    let fence = Message::decode(got.payload).expect("messaging.Message");
    assert_eq!(
        (fence.subtopic.as_str(), &fence.payload[..]),
        ("", &b"fence"[..])
    );
    // Both bridged messages are counted (the client counts a publish once it has queued it,
    // which may trail the bus delivery by a moment), and the hc/ and plain ones are not.
    let published = "mqtt_adapter_bridge_messages_total{direction=\"out\",result=\"published\"}";
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let (_, metrics) = http_get(adapter.ports.http, "/metrics").await;
        let count = metric(&metrics, published);
        if count == Some(2.0) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline && count.is_none_or(|c| c < 2.0),
            "{published}: {count:?}\n{metrics}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    drop((dev, plain));
    adapter.shutdown().await;
}

#[tokio::test]
async fn bus_message_from_another_service_reaches_mqtt_subscribers() {
    let nats = NatsServer::start().await;
    let bus = nats.client().await;
    let mut adapter = adapter_on(&nats).await;
    wait_bridge_ready(&adapter, &bus).await;
    adapter.expect_connect("c3").await;
    adapter.expect_disconnect("c3").await;

    let mut v4 =
        RawClient::connect_ok(adapter.port, &Connect::new(V311, "sub-4", "c2", "s2")).await;
    adapter.expect_connect("c2").await;
    assert_eq!(v4.subscribe(V311, 1, &[("m/d1/c/ch1/#", 0)]).await, vec![0]);

    // As the HTTP adapter would publish it: no instance header.
    let message = Message {
        channel: "ch1".into(),
        domain: "d1".into(),
        subtopic: "x.y".into(),
        publisher: "http-client".into(),
        protocol: "http".into(),
        payload: "from-http".into(),
        created: unix_nanos(),
        client_id: String::new(),
    };
    bus.publish("m.d1.c.ch1.x.y", message.encode_to_vec().into())
        .await
        .expect("publish");
    bus.flush().await.expect("flush");
    let (topic, payload) = next_mqtt(&mut v4).await;
    assert_eq!(
        (topic.as_str(), payload.as_slice()),
        ("m/d1/c/ch1/x/y", &b"from-http"[..])
    );

    // Not a messaging.Message, or not a channel subject: skipped, the bridge keeps going.
    bus.publish("m.d1.c.ch1.x", "not protobuf \u{1}\u{2}\u{3}".into())
        .await
        .expect("publish");
    bus.publish("m.d1.other", message.encode_to_vec().into())
        .await
        .expect("publish");
    let fence = Message {
        payload: "fence".into(),
        ..message
    };
    bus.publish("m.d1.c.ch1", fence.encode_to_vec().into())
        .await
        .expect("publish");
    let (topic, payload) = next_mqtt(&mut v4).await;
    assert_eq!(
        (topic.as_str(), payload.as_slice()),
        ("m/d1/c/ch1", &b"fence"[..])
    );
    drop(v4);
    adapter.shutdown().await;
}

#[tokio::test]
async fn two_instances_sharing_nats_deliver_each_message_exactly_once() {
    let nats = NatsServer::start().await;
    let bus = nats.client().await;
    let a = adapter_on(&nats).await;
    let b = adapter_on(&nats).await;
    wait_bridge_ready(&a, &bus).await;
    wait_bridge_ready(&b, &bus).await;

    let topic = "m/d1/c/ch1/room";
    let mut sub_a = RawClient::connect_ok(a.port, &Connect::new(V311, "sub-a", "c2", "s2")).await;
    assert_eq!(sub_a.subscribe(V311, 1, &[(topic, 0)]).await, vec![0]);
    let mut sub_b = RawClient::connect_ok(b.port, &Connect::new(V311, "sub-b", "c2", "s2")).await;
    assert_eq!(sub_b.subscribe(V311, 1, &[(topic, 0)]).await, vec![0]);
    let mut pub_a = RawClient::connect_ok(a.port, &Connect::new(V5, "pub-a", "c1", "s1")).await;
    let mut pub_b = RawClient::connect_ok(b.port, &Connect::new(V5, "pub-b", "c3", "s3")).await;

    // X from A; then Y from B once X reached B; then Z from A once Y reached A. A message
    // bridged back to the instance that published it would arrive before the next fence.
    pub_a.send(&raw::publish(V5, topic, 1, 1, b"X", &[])).await;
    assert_eq!(pub_a.expect_kind(raw::PUBACK).await.puback_reason(), 0);
    assert_eq!(next_mqtt(&mut sub_b).await.1, b"X");
    pub_b.send(&raw::publish(V5, topic, 1, 1, b"Y", &[])).await;
    assert_eq!(pub_b.expect_kind(raw::PUBACK).await.puback_reason(), 0);
    assert_eq!(
        next_mqtt(&mut sub_a).await.1,
        b"X",
        "A's subscriber gets A's message once"
    );
    assert_eq!(
        next_mqtt(&mut sub_a).await.1,
        b"Y",
        "then B's message, no echo of X"
    );
    pub_a.send(&raw::publish(V5, topic, 1, 2, b"Z", &[])).await;
    assert_eq!(pub_a.expect_kind(raw::PUBACK).await.puback_reason(), 0);
    assert_eq!(
        next_mqtt(&mut sub_b).await.1,
        b"Y",
        "B's subscriber gets B's message once"
    );
    assert_eq!(
        next_mqtt(&mut sub_b).await.1,
        b"Z",
        "then A's, no echo of Y and no second X"
    );
    assert_eq!(next_mqtt(&mut sub_a).await.1, b"Z");
    for sub in [&mut sub_a, &mut sub_b] {
        sub.ping().await;
    }
}

#[tokio::test]
async fn nats_restart_restores_the_bridge_and_local_traffic_never_stops() {
    let mut nats = NatsServer::start().await;
    let bus = nats.client().await;
    let adapter = adapter_on(&nats).await;
    wait_bridge_ready(&adapter, &bus).await;
    drop(bus);

    let mut sub =
        RawClient::connect_ok(adapter.port, &Connect::new(V311, "local-sub", "c2", "s2")).await;
    assert_eq!(
        sub.subscribe(V311, 1, &[("m/d1/c/ch1/#", 0)]).await,
        vec![0]
    );
    let mut dev = RawClient::connect_ok(adapter.port, &Connect::new(V5, "dev", "c1", "s1")).await;

    nats.kill();
    dev.send(&raw::publish(V5, "m/d1/c/ch1/outage", 1, 1, b"during", &[]))
        .await;
    assert_eq!(dev.expect_kind(raw::PUBACK).await.puback_reason(), 0);
    assert_eq!(
        next_mqtt(&mut sub).await,
        ("m/d1/c/ch1/outage".to_owned(), b"during".to_vec())
    );

    nats.restart().await;
    let bus = nats.client().await;
    let mut bus_sub = bus.subscribe("m.d1.c.ch1.after").await.expect("subscribe");
    bus.flush().await.expect("flush");
    // The adapter reconnects by itself; publish until a message makes it to the bus.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut pkid = 1;
    loop {
        pkid += 1;
        dev.send(&raw::publish(
            V5,
            "m/d1/c/ch1/after",
            1,
            pkid,
            b"after",
            &[],
        ))
        .await;
        assert_eq!(dev.expect_kind(raw::PUBACK).await.puback_reason(), 0);
        assert_eq!(
            next_mqtt(&mut sub).await.1,
            b"after",
            "local delivery is unaffected"
        );
        match tokio::time::timeout(Duration::from_millis(200), bus_sub.next()).await {
            Ok(Some(m)) => {
                assert_eq!(
                    Message::decode(m.payload).expect("Message").payload,
                    "after"
                );
                break;
            }
            _ => assert!(
                Instant::now() < deadline,
                "bridge out not restored 20 s after NATS restart"
            ),
        }
    }
    // Bridge in is back too (resubscribed before anything was published on the new connection).
    let message = Message {
        channel: "ch1".into(),
        domain: "d1".into(),
        payload: "inbound-after".into(),
        ..Default::default()
    };
    bus.publish("m.d1.c.ch1.in", message.encode_to_vec().into())
        .await
        .expect("publish");
    bus.flush().await.expect("flush");
    loop {
        let (topic, payload) = next_mqtt(&mut sub).await;
        if payload == b"after" {
            continue; // extra local copies of the retry loop's publishes
        }
        assert_eq!(
            (topic.as_str(), payload.as_slice()),
            ("m/d1/c/ch1/in", &b"inbound-after"[..])
        );
        break;
    }
}

#[tokio::test]
async fn adapter_starts_while_nats_is_down_and_bridges_once_it_is_up() {
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let mut adapter = Adapter::start_with(CLIENTS, &[("SMQ_MESSAGE_BROKER_URL", &url)]).await;
    common::assert_round_trip(&mut adapter, "nats-down").await;

    let nats = NatsServer::start_on(port).await;
    let bus = nats.client().await;
    wait_bridge_ready(&adapter, &bus).await;
    adapter.expect_connect("c3").await;
    adapter.expect_disconnect("c3").await;
    adapter.shutdown().await;
}

#[tokio::test]
async fn bad_bus_url_and_missing_grpc_url_stop_start_up_naming_the_variable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clients = dir.path().join("clients.toml");
    std::fs::write(&clients, CLIENTS).expect("write clients");
    let cases: [(&[(&str, &str)], &str); 3] = [
        (
            &[("SMQ_MESSAGE_BROKER_URL", "nats://bad host:4222")],
            "SMQ_MESSAGE_BROKER_URL",
        ),
        (
            &[("SMQ_MQTT_ADAPTER_AUTH", "supermq")],
            "SMQ_CLIENTS_GRPC_URL",
        ),
        (
            &[
                ("SMQ_MQTT_ADAPTER_AUTH", "supermq"),
                ("SMQ_CLIENTS_GRPC_URL", "http://127.0.0.1:1"),
                ("SMQ_CHANNELS_GRPC_URL", "http://127.0.0.1:1"),
                ("SMQ_CHANNELS_GRPC_CLIENT_CA_CERTS", "/nonexistent/ca.pem"),
            ],
            "SMQ_CHANNELS_GRPC_CLIENT_CA_CERTS",
        ),
    ];
    for (env, var) in cases {
        let (status, _stdout, stderr) =
            run_to_exit(adapter_command(free_port(), Some(&clients), env)).await;
        assert!(!status.success(), "{env:?} must stop start-up");
        let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error")).collect();
        assert!(
            lines.len() == 1 && lines[0].contains(var),
            "want one error line naming {var}, got {stderr:?}"
        );
    }
}

#[tokio::test]
async fn bus_messages_keep_their_publishers_qos_on_the_other_instance() {
    let nats = NatsServer::start().await;
    let bus = nats.client().await;
    let a = adapter_on(&nats).await;
    let b = adapter_on(&nats).await;
    wait_bridge_ready(&a, &bus).await;
    wait_bridge_ready(&b, &bus).await;

    let topic = "m/d1/c/ch1/qos-across";
    let mut sub_b =
        RawClient::connect_ok(b.port, &Connect::new(V311, "qos-sub-b", "c2", "s2")).await;
    assert_eq!(sub_b.subscribe(V311, 1, &[(topic, 2)]).await, vec![2]);
    let mut pub_a =
        RawClient::connect_ok(a.port, &Connect::new(V311, "qos-pub-a", "c1", "s1")).await;
    for qos in [0u8, 1] {
        pub_a
            .send(&raw::publish(V311, topic, qos, 7, &[b'0' + qos], &[]))
            .await;
        let got = sub_b.expect_kind(raw::PUBLISH).await;
        assert_eq!(
            got.publish_qos(),
            qos,
            "delivered on B at the QoS used on A"
        );
        if qos == 1 {
            sub_b.send(&raw::puback(got.publish_pkid())).await;
        }
    }
    // A bus message without the QoS header (another platform service) arrives at QoS 1.
    let message = Message {
        channel: "ch1".into(),
        domain: "d1".into(),
        subtopic: "qos-across".into(),
        publisher: "http-adapter".into(),
        protocol: "http".into(),
        payload: bytes::Bytes::from_static(b"h"),
        created: 1,
        client_id: String::new(),
    };
    bus.publish("m.d1.c.ch1.qos-across", message.encode_to_vec().into())
        .await
        .expect("publish to NATS");
    let got = sub_b.expect_kind(raw::PUBLISH).await;
    assert_eq!(
        (got.publish_qos(), got.publish_v311().1),
        (1, b"h".to_vec())
    );
}
