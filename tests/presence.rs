//! `mqtt-adapter presence` against real event streams: two adapter instances write to one
//! private `redis-server` / `nats-server -js`; devices come and go, one instance is killed with
//! `-9` and restarted; `presence --once --json` must then report exactly who is online, and a
//! following `presence --json` reports each change as a line.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};

use common::stores::{StoreKind, StoreServer, STORE_WAIT};
use common::*;
use serde_json::Value;

/// Devices `dev-1` … `dev-3` (secret `s-<n>`).
const DEVICES: &str = r#"
[[clients]]
id = "dev-1"
secret = "s-1"
[[clients]]
id = "dev-2"
secret = "s-2"
[[clients]]
id = "dev-3"
secret = "s-3"
"#;

/// An adapter instance writing to `url` with event details on, its data under `data_dir`.
async fn instance(name: &str, url: &str, data_dir: &Path) -> Adapter {
    let data_dir = data_dir.to_string_lossy();
    Adapter::start_with(
        DEVICES,
        &[
            ("SMQ_ES_URL", url),
            ("SMQ_MQTT_ADAPTER_INSTANCE", name),
            ("SMQ_MQTT_ADAPTER_DATA_DIR", &data_dir),
            ("SMQ_MQTT_ADAPTER_EVENT_DETAILS", "true"),
            ("SMQ_MQTT_ADAPTER_SHUTDOWN_TIMEOUT", "2"),
        ],
    )
    .await
}

/// Device `dev-<n>` connected as MQTT client `box-<n><tag>` (keep-alive off: a slow run must not
/// end a session by itself).
async fn device(adapter: &Adapter, n: u8, tag: &str, version: u8) -> RawClient {
    let id = format!("dev-{n}");
    let mqtt_id = format!("box-{n}{tag}");
    let secret = format!("s-{n}");
    let mut connect = Connect::new(version, &mqtt_id, &id, &secret);
    connect.keep_alive = 0;
    RawClient::connect_ok(adapter.port, &connect).await
}

/// The presence command reading `url`, with a clean environment.
fn presence_command(url: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mqtt-adapter"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SMQ_") {
            cmd.env_remove(key);
        }
    }
    cmd.arg("presence").args(args).env("SMQ_ES_URL", url);
    cmd
}

