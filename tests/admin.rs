//! The admin API (`SMQ_MQTT_ADAPTER_ADMIN_TOKEN`) with curl and real MQTT clients: 404 when off,
//! 401 without the token, the client list with filter and paging, and kicking a 3.1.1 and an
//! MQTT 5 device (reason code, will, `disconnect` reason). Cluster-wide takeover: two instances on
//! one nats-server, the same session connecting to the second ends it on the first.

mod common;

use common::nats::NatsServer;
use common::raw::{self, Connect, RawClient, PUBLISH, V311, V5};
use common::stores::{StoreKind, StoreServer};
use common::*;
use serde_json::Value;

const TOKEN: &str = "admin-secret";

/// `curl` a path on the HTTP port: (status, body).
async fn curl(port: u16, method: &str, path: &str, token: Option<&str>) -> (u16, String) {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method])
        .arg(format!("http://127.0.0.1:{port}{path}"));
    if let Some(token) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    let out = tokio::time::timeout(WAIT, cmd.output())
        .await
        .expect("curl finished within the wait")
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').expect("status line");
    (status.trim().parse().expect("HTTP status"), body.to_owned())
}

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body}"))
}

#[tokio::test]
async fn admin_endpoints_are_absent_without_a_token() {
    let adapter = Adapter::start(CLIENTS).await;
    let (status, _) = curl(adapter.ports.http, "GET", "/clients", Some(TOKEN)).await;
    assert_eq!(status, 404);
    let (status, _) = curl(adapter.ports.http, "DELETE", "/clients/x", Some(TOKEN)).await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn listing_needs_the_token_and_pages() {
    let mut adapter =
        Adapter::start_with(CLIENTS, &[("SMQ_MQTT_ADAPTER_ADMIN_TOKEN", TOKEN)]).await;
    let http = adapter.ports.http;
    // Every route, before it looks for the client (no dev-2 yet, which would be a 404).
    let routes = [
        ("GET", "/clients"),
        ("GET", "/clients/dev-2"),
        ("DELETE", "/clients/dev-2"),
    ];
    for token in [None, Some("wrong"), Some("admin-secret-but-longer")] {
        for (method, path) in routes {
            let (status, _) = curl(http, method, path, token).await;
            assert_eq!(status, 401, "{method} {path} with token {token:?}");
        }
    }
    let mut v4 =
        RawClient::connect_ok(adapter.port, &Connect::new(V311, "dev/1 é%", "c1", "s1")).await;
    assert_eq!(
        v4.subscribe(V311, 1, &[("m/d1/c/ch1/a", 1), ("sensors/x", 0)])
            .await,
        [1, 0]
    );
    let _v5 = RawClient::connect_ok(adapter.port, &Connect::new(V5, "dev-2", "c2", "s2")).await;
    let _v5b = RawClient::connect_ok(adapter.port, &Connect::new(V5, "dev-3", "c2", "s2")).await;
    adapter
        .expect_events_unordered(&[("c1", "connect"), ("c2", "connect"), ("c2", "connect")])
        .await;

    let (status, body) = curl(http, "GET", "/clients", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let all = json(&body);
    assert_eq!(all["total"], 3);
    let first = &all["clients"][0];
    assert_eq!(first["mqtt_client_id"], "dev-2");
    assert_eq!(first["client_id"], "c2");
    assert_eq!(first["protocol_version"], "5");
    assert_eq!(first["transport"], "tcp");
    assert_eq!(first["keep_alive"], 30);
    assert!(first["connected_at"].as_u64().expect("ns") > 1_577_836_800_000_000_000);
    assert!(first["remote_addr"]
        .as_str()
        .expect("addr")
        .starts_with("127.0.0.1:"));
    let c1 = &all["clients"][2];
    assert_eq!(c1["mqtt_client_id"], "dev/1 é%");
    assert_eq!(
        c1["subscriptions"],
        serde_json::json!(["m/d1/c/ch1/a", "sensors/x"])
    );

    let (_, body) = curl(
        http,
        "GET",
        "/clients?client_id=c2&limit=1&offset=1",
        Some(TOKEN),
    )
    .await;
    let page = json(&body);
    assert_eq!(page["total"], 2);
    assert_eq!(page["clients"].as_array().expect("array").len(), 1);
    assert_eq!(page["clients"][0]["mqtt_client_id"], "dev-3");
    let (status, _) = curl(http, "GET", "/clients?limit=10001", Some(TOKEN)).await;
    assert_eq!(status, 400);

    // Percent-encoded: `/`, space, non-ASCII and `%` itself.
    let (status, body) = curl(http, "GET", "/clients/dev%2F1%20%C3%A9%25", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["client_id"], "c1");
    let (status, _) = curl(http, "GET", "/clients/nobody", Some(TOKEN)).await;
    assert_eq!(status, 404);
    v4.ping().await;
}

#[tokio::test]
async fn kicking_ends_the_session_with_will_and_reason() {
    let store = StoreServer::start(StoreKind::Redis).await;
    let url = store.url();
    let adapter = Adapter::start_with(
        CLIENTS,
        &[
            ("SMQ_MQTT_ADAPTER_ADMIN_TOKEN", TOKEN),
            ("SMQ_ES_URL", url.as_str()),
            ("SMQ_MQTT_ADAPTER_EVENT_DETAILS", "true"),
        ],
    )
    .await;
    let http = adapter.ports.http;
    let mut watcher =
        RawClient::connect_ok(adapter.port, &Connect::new(V311, "watch", "c2", "s2")).await;
    assert_eq!(
        watcher
            .subscribe(V311, 1, &[("m/d1/c/ch1/will/#", 0)])
            .await,
        [0]
    );
    for (version, id) in [(V311, "kick-4"), (V5, "kick-5")] {
        let mut connect = Connect::new(version, id, "c1", "s1");
        let topic = format!("m/d1/c/ch1/will/{id}");
        connect.will = Some(raw::Will {
            topic: &topic,
            payload: b"bye",
            qos: 0,
            retain: false,
        });
        let mut device = RawClient::connect_ok(adapter.port, &connect).await;
        let (status, body) = curl(http, "DELETE", &format!("/clients/{id}"), Some(TOKEN)).await;
        assert_eq!(status, 204, "{body}");
        if version == V5 {
            let disconnect = device.expect_kind(14).await;
            assert_eq!(
                disconnect.body.first(),
                Some(&0x98),
                "administrative action"
            );
        }
        device.expect_closed().await;
        let will = watcher.expect_kind(PUBLISH).await;
        assert_eq!(will.publish_v311().0, topic);
        let (status, _) = curl(http, "DELETE", &format!("/clients/{id}"), Some(TOKEN)).await;
        assert_eq!(status, 404, "already gone");
    }
    // watcher connect + 2 × (connect, disconnect)
    let events = store.wait_events(5).await;
    let reasons: Vec<&str> = events
        .iter()
        .filter(|e| e.event.event_type == "disconnect")
        .map(|e| e.extra.get("reason").map(String::as_str).unwrap_or(""))
        .collect();
    assert_eq!(reasons, ["administrative", "administrative"], "{events:?}");
}

#[tokio::test]
async fn the_same_session_on_another_instance_takes_over() {
    let nats = NatsServer::start().await;
    let bus = nats.url();
    let mut a = Adapter::start_with(CLIENTS, &[("SMQ_MESSAGE_BROKER_URL", bus.as_str())]).await;
    let mut b = Adapter::start_with(CLIENTS, &[("SMQ_MESSAGE_BROKER_URL", bus.as_str())]).await;

    let mut on_a = RawClient::connect_ok(a.port, &Connect::new(V5, "roamer", "c1", "s1")).await;
    a.expect_connect("c1").await;
    // Another identity with the same MQTT client id on B is another session: A keeps its own.
    let mut other = RawClient::connect_ok(b.port, &Connect::new(V5, "roamer", "c2", "s2")).await;
    b.expect_connect("c2").await;
    other.ping().await;
    on_a.ping().await;

    let mut on_b = RawClient::connect_ok(b.port, &Connect::new(V5, "roamer", "c1", "s1")).await;
    b.expect_connect("c1").await;
    let disconnect = on_a.expect_kind(14).await;
    assert_eq!(disconnect.body.first(), Some(&0x8E), "session taken over");
    on_a.expect_closed().await;
    a.expect_disconnect("c1").await;
    on_b.ping().await;
    other.ping().await;
    let metrics = http_get(a.ports.http, "/metrics").await.1;
    assert_eq!(
        metric(
            &metrics,
            "mqtt_adapter_disconnect_reasons_total{reason=\"takeover\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}
