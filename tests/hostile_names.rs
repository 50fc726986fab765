//! Hostile input, second round (issue #23), the rules about names and grants: names never merge
//! on the bus (a subtopic's `.` and `/` are one thing on every instance; domain and channel ids
//! the bus would split are refused), plain grants never open channels, a reload never serves an
//! empty or truncated registry, and peer strings cannot forge a log line.

mod common;

use std::time::Duration;

use futures_util::StreamExt;
use prost::Message as _;

use common::nats::NatsServer;
use common::raw::{self, Connect, RawClient, V311, V5};
use common::*;

/// Waits until `adapter`'s bridge is up in both directions: a device message from it reaches the
/// test's NATS subscriber (the adapter subscribes `m.>` before it publishes anything).
async fn wait_bridge_ready(adapter: &mut Adapter, nats: &async_nats::Client, tag: &str) {
    let subject = format!("m.d1.c.ch3.ready-{tag}");
    let mut sub = nats.subscribe(subject).await.expect("subscribe");
    nats.flush().await.expect("flush");
    let mut dev = RawClient::connect_ok(
        adapter.port,
        &Connect::new(V5, &format!("ready-{tag}"), "c3", "s3"),
    )
    .await;
    adapter.expect_connect("c3").await;
    let topic = format!("m/d1/c/ch3/ready-{tag}");
    dev.send(&raw::publish(V5, &topic, 1, 1, b"ready", &[]))
        .await;
    assert_eq!(dev.expect_kind(raw::PUBACK).await.puback_reason(), 0);
    tokio::time::timeout(WAIT, sub.next())
        .await
        .expect("the adapter's bridge did not come up")
        .expect("NATS subscription ended");
    dev.send(&raw::disconnect(V5)).await;
    adapter.expect_disconnect("c3").await;
}

/// The bus subject `m.d1.c.ch1.a.b` cannot tell the subtopic `a.b` from `a/b`: a message published
/// on `…/a.b` must reach a subscriber on this instance and on another one under the same topic.
#[tokio::test]
async fn a_dotted_subtopic_is_delivered_under_one_topic_on_every_instance() {
    let nats = NatsServer::start().await;
    let bus = nats.client().await;
    let env = [("SMQ_MESSAGE_BROKER_URL", nats.url())];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut here = Adapter::start_with(CLIENTS, &env).await;
    let mut there = Adapter::start_with(CLIENTS, &env).await;
    wait_bridge_ready(&mut here, &bus, "here").await;
    wait_bridge_ready(&mut there, &bus, "there").await;

    let mut local =
        RawClient::connect_ok(here.port, &Connect::new(V311, "dot-l", "c2", "s2")).await;
    here.expect_connect("c2").await;
    assert_eq!(local.subscribe(V311, 1, &[("m/d1/c/ch1/#", 1)]).await, [1]);
    let mut remote =
        RawClient::connect_ok(there.port, &Connect::new(V311, "dot-r", "c2", "s2")).await;
    there.expect_connect("c2").await;
    assert_eq!(remote.subscribe(V311, 1, &[("m/d1/c/ch1/#", 1)]).await, [1]);
    let mut on_bus = bus.subscribe("m.d1.c.ch1.>").await.expect("subscribe");
    bus.flush().await.expect("flush");

    let mut publisher =
        RawClient::connect_ok(here.port, &Connect::new(V5, "dot-p", "c1", "s1")).await;
    here.expect_connect("c1").await;
    publisher
        .send(&raw::publish(V5, "m/d1/c/ch1/a.b", 1, 1, b"dotted", &[]))
        .await;
    assert_eq!(publisher.expect_kind(raw::PUBACK).await.puback_reason(), 0);

    let got_local = local.expect_kind(raw::PUBLISH).await.publish_v311();
    let got_remote = remote.expect_kind(raw::PUBLISH).await.publish_v311();
    assert_eq!(got_local, ("m/d1/c/ch1/a/b".into(), b"dotted".to_vec()));
    assert_eq!(got_local, got_remote, "one topic here and there");
    let message = tokio::time::timeout(WAIT, on_bus.next())
        .await
        .expect("the message reached the bus")
        .expect("NATS subscription ended");
    assert_eq!(message.subject.as_str(), "m.d1.c.ch1.a.b");
    let decoded =
        mqtt_adapter::bridge::message::Message::decode(message.payload).expect("messaging.Message");
    assert_eq!(decoded.subtopic, "a.b");
    here.shutdown().await;
    there.shutdown().await;
}

