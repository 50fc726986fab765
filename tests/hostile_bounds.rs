//! Hostile input, second round (issue #23), the bounds: every byte a peer can make the adapter
//! hold counts against a bound (MQTT 5 properties in the queue, topic aliases, the CONNECT before
//! authentication over TCP and WebSocket, levels after decoding), wills honour their expiry, and
//! the malformed packets the codec let through are refused.

mod common;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::raw::{self, Connect, RawClient, V311, V5};
use common::*;

/// MQTT DISCONNECT packet type.
const DISCONNECT: u8 = 14;

async fn scrape(adapter: &Adapter) -> String {
    let (status, body) = http_get(adapter.ports.http, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

fn limit_hits(metrics: &str, limit: &str) -> f64 {
    metric(
        metrics,
        &format!("mqtt_adapter_limit_hits_total{{limit=\"{limit}\"}}"),
    )
    .unwrap_or(0.0)
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

/// An MQTT 5 PUBLISH with the given encoded properties.
fn publish_with(topic: &[u8], qos: u8, pkid: u16, props: &[u8], payload: &[u8]) -> Vec<u8> {
    let mut body = (topic.len() as u16).to_be_bytes().to_vec();
    body.extend_from_slice(topic);
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    body.extend(raw::varint(props.len()));
    body.extend_from_slice(props);
    body.extend_from_slice(payload);
    raw::packet(0x30 | (qos << 1), &body)
}

/// An MQTT 5 CONNECT (clean start, credentials) with a will carrying `will_props`.
fn connect_with_will(
    client_id: &str,
    user: &str,
    pass: &str,
    will_topic: &[u8],
    will_props: &[u8],
    retain: bool,
) -> Vec<u8> {
    let mut body = raw::string("MQTT");
    body.push(V5);
    body.push(0x80 | 0x40 | 0x04 | 0x02 | if retain { 0x20 } else { 0 });
    body.extend_from_slice(&30u16.to_be_bytes());
    body.push(0); // no CONNECT properties
    body.extend(raw::string(client_id));
    body.extend(raw::varint(will_props.len()));
    body.extend_from_slice(will_props);
    body.extend_from_slice(&(will_topic.len() as u16).to_be_bytes());
    body.extend_from_slice(will_topic);
    body.extend(raw::string("gone"));
    body.extend(raw::string(user));
    body.extend(raw::string(pass));
    raw::packet(0x10, &body)
}

/// Expects the adapter's DISCONNECT with `reason`, then the close.
async fn expect_disconnect_reason(client: &mut RawClient, reason: u8) {
    let packet = client.expect_kind(DISCONNECT).await;
    assert_eq!(packet.body.first().copied(), Some(reason), "{packet:?}");
    client.expect_closed().await;
}

/// 1 MB of user properties on a message queued for an offline session used to cost ten times
/// that in memory and count as a few bytes against the queue's byte bound: RSS grew without
/// `queue_full` moving. The properties are charged now.
#[tokio::test]
async fn mqtt5_properties_count_against_the_queue_byte_bound() {
    let mut adapter =
        Adapter::start_with(CLIENTS, &[("SMQ_MQTT_ADAPTER_MAX_QUEUED_BYTES", "4194304")]).await;
    let port = adapter.port;
    let mut offline = Connect::new(V5, "props-offline", "c2", "s2");
    offline.clean = false;
    offline.properties = raw::session_expiry(600);
    let mut sub = RawClient::connect_ok(port, &offline).await;
    adapter.expect_connect("c2").await;
    assert_eq!(sub.subscribe(V5, 1, &[("m/d1/c/ch1/#", 1)]).await, [1]);
    sub.send(&raw::disconnect(V5)).await;
    adapter.expect_disconnect("c2").await;

    let before = rss(adapter.pid());
    let mut publisher =
        RawClient::connect_ok(port, &Connect::new(V5, "props-pub", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    // ~900 KB on the wire each: 130,000 one-letter pairs.
    let pairs: Vec<(&str, &str)> = vec![("k", "v"); 130_000];
    for pkid in 1..=40u16 {
        publisher
            .send(&raw::publish(V5, "m/d1/c/ch1/props", 1, pkid, b"p", &pairs))
            .await;
        assert_eq!(publisher.expect_kind(raw::PUBACK).await.puback_reason(), 0);
    }
    let grown = rss(adapter.pid()).saturating_sub(before);
    let metrics = scrape(&adapter).await;
    let dropped = metric(
        &metrics,
        "mqtt_adapter_messages_dropped_total{reason=\"queue_full\"}",
    )
    .unwrap_or(0.0);
    assert!(dropped >= 30.0, "queue_full {dropped}\n{metrics}");
    // Unbounded, 40 such messages held about 400 MB.
    assert!(grown < 150 << 20, "RSS grew by {} MB", grown >> 20);
    adapter.shutdown().await;
}

/// A topic alias used to be stored before the topic-length check: the PUBLISH was refused, yet
/// its alias held the long topic. Now the refused topic sets up no alias.
#[tokio::test]
async fn a_topic_beyond_the_bounds_sets_up_no_alias() {
    let mut adapter =
        Adapter::start_with(CLIENTS, &[("SMQ_MQTT_ADAPTER_MAX_TOPIC_LENGTH", "64")]).await;
    let mut dev =
        RawClient::connect_ok(adapter.port, &Connect::new(V5, "alias-dev", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    let long = format!("m/d1/c/ch1/{}", "x".repeat(100));
    let alias_1 = [0x23, 0, 1];
    dev.send(&publish_with(long.as_bytes(), 1, 1, &alias_1, b"x"))
        .await;
    assert_eq!(dev.expect_kind(raw::PUBACK).await.puback_reason(), 0x90);
    // The alias was never set up: using it is a protocol error (0x94), not the long topic again.
    dev.send(&publish_with(b"", 1, 2, &alias_1, b"x")).await;
    expect_disconnect_reason(&mut dev, 0x94).await;
    adapter.expect_disconnect("c1").await;
    assert_eq!(limit_hits(&scrape(&adapter).await, "topic_length"), 1.0);
    adapter.shutdown().await;
}

/// Before authentication a socket could make the adapter buffer a CONNECT up to the maximum
/// packet size (1 MiB). Over TCP the CONNECT is now refused as soon as its length is read.
#[tokio::test]
async fn a_connect_beyond_its_bound_is_refused_before_it_is_buffered() {
    let adapter = Adapter::start_with(
        CLIENTS,
        &[
            ("SMQ_MQTT_ADAPTER_MAX_CONNECT_SIZE", "4096"),
            ("SMQ_MQTT_ADAPTER_CONNECT_TIMEOUT", "120"),
        ],
    )
    .await;
    // A CONNECT announcing 500,000 bytes: the fixed header only.
    let mut header = vec![0x10];
    header.extend(raw::varint(500_000));
    let mut socket = RawClient::open(adapter.port).await;
    socket.send(&header).await;
    socket.expect_closed().await;

    // One within the bound (a will payload makes it 3 KB) is served.
    let mut ok = RawClient::open(adapter.port).await;
    let mut connect = Connect::new(V311, "fits", "c1", "s1");
    let payload = vec![b'w'; 3000];
    connect.will = Some(raw::Will {
        topic: "m/d1/c/ch1/will",
        payload: &payload,
        qos: 0,
        retain: false,
    });
    assert_eq!(ok.handshake(&connect).await, Ok(0));
    // After authentication larger packets are fine.
    ok.send(&raw::publish(
        V311,
        "m/d1/c/ch1/big",
        1,
        1,
        &vec![b'b'; 100_000],
        &[],
    ))
    .await;
    ok.expect_kind(raw::PUBACK).await;
    assert_eq!(
        limit_hits(&scrape(&adapter).await, "connect_size"),
        1.0,
        "counted"
    );
    adapter.shutdown().await;
}

/// Over WebSocket the library buffers a whole message before the session sees it: a 1 MB
/// WebSocket frame trickled before CONNECT used to be held until complete. The raw stream is now
/// bounded until the device is authenticated.
#[tokio::test]
async fn a_websocket_message_beyond_the_connect_bound_is_cut_off() {
    let adapter = Adapter::start_with(
        CLIENTS,
        &[
            ("SMQ_MQTT_ADAPTER_MAX_CONNECT_SIZE", "4096"),
            ("SMQ_MQTT_ADAPTER_CONNECT_TIMEOUT", "120"),
            ("SMQ_MQTT_ADAPTER_HANDSHAKE_TIMEOUT", "120"),
        ],
    )
    .await;
    let mut stream = TcpStream::connect(("127.0.0.1", adapter.ports.ws))
        .await
        .expect("connect to the WebSocket port");
    let upgrade = "GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
                   Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                   Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n";
    stream.write_all(upgrade.as_bytes()).await.expect("upgrade");
    let mut response = Vec::new();
    while !response.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        let n = tokio::time::timeout(WAIT, stream.read(&mut byte))
            .await
            .expect("upgrade answered")
            .expect("read");
        assert_eq!(n, 1, "closed during the upgrade");
        response.push(byte[0]);
    }
    assert!(response.starts_with(b"HTTP/1.1 101"), "{response:?}");
    // A masked binary frame announcing 1,000,000 bytes, of which 256 KB are sent.
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&1_000_000u64.to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    let _ = stream.write_all(&frame).await;
    let chunk = vec![0u8; 16 * 1024];
    for _ in 0..16 {
        if stream.write_all(&chunk).await.is_err() {
            break;
        }
    }
    let mut scratch = [0u8; 64];
    let end = tokio::time::timeout(WAIT, stream.read(&mut scratch)).await;
    assert!(
        matches!(end, Ok(Ok(0)) | Ok(Err(_))),
        "the socket is still open after 256 KB before CONNECT: {end:?}"
    );
    assert_eq!(limit_hits(&scrape(&adapter).await, "connect_size"), 1.0);
    adapter.shutdown().await;
}

/// `%2F` and a subtopic's `.` are levels once decoded: five levels as sent could be routed as
/// many more. Levels are counted on the canonical form too.
#[tokio::test]
async fn levels_are_counted_after_decoding() {
    let mut adapter =
        Adapter::start_with(CLIENTS, &[("SMQ_MQTT_ADAPTER_MAX_TOPIC_LEVELS", "8")]).await;
    let mut dev =
        RawClient::connect_ok(adapter.port, &Connect::new(V5, "levels-dev", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    // Five levels as sent, nine once decoded.
    for (pkid, topic) in [
        (1, "m/d1/c/ch1/a%2Fb%2Fc%2Fd%2Fe"),
        (2, "m/d1/c/ch1/a.b.c.d.e"),
    ] {
        dev.send(&raw::publish(V5, topic, 1, pkid, b"x", &[])).await;
        assert_eq!(
            dev.expect_kind(raw::PUBACK).await.puback_reason(),
            0x90,
            "{topic}"
        );
    }
    assert_eq!(
        dev.subscribe(V5, 3, &[("m/d1/c/ch1/a%2Fb%2Fc%2Fd%2F%23", 0)])
            .await,
        [0x8F]
    );
    dev.send(&raw::publish(V5, "m/d1/c/ch1/a%2Fb%2Fc", 1, 4, b"x", &[]))
        .await;
    assert_eq!(dev.expect_kind(raw::PUBACK).await.puback_reason(), 0);
    assert_eq!(limit_hits(&scrape(&adapter).await, "topic_levels"), 3.0);
    adapter.shutdown().await;
}

/// A retained will with Message Expiry 1 s was still delivered seconds later, with the stale
/// property. Its expiry now runs from its publication.
#[tokio::test]
async fn a_will_expires_like_any_message() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let port = adapter.port;
    let mut dying = RawClient::open(port).await;
    let expiry_1s = [0x02, 0, 0, 0, 1];
    dying
        .send(&connect_with_will(
            "will-dev",
            "c1",
            "s1",
            b"m/d1/c/ch1/will/state",
            &expiry_1s,
            true,
        ))
        .await;
    assert_eq!(dying.expect_packet().await.connack_code(), 0);
    adapter.expect_connect("c1").await;
    drop(dying);
    adapter.expect_disconnect("c1").await;

    // Right after, the retained will is there.
    let mut early =
        RawClient::connect_ok(port, &Connect::new(V311, "will-early", "c2", "s2")).await;
    adapter.expect_connect("c2").await;
    assert_eq!(
        early.subscribe(V311, 1, &[("m/d1/c/ch1/will/#", 0)]).await,
        [0]
    );
    let (topic, _) = early.expect_kind(raw::PUBLISH).await.publish_v311();
    assert_eq!(topic, "m/d1/c/ch1/will/state");

    // The expiry interval is what is tested: let it pass.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let mut late = RawClient::connect_ok(port, &Connect::new(V311, "will-late", "c3", "s3")).await;
    adapter.expect_connect("c3").await;
    assert_eq!(
        late.subscribe(V311, 1, &[("m/d1/c/ch1/will/#", 0)]).await,
        [0]
    );
    let mut marker =
        RawClient::connect_ok(port, &Connect::new(V311, "will-mark", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    marker
        .send(&raw::publish(
            V311,
            "m/d1/c/ch1/will/marker",
            0,
            0,
            b"m",
            &[],
        ))
        .await;
    // Retained messages follow the SUBACK: had the will been kept, it would come first.
    let (topic, _) = late.expect_kind(raw::PUBLISH).await.publish_v311();
    assert_eq!(
        topic, "m/d1/c/ch1/will/marker",
        "the expired will was delivered"
    );
    adapter.shutdown().await;
}

/// The malformed packets the codec let through: a repeated Message Expiry, a Subscription
/// Identifier in a client PUBLISH, Subscription Identifier 0, a DISCONNECT raising the session
/// expiry from 0 (each a protocol error, DISCONNECT 0x82), and a will topic that is not UTF-8
/// (CONNACK 0x90).
#[tokio::test]
async fn malformed_properties_are_protocol_errors() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let port = adapter.port;
    let expiry = [0x02, 0, 0, 0, 9];
    let cases: [(&str, Vec<u8>); 3] = [
        (
            "twice",
            publish_with(b"m/d1/c/ch1/p", 1, 1, &[expiry, expiry].concat(), b"x"),
        ),
        (
            "sub-id",
            publish_with(b"m/d1/c/ch1/p", 1, 1, &[0x0B, 0x01], b"x"),
        ),
        ("sub-id-0", {
            let mut body = 1u16.to_be_bytes().to_vec();
            body.extend_from_slice(&[2, 0x0B, 0x00]);
            body.extend(raw::string("m/d1/c/ch1/#"));
            body.push(0);
            raw::packet(0x82, &body)
        }),
    ];
    for (name, packet) in cases {
        let mut dev =
            RawClient::connect_ok(port, &Connect::new(V5, &format!("bad-{name}"), "c1", "s1"))
                .await;
        adapter.expect_connect("c1").await;
        dev.send(&packet).await;
        expect_disconnect_reason(&mut dev, 0x82).await;
        adapter.expect_disconnect("c1").await;
    }

    // Session expiry 0 at CONNECT, 60 at DISCONNECT.
    let mut dev = RawClient::connect_ok(port, &Connect::new(V5, "bad-raise", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    dev.send(&[0xE0, 0x07, 0x00, 0x05, 0x11, 0, 0, 0, 60]).await;
    expect_disconnect_reason(&mut dev, 0x82).await;
    adapter.expect_disconnect("c1").await;

    let mut refused = RawClient::open(port).await;
    refused
        .send(&connect_with_will(
            "bad-will",
            "c1",
            "s1",
            b"m/d1/c/ch1/\xFF\xFE",
            &[],
            false,
        ))
        .await;
    assert_eq!(refused.expect_packet().await.connack_code(), 0x90);
    refused.expect_closed().await;

    // A malformed SUBSCRIBE is logged as one (the codec's text spoke of "connect").
    let mut dev = RawClient::connect_ok(port, &Connect::new(V5, "bad-sub", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    let mut body = 1u16.to_be_bytes().to_vec();
    body.extend_from_slice(&[2, 0x01, 0x00]); // Payload Format Indicator: not a SUBSCRIBE property
    body.extend(raw::string("m/d1/c/ch1/#"));
    body.push(0);
    dev.send(&raw::packet(0x82, &body)).await;
    dev.expect_closed().await;
    adapter.expect_disconnect("c1").await;
    adapter.wait_log("malformed SUBSCRIBE", WAIT).await;
    assert_next_event_is_sentinel(&mut adapter).await;
    adapter.shutdown().await;
}

/// The scheme of `Authorization: Bearer` is case-insensitive (RFC 9110): `bearer` used to get 401.
#[tokio::test]
async fn the_admin_token_scheme_is_case_insensitive() {
    let adapter = Adapter::start_with(CLIENTS, &[("SMQ_MQTT_ADAPTER_ADMIN_TOKEN", "tok")]).await;
    for (scheme, expected) in [
        ("Bearer", "200"),
        ("bearer", "200"),
        ("BEARER", "200"),
        ("Basic", "401"),
    ] {
        let out = tokio::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-H"])
            .arg(format!("Authorization: {scheme} tok"))
            .arg(format!("http://127.0.0.1:{}/clients", adapter.ports.http))
            .output()
            .await
            .expect("run curl");
        assert_eq!(String::from_utf8_lossy(&out.stdout), expected, "{scheme}");
    }
    adapter.shutdown().await;
}

/// Peak resident memory of a process (VmHWM), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kb * 1024
}

/// Every admin call used to copy every session and subscription, whatever the page: a 26-byte
/// answer (`limit=0`) with 150 × 1,000 subscriptions cost 193 MB at its peak. Only the page is
/// copied now.
#[tokio::test]
async fn an_admin_page_copies_only_the_page() {
    const SESSIONS: usize = 100;
    let adapter = Adapter::start_with(CLIENTS, &[("SMQ_MQTT_ADAPTER_ADMIN_TOKEN", "tok")]).await;
    let mut held = Vec::with_capacity(SESSIONS);
    for s in 0..SESSIONS {
        let id = format!("many-{s:03}");
        // No keep-alive: setting up 100,000 subscriptions may take longer than one.
        let mut connect = Connect::new(V311, &id, "c1", "s1");
        connect.keep_alive = 0;
        let mut dev = RawClient::connect_ok(adapter.port, &connect).await;
        for batch in 0..10u16 {
            let filters: Vec<String> = (0..100)
                .map(|f| format!("m/d1/c/ch1/{}/{batch}/{f}", "x".repeat(900)))
                .collect();
            let filters: Vec<(&str, u8)> = filters.iter().map(|f| (f.as_str(), 0)).collect();
            let codes = dev.subscribe(V311, batch + 1, &filters).await;
            assert!(codes.iter().all(|&c| c == 0), "{codes:?}");
        }
        held.push(dev);
    }
    let before = peak_rss(adapter.pid());
    let url = format!("http://127.0.0.1:{}/clients?limit=0", adapter.ports.http);
    let calls: Vec<_> = (0..8)
        .map(|_| {
            tokio::process::Command::new("curl")
                .args(["-s", "-H", "Authorization: Bearer tok"])
                .arg(&url)
                .output()
        })
        .collect();
    for call in futures_util::future::join_all(calls).await {
        let out = call.expect("run curl");
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(body.contains(&format!("\"total\":{SESSIONS}")), "{body}");
    }
    let grown = peak_rss(adapter.pid()).saturating_sub(before);
    // Copying all 100,000 subscriptions (about 920 bytes each) cost over 90 MB per call.
    assert!(grown < 50 << 20, "peak RSS grew by {} MB", grown >> 20);
    drop(held);
    adapter.shutdown().await;
}

/// A retained PUBLISH (retain flag set) with an MQTT 5 PUBACK/PUBREC reason back.
async fn publish_retained(client: &mut RawClient, topic: &str, pkid: u16, payload: &[u8]) -> u8 {
    let mut packet = raw::publish(V5, topic, 1, pkid, payload, &[]);
    packet[0] |= 0x01;
    client.send(&packet).await;
    client.expect_kind(raw::PUBACK).await.puback_reason()
}

/// The retained store was bounded by count only, one bound for all tenants: 200 × 1 MB retained
/// kept 200 MB, and once one tenant filled the count every other tenant's retained PUBLISH was
/// refused. It has a byte bound now, and each client id at most its share of both.
#[tokio::test]
async fn the_retained_store_is_bounded_in_bytes_and_shared_between_clients() {
    let mut adapter = Adapter::start_with(
        CLIENTS,
        &[
            ("SMQ_MQTT_ADAPTER_MAX_RETAINED", "8"),
            ("SMQ_MQTT_ADAPTER_MAX_RETAINED_BYTES", "1048576"),
            ("SMQ_MQTT_ADAPTER_RETAINED_CLIENT_SHARE", "50"),
        ],
    )
    .await;
    let port = adapter.port;
    let mut greedy = RawClient::connect_ok(port, &Connect::new(V5, "rs-greedy", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    for n in 1..=4u16 {
        let topic = format!("m/d1/c/ch1/r/{n}");
        assert_eq!(publish_retained(&mut greedy, &topic, n, b"v").await, 0);
    }
    // Its share of 8 topics is 4: the fifth is refused, and replacing one of its own is fine.
    assert_eq!(
        publish_retained(&mut greedy, "m/d1/c/ch1/r/5", 5, b"v").await,
        0x97
    );
    assert_eq!(
        publish_retained(&mut greedy, "m/d1/c/ch1/r/1", 6, b"w").await,
        0
    );
    // Another tenant is not starved.
    let mut other = RawClient::connect_ok(port, &Connect::new(V5, "rs-other", "c2", "s2")).await;
    adapter.expect_connect("c2").await;
    assert_eq!(
        publish_retained(&mut other, "m/d1/c/ch1/r/6", 1, b"v").await,
        0
    );
    // Bytes: 300 KB fits c3's share of 512 KiB, a second 300 KB does not.
    let mut big = RawClient::connect_ok(port, &Connect::new(V5, "rs-big", "c3", "s3")).await;
    adapter.expect_connect("c3").await;
    let payload = vec![b'b'; 300_000];
    assert_eq!(
        publish_retained(&mut big, "m/d1/c/ch1/big/1", 1, &payload).await,
        0
    );
    assert_eq!(
        publish_retained(&mut big, "m/d1/c/ch1/big/2", 2, &payload).await,
        0x97
    );

    let metrics = scrape(&adapter).await;
    assert_eq!(
        metric(&metrics, "mqtt_adapter_retained_messages"),
        Some(6.0),
        "{metrics}"
    );
    let bytes = metric(&metrics, "mqtt_adapter_retained_bytes").expect("retained bytes gauge");
    assert!((300_000.0..1_048_576.0).contains(&bytes), "{bytes}");
    assert_eq!(limit_hits(&metrics, "retained"), 2.0);
    adapter.shutdown().await;
}

/// Offline persistent sessions, their subscriptions and what is queued for them were invisible
/// on /metrics. The core's state is reported now.
#[tokio::test]
async fn sessions_subscriptions_and_queued_bytes_are_on_metrics() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let port = adapter.port;
    let mut persistent = Connect::new(V5, "gauge-offline", "c2", "s2");
    persistent.clean = false;
    persistent.properties = raw::session_expiry(600);
    let mut away = RawClient::connect_ok(port, &persistent).await;
    adapter.expect_connect("c2").await;
    assert_eq!(
        away.subscribe(V5, 1, &[("m/d1/c/ch1/a/#", 1), ("m/d1/c/ch1/b/#", 1)])
            .await,
        [1, 1]
    );
    away.send(&raw::disconnect(V5)).await;
    adapter.expect_disconnect("c2").await;
    let mut here = RawClient::connect_ok(port, &Connect::new(V5, "gauge-online", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    here.send(&raw::publish(
        V5,
        "m/d1/c/ch1/a/x",
        1,
        1,
        &[b'q'; 1000],
        &[],
    ))
    .await;
    assert_eq!(here.expect_kind(raw::PUBACK).await.puback_reason(), 0);

    let metrics = scrape(&adapter).await;
    for (series, value) in [
        ("mqtt_adapter_sessions{state=\"online\"}", 1.0),
        ("mqtt_adapter_sessions{state=\"offline\"}", 1.0),
        ("mqtt_adapter_subscriptions", 2.0),
    ] {
        assert_eq!(metric(&metrics, series), Some(value), "{series}\n{metrics}");
    }
    let queued = metric(&metrics, "mqtt_adapter_queued_bytes").expect("queued bytes gauge");
    assert!(queued >= 1000.0, "{queued}");
    adapter.shutdown().await;
}

/// The HTTP port had no header timeout and no connection cap: 2,000 half-sent requests were
/// held for over a minute. Beyond the cap a socket is closed at accept (counted), a request
/// whose headers do not arrive in time is closed, and /health is served again.
#[tokio::test]
async fn the_http_port_caps_connections_and_times_out_half_sent_requests() {
    let adapter = Adapter::start_with(
        CLIENTS,
        &[
            ("SMQ_MQTT_ADAPTER_HTTP_MAX_CONNECTIONS", "8"),
            // Long enough that the held requests are still held when the ninth arrives.
            ("SMQ_MQTT_ADAPTER_HTTP_HEADER_TIMEOUT", "15s"),
        ],
    )
    .await;
    let half = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n";
    let mut held = Vec::new();
    for _ in 0..8 {
        let mut socket = TcpStream::connect(("127.0.0.1", adapter.ports.http))
            .await
            .expect("connect to the HTTP port");
        socket.write_all(half).await.expect("half a request");
        held.push(socket);
    }
    // The ninth is closed at once: the cap is reached.
    let mut ninth = TcpStream::connect(("127.0.0.1", adapter.ports.http))
        .await
        .expect("connect to the HTTP port");
    let _ = ninth.write_all(half).await;
    let mut scratch = [0u8; 256];
    let end = tokio::time::timeout(WAIT, ninth.read(&mut scratch)).await;
    assert!(
        matches!(end, Ok(Ok(0)) | Ok(Err(_))),
        "a connection beyond the cap was kept: {end:?}"
    );
    // The half-sent requests are closed by the header timeout (answered 408 or just closed).
    for socket in &mut held {
        let mut answer = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(60), socket.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "a half-sent request was held for 60 s");
        assert!(!answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    }
    let (status, metrics) = http_get(adapter.ports.http, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(limit_hits(&metrics, "http_connections"), 1.0, "{metrics}");
    let (status, _) = http_get(adapter.ports.http, "/health").await;
    assert_eq!(status, 200);
    adapter.shutdown().await;
}

/// `count` TCP connections to `port` on 127.0.0.1 that send nothing.
async fn connect_many(port: u16, count: usize) -> Vec<TcpStream> {
    let mut sockets = Vec::with_capacity(count);
    for _ in 0..count {
        sockets.push(
            TcpStream::connect(("127.0.0.1", port))
                .await
                .expect("connect"),
        );
    }
    sockets
}

/// Waits (bounded, generously) until the adapter has closed at least `count` of `sockets` (end
/// of stream or reset); returns how many it had closed by then.
async fn wait_closed(sockets: &[TcpStream], count: usize) -> usize {
    let mut ends: futures_util::stream::FuturesUnordered<_> = sockets
        .iter()
        .map(|socket| async move {
            let mut byte = [0u8; 1];
            loop {
                if socket.readable().await.is_err() {
                    return;
                }
                match socket.try_read(&mut byte) {
                    Ok(0) => return,
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        })
        .collect();
    let mut closed = 0;
    let reached = tokio::time::timeout(Duration::from_secs(30), async {
        while closed < count && futures_util::StreamExt::next(&mut ends).await.is_some() {
            closed += 1;
        }
    })
    .await;
    assert!(
        reached.is_ok(),
        "only {closed} of {} sockets were closed at accept (expected at least {count})",
        sockets.len()
    );
    closed
}

/// Polls `/health` until it answers 200 (bounded): HTTP sockets the test dropped are freed by
/// the adapter as it reads their end.
async fn wait_health(port: u16) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match common::ops::try_http_get(port, "/health").await {
            Ok((200, _)) => return,
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "/health did not answer 200 within {WAIT:?}: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The HTTP port's connection cap sat outside the descriptor reserve: under a low open file
/// limit, HTTP sockets took the last descriptors (MQTT connects were then closed without
/// CONNACK, and `/health` timed out). HTTP and device sockets are now counted in one account:
/// an HTTP flood is held to its share of the reserve (whatever the configured cap) and devices
/// are still served; a device flood is held to its room and `/health` still answers; the
/// adapter never reaches the limit.
#[tokio::test]
async fn http_and_device_sockets_share_one_descriptor_account() {
    const FILE_LIMIT: usize = 128;
    const FLOOD: usize = 200;
    let mut adapter = Adapter::start_with(
        CLIENTS,
        &[
            // Far above what the limit leaves: the descriptor reserve bounds it.
            ("SMQ_MQTT_ADAPTER_HTTP_MAX_CONNECTIONS", "1000"),
            // The flood sends nothing: its sockets are held until closed at accept.
            ("SMQ_MQTT_ADAPTER_HTTP_HEADER_TIMEOUT", "5m"),
            ("SMQ_MQTT_ADAPTER_CONNECT_TIMEOUT", "5m"),
            ("SMQ_MQTT_ADAPTER_CONNECT_RATE_PER_IP", "0"),
        ],
    )
    .await;
    let pid = adapter.pid();
    lower_file_limit(pid, FILE_LIMIT as u64);

    // An HTTP flood: at most a quarter of the limit is held, the rest closed at accept.
    let http = connect_many(adapter.ports.http, FLOOD).await;
    let closed = wait_closed(&http, FLOOD - FILE_LIMIT / 4).await;
    let mut device =
        RawClient::connect_ok(adapter.port, &Connect::new(V311, "fd-device", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    assert!(open_fds(pid) < FILE_LIMIT, "{} descriptors", open_fds(pid));

    // A device flood beside it: devices stop at the limit less the reserve (half, here).
    let devices = connect_many(adapter.port, FLOOD).await;
    let closed = closed + wait_closed(&devices, FLOOD - FILE_LIMIT / 2).await;
    assert!(open_fds(pid) < FILE_LIMIT, "{} descriptors", open_fds(pid));
    device.ping().await;

    // With the HTTP flood gone and the device flood still held, /health answers.
    drop(http);
    wait_health(adapter.ports.http).await;
    let metrics = scrape(&adapter).await;
    assert!(
        limit_hits(&metrics, "file_descriptors") >= closed as f64,
        "{metrics}"
    );
    assert_eq!(limit_hits(&metrics, "http_connections"), 0.0, "{metrics}");
    drop(devices);
    adapter.shutdown().await;
}

/// A keep-alive HTTP connection idle after its answer lived until hyper's header timeout (one
/// value for the first request's headers and for the wait for the next) or the 60 s age limit.
/// It is closed once idle for SMQ_MQTT_ADAPTER_HTTP_IDLE_TIMEOUT, whatever the header timeout.
#[tokio::test]
async fn an_idle_keep_alive_http_connection_is_closed() {
    let adapter = Adapter::start_with(
        CLIENTS,
        &[
            ("SMQ_MQTT_ADAPTER_HTTP_IDLE_TIMEOUT", "1s"),
            // Beyond the wait below and the age limit: only the idle timeout can close it.
            ("SMQ_MQTT_ADAPTER_HTTP_HEADER_TIMEOUT", "5m"),
        ],
    )
    .await;
    let mut socket = TcpStream::connect(("127.0.0.1", adapter.ports.http))
        .await
        .expect("connect to the HTTP port");
    socket
        .write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .expect("request");
    // The whole answer: headers, then the body by its Content-Length.
    let mut answer = Vec::new();
    let mut chunk = [0u8; 1024];
    let complete = |answer: &[u8]| {
        let text = String::from_utf8_lossy(answer);
        let Some((head, body)) = text.split_once("\r\n\r\n") else {
            return false;
        };
        let length = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().to_string())
            })
            .and_then(|v| v.parse::<usize>().ok())
            .expect("Content-Length");
        body.len() >= length
    };
    while !complete(&answer) {
        let n = tokio::time::timeout(WAIT, socket.read(&mut chunk))
            .await
            .expect("the answer")
            .expect("read");
        assert!(n > 0, "closed before the answer: {answer:?}");
        answer.extend_from_slice(&chunk[..n]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 200"), "{answer:?}");
    // Kept alive, then idle: the adapter closes it.
    let end = tokio::time::timeout(Duration::from_secs(30), socket.read(&mut chunk)).await;
    assert!(
        matches!(end, Ok(Ok(0)) | Ok(Err(_))),
        "an idle keep-alive connection was kept: {end:?}"
    );
    adapter.shutdown().await;
}

/// Offline persistent sessions were unlimited: one client id could keep any number (100 × 1,000
/// filters: +120 MB, never expiring). Beyond SMQ_MQTT_ADAPTER_MAX_OFFLINE_SESSIONS the client's
/// oldest offline session is discarded, counted.
#[tokio::test]
async fn one_client_id_keeps_a_bounded_number_of_offline_sessions() {
    let mut adapter =
        Adapter::start_with(CLIENTS, &[("SMQ_MQTT_ADAPTER_MAX_OFFLINE_SESSIONS", "3")]).await;
    let port = adapter.port;
    let persistent = |id: &'static str| {
        let mut connect = Connect::new(V5, id, "c2", "s2");
        connect.clean = false;
        connect.properties = raw::session_expiry(600);
        connect
    };
    for id in ["off-1", "off-2", "off-3", "off-4", "off-5"] {
        let mut dev = RawClient::connect_ok(port, &persistent(id)).await;
        adapter.expect_connect("c2").await;
        assert_eq!(dev.subscribe(V5, 1, &[("m/d1/c/ch1/#", 1)]).await, [1]);
        dev.send(&raw::disconnect(V5)).await;
        adapter.expect_disconnect("c2").await;
    }
    let metrics = scrape(&adapter).await;
    assert_eq!(
        metric(&metrics, "mqtt_adapter_sessions{state=\"offline\"}"),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(limit_hits(&metrics, "offline_sessions"), 2.0);
    // The two oldest are gone (no session present), the newest is kept.
    for (id, present) in [("off-1", 0), ("off-5", 1)] {
        let mut dev = RawClient::open(port).await;
        dev.send(&persistent(id).encode()).await;
        let connack = dev.expect_packet().await;
        assert_eq!(connack.connack_code(), 0);
        assert_eq!(connack.body[0] & 1, present, "session present for {id}");
        adapter.expect_connect("c2").await;
        dev.send(&raw::disconnect(V5)).await;
        adapter.expect_disconnect("c2").await;
    }
    adapter.shutdown().await;
}
