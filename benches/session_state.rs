//! The `local` state store beside Mosquitto's persistence (not a test; `cargo bench --bench
//! session_state`, see benches/README.md, section "MQTT state").
//!
//! Three figures, each for the adapter (`SMQ_MQTT_ADAPTER_STATE=local`) and for Mosquitto
//! (`persistence true`) in the same run:
//! - start-up with `BENCH_RETAINED` (100,000) retained messages kept: spawn to listening;
//! - resume after a SIGTERM restart of a persistent session with `BENCH_QUEUED` (1,000) QoS 1
//!   messages queued while it was away: CONNECT to CONNACK, and to the last message;
//! - RSS of `BENCH_SESSIONS` (10,000) idle persistent sessions (MQTT 3.1.1, clean session 0, one
//!   QoS 1 subscription), connected and then offline, per session.
//!
//! `BENCH_ADAPTER_BIN` runs another adapter binary (e.g. the release one from a debug build of
//! this bench). Under `cargo test --all-targets` it is a small smoke pass.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::raw::{self, CONNACK, PUBACK, PUBLISH, SUBACK};
use common::{adapter_command, free_port, Connect, RawClient, V311};

fn knob(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One broker process under test.
struct Broker {
    name: &'static str,
    child: Child,
    port: u16,
    spawned: Instant,
    /// Spawn to accepting.
    ready: Duration,
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Adapter,
    Mosquitto,
}

impl Broker {
    fn command(kind: Kind, dir: &Path, port: u16) -> Command {
        match kind {
            Kind::Adapter => {
                let clients = dir.join("clients.toml");
                std::fs::write(&clients, "[anonymous]\ntopics = [\"#\"]\n").expect("clients file");
                let data = dir.join("data");
                let data = data.to_string_lossy().into_owned();
                let template = adapter_command(
                    port,
                    Some(&clients),
                    &[
                        ("SMQ_MQTT_ADAPTER_DATA_DIR", data.as_str()),
                        ("SMQ_MQTT_ADAPTER_STATE", "local"),
                        ("SMQ_MQTT_ADAPTER_HOST", "127.0.0.1"),
                        ("SMQ_MQTT_ADAPTER_LOG_LEVEL", "warn"),
                        ("SMQ_MQTT_ADAPTER_MAX_QUEUED_MESSAGES", "100000"),
                        // One publisher writes every retained message: no rate or share bound.
                        ("SMQ_MQTT_ADAPTER_PUBLISH_RATE", "0"),
                        ("SMQ_MQTT_ADAPTER_RETAINED_CLIENT_SHARE", "100"),
                        ("SMQ_MQTT_ADAPTER_MAX_RETAINED", "1000000"),
                    ],
                );
                let bin = std::env::var_os("BENCH_ADAPTER_BIN")
                    .unwrap_or_else(|| template.get_program().to_owned());
                let mut cmd = Command::new(bin);
                for (key, value) in template.get_envs() {
                    match value {
                        Some(value) => cmd.env(key, value),
                        None => cmd.env_remove(key),
                    };
                }
                cmd
            }
            Kind::Mosquitto => {
                let conf = dir.join("mosquitto.conf");
                std::fs::write(
                    &conf,
                    format!(
                        "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\npersistence_location {}/\nmax_queued_messages 100000\nuser root\n",
                        dir.display()
                    ),
                )
                .expect("mosquitto.conf");
                let mut cmd = Command::new("mosquitto");
                cmd.arg("-c").arg(conf);
                cmd
            }
        }
    }

    async fn start(kind: Kind, dir: &Path) -> Broker {
        let port = free_port();
        let mut cmd = Broker::command(kind, dir, port);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr")).expect("stderr file"));
        let spawned = Instant::now();
        let mut child = cmd.spawn().expect("spawn the broker");
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                child.try_wait().expect("child status").is_none(),
                "the broker exited: {}",
                std::fs::read_to_string(dir.join("stderr")).unwrap_or_default()
            );
            assert!(
                spawned.elapsed() < Duration::from_secs(300),
                "never listened"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        Broker {
            name: match kind {
                Kind::Adapter => "adapter (local)",
                Kind::Mosquitto => "Mosquitto (persistence)",
            },
            ready: spawned.elapsed(),
            child,
            port,
            spawned,
        }
    }

    fn rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("/proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS")
    }

    fn stop(mut self) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let status = self.child.wait().expect("broker exit");
        assert!(status.success(), "{} exit status {status}", self.name);
        let _ = self.spawned;
    }
}

fn connect(id: &str) -> Connect<'_> {
    let mut c = Connect::new(V311, id, "", "");
    c.username = None;
    c.password = None;
    c.clean = false;
    c.keep_alive = 600;
    c
}

