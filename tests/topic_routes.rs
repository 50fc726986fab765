//! Topic routes with the `supermq` backend (a real tonic stand-in answering
//! `DomainsService`/`ChannelsService` `RetrieveIDByRoute`): a device publishing by route reaches
//! a subscriber by id and the other way round, the bus bridge sees ids only, an unknown route is
//! refused exactly like an unknown channel, and the route cache makes one lookup per route for
//! 100 publishes.

mod common;

use common::nats::NatsServer;
use common::platform::{Platform, PUBLISH, SUBSCRIBE};
use common::raw::{self, PUBACK};
use common::{Adapter, Connect, RawClient, V311, V5, WAIT};
use futures_util::StreamExt;
use mqtt_adapter::bridge::message::Message;
use prost::Message as _;

const DOMAIN: &str = "6a1f0b2c-3d4e-4f50-8a61-b7c8d9e0f1a2";
const CHANNEL: &str = "0c9b8a7d-6e5f-4a3b-9c2d-1e0f9a8b7c6d";
/// A channel of the domain the client has no grant on.
const UNKNOWN_CHANNEL: &str = "11111111-2222-4333-8444-555555555555";

async fn routed_adapter() -> (Platform, Adapter) {
    routed_adapter_with(&[]).await
}

async fn routed_adapter_with(extra: &[(&str, &str)]) -> (Platform, Adapter) {
    let platform = Platform::start().await;
    let s = &platform.state;
    s.client("dev", "secret");
    s.grant(DOMAIN, "dev", CHANNEL, PUBLISH);
    s.grant(DOMAIN, "dev", CHANNEL, SUBSCRIBE);
    s.domain_route("home", DOMAIN);
    s.channel_route(DOMAIN, "kitchen", CHANNEL);
    let env = platform.adapter_env_with_routes();
    let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    env.extend_from_slice(extra);
    let adapter = Adapter::start_without_clients_file(&env).await;
    (platform, adapter)
}

#[tokio::test]
async fn route_and_id_address_the_same_channel() {
    let (platform, mut adapter) = routed_adapter().await;
    let mut by_id =
        RawClient::connect_ok(adapter.port, &Connect::new(V311, "by-id", "dev", "secret")).await;
    adapter.expect_connect("dev").await;
    let id_filter = format!("m/{DOMAIN}/c/{CHANNEL}/#");
    assert_eq!(by_id.subscribe(V311, 1, &[(&id_filter, 0)]).await, vec![0]);

    let mut by_route =
        RawClient::connect_ok(adapter.port, &Connect::new(V5, "by-route", "dev", "secret")).await;
    adapter.expect_connect("dev").await;

    // Published by route: the subscriber by id gets it on the id topic.
    by_route
        .send(&raw::publish(
            V5,
            "m/home/c/kitchen/temp",
            1,
            2,
            b"21.5",
            &[],
        ))
        .await;
    assert_eq!(by_route.expect_kind(PUBACK).await.puback_reason(), 0);
    let (topic, payload) = by_id.expect_kind(raw::PUBLISH).await.publish_v311();
    assert_eq!(topic, format!("m/{DOMAIN}/c/{CHANNEL}/temp"));
    assert_eq!(payload, b"21.5");

    assert_eq!(
        by_route
            .subscribe(V5, 1, &[("m/home/c/kitchen/#", 1)])
            .await,
        vec![1]
    );

    // Published by id: the subscriber by route gets it too (on the id topic, see README).
    let id_topic = format!("m/{DOMAIN}/c/{CHANNEL}/hum");
    by_id
        .send(&raw::publish(V311, &id_topic, 0, 0, b"40", &[]))
        .await;
    let delivery = by_route.expect_kind(raw::PUBLISH).await;
    let delivered = String::from_utf8_lossy(&delivery.body);
    assert!(
        delivered.contains(&id_topic) && delivered.ends_with("40"),
        "delivery to the route subscriber: {delivered:?}"
    );

    // Authorization saw ids only.
    let requests = platform.state.authz_requests.lock().unwrap().clone();
    assert!(!requests.is_empty());
    for r in &requests {
        assert_eq!(
            (r.domain_id.as_str(), r.channel_id.as_str()),
            (DOMAIN, CHANNEL)
        );
    }
    // Unsubscribing by route removes the subscription made by route.
    by_route
        .send(&raw::unsubscribe(V5, 3, &["m/home/c/kitchen/#"]))
        .await;
    let unsuback = by_route.expect_kind(raw::UNSUBACK).await;
    assert_eq!(unsuback.body.last(), Some(&0), "UNSUBACK success");
}