/// `presence --once --json`: the parsed object.
async fn snapshot(url: &str) -> Value {
    let (status, stdout, stderr) = run_to_exit(presence_command(url, &["--once", "--json"])).await;
    assert!(status.success(), "presence failed: {status}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "--json prints one object: {stdout:?}");
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

/// The online set as sorted `(instance, client id, sessions)`.
fn online_set(snapshot: &Value) -> Vec<(String, String, u64)> {
    let mut set: Vec<_> = snapshot["online"]
        .as_array()
        .expect("online is an array")
        .iter()
        .map(|o| {
            (
                o["instance"].as_str().expect("instance").to_owned(),
                o["client_id"].as_str().expect("client_id").to_owned(),
                o["sessions"].as_u64().expect("sessions"),
            )
        })
        .collect();
    set.sort();
    set
}

fn set(items: &[(&str, &str, u64)]) -> Vec<(String, String, u64)> {
    items
        .iter()
        .map(|(i, c, n)| (i.to_string(), c.to_string(), *n))
        .collect()
}

/// Three devices on two instances, one disconnects, instance `edge-a` is killed with `-9` and
/// restarted (its open session gets a `crash_recovery` disconnect), then a device connects to it
/// again.
async fn online_set_after_a_crash(kind: StoreKind) {
    let store = StoreServer::start(kind).await;
    let url = store.url();
    let (data_a, data_b) = (
        tempfile::tempdir().expect("dir"),
        tempfile::tempdir().expect("dir"),
    );
    let a = instance("edge-a", &url, data_a.path()).await;
    let b = instance("edge-b", &url, data_b.path()).await;

    let _dev1 = device(&a, 1, "", V311).await;
    let mut dev2 = device(&a, 2, "", V5).await;
    let _dev3 = device(&b, 3, "", V311).await;
    store.wait_events(3).await;
    // Two sessions of one client id (two MQTT client ids) on one instance count twice.
    let _dev3_again = device(&b, 3, "-second", V5).await;
    dev2.send(&raw::disconnect(V5)).await;
    dev2.expect_closed().await;
    // Everything so far is in the store, so the kill loses no event.
    store.wait_events(5).await;
    let before = snapshot(&url).await;
    assert_eq!(
        online_set(&before),
        set(&[("edge-a", "dev-1", 1), ("edge-b", "dev-3", 2)])
    );

    a.kill().await;
    let a = instance("edge-a", &url, data_a.path()).await;
    let recovered = store.wait_events(6).await;
    assert_eq!(
        recovered[5].extra.get("reason").map(String::as_str),
        Some("crash_recovery"),
        "the restart closes dev-1's session: {:?}",
        recovered[5]
    );
    let _dev2_back = device(&a, 2, "", V311).await;
    store.wait_events(7).await;

    let after = snapshot(&url).await;
    assert_eq!(
        online_set(&after),
        set(&[("edge-a", "dev-2", 1), ("edge-b", "dev-3", 2)]),
        "{after}"
    );
    let edge_a = &after["instances"]["edge-a"];
    assert_eq!(edge_a["connects"], 3, "{after}");
    assert_eq!(edge_a["disconnects"], 2, "{after}");
    assert_eq!(edge_a["crash_recoveries"], 1, "{after}");
    assert_eq!(edge_a["closed_by_recovery"], 1, "{after}");
    assert_eq!(
        edge_a["disconnect_reasons"]["client_disconnect"], 1,
        "{after}"
    );
    assert_eq!(after["instances"]["edge-b"]["sessions"], 2, "{after}");
    for name in ["edge-a", "edge-b"] {
        assert_eq!(
            after["instances"][name]["unmatched_disconnects"], 0,
            "{after}"
        );
    }
    assert_eq!(after["events"]["read"], 7, "{after}");
    drop(b);
}

#[tokio::test]
async fn online_set_after_a_crash_on_redis() {
    online_set_after_a_crash(StoreKind::Redis).await;
}

#[tokio::test]
async fn online_set_after_a_crash_on_nats() {
    online_set_after_a_crash(StoreKind::Nats).await;
}

/// Following the stream (stdout a pipe): first who is online, then one JSON line per change,
/// including a disconnect that never had a connect (shown as an anomaly, not hidden).
async fn follows_changes(kind: StoreKind) {
    let store = StoreServer::start(kind).await;
    let url = store.url();
    let data = tempfile::tempdir().expect("dir");
    let adapter = instance("edge-f", &url, data.path()).await;
    let mut early = device(&adapter, 1, "", V311).await;
    store.wait_events(1).await;

    let mut lines = Follower::spawn(presence_command(&url, &["--json"]));

    let first = next_json(&mut lines).await;
    assert_eq!(
        (&first["change"], &first["client_id"], &first["sessions"]),
        (&"online".into(), &"dev-1".into(), &1.into()),
        "{first}"
    );
    early.send(&raw::disconnect(V311)).await;
    early.expect_closed().await;
    let offline = next_json(&mut lines).await;
    assert_eq!(offline["change"], "offline", "{offline}");
    assert_eq!(offline["reason"], "client_disconnect", "{offline}");

    // Another writer's stray disconnect (say, a stream trimmed mid-session).
    store_stray_disconnect(&store).await;
    let anomaly = next_json(&mut lines).await;
    assert_eq!(anomaly["change"], "anomaly", "{anomaly}");
    assert_eq!(anomaly["client_id"], "ghost", "{anomaly}");
}

/// A running `presence --json` whose stdout lines arrive on a channel; killed when dropped.
struct Follower {
    child: std::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
}

impl Follower {
    fn spawn(mut cmd: Command) -> Follower {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn presence");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Follower { child, lines }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn next_json(follower: &mut Follower) -> Value {
    let line = tokio::time::timeout(STORE_WAIT, follower.lines.recv())
        .await
        .expect("a line from presence within the wait")
        .expect("presence stdout open");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"))
}

/// Writes a `disconnect` of `ghost` on instance `elsewhere`, as an adapter would.
async fn store_stray_disconnect(store: &StoreServer) {
    let occurred_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos() as i64;
    match store.kind {
        StoreKind::Redis => {
            let client = redis::Client::open(store.url()).expect("redis url");
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .expect("connect to redis");
            let _: String = redis::cmd("XADD")
                .arg("supermq.mqtt")
                .arg("*")
                .arg("client_id")
                .arg("ghost")
                .arg("event_type")
                .arg("disconnect")
                .arg("instance")
                .arg("elsewhere")
                .arg("occurred_at")
                .arg(occurred_at.to_string())
                .query_async(&mut conn)
                .await
                .expect("XADD");
        }
        StoreKind::Nats => {
            let client = async_nats::connect(store.url())
                .await
                .expect("connect to nats");
            let js = async_nats::jetstream::new(client);
            let body = serde_json::json!({
                "client_id": "ghost",
                "event_type": "disconnect",
                "instance": "elsewhere",
                "occurred_at": occurred_at,
            });
            js.publish("events.supermq.mqtt", body.to_string().into())
                .await
                .expect("publish")
                .await
                .expect("ack");
        }
    }
}

#[tokio::test]
async fn follows_changes_on_redis() {
    follows_changes(StoreKind::Redis).await;
}

#[tokio::test]
async fn follows_changes_on_nats() {
    follows_changes(StoreKind::Nats).await;
}

#[tokio::test]
async fn presence_without_a_usable_store_says_what_to_set() {
    let (status, _, stderr) = run_to_exit(presence_command("", &["--once"])).await;
    assert!(!status.success());
    assert!(stderr.contains("SMQ_ES_URL"), "{stderr}");
    let (status, _, stderr) = run_to_exit(presence_command(
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        &["--once"],
    ))
    .await;
    assert!(!status.success());
    assert!(stderr.contains("redis:// or nats://"), "{stderr}");
}

/// `dev-1` may subscribe on `d/ch` (so its session has a subscribe event), `dev-2` has no channel.
const SUPERMQ_DEVICES: &str = r#"
[[clients]]
id = "dev-1"
secret = "s-1"
[[clients]]
id = "dev-2"
secret = "s-2"
[[connections]]
client = "dev-1"
domain = "d"
channel = "ch"
actions = ["subscribe"]
"#;

/// With the `supermq` layout presence reads the connect and disconnect streams (subjects) merged,
/// skips subscribe events, and follows both.
async fn follows_the_supermq_layout(kind: StoreKind) {
    let store = StoreServer::start(kind).await;
    let url = store.url();
    let adapter = Adapter::start_with(
        SUPERMQ_DEVICES,
        &[
            ("SMQ_ES_URL", url.as_str()),
            ("SMQ_MQTT_ADAPTER_INSTANCE", "edge-s"),
            ("SMQ_MQTT_ADAPTER_EVENT_LAYOUT", "supermq"),
        ],
    )
    .await;
    let mut one = device(&adapter, 1, "", V311).await;
    assert_eq!(one.subscribe(V311, 1, &[("m/d/c/ch/#", 0)]).await, vec![0]);
    let mut two = device(&adapter, 2, "", V5).await;
    two.send(&raw::disconnect(V5)).await;
    two.expect_closed().await;
    common::supermq_events::wait_store_entries(&store, 4).await;

    let supermq = |mut cmd: Command| {
        cmd.env("SMQ_MQTT_ADAPTER_EVENT_LAYOUT", "supermq");
        cmd
    };
    let (status, stdout, stderr) =
        run_to_exit(supermq(presence_command(&url, &["--once", "--json"]))).await;
    assert!(status.success(), "presence failed: {status}\n{stderr}");
    let now: Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    assert_eq!(online_set(&now), set(&[("edge-s", "dev-1", 1)]), "{now}");
    assert_eq!(now["events"]["malformed"], 0, "{now}");
    assert_eq!(
        now["events"]["read"], 3,
        "connects and disconnects only: {now}"
    );

    let mut lines = Follower::spawn(supermq(presence_command(&url, &["--json"])));
    let first = next_json(&mut lines).await;
    assert_eq!(
        (&first["change"], &first["client_id"]),
        (&"online".into(), &"dev-1".into())
    );
    one.send(&raw::disconnect(V311)).await;
    one.expect_closed().await;
    let offline = next_json(&mut lines).await;
    assert_eq!(
        (&offline["change"], &offline["client_id"]),
        (&"offline".into(), &"dev-1".into())
    );
    let _back = device(&adapter, 2, "-again", V311).await;
    let online = next_json(&mut lines).await;
    assert_eq!(
        (&online["change"], &online["client_id"]),
        (&"online".into(), &"dev-2".into())
    );
}

#[tokio::test]
async fn follows_the_supermq_layout_on_redis() {
    follows_the_supermq_layout(StoreKind::Redis).await;
}

#[tokio::test]
async fn follows_the_supermq_layout_on_nats() {
    follows_the_supermq_layout(StoreKind::Nats).await;
}