/// Publishes `n` QoS 1 messages (`topic_of(i)`), up to 100 unacknowledged, and waits for every
/// PUBACK.
async fn publish(port: u16, n: usize, retain: bool, topic_of: impl Fn(usize) -> String) {
    let mut c = RawClient::connect_ok(port, &{
        let mut c = connect("bench-pub");
        c.clean = true;
        c
    })
    .await;
    let payload = [b'x'; 64];
    let (mut sent, mut acked) = (0, 0);
    while acked < n {
        while sent < n && sent - acked < 100 {
            let pkid = (sent % 60_000 + 1) as u16;
            let mut packet = raw::publish(V311, &topic_of(sent), 1, pkid, &payload, &[]);
            if retain {
                packet[0] |= 0x01;
            }
            c.send(&packet).await;
            sent += 1;
        }
        let p = c.expect_packet().await;
        if p.kind == PUBACK {
            acked += 1;
        }
    }
}

async fn startup_with_retained(kind: Kind, n: usize) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = Broker::start(kind, dir.path()).await;
    publish(broker.port, n, true, |i| {
        format!("r/{}/{}", i / 1000, i % 1000)
    })
    .await;
    broker.stop();
    let broker = Broker::start(kind, dir.path()).await;
    // Ready means serving what was kept: the last one is there.
    let mut c = RawClient::connect_ok(broker.port, &connect("bench-check")).await;
    c.send(&raw::subscribe(
        V311,
        1,
        &[(&format!("r/{}/{}", (n - 1) / 1000, (n - 1) % 1000), 1)],
    ))
    .await;
    c.expect_kind(SUBACK).await;
    c.expect_kind(PUBLISH).await;
    let served = broker.spawned.elapsed();
    let line = format!(
        "| start-up with {n} retained | {} | {:.2} s to listening, {:.2} s to the last one served |",
        broker.name,
        broker.ready.as_secs_f64(),
        served.as_secs_f64()
    );
    broker.stop();
    line
}

async fn resume_with_queued(kind: Kind, n: usize) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = Broker::start(kind, dir.path()).await;
    let mut sub = RawClient::connect_ok(broker.port, &connect("bench-sub")).await;
    sub.send(&raw::subscribe(V311, 1, &[("q/t", 1)])).await;
    sub.expect_kind(SUBACK).await;
    sub.send(&raw::disconnect(V311)).await;
    sub.expect_closed().await;
    publish(broker.port, n, false, |_| "q/t".to_owned()).await;
    broker.stop();
    let broker = Broker::start(kind, dir.path()).await;
    let start = Instant::now();
    let mut sub = RawClient::open(broker.port).await;
    sub.send(&connect("bench-sub").encode()).await;
    let ack = sub.expect_kind(CONNACK).await;
    let connack = start.elapsed();
    assert_eq!(ack.body[0] & 1, 1, "{}: session present", broker.name);
    let mut got = 0;
    while got < n {
        let p = sub.expect_kind(PUBLISH).await;
        sub.send(&raw::puback(p.publish_pkid())).await;
        got += 1;
    }
    let last = start.elapsed();
    let line = format!(
        "| resume after a restart, {n} queued | {} | CONNACK {:.1} ms, last message {:.1} ms |",
        broker.name,
        connack.as_secs_f64() * 1e3,
        last.as_secs_f64() * 1e3
    );
    broker.stop();
    line
}

async fn idle_sessions(kind: Kind, n: usize) -> String {
    let dir = tempfile::tempdir().expect("temp dir");
    let broker = Broker::start(kind, dir.path()).await;
    let before = broker.rss_kb();
    let mut held = Vec::with_capacity(n);
    for i in 0..n {
        let id = format!("idle-{i}");
        let mut c = RawClient::connect_ok(broker.port, &connect(&id)).await;
        c.send(&raw::subscribe(V311, 1, &[(&format!("idle/{i}"), 1)]))
            .await;
        c.expect_kind(SUBACK).await;
        held.push(c);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let online = broker.rss_kb();
    for mut c in held.drain(..) {
        c.send(&raw::disconnect(V311)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let offline = broker.rss_kb();
    let per = |kb: u64| (kb.saturating_sub(before) * 1024) as f64 / n as f64;
    let line = format!(
        "| {n} idle persistent sessions | {} | online {:.0} B, offline {:.0} B per session (RSS {} → {} → {} kB) |",
        broker.name,
        per(online),
        per(offline),
        before,
        online,
        offline
    );
    broker.stop();
    line
}

fn mosquitto_found() -> bool {
    Command::new("mosquitto")
        .arg("-h")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this as a smoke run.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let retained = knob("BENCH_RETAINED", if smoke { 100 } else { 100_000 });
    let queued = knob("BENCH_QUEUED", if smoke { 10 } else { 1_000 });
    let sessions = knob("BENCH_SESSIONS", if smoke { 10 } else { 10_000 });
    let kinds: Vec<Kind> = if mosquitto_found() && !smoke {
        vec![Kind::Adapter, Kind::Mosquitto]
    } else {
        vec![Kind::Adapter]
    };
    println!("| what | broker | figure |\n|---|---|---|");
    for &kind in &kinds {
        println!("{}", startup_with_retained(kind, retained).await);
    }
    for &kind in &kinds {
        println!("{}", resume_with_queued(kind, queued).await);
    }
    for &kind in &kinds {
        println!("{}", idle_sessions(kind, sessions).await);
    }
}
