//! Persistent sessions across restarts of the real binary (`SMQ_MQTT_ADAPTER_STATE=local`, the
//! default): an offline session keeps its subscriptions and every QoS 1 message acknowledged to
//! its publisher while it was away, across a SIGTERM restart and a `kill -9`, over MQTT 3.1.1
//! (clean session 0) and 5 (session expiry); a session whose expiry ran out while the adapter
//! was down is gone; a will of a session that died with the process goes out after the restart;
//! a DISCONNECT's Session Expiry Interval decides whether the session outlives the connection.

mod common;

use std::path::Path;
use std::time::Duration;

use common::adapter::Adapter;
use common::clients::{v4_options, v5_options, V4Client, V5Client};
use common::raw::{self, CONNACK};
use common::{Connect, RawClient, CLIENTS, V5};
use rumqttc::v5::mqttbytes::v5::ConnectProperties;
use rumqttc::QoS;

const TOPIC: &str = "m/d1/c/ch1/kept";
const QUEUED: usize = 50;

async fn start(data_dir: &Path) -> Adapter {
    let dir = data_dir.to_string_lossy().into_owned();
    Adapter::start_with(CLIENTS, &[("SMQ_MQTT_ADAPTER_DATA_DIR", dir.as_str())]).await
}

#[derive(Clone, Copy, Debug)]
enum Stop {
    Sigterm,
    Kill9,
}

async fn restart(mut adapter: Adapter, data_dir: &Path, stop: Stop) -> Adapter {
    match stop {
        Stop::Sigterm => {
            adapter.terminate();
            assert!(adapter.wait_exit().await.success(), "exit 0 on SIGTERM");
        }
        Stop::Kill9 => adapter.kill().await,
    }
    start(data_dir).await
}

/// A persistent subscriber of either version, connected.
enum Subscriber {
    V4(V4Client),
    V5(Box<V5Client>),
}

impl Subscriber {
    async fn connect(port: u16, v5: bool, id: &str) -> Subscriber {
        if v5 {
            let mut opts = v5_options(port, id, "c1", "s1");
            opts.set_clean_start(false);
            let mut props = ConnectProperties::new();
            props.session_expiry_interval = Some(3600);
            opts.set_connect_properties(props);
            Subscriber::V5(Box::new(V5Client::connect_with(opts).await))
        } else {
            let mut opts = v4_options(port, id, "c1", "s1");
            opts.set_clean_session(false);
            Subscriber::V4(V4Client::connect_with(opts).await)
        }
    }

    fn present(&self) -> bool {
        match self {
            Subscriber::V4(c) => c.connack.session_present,
            Subscriber::V5(c) => c.connack.session_present,
        }
    }

    async fn subscribe(&mut self, filter: &str) {
        match self {
            Subscriber::V4(c) => c.subscribe(filter, QoS::AtLeastOnce).await,
            Subscriber::V5(c) => {
                c.subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
                    .await
            }
        }
    }

    async fn next_payload(&mut self) -> Vec<u8> {
        match self {
            Subscriber::V4(c) => c.next_publish().await.payload.to_vec(),
            Subscriber::V5(c) => c.next_publish().await.payload.to_vec(),
        }
    }

    async fn disconnect(self) {
        match self {
            Subscriber::V4(c) => c.disconnect().await,
            Subscriber::V5(c) => c.disconnect().await,
        }
    }
}

async fn publish_acked(port: u16, id: &str, payloads: impl IntoIterator<Item = String>) {
    let mut publisher = V4Client::connect(port, id, "c2", "s2").await;
    for payload in payloads {
        publisher
            .publish(TOPIC, QoS::AtLeastOnce, false, payload.as_bytes())
            .await;
    }
    publisher.disconnect().await;
}

#[tokio::test]
async fn an_offline_session_and_its_queued_messages_survive_a_restart() {
    for stop in [Stop::Sigterm, Stop::Kill9] {
        for v5 in [false, true] {
            let what = format!("{stop:?}, MQTT {}", if v5 { 5 } else { 3 });
            let data = tempfile::tempdir().expect("temp dir");
            let adapter = start(data.path()).await;
            let mut sub = Subscriber::connect(adapter.port, v5, "kept-sub").await;
            sub.subscribe(TOPIC).await;
            sub.disconnect().await;
            // Every one PUBACKed before the stop.
            publish_acked(
                adapter.port,
                "kept-pub",
                (0..QUEUED).map(|i| format!("m{i}")),
            )
            .await;

            let adapter = restart(adapter, data.path(), stop).await;
            let mut sub = Subscriber::connect(adapter.port, v5, "kept-sub").await;
            assert!(sub.present(), "{what}: session present after the restart");
            for i in 0..QUEUED {
                assert_eq!(
                    sub.next_payload().await,
                    format!("m{i}").into_bytes(),
                    "{what}: queued message {i}, in order"
                );
            }
            // The subscription itself came back too.
            publish_acked(adapter.port, "kept-pub", ["after".to_owned()]).await;
            assert_eq!(sub.next_payload().await, b"after", "{what}: live message");
        }
    }
}

