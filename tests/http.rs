//! The operations endpoint (SPEC §7): `/health` (200 serving, 503 while draining), `/metrics` with
//! exact counts after known traffic, and the graceful drain on SIGTERM: every open session gets its
//! `disconnect` (MQTT 5 ones a DISCONNECT 0x8B first), events are flushed, exit 0.

mod common;

use std::time::{Duration, Instant};

use common::*;
use rumqttc::QoS;

#[tokio::test]
async fn health_reports_pass_with_version_and_instance() {
    let adapter = Adapter::start(CLIENTS).await;
    let (status, body) = http_get(adapter.ports.http, "/health").await;
    assert_eq!(status, 200, "{body}");
    let json: serde_json::Value = serde_json::from_str(&body).expect("health is JSON");
    assert_eq!(json["status"], "pass");
    assert_eq!(json["version"], env!("CARGO_PKG_VERSION"));
    assert!(
        json["instance_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty()),
        "{body}"
    );
    let (status, _) = http_get(adapter.ports.http, "/nothing").await;
    assert_eq!(status, 404);
    adapter.shutdown().await;
}

/// Scrapes until `series` reads `want` (the outbox counts an event just after the store took it).
async fn await_metric(adapter: &Adapter, series: &str, want: f64) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let (_, body) = http_get(adapter.ports.http, "/metrics").await;
        if metric(&body, series) == Some(want) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{series} never reached {want}:\n{body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn metrics_count_known_traffic_exactly() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let port = adapter.port;
    let (_, before) = http_get(adapter.ports.http, "/metrics").await;
    for name in [
        "mqtt_adapter_connections",
        "mqtt_adapter_disconnects_total",
        "mqtt_adapter_events_pending",
        "mqtt_adapter_events_dropped_total",
    ] {
        assert_eq!(metric(&before, name), Some(0.0), "{name} in\n{before}");
    }

    let mut sub = V4Client::connect(port, "m-sub", "c2", "s2").await;
    adapter.expect_connect("c2").await;
    sub.subscribe("m/d1/c/ch1/count", QoS::AtLeastOnce).await;
    let mut publisher = V5Client::connect(port, "m-pub", "c3", "s3").await;
    adapter.expect_connect("c3").await;
    let refused = V4Client::try_connect(v4_options(port, "m-bad", "c1", "wrong")).await;
    assert!(refused.is_err(), "a wrong password connected");
    for i in 0..7u8 {
        publisher
            .publish(
                "m/d1/c/ch1/count",
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                &[i],
                &[],
            )
            .await;
        assert_eq!(&sub.next_publish().await.payload[..], &[i]);
    }
    let (_, during) = http_get(adapter.ports.http, "/metrics").await;
    assert_eq!(
        metric(&during, "mqtt_adapter_connections"),
        Some(2.0),
        "{during}"
    );
    assert_eq!(
        metric(
            &during,
            "mqtt_adapter_listener_connections{listener=\"tcp\"}"
        ),
        Some(2.0),
        "{during}"
    );
    publisher.disconnect().await;
    adapter.expect_disconnect("c3").await;
    sub.disconnect().await;
    adapter.expect_disconnect("c2").await;

    let text = await_metric(
        &adapter,
        "mqtt_adapter_events_published_total{store=\"stdout\"}",
        4.0,
    )
    .await;
    for (series, want) in [
        ("mqtt_adapter_connections", 0.0),
        ("mqtt_adapter_connects_total{result=\"accepted\"}", 2.0),
        (
            "mqtt_adapter_connects_total{result=\"bad_credentials\"}",
            1.0,
        ),
        ("mqtt_adapter_disconnects_total", 2.0),
        (
            "mqtt_adapter_disconnect_reasons_total{reason=\"client_disconnect\"}",
            2.0,
        ),
        ("mqtt_adapter_messages_total{direction=\"in\"}", 7.0),
        ("mqtt_adapter_messages_total{direction=\"out\"}", 7.0),
        ("mqtt_adapter_auth_duration_seconds_count", 3.0),
        ("mqtt_adapter_events_pending", 0.0),
        ("mqtt_adapter_events_dropped_total", 0.0),
    ] {
        assert_eq!(metric(&text, series), Some(want), "{series} in\n{text}");
    }
    assert!(
        text.contains("# TYPE mqtt_adapter_auth_duration_seconds histogram"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE mqtt_adapter_connections gauge"),
        "{text}"
    );
    adapter.shutdown().await;
}

#[tokio::test]
async fn health_turns_503_while_draining() {
    let mut adapter = Adapter::start_with(CLIENTS, &[("SMQ_MQTT_ADAPTER_DRAIN_GRACE", "60")]).await;
    let (status, _) = http_get(adapter.ports.http, "/health").await;
    assert_eq!(status, 200);
    let client = V4Client::connect(adapter.port, "drain-1", "c1", "s1").await;
    adapter.expect_connect("c1").await;

    adapter.terminate();
    let deadline = Instant::now() + WAIT;
    let body = loop {
        let (status, body) = http_get(adapter.ports.http, "/health").await;
        if status == 503 {
            break body;
        }
        assert_eq!(status, 200, "{body}");
        assert!(
            Instant::now() < deadline,
            "/health never turned 503 after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let json: serde_json::Value = serde_json::from_str(&body).expect("health is JSON");
    assert_eq!(json["status"], "fail");
    // During the grace period sessions are still served.
    assert!(adapter.is_running());
    let mut probe =
        RawClient::connect_ok(adapter.port, &Connect::new(V311, "drain-2", "c2", "s2")).await;
    adapter.expect_connect("c2").await;
    probe.ping().await;

    // The second signal ends the grace period: both sessions end, exit 0.
    let rest = adapter.shutdown().await;
    let mut ended: Vec<&str> = rest.iter().map(|e| e.client_id.as_str()).collect();
    ended.sort_unstable();
    assert_eq!(ended, ["c1", "c2"], "{rest:?}");
    drop(client);
}

#[tokio::test]
async fn sigterm_with_100_sessions_emits_100_disconnects() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let port = adapter.port;
    let mut v4 = Vec::new();
    let mut v5 = Vec::new();
    for i in 0..50 {
        v4.push(V4Client::connect(port, &format!("many-4-{i}"), "c1", "s1").await);
        let id = format!("many-5-{i}");
        v5.push(RawClient::connect_ok(port, &Connect::new(V5, &id, "c2", "s2")).await);
    }
    for _ in 0..100 {
        adapter.next_event().await;
    }
    let (_, metrics) = http_get(adapter.ports.http, "/metrics").await;
    assert_eq!(
        metric(&metrics, "mqtt_adapter_connections"),
        Some(100.0),
        "{metrics}"
    );

    adapter.terminate();
    for client in &mut v5 {
        let packet = client.expect_kind(14).await;
        assert_eq!(
            packet.body.first(),
            Some(&0x8B),
            "MQTT 5 DISCONNECT on shutdown: {packet:?}"
        );
        client.expect_closed().await;
    }
    let rest = adapter.events_until_eof().await;
    assert_eq!(rest.len(), 100, "{rest:?}");
    assert!(
        rest.iter().all(|e| e.event_type == "disconnect"),
        "{rest:?}"
    );
    let status = adapter.wait_exit().await;
    assert!(status.success(), "exit status {status}");
    assert_paired(&adapter.seen);
    drop(v4);
}
