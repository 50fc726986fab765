//! The `supermq` auth backend against a real tonic server implementing the repo's .proto:
//! authentication, channel authorization per action, the decision cache (positive, negative,
//! single-flight), and the platform being slow, down and back.

mod common;

use std::time::{Duration, Instant};

use common::platform::{Platform, PUBLISH, SUBSCRIBE};
use common::raw::{self, PUBACK};
use common::{Adapter, Connect, RawClient, V311, V5};
use mqtt_adapter::auth::grpc::proto::channels::v1::AuthzReq;

async fn adapter_for(platform: &Platform, extra: &[(&str, &str)]) -> Adapter {
    let mut env = platform.adapter_env();
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Adapter::start_without_clients_file(&env).await
}

fn standard_platform(platform: &Platform) {
    let s = &platform.state;
    s.client("c1", "s1");
    s.client("c2", "s2");
    s.client_answering("alias", "sa", "someone-else");
    s.grant("d1", "c1", "ch1", PUBLISH);
    s.grant("d1", "c1", "ch1", SUBSCRIBE);
    s.grant("d1", "c1", "ro", SUBSCRIBE);
    s.grant("d1", "c2", "ch1", SUBSCRIBE);
}

#[tokio::test]
async fn authenticated_client_gets_exactly_its_channel_actions() {
    let platform = Platform::start().await;
    standard_platform(&platform);
    let mut adapter = adapter_for(&platform, &[]).await;

    let mut sub =
        RawClient::connect_ok(adapter.port, &Connect::new(V311, "sub-dev", "c2", "s2")).await;
    adapter.expect_connect("c2").await;
    let codes = sub
        .subscribe(
            V311,
            1,
            &[("m/d1/c/ch1/#", 0), ("m/d1/c/ro", 0), ("plain/topic", 0)],
        )
        .await;
    assert_eq!(codes, vec![0, 0x80, 0x80], "c2 may subscribe on ch1 only");

    let mut dev =
        RawClient::connect_ok(adapter.port, &Connect::new(V5, "pub-dev", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    let codes = dev
        .subscribe(V5, 1, &[("m/d1/c/ro", 1), ("m/d1/c/other", 1)])
        .await;
    assert_eq!(codes, vec![1, 0x87], "c1 may subscribe on ro, not on other");

    // Publishing: allowed on ch1, refused on ro (subscribe-only) with 0x87, session kept.
    dev.send(&raw::publish(V5, "m/d1/c/ro", 1, 7, b"no", &[]))
        .await;
    assert_eq!(dev.expect_kind(PUBACK).await.puback_reason(), 0x87);
    dev.send(&raw::publish(V5, "m/d1/c/ch1/temp", 1, 8, b"21.5", &[]))
        .await;
    assert_eq!(dev.expect_kind(PUBACK).await.puback_reason(), 0);
    let (topic, payload) = sub.expect_kind(raw::PUBLISH).await.publish_v311();
    assert_eq!(
        (topic.as_str(), payload.as_slice()),
        ("m/d1/c/ch1/temp", &b"21.5"[..])
    );

    // The requests carry SPEC §3's exact fields.
    let requests = platform.state.authz_requests.lock().unwrap().clone();
    let publish_req = AuthzReq {
        domain_id: "d1".into(),
        client_id: "c1".into(),
        client_type: "client".into(),
        channel_id: "ch1".into(),
        r#type: PUBLISH,
    };
    assert!(requests.contains(&publish_req), "{requests:?}");
    let subscribe_req = AuthzReq {
        domain_id: "d1".into(),
        client_id: "c2".into(),
        client_type: "client".into(),
        channel_id: "ch1".into(),
        r#type: SUBSCRIBE,
    };
    assert!(requests.contains(&subscribe_req), "{requests:?}");
    drop(dev);
    drop(sub);
    adapter.shutdown().await;
}

#[tokio::test]
async fn wrong_secret_unknown_client_and_id_mismatch_are_refused() {
    let platform = Platform::start().await;
    standard_platform(&platform);
    let mut adapter = adapter_for(&platform, &[]).await;

    for (version, want) in [(V311, 0x05), (V5, 0x86)] {
        let (_c, code) =
            RawClient::connect(adapter.port, &Connect::new(version, "d", "c1", "wrong")).await;
        assert_eq!(code, want, "wrong secret, MQTT level {version}");
        let (_c, code) =
            RawClient::connect(adapter.port, &Connect::new(version, "d", "nobody", "x")).await;
        assert_eq!(code, want, "unknown client, MQTT level {version}");
        // The service authenticates `alias` but as another id: refused (id must equal username).
        let (_c, code) =
            RawClient::connect(adapter.port, &Connect::new(version, "d", "alias", "sa")).await;
        assert_eq!(code, want, "id != username, MQTT level {version}");
    }
    // Nothing was emitted for the refusals: the next event is a later, accepted session's.
    platform.state.client("sentinel", "ss");
    let sentinel = RawClient::connect_ok(
        adapter.port,
        &Connect::new(V311, "sentinel", "sentinel", "ss"),
    )
    .await;
    adapter.expect_connect("sentinel").await;
    drop(sentinel);
    adapter.expect_disconnect("sentinel").await;
    adapter.shutdown().await;
}

#[tokio::test]
async fn decisions_are_cached_positive_and_negative() {
    let platform = Platform::start().await;
    standard_platform(&platform);
    let mut adapter = adapter_for(&platform, &[]).await;

    for i in 0..3 {
        let mut c = RawClient::connect_ok(
            adapter.port,
            &Connect::new(V311, &format!("dev{i}"), "c1", "s1"),
        )
        .await;
        adapter.expect_connect("c1").await;
        assert_eq!(
            c.subscribe(V311, 1, &[("m/d1/c/ch1", 0), ("m/d1/c/nope", 0)])
                .await,
            vec![0, 0x80]
        );
        c.send(&raw::disconnect(V311)).await;
        adapter.expect_disconnect("c1").await;
    }
    assert_eq!(
        platform.state.authn_calls(),
        1,
        "second and third connect come from the cache"
    );
    assert_eq!(
        platform.state.authz_calls(),
        2,
        "one call per (channel, action), allow and deny"
    );

    for _ in 0..3 {
        let (_c, code) =
            RawClient::connect(adapter.port, &Connect::new(V311, "bad", "c1", "wrong")).await;
        assert_eq!(code, 0x05);
    }
    assert_eq!(platform.state.authn_calls(), 2, "the refusal is cached too");
    adapter.shutdown().await;
}

#[tokio::test]
async fn connection_storm_with_one_identity_makes_one_call() {
    let platform = Platform::start().await;
    standard_platform(&platform);
    // Hold the one call open so the storm's CONNECTs pile up on it.
    platform.state.set_delay(Duration::from_millis(500));
    let adapter = adapter_for(&platform, &[("SMQ_CLIENTS_GRPC_TIMEOUT", "10s")]).await;
    let port = adapter.port;
    let storm: Vec<_> = (0..100)
        .map(|i| {
            tokio::spawn(async move {
                let id = format!("storm-{i}");
                let (client, code) =
                    RawClient::connect(port, &Connect::new(V311, &id, "c1", "s1")).await;
                (client, code)
            })
        })
        .collect();
    let mut clients = Vec::new();
    for task in storm {
        let (client, code) = task.await.expect("storm task");
        assert_eq!(code, 0);
        clients.push(client);
    }
    assert_eq!(
        platform.state.authn_calls(),
        1,
        "100 identical CONNECTs, one Authenticate"
    );
}

#[tokio::test]
async fn slow_platform_gives_server_unavailable_and_cached_decisions_keep_serving() {
    let platform = Platform::start().await;
    standard_platform(&platform);
    let timeout = Duration::from_millis(300);
    let adapter = adapter_for(
        &platform,
        &[
            ("SMQ_CLIENTS_GRPC_TIMEOUT", "300ms"),
            ("SMQ_CHANNELS_GRPC_TIMEOUT", "300ms"),
        ],
    )
    .await;

    // Warm the cache for c1 on ch1 while the platform is quick.
    let mut warm =
        RawClient::connect_ok(adapter.port, &Connect::new(V311, "warm", "c1", "s1")).await;
    assert_eq!(warm.subscribe(V311, 1, &[("m/d1/c/ch1", 0)]).await, vec![0]);
    warm.send(&raw::disconnect(V311)).await;

    platform.state.set_delay(Duration::from_secs(30));
    let margin = Duration::from_secs(3);
    for (version, want) in [(V311, 0x03), (V5, 0x88)] {
        let started = Instant::now();
        let (_c, code) =
            RawClient::connect(adapter.port, &Connect::new(version, "slow", "c2", "s2")).await;
        assert_eq!(
            code, want,
            "CONNACK for MQTT level {version} when the service is slow"
        );
        assert!(
            started.elapsed() < timeout + margin,
            "took {:?}",
            started.elapsed()
        );
    }

    // Cached identity still connects; a cached channel is served, an uncached one is refused.
    let mut dev =
        RawClient::connect_ok(adapter.port, &Connect::new(V5, "cached", "c1", "s1")).await;
    assert_eq!(
        dev.subscribe(V5, 1, &[("m/d1/c/ch1", 1), ("m/d1/c/ro", 1)])
            .await,
        vec![1, 0x87]
    );
    dev.send(&raw::publish(V5, "m/d1/c/ro/x", 1, 3, b"x", &[]))
        .await;
    assert_eq!(dev.expect_kind(PUBACK).await.puback_reason(), 0x87);
    dev.ping().await;
}

#[tokio::test]
async fn platform_down_then_back_recovers_by_itself() {
    let mut platform = Platform::start().await;
    standard_platform(&platform);
    let mut adapter = adapter_for(&platform, &[]).await;

    let c = RawClient::connect_ok(adapter.port, &Connect::new(V311, "before", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    drop(c);
    adapter.expect_disconnect("c1").await;

    // A live MQTT 5 session whose channel access is not cached yet.
    let mut live = RawClient::connect_ok(adapter.port, &Connect::new(V5, "live", "c1", "s1")).await;
    adapter.expect_connect("c1").await;

    platform.stop().await;
    live.send(&raw::publish(V5, "m/d1/c/ch1/live", 1, 1, b"down", &[]))
        .await;
    assert_eq!(
        live.expect_kind(PUBACK).await.puback_reason(),
        0x87,
        "refused while down"
    );
    for (version, want) in [(V311, 0x03), (V5, 0x88)] {
        let (_c, code) =
            RawClient::connect(adapter.port, &Connect::new(version, "down", "c2", "s2")).await;
        assert_eq!(code, want, "platform down, MQTT level {version}");
    }
    let calls_while_down = platform.state.authn_calls();

    platform.restart().await;
    // The first CONNECT after the restart may still race the channel's reconnect; the adapter
    // must recover without being restarted, so retry a bounded number of times.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut client = loop {
        let (client, code) =
            RawClient::connect(adapter.port, &Connect::new(V311, "after", "c2", "s2")).await;
        if code == 0 {
            break client;
        }
        assert_eq!(
            code, 0x03,
            "only 'unavailable' is acceptable while recovering"
        );
        assert!(
            Instant::now() < deadline,
            "adapter did not recover within 10 s of the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    adapter.expect_connect("c2").await;
    assert!(
        platform.state.authn_calls() > calls_while_down,
        "the restarted service was asked"
    );
    // The live session is served again without reconnecting: the outage refusal was not kept.
    // (The channels service has its own gRPC channel, which may reconnect a moment later.)
    let mut pkid = 1;
    loop {
        pkid += 1;
        live.send(&raw::publish(V5, "m/d1/c/ch1/live", 1, pkid, b"up", &[]))
            .await;
        match live.expect_kind(PUBACK).await.puback_reason() {
            0 => break,
            code => assert_eq!(code, 0x87, "only 'not authorized' while recovering"),
        }
        assert!(
            Instant::now() < deadline,
            "live session not served within 10 s of the restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    live.send(&raw::disconnect(V5)).await;
    adapter.expect_disconnect("c1").await;
    assert_eq!(
        client.subscribe(V311, 1, &[("m/d1/c/ch1", 0)]).await,
        vec![0]
    );
    client.send(&raw::disconnect(V311)).await;
    adapter.expect_disconnect("c2").await;
    adapter.shutdown().await;
}
