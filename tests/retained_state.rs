//! Retained messages across restarts of the real binary (`SMQ_MQTT_ADAPTER_STATE`): with `local`
//! (the default) a retained message that was acknowledged survives a SIGTERM restart and a
//! `kill -9` right after its PUBACK (QoS 1) or PUBCOMP (QoS 2), over MQTT 3.1.1 and 5; a cleared
//! one stays cleared; an MQTT 5
//! message whose expiry ran out meanwhile is not delivered; with `memory` nothing is kept.
//!
//! "Not delivered" is asserted by order, never by waiting: the subscriber asks for the topic
//! that must be empty and, in the same SUBSCRIBE after it, for a marker topic that holds a
//! retained message; retained deliveries are queued filter by filter, so the first PUBLISH is
//! the marker only if the first filter matched nothing.

mod common;

use std::time::Duration;

use common::raw::{self, Packet, PUBACK, PUBLISH, SUBACK};

/// MQTT packet type of PUBCOMP.
const PUBCOMP: u8 = 7;
use common::{Adapter, Connect, RawClient, CLIENTS, V311, V5};

const TOPIC: &str = "m/d1/c/ch1/state";
const MARKER: &str = "m/d1/c/ch1/marker";

/// A retained PUBLISH; MQTT 5 with a Message Expiry Interval if `expiry` is set.
fn retained(
    version: u8,
    topic: &str,
    qos: u8,
    pkid: u16,
    payload: &[u8],
    expiry: Option<u32>,
) -> Vec<u8> {
    let mut body = raw::string(topic);
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    if version == V5 {
        let mut props = Vec::new();
        if let Some(seconds) = expiry {
            props.push(0x02);
            props.extend_from_slice(&seconds.to_be_bytes());
        }
        body.extend(raw::varint(props.len()));
        body.extend(props);
    }
    body.extend_from_slice(payload);
    raw::packet(0x31 | (qos << 1), &body)
}

/// Topic, payload and RETAIN flag of a PUBLISH in either version.
fn published(version: u8, packet: &Packet) -> (String, Vec<u8>, bool) {
    assert_eq!(packet.kind, PUBLISH, "expected PUBLISH, got {packet:?}");
    let len = u16::from_be_bytes([packet.body[0], packet.body[1]]) as usize;
    let topic = String::from_utf8(packet.body[2..2 + len].to_vec()).expect("utf-8 topic");
    let mut at = 2 + len;
    if (packet.flags >> 1) & 0x03 > 0 {
        at += 2;
    }
    if version == V5 {
        let (props, used) = raw::read_varint(&packet.body[at..]).expect("property length");
        at += used + props;
    }
    (topic, packet.body[at..].to_vec(), packet.flags & 0x01 == 1)
}

async fn start(data_dir: &std::path::Path, state: &str) -> Adapter {
    let dir = data_dir.to_string_lossy().into_owned();
    Adapter::start_with(
        CLIENTS,
        &[
            ("SMQ_MQTT_ADAPTER_DATA_DIR", dir.as_str()),
            ("SMQ_MQTT_ADAPTER_STATE", state),
        ],
    )
    .await
}

async fn client(adapter: &Adapter, version: u8, id: &str) -> RawClient {
    RawClient::connect_ok(adapter.port, &Connect::new(version, id, "c1", "s1")).await
}

/// Publishes a retained QoS 1 message and waits for its PUBACK.
async fn publish_acked(
    c: &mut RawClient,
    version: u8,
    topic: &str,
    payload: &[u8],
    expiry: Option<u32>,
) {
    c.send(&retained(version, topic, 1, 7, payload, expiry))
        .await;
    let ack = c.expect_kind(PUBACK).await;
    assert_eq!(ack.puback_reason(), 0, "PUBACK of the retained message");
}

