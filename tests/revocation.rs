//! Revocation that takes effect at once (issue #15): the adapter follows the clients service's
//! events on `supermq.clients` in a private redis-server, a private nats-server and the shared
//! RabbitMQ. Disabling a client or rotating its secret ends its sessions (MQTT 5 DISCONNECT 0x87,
//! will published, `disconnect` reason `revoked`) and its next CONNECT asks the platform again;
//! disabling a channel removes exactly the subscriptions on it; deleting one connection touches
//! only that client. The consumer survives its store restarting. SIGHUP reloads the static
//! clients file: a file that drops a connection ends exactly the affected sessions, a broken one
//! changes nothing and the log names its line.

mod common;

use std::time::Duration;

use common::platform::{Platform, PUBLISH as AUTHZ_PUBLISH, SUBSCRIBE as AUTHZ_SUBSCRIBE};
use common::raw::{self, Connect, RawClient, PUBACK, PUBLISH, V311, V5};
use common::stores::{amqp_url, StoreKind, StoreServer, STORE_WAIT};
use common::*;

const DISCONNECT: u8 = 14;
const NOT_AUTHORIZED: u8 = 0x87;
/// Bound for the consumer to be (back) on its store and an event to take effect.
const REVOKE_WAIT: Duration = Duration::from_secs(30);

/// Where the test writes the platform's events.
enum Source {
    Redis(StoreServer),
    Nats(StoreServer),
    Amqp,
}

impl Source {
    fn url(&self) -> String {
        match self {
            Source::Redis(s) | Source::Nats(s) => s.url(),
            Source::Amqp => amqp_url(),
        }
    }

