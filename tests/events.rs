//! Connection events on stdout (SPEC §4): a `connect` after every accepted CONNECT and exactly one
//! `disconnect` per session whichever way it ends, with exactly four fields and increasing occurred_at.
//!
//! Each test ends with `shutdown()`: SIGTERM, stdout read to its end, exit status 0, and every connect
//! of the run paired with exactly one later disconnect, so a duplicate or missing event fails the test.

mod common;

use common::*;

#[tokio::test]
async fn disconnect_packet_ends_the_session_once() {
    let mut adapter = Adapter::start(CLIENTS).await;

    let v311 = V4Client::connect(adapter.port, "bye-4", "c1", "s1").await;
    let connected = adapter.expect_connect("c1").await;
    v311.disconnect().await;
    let disconnected = adapter.expect_disconnect("c1").await;
    assert_session(&connected, &disconnected);

    let mut v5 = RawClient::connect_ok(adapter.port, &Connect::new(V5, "bye-5", "c2", "s2")).await;
    let connected = adapter.expect_connect("c2").await;
    v5.send(&raw::disconnect(V5)).await;
    v5.expect_closed().await;
    let disconnected = adapter.expect_disconnect("c2").await;
    assert_session(&connected, &disconnected);

    let rest = adapter.shutdown().await;
    assert!(rest.is_empty(), "events after all sessions ended: {rest:?}");
}

#[tokio::test]
async fn abrupt_socket_close_ends_the_session_once() {
    let mut adapter = Adapter::start(CLIENTS).await;
    for version in [V311, V5] {
        let device =
            RawClient::connect_ok(adapter.port, &Connect::new(version, "abrupt", "c1", "s1")).await;
        let connected = adapter.expect_connect("c1").await;
        drop(device);
        let disconnected = adapter.expect_disconnect("c1").await;
        assert_session(&connected, &disconnected);
    }
    let rest = adapter.shutdown().await;
    assert!(rest.is_empty(), "events after all sessions ended: {rest:?}");
}

#[tokio::test]
async fn keep_alive_expiry_ends_the_session_once() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let mut connect = Connect::new(V311, "silent-ka", "c1", "s1");
    connect.keep_alive = 1;
    let mut device = RawClient::connect_ok(adapter.port, &connect).await;
    let connected = adapter.expect_connect("c1").await;
    // Silence: the adapter must give up after 1.5 × keep-alive (well inside the wait).
    device.expect_closed().await;
    let disconnected = adapter.expect_disconnect("c1").await;
    assert_session(&connected, &disconnected);
    let rest = adapter.shutdown().await;
    assert!(rest.is_empty(), "events after all sessions ended: {rest:?}");
}

#[tokio::test]
async fn second_connect_on_a_session_is_a_protocol_error_ending_it_once() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let connect = Connect::new(V311, "twice", "c1", "s1");
    let mut device = RawClient::connect_ok(adapter.port, &connect).await;
    let connected = adapter.expect_connect("c1").await;
    device.send(&connect.encode()).await;
    device.expect_closed().await;
    let disconnected = adapter.expect_disconnect("c1").await;
    assert_session(&connected, &disconnected);
    let rest = adapter.shutdown().await;
    assert!(rest.is_empty(), "events after all sessions ended: {rest:?}");
}

#[tokio::test]
async fn malformed_packet_after_connect_ends_the_session_once() {
    let mut adapter = Adapter::start(CLIENTS).await;
    for version in [V311, V5] {
        let mut device =
            RawClient::connect_ok(adapter.port, &Connect::new(version, "garbled", "c2", "s2"))
                .await;
        let connected = adapter.expect_connect("c2").await;
        // Packet type 0 is reserved in both versions.
        device.send(&[0x00, 0x02, 0xDE, 0xAD]).await;
        device.expect_closed().await;
        let disconnected = adapter.expect_disconnect("c2").await;
        assert_session(&connected, &disconnected);
    }
    let rest = adapter.shutdown().await;
    assert!(rest.is_empty(), "events after all sessions ended: {rest:?}");
}

#[tokio::test]
async fn takeover_emits_old_disconnect_before_new_connect() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let mut old =
        RawClient::connect_ok(adapter.port, &Connect::new(V311, "same-device", "c1", "s1")).await;
    let old_connect = adapter.expect_connect("c1").await;

    let mut new =
        RawClient::connect_ok(adapter.port, &Connect::new(V5, "same-device", "c1", "s1")).await;
    let first = adapter.next_event().await;
    let second = adapter.next_event().await;
    assert_eq!(
        (first.event_type.as_str(), second.event_type.as_str()),
        ("disconnect", "connect"),
        "takeover order: old session's disconnect, then new session's connect; got {first:?}, {second:?}"
    );
    assert_session(&old_connect, &first);
    assert!(
        second.occurred_at >= first.occurred_at,
        "new connect occurred_at {} is before the old disconnect's {}",
        second.occurred_at,
        first.occurred_at
    );
    old.expect_closed().await;

    // The new session is the live one.
    new.ping().await;
    new.send(&raw::disconnect(V5)).await;
    new.expect_closed().await;
    let new_disconnect = adapter.expect_disconnect("c1").await;
    assert_session(&second, &new_disconnect);

    let rest = adapter.shutdown().await;
    assert!(rest.is_empty(), "events after all sessions ended: {rest:?}");
}