#[tokio::test]
async fn a_session_whose_expiry_ran_out_while_the_adapter_was_down_is_gone() {
    let data = tempfile::tempdir().expect("temp dir");
    let adapter = start(data.path()).await;
    let opts = |port| {
        let mut opts = v5_options(port, "short-lived", "c1", "s1");
        opts.set_clean_start(false);
        let mut props = ConnectProperties::new();
        props.session_expiry_interval = Some(1);
        opts.set_connect_properties(props);
        opts
    };
    let mut sub = V5Client::connect_with(opts(adapter.port)).await;
    sub.subscribe(TOPIC, rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await;
    sub.disconnect().await;
    let mut adapter = adapter;
    adapter.terminate();
    assert!(adapter.wait_exit().await.success());
    // The expiry interval passes while no adapter runs (the point of the test, not a wait for
    // an event).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let adapter = start(data.path()).await;
    let again = V5Client::connect_with(opts(adapter.port)).await;
    assert!(
        !again.connack.session_present,
        "a session that expired while the adapter was down must not be resumed"
    );
}

#[tokio::test]
async fn the_will_of_a_session_that_died_with_the_process_goes_out_after_the_restart() {
    let data = tempfile::tempdir().expect("temp dir");
    let adapter = start(data.path()).await;
    // A persistent subscriber of the will topic, offline when the adapter dies.
    let mut sub = Subscriber::connect(adapter.port, false, "will-sub").await;
    sub.subscribe(TOPIC).await;
    sub.disconnect().await;
    // A persistent device with a will, online when the adapter dies.
    let mut opts = v4_options(adapter.port, "will-dev", "c2", "s2");
    opts.set_clean_session(false);
    opts.set_last_will(rumqttc::LastWill::new(
        TOPIC,
        "dev-gone",
        QoS::AtLeastOnce,
        false,
    ));
    let device = V4Client::connect_with(opts).await;
    assert!(!device.connack.session_present);

    let adapter = restart(adapter, data.path(), Stop::Kill9).await;
    let mut sub = Subscriber::connect(adapter.port, false, "will-sub").await;
    assert!(sub.present());
    assert_eq!(sub.next_payload().await, b"dev-gone");
    drop(device);
}

/// An MQTT 5 CONNECT with `expiry`, clean start 0, as raw bytes.
fn raw_connect(id: &str, expiry: u32) -> Connect<'_> {
    let mut connect = Connect::new(V5, id, "c1", "s1");
    connect.clean = false;
    connect.properties = raw::session_expiry(expiry);
    connect
}

/// An MQTT 5 DISCONNECT (normal) carrying a Session Expiry Interval.
fn disconnect_with_expiry(seconds: u32) -> Vec<u8> {
    let mut props = vec![0x11];
    props.extend_from_slice(&seconds.to_be_bytes());
    let mut body = vec![0x00];
    body.extend(raw::varint(props.len()));
    body.extend(props);
    raw::packet(0xE0, &body)
}

#[tokio::test]
async fn a_disconnect_with_session_expiry_0_ends_a_kept_session() {
    let data = tempfile::tempdir().expect("temp dir");
    let adapter = start(data.path()).await;
    for (told, kept) in [(0u32, false), (600, true)] {
        let id = format!("told-{told}");
        let mut c = RawClient::connect_ok(adapter.port, &raw_connect(&id, 3600)).await;
        c.subscribe(V5, 1, &[(TOPIC, 1)]).await;
        c.send(&disconnect_with_expiry(told)).await;
        c.expect_closed().await;
        let mut again = RawClient::open(adapter.port).await;
        again.send(&raw_connect(&id, 3600).encode()).await;
        let connack = again.expect_kind(CONNACK).await;
        assert_eq!(connack.connack_code(), 0);
        assert_eq!(
            connack.body[0] & 1 == 1,
            kept,
            "DISCONNECT with session expiry {told}: session present"
        );
    }
}

#[tokio::test]
async fn an_unacknowledged_delivery_is_sent_again_with_its_packet_id_after_a_restart() {
    let data = tempfile::tempdir().expect("temp dir");
    let adapter = start(data.path()).await;
    let mut connect = Connect::new(common::V311, "unacked-sub", "c1", "s1");
    connect.clean = false;
    let mut sub = RawClient::connect_ok(adapter.port, &connect).await;
    sub.subscribe(common::V311, 1, &[(TOPIC, 1)]).await;
    publish_acked(adapter.port, "unacked-pub", ["first".to_owned()]).await;
    // Written to the device, never acknowledged.
    let first = sub.expect_kind(raw::PUBLISH).await;
    let pkid = first.publish_pkid();
    assert_eq!(first.flags & 0x08, 0, "not a DUP the first time");
    sub.send(&raw::disconnect(common::V311)).await;
    sub.expect_closed().await;

    let adapter = restart(adapter, data.path(), Stop::Sigterm).await;
    let mut sub = RawClient::open(adapter.port).await;
    sub.send(&connect.encode()).await;
    let connack = sub.expect_kind(CONNACK).await;
    assert_eq!(connack.body[0] & 1, 1, "session present");
    let again = sub.expect_kind(raw::PUBLISH).await;
    assert_eq!(again.publish_pkid(), pkid, "the same packet id");
    assert_eq!(again.flags & 0x08, 0x08, "DUP set");
    assert_eq!(again.publish_v311(), (TOPIC.to_owned(), b"first".to_vec()));
}