/// A domain `d1.c.ch1` with channel `z` is the subject `m.d1.c.ch1.c.z`: channel `ch1` of `d1` on
/// every other instance. Such ids are refused at start-up and on reload, and a topic naming one is
/// malformed.
#[tokio::test]
async fn ids_the_bus_would_split_are_refused_at_start_reload_and_in_topics() {
    let splitting = "[[clients]]\nid = \"evil\"\nsecret = \"e\"\n\n[[connections]]\nclient = \"evil\"\ndomain = \"d1.c.ch1\"\nchannel = \"z\"\nactions = [\"publish\"]\n";
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("clients.toml");
    std::fs::write(&path, splitting).expect("write clients file");
    let (status, _, stderr) = run_to_exit(adapter_command(free_port(), Some(&path), &[])).await;
    assert!(!status.success(), "started with a splitting domain id");
    assert!(
        stderr.contains("line 6") && stderr.contains("d1.c.ch1"),
        "the error names the line and the id:\n{stderr}"
    );

    let mut adapter = Adapter::start(CLIENTS).await;
    let mut c1 =
        RawClient::connect_ok(adapter.port, &Connect::new(V5, "split-1", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    for topic in ["m/d1.c.ch1/c/z/x", "m/d1/c/ch1.c.z/x", "m/d1/c/ch 1/x"] {
        c1.send(&raw::publish(V5, topic, 1, 7, b"x", &[])).await;
        assert_eq!(
            c1.expect_kind(raw::PUBACK).await.puback_reason(),
            0x90,
            "{topic}"
        );
    }
    assert_eq!(
        c1.subscribe(V5, 2, &[("m/d1.c.ch1/c/z/#", 0)]).await,
        [0x8F]
    );

    let with_evil = format!("{CLIENTS}\n{splitting}");
    std::fs::write(adapter.clients_file(), &with_evil).expect("rewrite clients file");
    adapter.signal(libc::SIGHUP);
    let log = adapter.wait_log("reload refused", WAIT).await;
    assert!(log.contains("d1.c.ch1"), "{log}");
    // The old registry stays: c1 still has its channel.
    assert_eq!(c1.subscribe(V5, 3, &[("m/d1/c/ch1/#", 0)]).await, [0]);
    assert_next_event_is_sentinel(&mut adapter).await;
    adapter.shutdown().await;
}

/// README's own example (`[anonymous] topics = ["#"]`) let anonymous clients read and write
/// every tenant's channels; an `[[acl]]` filter did the same for a client. Channels are granted by
/// `[[connections]]` only, and a plain filter that would match channel topics is refused.
#[tokio::test]
async fn plain_grants_never_open_channels() {
    let clients = format!(
        "{CLIENTS}\n[[acl]]\nclient = \"outsider\"\ntopics = [\"m/#\", \"+/d1/c/ch1/#\", \"$x/#\", \"plain/#\"]\nactions = [\"publish\", \"subscribe\"]\n\n[anonymous]\ntopics = [\"#\"]\n"
    );
    let mut adapter = Adapter::start(&clients).await;
    let port = adapter.port;
    let mut member = RawClient::connect_ok(port, &Connect::new(V311, "pg-m", "c2", "s2")).await;
    adapter.expect_connect("c2").await;
    assert_eq!(member.subscribe(V311, 1, &[("m/d1/c/ch1/#", 0)]).await, [0]);

    let mut anon_connect = Connect::new(V5, "pg-anon", "", "");
    anon_connect.username = None;
    anon_connect.password = None;
    let mut anon = RawClient::connect_ok(port, &anon_connect).await;
    adapter.expect_connect("").await;
    let mut outsider =
        RawClient::connect_ok(port, &Connect::new(V5, "pg-o", "outsider", "so")).await;
    adapter.expect_connect("outsider").await;

    for client in [&mut anon, &mut outsider] {
        let codes = client
            .subscribe(
                V5,
                1,
                &[
                    ("m/d1/c/ch1/#", 0),
                    ("#", 0),
                    ("+/d1/c/ch1/#", 0),
                    ("m/#", 0),
                    ("$share/g/m/d1/c/ch1/#", 0),
                    ("plain/#", 0),
                ],
            )
            .await;
        assert_eq!(codes, [0x87, 0x87, 0x87, 0x87, 0x87, 0], "{codes:x?}");
        client
            .send(&raw::publish(V5, "m/d1/c/ch1/injected", 1, 2, b"no", &[]))
            .await;
        assert_eq!(client.expect_kind(raw::PUBACK).await.puback_reason(), 0x87);
        client
            .send(&raw::publish(V5, "m/d1/x", 1, 3, b"no", &[]))
            .await;
        assert_eq!(client.expect_kind(raw::PUBACK).await.puback_reason(), 0x87);
    }
    // Plain topics still work, and a literal `$` grant matches `$` topics.
    outsider
        .send(&raw::publish(V5, "$x/y", 1, 4, b"dollar", &[]))
        .await;
    assert_eq!(outsider.expect_kind(raw::PUBACK).await.puback_reason(), 0);
    anon.send(&raw::publish(V5, "plain/news", 1, 5, b"plain", &[]))
        .await;
    assert_eq!(anon.expect_kind(raw::PUBACK).await.puback_reason(), 0);
    let got = outsider.expect_kind(raw::PUBLISH).await;
    assert_eq!(got.kind, raw::PUBLISH);
    // Nothing reached the channel's member: its next packet is the answer to its ping.
    member.ping().await;
    adapter.shutdown().await;
}

/// Counts the occurrences of `needle` in the adapter's log, waiting until there are `n`.
async fn wait_log_count(adapter: &Adapter, needle: &str, n: usize) -> String {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let log = adapter.stderr();
        if log.matches(needle).count() >= n {
            return log;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the log did not show {needle:?} {n} times; stderr:\n{}",
            adapter.stderr_tail()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A zero-byte or cut-short file (a non-atomic write caught midway) used to be served on SIGHUP:
/// every session revoked, every CONNECT refused. A reload refuses it and keeps the registry.
#[tokio::test]
async fn a_reload_refuses_an_empty_or_truncated_registry() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let mut c1 = RawClient::connect_ok(adapter.port, &Connect::new(V5, "rl-1", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    assert_eq!(c1.subscribe(V5, 1, &[("m/d1/c/ch1/#", 0)]).await, [0]);
    // Cut at a line end, without its newline, after the first connection: valid TOML that
    // drops c2, c3 and most grants.
    let cut = CLIENTS
        .find("[[connections]]\nclient = \"c2\"")
        .expect("c2's connection")
        - 2;
    let truncated = &CLIENTS[..cut];
    assert!(!truncated.ends_with('\n'));
    for (n, broken) in ["", "\n", "# nothing yet\n", truncated]
        .into_iter()
        .enumerate()
    {
        std::fs::write(adapter.clients_file(), broken).expect("rewrite clients file");
        adapter.signal(libc::SIGHUP);
        wait_log_count(&adapter, "reload refused", n + 1).await;
        c1.ping().await;
    }
    let log = adapter.stderr();
    assert!(!log.contains("clients registry reloaded"), "{log}");
    // The registry in force is the first: c2 keeps its channel, which the cut file dropped.
    let mut c2 = RawClient::connect_ok(adapter.port, &Connect::new(V5, "rl-2", "c2", "s2")).await;
    adapter.expect_connect("c2").await;
    assert_eq!(c2.subscribe(V5, 1, &[("m/d1/c/ch1/#", 0)]).await, [0]);
    c2.send(&raw::disconnect(V5)).await;
    adapter.expect_disconnect("c2").await;
    assert_eq!(c1.subscribe(V5, 2, &[("m/d1/c/ch1/#", 0)]).await, [0]);
    assert_next_event_is_sentinel(&mut adapter).await;
    adapter.shutdown().await;

    // At start-up an empty registry is allowed, with a warning.
    let empty = Adapter::start("").await;
    empty.wait_log("has no [[clients]]", WAIT).await;
    empty.shutdown().await;
}

/// A client id, username, topic or filter with a line break used to write a forged log line
/// (`… ERROR …` at the start of a line). They are escaped.
#[tokio::test]
async fn a_newline_in_a_peer_string_cannot_forge_a_log_line() {
    let mut adapter = Adapter::start(CLIENTS).await;
    let port = adapter.port;
    let client_id = format!("dev{FORGED}-id");
    let username = format!("c1{FORGED}-user");
    let mut refused = RawClient::open(port).await;
    let code = refused
        .handshake(&Connect::new(V5, &client_id, &username, "wrong"))
        .await
        .expect("CONNACK");
    assert_eq!(code, 0x86);

    let mut dev = RawClient::connect_ok(port, &Connect::new(V5, &client_id, "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    let topic = format!("nope{FORGED}-topic");
    dev.send(&raw::publish(V5, &topic, 1, 1, b"x", &[])).await;
    assert_ne!(dev.expect_kind(raw::PUBACK).await.puback_reason(), 0);
    let filter = format!("nope{FORGED}-filter");
    assert_eq!(dev.subscribe(V5, 2, &[(&filter, 0)]).await, [0x87]);
    dev.send(&raw::disconnect(V5)).await;
    adapter.expect_disconnect("c1").await;
    adapter.wait_log("subscribe refused", WAIT).await;
    let log = adapter.wait_log("disconnected", WAIT).await;
    assert_no_forged_line(&log);
    for what in ["-id", "-user", "-topic", "-filter"] {
        assert!(
            log.contains(&format!("forged{what}")),
            "the {what} was logged (escaped):\n{log}"
        );
    }
    adapter.shutdown().await;
}

/// The same through the cluster takeover: the instance that loses the session logs the client
/// id and MQTT client id it read from the bus announcement.
#[tokio::test]
async fn a_newline_in_a_client_id_cannot_forge_a_log_line_through_a_cluster_takeover() {
    let nats = NatsServer::start().await;
    let bus = nats.url();
    let env = [("SMQ_MESSAGE_BROKER_URL", bus.as_str())];
    let mut here = Adapter::start_with(CLIENTS, &env).await;
    let mut there = Adapter::start_with(CLIENTS, &env).await;
    let client_id = format!("roamer{FORGED}-takeover");

    let mut first =
        RawClient::connect_ok(here.port, &Connect::new(V5, &client_id, "c1", "s1")).await;
    here.expect_connect("c1").await;
    let mut second =
        RawClient::connect_ok(there.port, &Connect::new(V5, &client_id, "c1", "s1")).await;
    there.expect_connect("c1").await;
    // Announcements cross on the bus: the first session is taken over, unless the second
    // instance read the first announcement only after its own CONNECT. Either way one instance
    // logs the takeover.
    let (disconnect, loser) = tokio::select! {
        d = first.expect_kind(14) => (d, &here),
        d = second.expect_kind(14) => (d, &there),
    };
    assert_eq!(disconnect.body.first(), Some(&0x8E), "session taken over");

    let log = loser
        .wait_log("session taken over by another instance", WAIT)
        .await;
    assert_no_forged_line(&log);
    let taken_over = log
        .lines()
        .find(|line| line.contains("session taken over by another instance"))
        .unwrap_or_default();
    assert!(
        taken_over.contains("forged-takeover"),
        "the MQTT client id was logged (escaped) on the takeover line:\n{log}"
    );
    here.shutdown().await;
    there.shutdown().await;
}

/// A line break and a forged timestamp, level and target inside a peer string.
const FORGED: &str = "\n2026-01-01T00:00:00.000000Z ERROR mqtt_adapter: forged";

/// No line of `log` starts where [`FORGED`] would start one.
fn assert_no_forged_line(log: &str) {
    for line in log.lines() {
        assert!(
            !line.starts_with("2026-01-01T00:00:00"),
            "a forged line in the log: {line:?}\n{log}"
        );
    }
}