/// Subscribes to `filters` in one SUBSCRIBE and returns the first PUBLISH that follows.
async fn first_retained(
    adapter: &Adapter,
    version: u8,
    filters: &[&str],
) -> (String, Vec<u8>, bool) {
    let mut sub = client(adapter, version, "sub").await;
    let filters: Vec<(&str, u8)> = filters.iter().map(|f| (*f, 1)).collect();
    sub.send(&raw::subscribe(version, 1, &filters)).await;
    sub.expect_kind(SUBACK).await;
    let packet = sub.expect_kind(PUBLISH).await;
    published(version, &packet)
}

async fn sigterm_restart(mut adapter: Adapter, data_dir: &std::path::Path, state: &str) -> Adapter {
    adapter.terminate();
    assert!(adapter.wait_exit().await.success(), "exit 0 on SIGTERM");
    start(data_dir, state).await
}

#[tokio::test]
async fn a_retained_message_survives_a_sigterm_restart() {
    for version in [V311, V5] {
        let data = tempfile::tempdir().expect("temp dir");
        let adapter = start(data.path(), "local").await;
        let mut publisher = client(&adapter, version, "pub").await;
        publish_acked(&mut publisher, version, TOPIC, b"on", None).await;
        let adapter = sigterm_restart(adapter, data.path(), "local").await;
        assert_eq!(
            first_retained(&adapter, version, &[TOPIC]).await,
            (TOPIC.to_owned(), b"on".to_vec(), true),
            "MQTT version {version}"
        );
    }
}

#[tokio::test]
async fn a_retained_message_acknowledged_right_before_a_kill_9_survives() {
    for version in [V311, V5] {
        let data = tempfile::tempdir().expect("temp dir");
        let adapter = start(data.path(), "local").await;
        let mut publisher = client(&adapter, version, "pub").await;
        // Two changes of one topic, then a kill at once after the PUBACK of the second.
        publish_acked(&mut publisher, version, TOPIC, b"first", None).await;
        publish_acked(&mut publisher, version, TOPIC, b"second", None).await;
        adapter.kill().await;
        let adapter = start(data.path(), "local").await;
        assert_eq!(
            first_retained(&adapter, version, &[TOPIC]).await,
            (TOPIC.to_owned(), b"second".to_vec(), true),
            "MQTT version {version}"
        );
    }
}

#[tokio::test]
async fn a_cleared_retained_message_stays_cleared_after_restarts() {
    for version in [V311, V5] {
        let data = tempfile::tempdir().expect("temp dir");
        let adapter = start(data.path(), "local").await;
        let mut publisher = client(&adapter, version, "pub").await;
        publish_acked(&mut publisher, version, TOPIC, b"on", None).await;
        publish_acked(&mut publisher, version, TOPIC, b"", None).await;
        publish_acked(&mut publisher, version, MARKER, b"marker", None).await;
        adapter.kill().await;
        let adapter = start(data.path(), "local").await;
        let adapter = sigterm_restart(adapter, data.path(), "local").await;
        assert_eq!(
            first_retained(&adapter, version, &[TOPIC, MARKER]).await,
            (MARKER.to_owned(), b"marker".to_vec(), true),
            "MQTT version {version}: the cleared topic delivers nothing"
        );
    }
}

#[tokio::test]
async fn memory_state_keeps_nothing_across_a_restart() {
    let data = tempfile::tempdir().expect("temp dir");
    let adapter = start(data.path(), "memory").await;
    let mut publisher = client(&adapter, V311, "pub").await;
    publish_acked(&mut publisher, V311, TOPIC, b"on", None).await;
    let adapter = sigterm_restart(adapter, data.path(), "memory").await;
    let mut publisher = client(&adapter, V311, "pub").await;
    publish_acked(&mut publisher, V311, MARKER, b"marker", None).await;
    assert_eq!(
        first_retained(&adapter, V311, &[TOPIC, MARKER]).await,
        (MARKER.to_owned(), b"marker".to_vec(), true),
        "nothing retained before the restart"
    );
    assert!(
        !data.path().join("state").exists(),
        "memory writes no state directory"
    );
}