    fn ready_log(&self) -> &'static str {
        match self {
            Source::Redis(_) => "following supermq.clients on redis",
            Source::Nats(_) => "following events.supermq.clients on nats",
            Source::Amqp => "following events.supermq.clients on amqp",
        }
    }

    fn store(&mut self) -> &mut StoreServer {
        match self {
            Source::Redis(s) | Source::Nats(s) => s,
            Source::Amqp => panic!("the shared RabbitMQ is not restarted by tests"),
        }
    }

    /// Writes one event in the seed's format (flat pairs on Redis, a JSON object elsewhere),
    /// retrying (bounded) while a just-restarted store is not answering yet.
    async fn emit(&self, fields: &[(&str, &str)]) {
        let deadline = tokio::time::Instant::now() + STORE_WAIT;
        loop {
            match self.try_emit(fields).await {
                Ok(()) => return,
                Err(e) => assert!(
                    tokio::time::Instant::now() < deadline,
                    "cannot write the event: {e}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn try_emit(&self, fields: &[(&str, &str)]) -> Result<(), String> {
        let json: serde_json::Map<String, serde_json::Value> = fields
            .iter()
            .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
            .collect();
        let body = serde_json::Value::Object(json).to_string();
        match self {
            Source::Redis(store) => {
                let client = redis::Client::open(store.url()).map_err(|e| e.to_string())?;
                let mut conn = client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| e.to_string())?;
                let mut cmd = redis::cmd("XADD");
                cmd.arg("supermq.clients").arg("*");
                for (k, v) in fields {
                    cmd.arg(*k).arg(*v);
                }
                cmd.query_async::<String>(&mut conn)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            Source::Nats(store) => {
                let client = async_nats::connect(store.url())
                    .await
                    .map_err(|e| e.to_string())?;
                let js = async_nats::jetstream::new(client);
                let ack = js
                    .publish("events.supermq.clients", body.into())
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::time::timeout(WAIT, ack)
                    .await
                    .map_err(|_| "no JetStream ack".to_owned())?
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
            Source::Amqp => {
                use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
                let conn =
                    lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
                        .await
                        .map_err(|e| e.to_string())?;
                let channel = conn.create_channel().await.map_err(|e| e.to_string())?;
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await
                    .map_err(|e| e.to_string())?;
                let confirm = channel
                    .basic_publish(
                        "events".into(),
                        "events.supermq.clients".into(),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        lapin::BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                let confirmed = confirm.await.map_err(|e| e.to_string())?;
                let _ = conn.close(200, "done".into()).await;
                if confirmed.is_ack() {
                    Ok(())
                } else {
                    Err("RabbitMQ did not confirm".into())
                }
            }
        }
    }
}

/// Asserts the MQTT 5 session ends with DISCONNECT 0x87 (Not authorized), then the socket closes.
async fn expect_revoked(device: &mut RawClient) {
    let disconnect = loop {
        let packet = device
            .read_packet(REVOKE_WAIT)
            .await
            .unwrap_or_else(|end| panic!("awaiting DISCONNECT 0x87: {end:?}"));
        if packet.kind == DISCONNECT {
            break packet;
        }
    };
    assert_eq!(
        disconnect.body.first(),
        Some(&NOT_AUTHORIZED),
        "{disconnect:?}"
    );
    device.expect_closed().await;
}

/// QoS 1 PUBLISH from an MQTT 5 session; returns the PUBACK reason code.
async fn publish_v5(device: &mut RawClient, topic: &str, pkid: u16) -> u8 {
    device
        .send(&raw::publish(V5, topic, 1, pkid, b"x", &[]))
        .await;
    device.expect_kind(PUBACK).await.puback_reason()
}

async fn metric_value(adapter: &Adapter, series: &str) -> f64 {
    let (_, body) = http_get(adapter.ports.http, "/metrics").await;
    metric(&body, series).unwrap_or(0.0)
}

/// The whole issue's scenario against one store, with the `supermq` backend (the tonic stand-in).
async fn revocations_take_effect(source: Source) {
    let tag = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let (dev, other, watch) = (
        format!("dev-{tag}"),
        format!("other-{tag}"),
        format!("watch-{tag}"),
    );
    let (ch1, ch3) = (format!("ch1-{tag}"), format!("ch3-{tag}"));
    let platform = Platform::start().await;
    let state = platform.state.clone();
    for client in [&dev, &other, &watch] {
        state.client(client, "secret");
    }
    for (client, channel) in [(&dev, &ch1), (&dev, &ch3), (&other, &ch1), (&watch, &ch3)] {
        for kind in [AUTHZ_PUBLISH, AUTHZ_SUBSCRIBE] {
            state.grant("d1", client, channel, kind);
        }
    }
    let url = source.url();
    let mut env = platform.adapter_env();
    env.push(("SMQ_MQTT_ADAPTER_PLATFORM_EVENTS_URL".into(), url.clone()));
    if let Source::Redis(_) = source {
        // Connection events (with their reasons) go to the same Redis.
        env.push(("SMQ_ES_URL".into(), url.clone()));
        env.push(("SMQ_MQTT_ADAPTER_EVENT_DETAILS".into(), "true".into()));
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let adapter = Adapter::start_without_clients_file(&env).await;
    adapter.wait_log(source.ready_log(), REVOKE_WAIT).await;

    let ch1_all = format!("m/d1/c/{ch1}/#");
    let ch3_all = format!("m/d1/c/{ch3}/#");
    let will_topic = format!("m/d1/c/{ch3}/will");
    let mut watcher = RawClient::connect_ok(
        adapter.port,
        &Connect::new(V311, "watcher", &watch, "secret"),
    )
    .await;
    assert_eq!(watcher.subscribe(V311, 1, &[(&ch3_all, 0)]).await, [0]);
    let mut bystander = RawClient::connect_ok(
        adapter.port,
        &Connect::new(V311, "bystander", &other, "secret"),
    )
    .await;
    assert_eq!(bystander.subscribe(V311, 1, &[(&ch1_all, 0)]).await, [0]);

    // client.remove (disabled): the session ends, its will is published, others stay.
    let mut connect = Connect::new(V5, "device", &dev, "secret");
    connect.will = Some(raw::Will {
        topic: &will_topic,
        payload: b"gone",
        qos: 0,
        retain: false,
    });
    let mut device = RawClient::connect_ok(adapter.port, &connect).await;
    assert_eq!(device.subscribe(V5, 1, &[(&ch1_all, 1)]).await, [1]);
    let authn = state.authn_calls();
    source
        .emit(&[
            ("operation", "client.remove"),
            ("id", &dev),
            ("status", "disabled"),
        ])
        .await;
    expect_revoked(&mut device).await;
    let will = watcher.expect_kind(PUBLISH).await;
    assert_eq!(will.publish_v311(), (will_topic.clone(), b"gone".to_vec()));
    bystander.ping().await;
    // Decisions are cached for an hour: only the revocation makes this CONNECT ask again.
    let mut device =
        RawClient::connect_ok(adapter.port, &Connect::new(V5, "device", &dev, "secret")).await;
    assert_eq!(
        state.authn_calls(),
        authn + 1,
        "CONNECT after client.remove authenticates again"
    );

    // client.update_secret: likewise.
    source
        .emit(&[("operation", "client.update_secret"), ("id", &dev)])
        .await;
    expect_revoked(&mut device).await;
    let mut device =
        RawClient::connect_ok(adapter.port, &Connect::new(V5, "device", &dev, "secret")).await;
    assert_eq!(
        state.authn_calls(),
        authn + 2,
        "CONNECT after client.update_secret authenticates again"
    );

    // channel.remove (disabled): the subscription on ch1 goes with its session; the device,
    // subscribed on ch3 only, stays, and its next PUBLISH on ch1 is authorized again.
    assert_eq!(device.subscribe(V5, 1, &[(&ch3_all, 1)]).await, [1]);
    let ch1_topic = format!("m/d1/c/{ch1}/t");
    assert_eq!(publish_v5(&mut device, &ch1_topic, 2).await, 0);
    let _ = bystander.expect_kind(PUBLISH).await;
    let authz = state.authz_calls();
    source
        .emit(&[
            ("operation", "channel.remove"),
            ("id", &ch1),
            ("status", "disabled"),
        ])
        .await;
    bystander.expect_closed_within(REVOKE_WAIT).await;
    assert_eq!(publish_v5(&mut device, &ch1_topic, 3).await, 0);
    assert_eq!(
        state.authz_calls(),
        authz + 1,
        "PUBLISH after channel.remove asks the platform"
    );
    watcher.ping().await;

    // policies.delete for the watcher on ch3: the watcher ends, the device (also on ch3) does not.
    source
        .emit(&[
            ("operation", "policies.delete"),
            ("subject", &watch),
            ("object", &ch3),
        ])
        .await;
    watcher.expect_closed_within(REVOKE_WAIT).await;
    let ch3_topic = format!("m/d1/c/{ch3}/t");
    assert_eq!(publish_v5(&mut device, &ch3_topic, 4).await, 0);
    let own = device.expect_kind(PUBLISH).await;
    assert!(
        own.body
            .windows(ch3_topic.len())
            .any(|w| w == ch3_topic.as_bytes()),
        "{own:?}"
    );

    // Ignored events are only counted.
    source
        .emit(&[
            ("operation", "client.remove"),
            ("id", &dev),
            ("status", "enabled"),
        ])
        .await;
    source
        .emit(&[("operation", "client.view"), ("id", &dev)])
        .await;
    let deadline = tokio::time::Instant::now() + REVOKE_WAIT;
    while metric_value(
        &adapter,
        "mqtt_adapter_platform_events_total{operation=\"other\"}",
    )
    .await
        < 1.0
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "client.view was not counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    device.ping().await;
    for (operation, n) in [
        ("client.remove", 1.0),
        ("client.update_secret", 1.0),
        ("channel.remove", 1.0),
        ("policies.delete", 1.0),
    ] {
        let series = format!("mqtt_adapter_revocations_total{{operation=\"{operation}\"}}");
        assert_eq!(metric_value(&adapter, &series).await, n, "{series}");
    }
    assert_eq!(
        metric_value(
            &adapter,
            "mqtt_adapter_platform_events_total{operation=\"client.remove\"}"
        )
        .await,
        2.0
    );
    assert_eq!(
        metric_value(
            &adapter,
            "mqtt_adapter_disconnect_reasons_total{reason=\"revoked\"}"
        )
        .await,
        4.0
    );
    let log = adapter.stderr();
    assert!(
        log.contains("platform revoked rights") && log.contains("client.update_secret"),
        "{log}"
    );

    if let Source::Redis(store) = &source {
        // connects: watcher, bystander, 3 × device; disconnects: 2 × device, bystander, watcher.
        let events = store.wait_events(9).await;
        let reasons: Vec<&str> = events
            .iter()
            .filter(|e| e.event.event_type == "disconnect")
            .map(|e| e.extra.get("reason").map(String::as_str).unwrap_or(""))
            .collect();
        assert_eq!(reasons, ["revoked"; 4], "{events:?}");
    }
}

#[tokio::test]
async fn redis_events_revoke_at_once() {
    revocations_take_effect(Source::Redis(StoreServer::start(StoreKind::Redis).await)).await;
}

#[tokio::test]
async fn jetstream_events_revoke_at_once() {
    revocations_take_effect(Source::Nats(StoreServer::start(StoreKind::Nats).await)).await;
}

#[tokio::test]
async fn rabbitmq_events_revoke_at_once() {
    revocations_take_effect(Source::Amqp).await;
}

/// The store stops and starts again: the consumer reconnects by itself and acts on an event
/// written after the restart (possibly before it is back: it resumes where it was).
async fn survives_a_store_restart(mut source: Source) {
    let url = source.url();
    let adapter = Adapter::start_with(
        CLIENTS,
        &[("SMQ_MQTT_ADAPTER_PLATFORM_EVENTS_URL", url.as_str())],
    )
    .await;
    let ready = source.ready_log();
    adapter.wait_log(ready, REVOKE_WAIT).await;
    let mut device =
        RawClient::connect_ok(adapter.port, &Connect::new(V5, "dev-1", "c1", "s1")).await;
    let mut bystander =
        RawClient::connect_ok(adapter.port, &Connect::new(V5, "dev-2", "c2", "s2")).await;

    source.store().stop();
    source.store().start_again().await;
    source
        .emit(&[
            ("operation", "client.remove"),
            ("id", "c1"),
            ("status", "disabled"),
        ])
        .await;
    expect_revoked(&mut device).await;
    bystander.ping().await;
    let log = adapter.stderr();
    assert_eq!(
        log.matches(ready).count(),
        2,
        "followed the store again after the restart:\n{log}"
    );
}

#[tokio::test]
async fn redis_consumer_survives_a_restart() {
    survives_a_store_restart(Source::Redis(StoreServer::start(StoreKind::Redis).await)).await;
}

#[tokio::test]
async fn jetstream_consumer_survives_a_restart() {
    survives_a_store_restart(Source::Nats(StoreServer::start(StoreKind::Nats).await)).await;
}

/// A static clients file with c1, c2, c3 and sentinel, the given (client, channel) connections
/// (publish and subscribe) and `extra` appended.
fn clients_file(connections: &[(&str, &str)], extra: &str) -> String {
    let mut text = String::new();
    for (id, secret) in [("c1", "s1"), ("c2", "s2"), ("c3", "s3"), ("sentinel", "ss")] {
        text.push_str(&format!(
            "[[clients]]\nid = \"{id}\"\nsecret = \"{secret}\"\n\n"
        ));
    }
    for (client, channel) in connections {
        text.push_str(&format!(
            "[[connections]]\nclient = \"{client}\"\ndomain = \"d1\"\nchannel = \"{channel}\"\nactions = [\"publish\", \"subscribe\"]\n\n"
        ));
    }
    text.push_str(extra);
    text
}

#[tokio::test]
async fn sighup_reloads_the_clients_file() {
    let all = [
        ("c1", "ch1"),
        ("c2", "ch1"),
        ("c3", "ch3"),
        ("sentinel", "ch1"),
    ];
    let mut adapter = Adapter::start(&clients_file(&all, "")).await;
    let mut sessions = Vec::new();
    for (client, secret, channel) in [
        ("c1", "s1", "ch1"),
        ("c2", "s2", "ch1"),
        ("c3", "s3", "ch3"),
    ] {
        let mut s =
            RawClient::connect_ok(adapter.port, &Connect::new(V5, client, client, secret)).await;
        adapter.expect_connect(client).await;
        let filter = format!("m/d1/c/{channel}/#");
        assert_eq!(s.subscribe(V5, 1, &[(&filter, 0)]).await, [0]);
        sessions.push(s);
    }

    // c1 loses its connection to ch1: exactly its session ends.
    let fewer = [("c2", "ch1"), ("c3", "ch3"), ("sentinel", "ch1")];
    std::fs::write(adapter.clients_file(), clients_file(&fewer, "")).unwrap();
    adapter.signal(libc::SIGHUP);
    expect_revoked(&mut sessions[0]).await;
    adapter.expect_disconnect("c1").await;
    adapter.wait_log("clients registry reloaded", WAIT).await;
    sessions[1].ping().await;
    sessions[2].ping().await;
    assert_next_event_is_sentinel(&mut adapter).await;
    // The new registry is in force: c1 may connect but not subscribe on ch1 any more.
    let mut c1 = RawClient::connect_ok(adapter.port, &Connect::new(V5, "c1", "c1", "s1")).await;
    adapter.expect_connect("c1").await;
    assert_eq!(
        c1.subscribe(V5, 1, &[("m/d1/c/ch1/#", 0)]).await,
        [NOT_AUTHORIZED]
    );

    // A broken file: refused with its line, nothing changes (c1 keeps its session, c2 its rights).
    let broken = clients_file(&[], "[[connections]]\nclient = \"c2\"\ncolour = \"red\"\n");
    // The unknown key is the file's last line.
    let bad_line = broken.lines().count();
    std::fs::write(adapter.clients_file(), &broken).unwrap();
    adapter.signal(libc::SIGHUP);
    let log = adapter.wait_log("reload refused", WAIT).await;
    assert!(
        log.contains(&format!("line {bad_line}")),
        "the log names line {bad_line}:\n{log}"
    );
    assert!(log.contains("colour"), "{log}");
    c1.ping().await;
    sessions[1].ping().await;
    assert_eq!(
        sessions[1].subscribe(V5, 2, &[("m/d1/c/ch1/x", 0)]).await,
        [0]
    );
    assert_next_event_is_sentinel(&mut adapter).await;
    drop(sessions);
    drop(c1);
}
