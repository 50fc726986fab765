//! Hostile input (issue #14): sockets that trickle their CONNECT (slowloris), credential brute
//! force from one IP, per-session limits (subscriptions, topic size, retained topics) and a flood
//! of connections beyond the connection limit. Each must cost only the offender: a well-behaved
//! device on the side keeps being served, and each defence is counted in `/metrics`.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::raw::{self, Connect};
use common::*;
use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

async fn scrape(adapter: &Adapter) -> String {
    let (status, body) = http_get(adapter.ports.http, "/metrics").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The process's soft limit of open files (the adapter inherits it).
fn open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    let rc = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    assert_eq!(rc, 0, "getrlimit(RLIMIT_NOFILE)");
    limit.rlim_cur
}

/// How one trickling socket ended.
#[derive(Debug, PartialEq, Eq)]
enum Trickle {
    /// The adapter closed it after this many bytes, before the request was complete.
    ClosedAfter(usize),
    /// The whole request went out and the adapter answered or kept the socket open.
    Completed,
    /// The adapter sent bytes back before the request was complete.
    Answered,
}

/// Sends `request` one byte per `pace`, stopping when the adapter closes the socket. `opened` is
/// told once the first byte is out.
async fn trickle(
    mut stream: TcpStream,
    request: Vec<u8>,
    pace: Duration,
    opened: mpsc::Sender<()>,
) -> Trickle {
    let mut reply = [0u8; 64];
    for (sent, byte) in request.iter().enumerate() {
        if stream.write_all(&[*byte]).await.is_err() {
            return Trickle::ClosedAfter(sent);
        }
        if sent == 0 {
            let _ = opened.send(()).await;
        }
        tokio::select! {
            read = stream.read(&mut reply) => return match read {
                Ok(0) | Err(_) => Trickle::ClosedAfter(sent + 1),
                Ok(_) => Trickle::Answered,
            },
            _ = tokio::time::sleep(pace) => {}
        }
    }
    Trickle::Completed
}

/// Thousands of sockets pace their CONNECT one byte a second: the whole CONNECT would take three
/// times the connect timeout, each byte comes well within it. A deadline per read would keep them
/// all open until their CONNECT completes; one deadline for the CONNECT closes every one first.
#[tokio::test]
async fn slowloris_sockets_are_closed_at_the_connect_deadline_while_a_device_is_served() {
    const TIMEOUT_SECS: u64 = 10;
    let pace = Duration::from_secs(1);
    // Both processes hold one descriptor per socket: stay well inside the limit, raise nothing.
    let sockets = 5000.min(open_file_limit().saturating_sub(500) as usize);
    assert!(sockets >= 500, "open file limit too low for this test");
    let mut adapter = Adapter::start_with(
        CLIENTS,
        &[
            (
                "SMQ_MQTT_ADAPTER_CONNECT_TIMEOUT",
                &TIMEOUT_SECS.to_string(),
            ),
            ("SMQ_MQTT_ADAPTER_CONNECT_RATE_PER_IP", "0"),
        ],
    )
    .await;
    let connect = Connect::new(V311, "slowloris-device", "c1", "s1").encode();
    assert!(
        connect.len() as u64 >= 3 * TIMEOUT_SECS,
        "CONNECT too short"
    );

    let (opened_tx, mut opened_rx) = mpsc::channel(sockets);
    let mut tasks = Vec::with_capacity(sockets);
    for _ in 0..sockets {
        let stream = TcpStream::connect(("127.0.0.1", adapter.port))
            .await
            .expect("TCP connect to adapter");
        tasks.push(tokio::spawn(trickle(
            stream,
            connect.clone(),
            pace,
            opened_tx.clone(),
        )));
    }
    drop(opened_tx);
    for _ in 0..sockets {
        tokio::time::timeout(Duration::from_secs(60), opened_rx.recv())
            .await
            .expect("every trickling socket sent its first byte")
            .expect("a trickling task ended before its first byte");
    }
    let during = scrape(&adapter).await;

    // Meanwhile a normal device connects and round-trips.
    assert_round_trip(&mut adapter, "during-slowloris").await;

    let mut closed = 0;
    for task in tasks {
        let end = tokio::time::timeout(Duration::from_secs(120), task)
            .await
            .expect("a trickling socket was never closed")
            .expect("trickle task");
        match end {
            Trickle::ClosedAfter(sent) if sent < connect.len() => closed += 1,
            other => panic!("a trickled CONNECT was not cut off at the deadline: {other:?}"),
        }
    }
    assert_eq!(closed, sockets);
    let open_then = metric(
        &during,
        "mqtt_adapter_listener_connections{listener=\"tcp\"}",
    )
    .expect("listener gauge");
    assert!(
        open_then >= (sockets / 2) as f64,
        "the round trip ran while {open_then} of {sockets} trickling sockets were open"
    );
    let log = adapter.stderr();
    assert!(
        log.contains("no CONNECT within the connect timeout"),
        "{}",
        adapter.stderr_tail()
    );
    let rest = adapter.shutdown().await;
    assert!(rest.is_empty(), "events from trickling sockets: {rest:?}");
}

