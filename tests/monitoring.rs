//! The monitoring files name only metrics the adapter exports: every `mqtt_adapter_*` name in
//! the Grafana dashboard (`deploy/grafana/mqtt-adapter.json`) and the Prometheus alert rules
//! (`deploy/prometheus/alerts.yml`) must appear on a running adapter's `/metrics`, after traffic
//! that makes every labelled family show up (a family with no sample yet is not exported).

mod common;

use std::collections::BTreeSet;
use std::path::Path;

use common::*;

/// What an operator must find on the dashboard (issue #12, part 4).
const DASHBOARD_MUST_SHOW: &[&str] = &[
    "mqtt_adapter_connections",
    "mqtt_adapter_connects_total",
    "mqtt_adapter_disconnect_reasons_total",
    "mqtt_adapter_messages_total",
    "mqtt_adapter_messages_dropped_total",
    "mqtt_adapter_auth_duration_seconds_bucket",
    "mqtt_adapter_events_pending",
    "mqtt_adapter_events_published_total",
    "mqtt_adapter_events_dropped_total",
    "mqtt_adapter_events_oldest_undelivered_seconds",
    "mqtt_adapter_bridge_messages_total",
    "mqtt_adapter_bridge_log_bytes",
    "mqtt_adapter_bridge_pending",
    "mqtt_adapter_bridge_oldest_undelivered_seconds",
    "mqtt_adapter_bridge_pushback",
    "mqtt_adapter_bridge_pushback_episodes_total",
    "mqtt_adapter_bridge_subscriptions",
];

/// The alerts an operator must get (issue #12, part 4).
const ALERTS: &[&str] = &[
    "MqttAdapterEventsNotDraining",
    "MqttAdapterEventsDropped",
    "MqttAdapterBridgeFailing",
    "MqttAdapterBridgeLogOld",
    "MqttAdapterBridgePushBack",
    "MqttAdapterAuthUnavailable",
    "MqttAdapterConnectionLimit",
];