#[tokio::test]
async fn a_retained_message_that_expired_while_stopped_is_not_delivered() {
    let data = tempfile::tempdir().expect("temp dir");
    let adapter = start(data.path(), "local").await;
    let mut publisher = client(&adapter, V5, "pub").await;
    let published_at = tokio::time::Instant::now();
    publish_acked(&mut publisher, V5, TOPIC, b"short", Some(1)).await;
    publish_acked(&mut publisher, V5, MARKER, b"long", Some(3600)).await;
    adapter.kill().await;
    // The expiry is wall-clock time: it runs out while no process holds the message.
    tokio::time::sleep_until(published_at + Duration::from_millis(1500)).await;
    let adapter = start(data.path(), "local").await;
    assert_eq!(
        first_retained(&adapter, V5, &[TOPIC, MARKER]).await,
        (MARKER.to_owned(), b"long".to_vec(), true),
        "the expired message is gone, the other is kept"
    );
}

#[tokio::test]
async fn nats_state_without_a_nats_url_is_refused_at_start_up() {
    let data = tempfile::tempdir().expect("temp dir");
    let dir = data.path().to_string_lossy().into_owned();
    let cmd = common::adapter_command(
        common::free_port(),
        None,
        &[
            ("SMQ_MQTT_ADAPTER_DATA_DIR", dir.as_str()),
            ("SMQ_MQTT_ADAPTER_STATE", "nats"),
        ],
    );
    let (status, _, stderr) = common::run_to_exit(cmd).await;
    assert!(!status.success());
    assert!(
        stderr.contains("SMQ_MQTT_ADAPTER_STATE_URL") && stderr.contains("SMQ_MESSAGE_BROKER_URL"),
        "{stderr}"
    );
}

#[tokio::test]
async fn with_no_setting_the_state_is_local_in_a_data_directory_created_in_the_working_directory() {
    let cwd = tempfile::tempdir().expect("temp dir");
    let port = common::free_port();
    let mut cmd = common::adapter_command(port, None, &[]);
    cmd.env_remove("SMQ_MQTT_ADAPTER_STATE")
        .current_dir(cwd.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let mut child = tokio::process::Command::from(cmd)
        .kill_on_drop(true)
        .spawn()
        .expect("spawn mqtt-adapter");
    // The README's run command: the demo registry, no variable but the port.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let connect = Connect::new(V311, "readme", "demo-app", "demo-app-secret");
    let code = loop {
        if let Some((_, code)) = RawClient::try_connect(port, &connect).await {
            break code;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the adapter did not accept on {port}"
        );
        assert!(child.try_wait().expect("try_wait").is_none(), "it exited");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(code, 0, "CONNACK");
    assert!(cwd.path().join("data/state/state.redb").is_file());
    let _ = child.kill().await;
}

#[tokio::test]
async fn a_retained_qos_2_message_completed_right_before_a_kill_9_survives() {
    let data = tempfile::tempdir().expect("temp dir");
    let adapter = start(data.path(), "local").await;
    let mut publisher = client(&adapter, V5, "pub").await;
    publisher
        .send(&retained(V5, TOPIC, 2, 9, b"exactly once", None))
        .await;
    assert_eq!(publisher.expect_kind(raw::PUBREC).await.pubrec_reason(), 0);
    // PUBREL: routed (and kept) now; PUBCOMP once it is on disk.
    publisher
        .send(&raw::packet(0x62, &9u16.to_be_bytes()))
        .await;
    publisher.expect_kind(PUBCOMP).await;
    adapter.kill().await;
    let adapter = start(data.path(), "local").await;
    assert_eq!(
        first_retained(&adapter, V5, &[TOPIC]).await,
        (TOPIC.to_owned(), b"exactly once".to_vec(), true)
    );
}