/// The WebSocket upgrade counts against the connect timeout: an upgrade request trickled for
/// longer than the connect timeout (but well within the handshake timeout) is cut off before it
/// is complete.
#[tokio::test]
async fn a_trickled_websocket_upgrade_counts_against_the_connect_timeout() {
    let mut adapter = Adapter::start_with(
        CLIENTS,
        &[
            ("SMQ_MQTT_ADAPTER_CONNECT_TIMEOUT", "2"),
            ("SMQ_MQTT_ADAPTER_HANDSHAKE_TIMEOUT", "120"),
        ],
    )
    .await;
    let upgrade = "GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
                   Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                   Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n";
    // At 100 ms a byte the upgrade alone takes over 15 s: far past 2 s, far within 120 s.
    let stream = TcpStream::connect(("127.0.0.1", adapter.ports.ws))
        .await
        .expect("connect to the WebSocket port");
    let (tx, _rx) = mpsc::channel(1);
    let end = tokio::time::timeout(
        Duration::from_secs(60),
        trickle(
            stream,
            upgrade.as_bytes().to_vec(),
            Duration::from_millis(100),
            tx,
        ),
    )
    .await
    .expect("the trickled upgrade was never cut off");
    assert!(
        matches!(end, Trickle::ClosedAfter(sent) if sent < upgrade.len()),
        "the trickled upgrade was not cut off at the connect deadline: {end:?}"
    );
    let metrics = scrape(&adapter).await;
    assert_eq!(
        metric(
            &metrics,
            "mqtt_adapter_handshake_errors_total{listener=\"ws\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    assert_round_trip(&mut adapter, "after-ws-trickle").await;
    adapter.shutdown().await;
}

const ATTACKER: [u8; 4] = [127, 0, 0, 2];
const DEVICE: [u8; 4] = [127, 0, 0, 3];

async fn open_from(port: u16, source: [u8; 4]) -> RawClient {
    RawClient::open_from(port, source.into())
        .await
        .unwrap_or_else(|e| panic!("connect from {source:?}: {e}"))
}

/// Five wrong passwords from 127.0.0.2 ban it: its next socket is closed before any CONNACK, even
/// with the right password, while a device on 127.0.0.3 keeps its session and connects anew. The
/// ban is logged once, counted, and over after SMQ_MQTT_ADAPTER_AUTH_BAN.
#[tokio::test]
async fn failed_connects_ban_the_ip_and_spare_devices_on_other_ips() {
    let mut adapter = Adapter::start_with(
        CLIENTS,
        &[
            ("SMQ_MQTT_ADAPTER_AUTH_FAILURES_PER_IP", "5"),
            ("SMQ_MQTT_ADAPTER_AUTH_BAN", "2s"),
        ],
    )
    .await;
    let port = adapter.port;
    let mut held = open_from(port, DEVICE).await;
    assert_eq!(
        held.handshake(&Connect::new(V311, "bf-held", "c2", "s2"))
            .await,
        Ok(0)
    );
    adapter.expect_connect("c2").await;
    assert_eq!(held.subscribe(V311, 1, &[("m/d1/c/ch1/bf", 0)]).await, [0]);

    for i in 0..5 {
        let mut guess = open_from(port, ATTACKER).await;
        let id = format!("bf-guess-{i}");
        let code = guess
            .handshake(&Connect::new(V311, &id, "c1", "wrong"))
            .await;
        assert_eq!(code, Ok(0x05), "wrong password number {i}");
    }
    // Banned: closed at accept, the right password does not help.
    for version in [V311, V5] {
        let mut banned = open_from(port, ATTACKER).await;
        let answer = banned
            .handshake(&Connect::new(version, "bf-right", "c1", "s1"))
            .await;
        assert_eq!(
            answer,
            Err(raw::ReadEnd::Closed),
            "banned IP, MQTT {version}"
        );
    }

    // Another IP: the held session is served, and a new device connects and publishes to it.
    let mut device = open_from(port, DEVICE).await;
    assert_eq!(
        device
            .handshake(&Connect::new(V5, "bf-device", "c3", "s3"))
            .await,
        Ok(0)
    );
    adapter.expect_connect("c3").await;
    device
        .send(&raw::publish(
            V5,
            "m/d1/c/ch1/bf",
            0,
            0,
            b"still-served",
            &[],
        ))
        .await;
    let got = held.expect_kind(raw::PUBLISH).await;
    assert_eq!(
        got.publish_v311(),
        ("m/d1/c/ch1/bf".into(), b"still-served".to_vec())
    );

    let metrics = scrape(&adapter).await;
    assert_eq!(
        metric(
            &metrics,
            "mqtt_adapter_limit_hits_total{limit=\"auth_ban\"}"
        ),
        Some(2.0),
        "{metrics}"
    );
    assert_eq!(
        metric(
            &metrics,
            "mqtt_adapter_connects_total{result=\"bad_credentials\"}"
        ),
        Some(5.0),
        "{metrics}"
    );
    let log = adapter.stderr();
    assert_eq!(
        log.matches("IP banned").count(),
        1,
        "logged once per ban:\n{log}"
    );
    assert!(log.contains("127.0.0.2"), "the ban names the IP:\n{log}");

    // The ban ends: the right password from 127.0.0.2 is accepted again (retried until then).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut again = open_from(port, ATTACKER).await;
        match again
            .handshake(&Connect::new(V311, "bf-after", "c1", "s1"))
            .await
        {
            Ok(0) => break,
            Err(raw::ReadEnd::Closed) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            other => panic!("after the ban: {other:?}"),
        }
    }
    adapter.expect_connect("c1").await;
    adapter.shutdown().await;
}

/// SMQ_MQTT_ADAPTER_AUTH_FAILURES_PER_IP=0: no failure count bans anyone.
#[tokio::test]
async fn zero_failures_per_ip_disables_the_ban() {
    let mut adapter =
        Adapter::start_with(CLIENTS, &[("SMQ_MQTT_ADAPTER_AUTH_FAILURES_PER_IP", "0")]).await;
    for i in 0..30 {
        let mut guess = open_from(adapter.port, ATTACKER).await;
        let id = format!("nb-{i}");
        let code = guess.handshake(&Connect::new(V5, &id, "c1", "wrong")).await;
        assert_eq!(code, Ok(0x86), "wrong password number {i}");
    }
    let mut right = open_from(adapter.port, ATTACKER).await;
    assert_eq!(
        right
            .handshake(&Connect::new(V311, "nb-ok", "c1", "s1"))
            .await,
        Ok(0)
    );
    adapter.expect_connect("c1").await;
    let metrics = scrape(&adapter).await;
    assert_eq!(
        metric(
            &metrics,
            "mqtt_adapter_limit_hits_total{limit=\"auth_ban\"}"
        ),
        None,
        "{metrics}"
    );
    adapter.shutdown().await;
}

/// Subscriptions per session: the one beyond the limit gets 0x97 (5) / 0x80 (3.1.1), replacing
/// an existing one is fine, and a freed one can be used again.
#[tokio::test]
async fn subscriptions_beyond_the_session_limit_are_refused() {
    let mut adapter =
        Adapter::start_with(CLIENTS, &[("SMQ_MQTT_ADAPTER_MAX_SUBSCRIPTIONS", "3")]).await;
    let port = adapter.port;
    let filters = [
        ("m/d1/c/ch1/a", 1),
        ("m/d1/c/ch1/b", 1),
        ("m/d1/c/ch1/c", 1),
        ("m/d1/c/ch1/d", 1),
    ];
    let mut v5 = RawClient::connect_ok(port, &Connect::new(V5, "subs-5", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    assert_eq!(v5.subscribe(V5, 1, &filters).await, [1, 1, 1, 0x97]);
    assert_eq!(v5.subscribe(V5, 2, &[("m/d1/c/ch1/a", 0)]).await, [0]);
    v5.send(&raw::unsubscribe(V5, 3, &["m/d1/c/ch1/b"])).await;
    v5.expect_kind(raw::UNSUBACK).await;
    assert_eq!(v5.subscribe(V5, 4, &[("m/d1/c/ch1/d", 1)]).await, [1]);

    let mut v311 = RawClient::connect_ok(port, &Connect::new(V311, "subs-4", "c2", "s2")).await;
    adapter.expect_connect("c2").await;
    assert_eq!(v311.subscribe(V311, 1, &filters).await, [1, 1, 1, 0x80]);
    v311.ping().await;

    // The subscriptions granted work.
    v5.send(&raw::publish(V5, "m/d1/c/ch1/c", 0, 0, b"sub-ok", &[]))
        .await;
    let got = v311.expect_kind(raw::PUBLISH).await;
    assert_eq!(
        got.publish_v311(),
        ("m/d1/c/ch1/c".into(), b"sub-ok".to_vec())
    );

    let metrics = scrape(&adapter).await;
    assert_eq!(
        metric(
            &metrics,
            "mqtt_adapter_limit_hits_total{limit=\"subscriptions\"}"
        ),
        Some(2.0),
        "{metrics}"
    );
    adapter.shutdown().await;
}

/// Topics longer or deeper than the bounds are refused as malformed topics: MQTT 5 PUBACK 0x90 /
/// SUBACK 0x8F, 3.1.1 closed / SUBACK 0x80; nothing reaches a subscriber. A will topic beyond
/// them refuses the CONNECT.
#[tokio::test]
async fn topics_beyond_the_length_and_level_bounds_are_malformed() {
    let mut adapter = Adapter::start_with(
        CLIENTS,
        &[
            ("SMQ_MQTT_ADAPTER_MAX_TOPIC_LENGTH", "64"),
            ("SMQ_MQTT_ADAPTER_MAX_TOPIC_LEVELS", "8"),
        ],
    )
    .await;
    let port = adapter.port;
    let mut sub = RawClient::connect_ok(port, &Connect::new(V311, "tb-sub", "c2", "s2")).await;
    adapter.expect_connect("c2").await;
    assert_eq!(sub.subscribe(V311, 1, &[("m/d1/c/ch1/#", 0)]).await, [0]);

    let deep = "m/d1/c/ch1/a/b/c/d/e"; // 9 levels
    let long = format!("m/d1/c/ch1/{}", "x".repeat(60)); // 71 bytes
    let fits = "m/d1/c/ch1/a/b/c/d"; // 8 levels, 18 bytes
    let mut v5 = RawClient::connect_ok(port, &Connect::new(V5, "tb-5", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    v5.send(&raw::publish(V5, deep, 1, 1, b"deep", &[])).await;
    assert_eq!(v5.expect_kind(raw::PUBACK).await.puback_reason(), 0x90);
    v5.send(&raw::publish(V5, &long, 1, 2, b"long", &[])).await;
    assert_eq!(v5.expect_kind(raw::PUBACK).await.puback_reason(), 0x90);
    let deep_filter = "m/d1/c/ch1/+/+/+/+/#";
    assert_eq!(
        v5.subscribe(V5, 3, &[(deep_filter, 0), (fits, 0)]).await,
        [0x8F, 0]
    );
    v5.send(&raw::publish(V5, fits, 1, 4, b"fits", &[])).await;
    assert_eq!(v5.expect_kind(raw::PUBACK).await.puback_reason(), 0);
    // The first PUBLISH the subscriber sees is the one that fits.
    let got = sub.expect_kind(raw::PUBLISH).await;
    assert_eq!(got.publish_v311(), (fits.into(), b"fits".to_vec()));

    let mut v311 = RawClient::connect_ok(port, &Connect::new(V311, "tb-4", "c3", "s3")).await;
    adapter.expect_connect("c3").await;
    assert_eq!(v311.subscribe(V311, 1, &[(deep_filter, 0)]).await, [0x80]);
    v311.send(&raw::publish(V311, &long, 0, 0, b"long", &[]))
        .await;
    v311.expect_closed().await;
    adapter.expect_disconnect("c3").await;

    // A will beyond the bounds refuses the CONNECT: 0x90 Topic Name invalid on 5, 0x05 on 3.1.1.
    for (version, topic, code) in [(V5, deep, 0x90), (V311, long.as_str(), 0x05)] {
        let mut connect = Connect::new(version, "tb-will", "c3", "s3");
        connect.will = Some(raw::Will {
            topic,
            payload: b"gone",
            qos: 0,
            retain: false,
        });
        let (mut refused, got) = RawClient::connect(port, &connect).await;
        assert_eq!(
            got, code,
            "CONNACK for a will on {topic:?}, version {version}"
        );
        refused.expect_closed().await;
    }

    let metrics = scrape(&adapter).await;
    for (limit, hits) in [("topic_levels", 4.0), ("topic_length", 3.0)] {
        let series = format!("mqtt_adapter_limit_hits_total{{limit=\"{limit}\"}}");
        assert_eq!(metric(&metrics, &series), Some(hits), "{series}\n{metrics}");
    }
    sub.ping().await;
    adapter.shutdown().await;
}

/// A full retained store keeps what it has: a retained PUBLISH on a new topic is refused with
/// 0x97 on MQTT 5 (PUBACK and PUBREC; not delivered), delivered but not retained on 3.1.1, and
/// counted; replacing a retained topic still works and the oldest is still there.
#[tokio::test]
async fn a_full_retained_store_refuses_new_topics_and_evicts_nothing() {
    // One client fills the store here: no per-client share.
    let mut adapter = Adapter::start_with(
        CLIENTS,
        &[
            ("SMQ_MQTT_ADAPTER_MAX_RETAINED", "2"),
            ("SMQ_MQTT_ADAPTER_RETAINED_CLIENT_SHARE", "100"),
        ],
    )
    .await;
    let port = adapter.port;
    let mut live = RawClient::connect_ok(port, &Connect::new(V311, "rt-live", "c2", "s2")).await;
    adapter.expect_connect("c2").await;
    assert_eq!(live.subscribe(V311, 1, &[("m/d1/c/ch1/r/#", 0)]).await, [0]);

    let mut v5 = RawClient::connect_ok(port, &Connect::new(V5, "rt-5", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    let retained = |version, topic: &str, qos, pkid, payload: &[u8]| {
        let mut p = raw::publish(version, topic, qos, pkid, payload, &[]);
        p[0] |= 0x01;
        p
    };
    v5.send(&retained(V5, "m/d1/c/ch1/r/oldest", 1, 1, b"1"))
        .await;
    assert_eq!(v5.expect_kind(raw::PUBACK).await.puback_reason(), 0);
    v5.send(&retained(V5, "m/d1/c/ch1/r/second", 1, 2, b"2"))
        .await;
    assert_eq!(v5.expect_kind(raw::PUBACK).await.puback_reason(), 0);
    v5.send(&retained(V5, "m/d1/c/ch1/r/third", 1, 3, b"3"))
        .await;
    assert_eq!(v5.expect_kind(raw::PUBACK).await.puback_reason(), 0x97);
    v5.send(&retained(V5, "m/d1/c/ch1/r/fourth", 2, 4, b"4"))
        .await;
    assert_eq!(v5.expect_kind(raw::PUBREC).await.pubrec_reason(), 0x97);
    v5.send(&retained(V5, "m/d1/c/ch1/r/oldest", 1, 5, b"1b"))
        .await;
    assert_eq!(v5.expect_kind(raw::PUBACK).await.puback_reason(), 0);

    let mut v311 = RawClient::connect_ok(port, &Connect::new(V311, "rt-4", "c3", "s3")).await;
    adapter.expect_connect("c3").await;
    v311.send(&retained(V311, "m/d1/c/ch1/r/fifth", 1, 1, b"5"))
        .await;
    v311.expect_kind(raw::PUBACK).await;
    v311.send(&raw::publish(V311, "m/d1/c/ch1/r/end", 0, 0, b"end", &[]))
        .await;

    let mut seen = Vec::new();
    loop {
        let (topic, payload) = live.expect_kind(raw::PUBLISH).await.publish_v311();
        if topic.ends_with("/end") {
            break;
        }
        seen.push((topic, payload));
    }
    let want: Vec<(String, Vec<u8>)> = [
        ("oldest", "1"),
        ("second", "2"),
        ("oldest", "1b"),
        ("fifth", "5"),
    ]
    .iter()
    .map(|(t, p)| (format!("m/d1/c/ch1/r/{t}"), p.as_bytes().to_vec()))
    .collect();
    assert_eq!(
        seen, want,
        "refused MQTT 5 PUBLISHes are not delivered; 3.1.1 ones are"
    );

    // A new subscriber finds both retained topics, the oldest with its new value.
    let mut late = RawClient::connect_ok(port, &Connect::new(V311, "rt-late", "c2", "s2")).await;
    adapter.expect_connect("c2").await;
    assert_eq!(late.subscribe(V311, 1, &[("m/d1/c/ch1/r/#", 0)]).await, [0]);
    let mut found = vec![
        late.expect_kind(raw::PUBLISH).await.publish_v311(),
        late.expect_kind(raw::PUBLISH).await.publish_v311(),
    ];
    found.sort();
    assert_eq!(
        found,
        [
            ("m/d1/c/ch1/r/oldest".to_string(), b"1b".to_vec()),
            ("m/d1/c/ch1/r/second".to_string(), b"2".to_vec())
        ]
    );
    late.ping().await;

    let metrics = scrape(&adapter).await;
    assert_eq!(
        metric(
            &metrics,
            "mqtt_adapter_limit_hits_total{limit=\"retained\"}"
        ),
        Some(3.0),
        "{metrics}"
    );
    assert_eq!(
        metric(&metrics, "mqtt_adapter_retained_refused_total"),
        Some(3.0),
        "{metrics}"
    );
    adapter.shutdown().await;
}

/// How one flood attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Attempt {
    /// CONNACK with this (refusal) code.
    Refused(u8),
    /// Closed without a CONNACK (shed at accept while out of descriptors).
    Closed,
    /// No answer and no close within the wait.
    Hung,
    /// The TCP connect itself failed.
    NoConnect,
}

/// 20,000 connection attempts beyond SMQ_MQTT_ADAPTER_MAX_CONNECTIONS, 400 at a time, against an
/// adapter whose open file limit is lowered to 256: every attempt is refused (CONNACK 0x03) or
/// closed, none hangs, the descriptors stay under the limit, the held sessions keep being
/// served, and new devices are served as soon as the held ones leave.
#[tokio::test]
async fn a_connection_flood_is_refused_cleanly_and_service_resumes() {
    const ATTEMPTS: usize = 20_000;
    const IN_FLIGHT: usize = 400;
    const FILE_LIMIT: u64 = 256;
    let mut adapter = Adapter::start_with(
        CLIENTS,
        &[
            ("SMQ_MQTT_ADAPTER_MAX_CONNECTIONS", "4"),
            ("SMQ_MQTT_ADAPTER_CONNECT_RATE_PER_IP", "0"),
        ],
    )
    .await;
    let port = adapter.port;
    let pid = adapter.pid();
    lower_file_limit(pid, FILE_LIMIT);
    let mut held = Vec::new();
    for i in 0..4 {
        let id = format!("flood-held-{i}");
        held.push(RawClient::connect_ok(port, &Connect::new(V311, &id, "c1", "s1")).await);
        adapter.expect_connect("c1").await;
    }

    let stop = Arc::new(tokio::sync::Notify::new());
    let sampler = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut most = 0;
            loop {
                most = most.max(open_fds(pid));
                tokio::select! {
                    _ = stop.notified() => return most,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
            }
        }
    });
    let outcomes: Vec<Attempt> = futures_util::stream::iter(0..ATTEMPTS)
        .map(|i| async move {
            let Ok(stream) = TcpStream::connect(("127.0.0.1", port)).await else {
                return Attempt::NoConnect;
            };
            let _ = stream.set_nodelay(true);
            let mut client = RawClient::from_stream(stream);
            let id = format!("flood-{i}");
            match client.handshake(&Connect::new(V311, &id, "c2", "s2")).await {
                Ok(code) => Attempt::Refused(code),
                Err(raw::ReadEnd::Closed) => Attempt::Closed,
                Err(raw::ReadEnd::Timeout) => Attempt::Hung,
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    stop.notify_one();
    let most_fds = sampler.await.expect("fd sampler");

    let mut tally = std::collections::BTreeMap::new();
    for outcome in &outcomes {
        *tally.entry(*outcome).or_insert(0usize) += 1;
    }
    let refused = tally.get(&Attempt::Refused(0x03)).copied().unwrap_or(0);
    let closed = tally.get(&Attempt::Closed).copied().unwrap_or(0);
    assert_eq!(
        refused + closed,
        ATTEMPTS,
        "every attempt refused with 0x03 or closed: {tally:?}"
    );
    assert!(refused > 0, "{tally:?}");
    assert!(
        (most_fds as u64) < FILE_LIMIT,
        "the adapter held {most_fds} descriptors (limit {FILE_LIMIT})"
    );
    assert!(adapter.is_running(), "the adapter died in the flood");

    // The held sessions were served throughout.
    for client in &mut held {
        client.ping().await;
    }
    let metrics = scrape(&adapter).await;
    assert_eq!(
        metric(
            &metrics,
            "mqtt_adapter_limit_hits_total{limit=\"connections\"}"
        ),
        Some(refused as f64),
        "{metrics}"
    );
    let shed = metric(
        &metrics,
        "mqtt_adapter_limit_hits_total{limit=\"file_descriptors\"}",
    )
    .unwrap_or(0.0);
    assert!(
        shed as usize <= closed,
        "{shed} shed at accept, {closed} closed without CONNACK"
    );

    // They leave; new devices are served at once.
    for client in held {
        let mut client = client;
        client.send(&raw::disconnect(V311)).await;
        client.expect_closed().await;
        adapter.expect_disconnect("c1").await;
    }
    assert_round_trip(&mut adapter, "after-flood").await;
    let log = adapter.stderr();
    let out = log.matches("file descriptors running out").count();
    let back = log.matches("file descriptors available again").count();
    assert_eq!(
        out,
        back,
        "one line per episode, each ended:\n{}",
        adapter.stderr_tail()
    );
    eprintln!(
        "flood: {tally:?}, most descriptors {most_fds}, shed at accept {shed}, episodes {out}"
    );
    adapter.shutdown().await;
}

/// Regression (fuzzing, `session` target): the MQTT 5 DISCONNECT the adapter sends before
/// closing was one byte longer than its remaining length said, leaving a stray byte on the wire.
#[tokio::test]
async fn a_v5_disconnect_with_a_reason_is_a_whole_frame_and_nothing_follows() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let mut stream = TcpStream::connect(("127.0.0.1", adapter.port))
        .await
        .expect("connect");
    let mut bytes = Connect::new(V5, "dc-frame", "c1", "s1").encode();
    // PUBLISH with QoS 3: malformed, answered with DISCONNECT 0x81.
    bytes.extend_from_slice(&[0x36, 0x05, 0x00, 0x01, b't', 0x00, 0x01]);
    stream.write_all(&bytes).await.expect("write");
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut out))
        .await
        .expect("the adapter closed the socket")
        .expect("read");
    adapter.expect_connect("c1").await;
    adapter.expect_disconnect("c1").await;
    assert_eq!(out.first(), Some(&0x20), "CONNACK first: {out:?}");
    let after_connack = &out[2 + usize::from(out[1])..];
    // DISCONNECT 0x81 with its properties (a reason string); the remaining length (one byte
    // here) must cover exactly the bytes that follow it.
    assert_eq!(
        after_connack.first(),
        Some(&0xE0),
        "DISCONNECT: {after_connack:?}"
    );
    assert_eq!(
        after_connack.get(2),
        Some(&0x81),
        "reason 0x81: {after_connack:?}"
    );
    assert_eq!(
        usize::from(after_connack[1]),
        after_connack.len() - 2,
        "DISCONNECT and nothing else: {after_connack:?}"
    );
    adapter.shutdown().await;
}