fn read(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Every `mqtt_adapter_…` token in `text`.
fn metric_names(text: &str) -> BTreeSet<String> {
    const PREFIX: &str = "mqtt_adapter_";
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find(PREFIX) {
        let tail = &rest[at..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        names.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    names
}

/// The expressions of the dashboard's panels (rows excluded), checked for shape on the way.
fn dashboard_exprs(dashboard: &serde_json::Value) -> Vec<String> {
    let panels = dashboard["panels"]
        .as_array()
        .expect("dashboard has panels");
    let mut ids = BTreeSet::new();
    let mut exprs = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(panel["id"].as_u64().expect("panel id")),
            "duplicate panel id in {title:?}"
        );
        assert!(
            panel["gridPos"].is_object(),
            "panel {title:?} has no gridPos"
        );
        if panel["type"] == "row" {
            continue;
        }
        let targets = panel["targets"].as_array().expect("panel targets");
        assert!(!targets.is_empty(), "panel {title:?} queries nothing");
        for target in targets {
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{title:?}");
            let expr = target["expr"].as_str().expect("target expr");
            assert!(expr.contains("mqtt_adapter_"), "{title:?}: {expr}");
            exprs.push(expr.to_owned());
        }
    }
    exprs
}

/// Sample names (`name{…} value`) and family names (`# TYPE name …`) of an exposition.
fn exported(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter_map(|line| match line.strip_prefix("# TYPE ") {
            Some(typed) => typed.split(' ').next(),
            None if line.starts_with('#') => None,
            None => line.split(['{', ' ']).next(),
        })
        .filter(|name| !name.is_empty())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn dashboard_and_alerts_name_only_exported_metrics() {
    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/mqtt-adapter.json"))
            .expect("the dashboard is JSON");
    let in_dashboard: BTreeSet<String> = dashboard_exprs(&dashboard)
        .iter()
        .flat_map(|e| metric_names(e))
        .collect();
    let alerts = read("deploy/prometheus/alerts.yml");
    let in_alerts = metric_names(&alerts);
    for name in DASHBOARD_MUST_SHOW {
        assert!(
            in_dashboard.contains(*name),
            "the dashboard does not show {name}"
        );
    }
    for alert in ALERTS {
        assert!(
            alerts
                .lines()
                .any(|l| l.trim() == format!("- alert: {alert}")),
            "alerts.yml has no alert {alert}"
        );
    }
    assert!(
        in_alerts.len() >= 5,
        "alert rules name too few metrics: {in_alerts:?}"
    );

    // Traffic that makes every labelled family appear: an accepted session, one refused by the
    // connection limit, one with a bad password, one closed for a malformed packet.
    // The bridge (its counters) and an event store (the log's gauges) are on.
    let nats = common::nats::NatsServer::start().await;
    let bus = nats.url();
    let store = common::stores::StoreServer::start(common::stores::StoreKind::Redis).await;
    let es = store.url();
    let data = tempfile::tempdir().expect("temp dir");
    let data_dir = data.path().to_string_lossy().into_owned();
    let adapter = Adapter::start_with(
        CLIENTS,
        &[
            ("SMQ_MQTT_ADAPTER_MAX_CONNECTIONS", "1"),
            ("SMQ_MESSAGE_BROKER_URL", bus.as_str()),
            ("SMQ_ES_URL", es.as_str()),
            ("SMQ_MQTT_ADAPTER_DATA_DIR", data_dir.as_str()),
        ],
    )
    .await;
    let (mut wrong, code) =
        RawClient::connect(adapter.port, &Connect::new(V311, "wrong", "c2", "nope")).await;
    assert_eq!(code, 0x05, "CONNACK for a bad password");
    // Its connection slot is free once the adapter closed the socket.
    wrong.expect_closed().await;
    let mut garbled =
        RawClient::connect_ok(adapter.port, &Connect::new(V311, "garbled", "c2", "s2")).await;
    store.wait_events(1).await;
    // Packet type 0 is reserved: a protocol error.
    garbled.send(&[0x00, 0x02, 0xDE, 0xAD]).await;
    garbled.expect_closed().await;
    store.wait_events(2).await;
    // The garbled session's slot is free too (closed above): one session may now hold the only one.
    let mut holder =
        RawClient::connect_ok(adapter.port, &Connect::new(V311, "holder", "c1", "s1")).await;
    store.wait_events(3).await;
    let (_, code) = RawClient::connect(adapter.port, &Connect::new(V311, "over", "c3", "s3")).await;
    assert_eq!(code, 0x03, "CONNACK beyond the connection limit");
    holder.send(&raw::disconnect(V311)).await;
    holder.expect_closed().await;
    store.wait_events(4).await;

    let (status, exposition) = http_get(adapter.ports.http, "/metrics").await;
    assert_eq!(status, 200);
    let exported = exported(&exposition);
    let mut missing = Vec::new();
    for (file, names) in [
        ("deploy/grafana/mqtt-adapter.json", &in_dashboard),
        ("deploy/prometheus/alerts.yml", &in_alerts),
    ] {
        for name in names {
            if !exported.contains(name) {
                missing.push(format!("{file}: {name}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "named but not on /metrics:\n  {}\n/metrics:\n{exposition}",
        missing.join("\n  ")
    );
    adapter.shutdown().await;
}

#[test]
fn metric_names_are_found_in_expressions() {
    let names = metric_names(
        r#"histogram_quantile(0.99, sum by (le) (rate(mqtt_adapter_auth_duration_seconds_bucket{instance=~"$instance"}[5m]))) / mqtt_adapter_connections"#,
    );
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "mqtt_adapter_auth_duration_seconds_bucket",
            "mqtt_adapter_connections"
        ]
    );
    let exposition = "# HELP mqtt_adapter_connections x\n# TYPE mqtt_adapter_connections gauge\nmqtt_adapter_connections 0\nmqtt_adapter_auth_duration_seconds_bucket{le=\"0.1\"} 1\n";
    let got = exported(exposition);
    assert!(got.contains("mqtt_adapter_connections"));
    assert!(got.contains("mqtt_adapter_auth_duration_seconds_bucket"));
    assert!(!got.contains("HELP"));
}