#[tokio::test]
async fn unknown_route_is_refused_like_an_unknown_channel() {
    let (platform, mut adapter) = routed_adapter().await;
    let mut dev =
        RawClient::connect_ok(adapter.port, &Connect::new(V5, "dev-5", "dev", "secret")).await;
    adapter.expect_connect("dev").await;

    let unknown_id = format!("m/{DOMAIN}/c/{UNKNOWN_CHANNEL}/t");
    dev.send(&raw::publish(V5, &unknown_id, 1, 1, b"x", &[]))
        .await;
    let by_id = dev.expect_kind(PUBACK).await.puback_reason();
    dev.send(&raw::publish(V5, "m/home/c/cellar/t", 1, 2, b"x", &[]))
        .await;
    let by_route = dev.expect_kind(PUBACK).await.puback_reason();
    dev.send(&raw::publish(V5, "m/nowhere/c/kitchen/t", 1, 3, b"x", &[]))
        .await;
    let by_domain_route = dev.expect_kind(PUBACK).await.puback_reason();
    assert_eq!(by_id, 0x87, "unknown channel: not authorized");
    assert_eq!((by_route, by_domain_route), (by_id, by_id));

    let codes = dev
        .subscribe(
            V5,
            4,
            &[
                (unknown_id.as_str(), 1),
                ("m/home/c/cellar/#", 1),
                ("m/home/c/kitchen", 1),
            ],
        )
        .await;
    assert_eq!(codes, vec![0x87, 0x87, 1]);
    assert_eq!(
        platform.state.route_calls("cellar"),
        1,
        "asked once, then cached"
    );
    assert_eq!(platform.state.route_calls("nowhere"), 1);

    // On MQTT 3.1.1 a refused PUBLISH closes the connection, by route as by id.
    let mut old =
        RawClient::connect_ok(adapter.port, &Connect::new(V311, "dev-4", "dev", "secret")).await;
    adapter.expect_connect("dev").await;
    old.send(&raw::publish(V311, "m/home/c/cellar/t", 0, 0, b"x", &[]))
        .await;
    old.expect_closed().await;
}

#[tokio::test]
async fn one_route_lookup_for_a_hundred_publishes() {
    let (platform, mut adapter) = routed_adapter().await;
    let mut sub =
        RawClient::connect_ok(adapter.port, &Connect::new(V311, "sub", "dev", "secret")).await;
    adapter.expect_connect("dev").await;
    let filter = format!("m/{DOMAIN}/c/{CHANNEL}/#");
    assert_eq!(sub.subscribe(V311, 1, &[(&filter, 1)]).await, vec![1]);

    let mut dev =
        RawClient::connect_ok(adapter.port, &Connect::new(V5, "pub", "dev", "secret")).await;
    adapter.expect_connect("dev").await;
    // Distinct subtopics, more than a connection remembers topic decisions for: every publish
    // goes through the authorizer and its route cache.
    for i in 0..100u16 {
        let topic = format!("m/home/c/kitchen/s{i}");
        dev.send(&raw::publish(V5, &topic, 1, i + 1, b"v", &[]))
            .await;
        assert_eq!(dev.expect_kind(PUBACK).await.puback_reason(), 0, "{topic}");
    }
    for i in 0..100u16 {
        let delivery = sub.expect_kind(raw::PUBLISH).await;
        let pkid = delivery.publish_pkid();
        let (topic, _) = delivery.publish_v311();
        assert_eq!(topic, format!("m/{DOMAIN}/c/{CHANNEL}/s{i}"));
        sub.send(&raw::puback(pkid)).await;
    }
    assert_eq!(platform.state.route_calls("home"), 1, "domain route");
    assert_eq!(platform.state.route_calls("kitchen"), 1, "channel route");
    assert_eq!(
        platform.state.authz_calls(),
        2,
        "one publish and one subscribe decision"
    );
}

#[tokio::test]
async fn the_bridge_publishes_a_routed_message_under_its_ids() {
    let nats = NatsServer::start().await;
    let bus = nats.client().await;
    let mut sub = bus.subscribe("m.>").await.expect("subscribe");
    bus.flush().await.expect("flush");
    let url = nats.url();
    let (_platform, mut adapter) = routed_adapter_with(&[("SMQ_MESSAGE_BROKER_URL", &url)]).await;
    let mut dev =
        RawClient::connect_ok(adapter.port, &Connect::new(V5, "bridged", "dev", "secret")).await;
    adapter.expect_connect("dev").await;
    dev.send(&raw::publish(V5, "m/home/c/kitchen/a/b", 1, 1, b"x", &[]))
        .await;
    assert_eq!(dev.expect_kind(PUBACK).await.puback_reason(), 0);
    let got = tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("no NATS message within the wait")
        .expect("NATS subscription ended");
    assert_eq!(got.subject.as_str(), format!("m.{DOMAIN}.c.{CHANNEL}.a.b"));
    let message = Message::decode(got.payload.as_ref()).expect("messaging.Message");
    assert_eq!(
        (
            message.domain.as_str(),
            message.channel.as_str(),
            message.subtopic.as_str()
        ),
        (DOMAIN, CHANNEL, "a.b")
    );
}
