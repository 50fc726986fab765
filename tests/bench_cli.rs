//! `mqtt-bench` against a running adapter, for tiny counts: the figures it reports are the counts
//! that really happened (QoS 1: every message sent is received; wrong credentials: every connect
//! is counted as refused), and its sessions produce paired connection events.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

/// One client allowed on the channel the bench's default topic template names.
const BENCH_CLIENTS: &str = r#"
[[clients]]
id = "bench"
secret = "bench-secret"

[[connections]]
client = "bench"
domain = "bench-domain"
channel = "bench-channel"
actions = ["publish", "subscribe"]
"#;

/// Upper bound for one tiny bench run (connects, publishes, drain), never a synchronisation sleep.
const RUN_WAIT: Duration = Duration::from_secs(60);

/// Runs `mqtt-bench <args> --json` to its end; returns exit code, stdout, stderr.
async fn bench(args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mqtt-bench"));
    cmd.args(args).stdin(std::process::Stdio::null());
    let output = tokio::time::timeout(
        RUN_WAIT,
        tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("mqtt-bench did not finish")
    .expect("run mqtt-bench");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Runs a scenario against `port` with the bench client's credentials plus `args`, and returns its
/// JSON report (asserting exit 0 and that stdout is exactly one JSON object).
async fn report(scenario: &str, port: u16, password: &str, args: &[&str]) -> Value {
    let port = port.to_string();
    let mut all = vec![
        scenario, "--port", &port, "-u", "bench", "-P", password, "--json",
    ];
    if scenario != "connect-storm" {
        all.extend_from_slice(&["--drain", "5"]);
    }
    all.extend_from_slice(args);
    let (code, stdout, stderr) = bench(&all).await;
    assert_eq!(
        code,
        Some(0),
        "mqtt-bench {all:?} failed; stderr:\n{stderr}"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "--json must print exactly one line, got {stdout:?}"
    );
    serde_json::from_str(lines[0]).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout:?}"))
}

fn count(report: &Value, key: &str) -> u64 {
    report[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing or not a count in {report}"))
}

#[tokio::test]
async fn qos1_scenarios_receive_every_message_sent() {
    let adapter = Adapter::start(BENCH_CLIENTS).await;
    let port = adapter.port;

    // (scenario, clients, messages, deliveries per message, connections)
    for (scenario, clients, messages, fanout, connections) in [
        ("fan-in", 3u64, 60u64, 1u64, 4u64),
        ("fan-out", 3, 20, 3, 4),
        ("pairs", 2, 40, 1, 4),
    ] {
        for version in ["3.1.1", "5"] {
            let r = report(
                scenario,
                port,
                "bench-secret",
                &[
                    "-q",
                    "1",
                    "-V",
                    version,
                    "-n",
                    &clients.to_string(),
                    "-c",
                    &messages.to_string(),
                ],
            )
            .await;
            let context = format!("{scenario} MQTT {version}: {r}");
            assert_eq!(count(&r, "connected"), connections, "{context}");
            assert_eq!(count(&r, "refused_connects"), 0, "{context}");
            assert_eq!(count(&r, "failed_connects"), 0, "{context}");
            assert_eq!(count(&r, "sent"), messages, "{context}");
            assert_eq!(count(&r, "acknowledged"), messages, "{context}");
            assert_eq!(count(&r, "expected"), messages * fanout, "{context}");
            assert_eq!(count(&r, "received"), messages * fanout, "{context}");
            assert_eq!(count(&r, "lost"), 0, "{context}");
            assert_eq!(
                r["latency"]["samples"].as_u64(),
                Some(messages * fanout),
                "{context}"
            );
        }
    }
    adapter.shutdown().await;
}

#[tokio::test]
async fn latency_scenario_times_every_delivery() {
    let adapter = Adapter::start(BENCH_CLIENTS).await;
    let r = report(
        "latency",
        adapter.port,
        "bench-secret",
        &["-q", "1", "-r", "200", "-c", "50"],
    )
    .await;
    assert_eq!(count(&r, "sent"), 50, "{r}");
    assert_eq!(count(&r, "received"), 50, "{r}");
    assert_eq!(count(&r, "lost"), 0, "{r}");
    let latency = &r["latency"];
    assert_eq!(latency["samples"].as_u64(), Some(50), "{r}");
    let (p50, p99) = (
        latency["p50_us"].as_f64().expect("p50"),
        latency["p99_us"].as_f64().expect("p99"),
    );
    assert!(p50 > 0.0 && p50 <= p99, "percentiles out of order: {r}");
    adapter.shutdown().await;
}

#[tokio::test]
async fn connect_storm_counts_accepted_and_refused_connects() {
    // 24 wrong secrets from one IP would otherwise ban it (SMQ_MQTT_ADAPTER_AUTH_FAILURES_PER_IP).
    let mut adapter = Adapter::start_with(
        BENCH_CLIENTS,
        &[("SMQ_MQTT_ADAPTER_AUTH_FAILURES_PER_IP", "0")],
    )
    .await;
    let port = adapter.port;

    for version in ["3.1.1", "5"] {
        let r = report(
            "connect-storm",
            port,
            "wrong-secret",
            &["-V", version, "-n", "12", "--hold", "0"],
        )
        .await;
        assert_eq!(count(&r, "refused_connects"), 12, "MQTT {version}: {r}");
        assert_eq!(count(&r, "connected"), 0, "MQTT {version}: {r}");
        assert_eq!(count(&r, "failed_connects"), 0, "MQTT {version}: {r}");
    }

    let r = report(
        "connect-storm",
        port,
        "bench-secret",
        &["-n", "15", "--concurrency", "5", "--hold", "0.2"],
    )
    .await;
    assert_eq!(count(&r, "connected"), 15, "{r}");
    assert_eq!(count(&r, "refused_connects"), 0, "{r}");
    assert_eq!(count(&r, "failed_connects"), 0, "{r}");
    assert_eq!(r["connack_latency"]["samples"].as_u64(), Some(15), "{r}");
    assert!(count(&r, "peak_connected") >= 1, "{r}");

    // A hold longer than 1.5 keep-alives: the storm client must ping, or the adapter closes
    // the connection (counted as failed).
    let r = report(
        "connect-storm",
        port,
        "bench-secret",
        &["-n", "3", "--keep-alive", "1", "--hold", "2.5"],
    )
    .await;
    assert_eq!(count(&r, "connected"), 3, "{r}");
    assert_eq!(count(&r, "failed_connects"), 0, "{r}");

    // The refused connects left no event; the 18 accepted sessions each left exactly one pair.
    let mut events = Vec::new();
    for _ in 0..36 {
        events.push(adapter.next_event().await);
    }
    assert!(events.iter().all(|e| e.client_id == "bench"), "{events:?}");
    assert_eq!(
        events.iter().filter(|e| e.event_type == "connect").count(),
        18,
        "{events:?}"
    );
    let rest = adapter.shutdown().await;
    assert!(
        rest.is_empty(),
        "events after every session ended: {rest:?}"
    );
}

/// A broker stand-in on a port of its own: accepts `n` connections, answers each CONNECT with a
/// success CONNACK of the CONNECT's protocol version, keeps each until its client closes, and
/// returns the source address each connection came from.
async fn record_peers(listener: tokio::net::TcpListener, n: usize) -> Vec<std::net::IpAddr> {
    let mut peers = Vec::new();
    let mut served = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (stream, peer) = listener.accept().await.expect("accept");
        peers.push(peer.ip());
        served.spawn(async move {
            let mut client = RawClient::from_stream(stream);
            let connect = client.expect_packet().await;
            // Body: protocol name (2 + 4 bytes), then the protocol level.
            let connack: &[u8] = match connect.body.get(6) {
                Some(&V5) => &[0x20, 0x03, 0x00, 0x00, 0x00],
                _ => &[0x20, 0x02, 0x00, 0x00],
            };
            client.send(connack).await;
            // DISCONNECT, then the client closes.
            while client.read_packet(WAIT).await.is_ok() {}
        });
    }
    while served.join_next().await.is_some() {}
    peers
}

#[tokio::test]
async fn connect_storm_binds_its_clients_to_the_source_addresses() {
    for version in ["3.1.1", "5"] {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a stand-in broker");
        let port = listener.local_addr().expect("port").port();
        let peers = tokio::spawn(record_peers(listener, 6));
        let r = report(
            "connect-storm",
            port,
            "any",
            &[
                "-V",
                version,
                "-n",
                "6",
                "--hold",
                "0",
                "--source",
                "127.0.0.2-127.0.0.3,127.0.0.5",
            ],
        )
        .await;
        assert_eq!(count(&r, "connected"), 6, "MQTT {version}: {r}");
        let mut peers: Vec<String> = peers
            .await
            .expect("stand-in broker")
            .iter()
            .map(ToString::to_string)
            .collect();
        peers.sort();
        // Round-robin: client n from the n-th address (wrapping), whatever order they connect in.
        assert_eq!(
            peers,
            [
                "127.0.0.2",
                "127.0.0.2",
                "127.0.0.3",
                "127.0.0.3",
                "127.0.0.5",
                "127.0.0.5"
            ],
            "MQTT {version}"
        );
    }
}

#[tokio::test]
async fn help_lists_the_scenarios_and_bad_options_name_the_flag() {
    let (code, stdout, _) = bench(&["--help"]).await;
    assert_eq!(code, Some(0));
    for scenario in ["fan-in", "fan-out", "pairs", "connect-storm", "latency"] {
        assert!(
            stdout.contains(scenario),
            "--help lacks {scenario}: {stdout}"
        );
    }

    let (code, _, stderr) = bench(&["fan-in", "--payload-size", "4", "--port", "1"]).await;
    assert_eq!(code, Some(2), "stderr: {stderr}");
    assert!(stderr.contains("--payload-size"), "stderr: {stderr}");

    let (code, _, stderr) = bench(&["connect-storm", "-u", "only-user", "--port", "1"]).await;
    assert_eq!(code, Some(2), "stderr: {stderr}");
    assert!(stderr.contains("--password"), "stderr: {stderr}");

    let (code, stdout, _) = bench(&["connect-storm", "--help"]).await;
    assert_eq!(code, Some(0));
    assert!(
        stdout.contains("--source"),
        "connect-storm --help: {stdout}"
    );
    for bad in [
        vec!["--source", "127.0.0.9-127.0.0.2"],
        vec!["--source", "127.0.0.2", "--tls-ca", "/dev/null"],
    ] {
        let mut args = vec!["connect-storm", "--port", "1"];
        args.extend(bad);
        let (code, _, stderr) = bench(&args).await;
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains("--source"), "{args:?}: {stderr}");
    }
}