#[tokio::test]
async fn sigterm_disconnects_every_session_then_exits_zero() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let _v311 = V4Client::connect(adapter.port, "term-4", "c1", "s1").await;
    let c1 = adapter.expect_connect("c1").await;
    let _v5 = V5Client::connect(adapter.port, "term-5", "c2", "s2").await;
    let c2 = adapter.expect_connect("c2").await;
    let mut raw3 =
        RawClient::connect_ok(adapter.port, &Connect::new(V311, "term-raw", "c3", "s3")).await;
    let c3 = adapter.expect_connect("c3").await;

    let rest = adapter.shutdown().await;
    let mut ended: Vec<&str> = rest.iter().map(|e| e.client_id.as_str()).collect();
    ended.sort_unstable();
    assert_eq!(
        ended,
        ["c1", "c2", "c3"],
        "disconnects on SIGTERM: {rest:?}"
    );
    for (connect, disconnect) in [c1, c2, c3]
        .iter()
        .map(|c| (c, rest.iter().find(|e| e.client_id == c.client_id).unwrap()))
    {
        assert_session(connect, disconnect);
    }
    raw3.expect_closed().await;
}

#[tokio::test]
async fn many_short_sessions_pair_up() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let mut sessions = Vec::new();
    for i in 0..10 {
        let version = if i % 2 == 0 { V311 } else { V5 };
        let id = format!("burst-{i}");
        sessions.push(
            RawClient::connect_ok(adapter.port, &Connect::new(version, &id, "c1", "s1")).await,
        );
    }
    for _ in 0..10 {
        adapter.expect_connect("c1").await;
    }
    for (i, mut session) in sessions.into_iter().enumerate() {
        if i % 2 == 0 {
            drop(session);
        } else {
            session.send(&raw::disconnect(V5)).await;
        }
    }
    for _ in 0..10 {
        adapter.expect_disconnect("c1").await;
    }
    let rest = adapter.shutdown().await;
    assert!(rest.is_empty(), "events after all sessions ended: {rest:?}");
}

#[tokio::test]
async fn sigint_behaves_like_sigterm() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let mut device =
        RawClient::connect_ok(adapter.port, &Connect::new(V5, "int-dev", "c1", "s1")).await;
    let connected = adapter.expect_connect("c1").await;
    let rest = adapter.shutdown_by(libc::SIGINT).await;
    assert_eq!(rest.len(), 1, "events after SIGINT: {rest:?}");
    assert_session(&connected, &rest[0]);
    device.expect_closed().await;
}

#[tokio::test]
async fn shutdown_does_not_wait_for_sockets_that_never_sent_connect() {
    // The default 10 s connect timeout is longer than the shutdown wait: shutdown must close them itself.
    let mut adapter = Adapter::start(CLIENTS).await;
    let mut silent = RawClient::open(adapter.port).await;
    let mut half = RawClient::open(adapter.port).await;
    half.send(&Connect::new(V311, "half", "c2", "s2").encode()[..6])
        .await;
    let mut device =
        RawClient::connect_ok(adapter.port, &Connect::new(V311, "live", "c1", "s1")).await;
    let connected = adapter.expect_connect("c1").await;

    let rest = adapter.shutdown().await;
    assert_eq!(rest.len(), 1, "events after SIGTERM: {rest:?}");
    assert_session(&connected, &rest[0]);
    device.expect_closed().await;
    silent.expect_closed().await;
    half.expect_closed().await;
}

#[tokio::test]
async fn traffic_keeps_a_short_keep_alive_session_open() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let mut connect = Connect::new(V5, "pinger", "c1", "s1");
    connect.keep_alive = 1;
    let mut device = RawClient::connect_ok(adapter.port, &connect).await;
    let connected = adapter.expect_connect("c1").await;
    // The device's own pace: a ping every 0.7 s spans 2.8 s, well past 1.5 × keep-alive.
    for _ in 0..4 {
        tokio::time::sleep(std::time::Duration::from_millis(700)).await;
        device.ping().await;
    }
    // Then silence ends it, with exactly one disconnect.
    device.expect_closed().await;
    let disconnected = adapter.expect_disconnect("c1").await;
    assert_session(&connected, &disconnected);
    let rest = adapter.shutdown().await;
    assert!(rest.is_empty(), "events after all sessions ended: {rest:?}");
}
