//! MQTT over WebSocket on path `/mqtt` (SPEC §6): MQTT 3.1.1 and 5 with rumqttc's websocket
//! transport and with paho-mqtt (Python), over WS and over TLS (WSS); every WebSocket session
//! emits its events like a TCP one; other paths and subprotocols are refused at the upgrade.

mod common;

use common::*;
use rumqttc::{QoS, TlsConfiguration, Transport};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn ws_v4(url: String, port: u16, mqtt_id: &str, user: &str, pass: &str) -> rumqttc::MqttOptions {
    let mut opts = rumqttc::MqttOptions::new(mqtt_id, url, port);
    opts.set_credentials(user, pass)
        .set_keep_alive(std::time::Duration::from_secs(30))
        .set_transport(Transport::Ws);
    opts
}

fn ws_v5(port: u16, mqtt_id: &str, user: &str, pass: &str) -> rumqttc::v5::MqttOptions {
    let url = format!("ws://127.0.0.1:{port}/mqtt");
    let mut opts = rumqttc::v5::MqttOptions::new(mqtt_id, url, port);
    opts.set_credentials(user, pass)
        .set_keep_alive(std::time::Duration::from_secs(30))
        .set_transport(Transport::Ws);
    opts
}

#[tokio::test]
async fn websocket_round_trip_for_mqtt_311_and_5() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let ws = adapter.ports.ws;

    let mut sub = V4Client::connect_with(ws_v4(
        format!("ws://127.0.0.1:{ws}/mqtt"),
        ws,
        "ws-sub",
        "c2",
        "s2",
    ))
    .await;
    let connected = adapter.expect_connect("c2").await;
    sub.subscribe("m/d1/c/ch1/ws", QoS::AtLeastOnce).await;

    let mut publisher = V5Client::connect_with(ws_v5(ws, "ws-pub", "c3", "s3")).await;
    adapter.expect_connect("c3").await;
    publisher
        .publish(
            "m/d1/c/ch1/ws",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            b"over-ws",
            &[],
        )
        .await;
    let got = sub.next_publish().await;
    assert_eq!(
        (got.topic.as_str(), &got.payload[..]),
        ("m/d1/c/ch1/ws", &b"over-ws"[..])
    );

    // And across transports: a TCP publisher reaches the WebSocket subscriber.
    let mut tcp = V4Client::connect(adapter.port, "tcp-pub", "c1", "s1").await;
    adapter.expect_connect("c1").await;
    tcp.publish("m/d1/c/ch1/ws", QoS::AtLeastOnce, false, b"from-tcp")
        .await;
    assert_eq!(&sub.next_publish().await.payload[..], b"from-tcp");
    tcp.disconnect().await;
    adapter.expect_disconnect("c1").await;

    publisher.disconnect().await;
    adapter.expect_disconnect("c3").await;
    // A WebSocket closed without DISCONNECT still ends with exactly one disconnect.
    sub.drop_abruptly();
    let disconnected = adapter.expect_disconnect("c2").await;
    assert_session(&connected, &disconnected);
    adapter.shutdown().await;
}

async fn paho(port: u16, version: &str, id: &str, user: &str, pass: &str, topic: &str) {
    let port = port.to_string();
    let args = [port.as_str(), version, id, user, pass, topic];
    let what = format!("over WebSocket (MQTT {version})");
    run_paho("ws_paho.py", &args, WAIT * 3, &what).await;
}

#[tokio::test]
async fn paho_mqtt_over_websocket() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let ws = adapter.ports.ws;
    paho(ws, "311", "paho-4", "c1", "s1", "m/d1/c/ch1/paho").await;
    let c = adapter.expect_connect("c1").await;
    let d = adapter.expect_disconnect("c1").await;
    assert_session(&c, &d);
    paho(ws, "5", "paho-5", "c2", "s2", "m/d1/c/ch1/paho5").await;
    adapter.expect_connect("c2").await;
    adapter.expect_disconnect("c2").await;
    let (_, metrics) = http_get(adapter.ports.http, "/metrics").await;
    // Each paho client published once and got its message back.
    assert_eq!(
        metric(&metrics, "mqtt_adapter_messages_total{direction=\"in\"}"),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "mqtt_adapter_messages_total{direction=\"out\"}"),
        Some(2.0),
        "{metrics}"
    );
    adapter.shutdown().await;
}

#[tokio::test]
async fn secure_websocket_round_trip() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = TestPki::new(dir.path(), "srv");
    let env = pki.env(false);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let mut adapter = Adapter::start_with(CLIENTS, &env).await;
    let wss = adapter.ports.wss;
    let mut opts = rumqttc::MqttOptions::new("wss-1", format!("wss://127.0.0.1:{wss}/mqtt"), wss);
    opts.set_credentials("c1", "s1")
        .set_transport(Transport::wss_with_config(TlsConfiguration::Simple {
            ca: std::fs::read(&pki.ca_pem).expect("read CA"),
            alpn: None,
            client_auth: None,
        }));
    let mut client = V4Client::connect_with(opts).await;
    adapter.expect_connect("c1").await;
    client.subscribe("m/d1/c/ch1/wss", QoS::AtLeastOnce).await;
    client
        .publish("m/d1/c/ch1/wss", QoS::AtLeastOnce, false, b"secure")
        .await;
    assert_eq!(&client.next_publish().await.payload[..], b"secure");
    client.disconnect().await;
    adapter.expect_disconnect("c1").await;
    adapter.shutdown().await;
}

/// Sends a WebSocket upgrade request and returns the response's status line.
async fn upgrade_status(port: u16, path: &str, protocol: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Protocol: {protocol}\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(WAIT, stream.read(&mut buf))
        .await
        .expect("no upgrade answer")
        .expect("read");
    let text = String::from_utf8_lossy(&buf[..n]).into_owned();
    text.lines().next().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn upgrade_needs_the_mqtt_path_and_subprotocol() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let ws = adapter.ports.ws;
    assert!(upgrade_status(ws, "/mqtt", "mqtt").await.contains(" 101 "));
    assert!(upgrade_status(ws, "/other", "mqtt").await.contains(" 404 "));
    assert!(upgrade_status(ws, "/mqtt", "chat").await.contains(" 400 "));
    assert_next_event_is_sentinel(&mut adapter).await;
    adapter.shutdown().await;
}
