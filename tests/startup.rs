//! Start-up and configuration (SPEC §3 static, §6): bad clients files and bad values stop start-up
//! with a message that says what to change, `--help` lists the variables, and the demo registry
//! prints mosquitto command lines that actually work.

mod common;

use std::time::{Duration, Instant};

use common::*;

async fn start_with_clients_file(toml: &str) -> (std::process::ExitStatus, String, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("broken-clients.toml");
    std::fs::write(&path, toml).expect("write clients file");
    run_to_exit(adapter_command(free_port(), Some(&path), &[])).await
}

#[tokio::test]
async fn clients_file_errors_stop_start_up_naming_file_and_line() {
    let cases = [
        (
            "unknown key",
            "[[clients]]\nid = \"c1\"\nsecret = \"s1\"\ncolour = \"red\"\n",
        ),
        (
            "duplicate client id",
            "[[clients]]\nid = \"c1\"\nsecret = \"s1\"\n\n[[clients]]\nid = \"c1\"\nsecret = \"s2\"\n",
        ),
        (
            "connection naming an unknown client",
            "[[clients]]\nid = \"c1\"\nsecret = \"s1\"\n\n[[connections]]\nclient = \"nobody\"\ndomain = \"d1\"\nchannel = \"ch1\"\nactions = [\"publish\"]\n",
        ),
    ];
    for (case, toml) in cases {
        let (status, stdout, stderr) = start_with_clients_file(toml).await;
        assert!(
            !status.success(),
            "{case}: start-up must fail, exit status {status}"
        );
        assert!(
            stderr.contains("broken-clients.toml"),
            "{case}: the error must name the file; stderr:\n{stderr}"
        );
        assert!(
            stderr.to_lowercase().contains("line"),
            "{case}: the error must give the line; stderr:\n{stderr}"
        );
        assert!(
            stdout.is_empty(),
            "{case}: stdout carries events only, got {stdout:?}"
        );
    }
}

#[tokio::test]
async fn missing_clients_file_stops_start_up_naming_it() {
    let cmd = adapter_command(
        free_port(),
        Some(std::path::Path::new("/nonexistent/clients.toml")),
        &[],
    );
    let (status, _, stderr) = run_to_exit(cmd).await;
    assert!(!status.success(), "exit status {status}");
    assert!(
        stderr.contains("/nonexistent/clients.toml"),
        "the error must name the file; stderr:\n{stderr}"
    );
}

#[tokio::test]
async fn port_in_use_stops_start_up_naming_the_variable() {
    let taken = std::net::TcpListener::bind("0.0.0.0:0").expect("bind a port");
    let port = taken.local_addr().expect("addr").port();
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("clients.toml");
    std::fs::write(&path, CLIENTS).expect("write clients file");
    let (status, _, stderr) = run_to_exit(adapter_command(port, Some(&path), &[])).await;
    assert!(!status.success(), "exit status {status}");
    assert!(
        stderr.contains("SMQ_MQTT_ADAPTER_MQTT_PORT"),
        "the error must name the variable; stderr:\n{stderr}"
    );
}

#[tokio::test]
async fn unparsable_value_stops_start_up_naming_the_variable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("clients.toml");
    std::fs::write(&path, CLIENTS).expect("write clients file");
    let cmd = adapter_command(
        free_port(),
        Some(&path),
        &[("SMQ_MQTT_ADAPTER_CONNECT_TIMEOUT", "soon")],
    );
    let (status, _, stderr) = run_to_exit(cmd).await;
    assert!(!status.success(), "exit status {status}");
    assert!(
        stderr.contains("SMQ_MQTT_ADAPTER_CONNECT_TIMEOUT"),
        "the error must name the variable the user set; stderr:\n{stderr}"
    );
}

#[tokio::test]
async fn help_lists_the_variables_with_defaults() {
    let mut cmd = adapter_command(free_port(), None, &[]);
    cmd.arg("--help");
    let (status, stdout, stderr) = run_to_exit(cmd).await;
    assert!(
        status.success(),
        "--help exit status {status}; stderr:\n{stderr}"
    );
    for variable in [
        "SMQ_MQTT_ADAPTER_MQTT_PORT",
        "SMQ_MQTT_ADAPTER_CLIENTS_FILE",
        "SMQ_MQTT_ADAPTER_INSTANCE",
        "SMQ_MQTT_ADAPTER_LOG_LEVEL",
        "SMQ_MQTT_ADAPTER_CONNECT_TIMEOUT",
        "SMQ_MQTT_ADAPTER_MAX_PACKET_SIZE",
        "SMQ_ES_URL",
        "SMQ_MQTT_ADAPTER_STATE",
        "SMQ_MQTT_ADAPTER_HTTP_IDLE_TIMEOUT",
    ] {
        assert!(
            stdout.contains(variable),
            "--help must list {variable}:\n{stdout}"
        );
    }
    assert!(
        stdout.contains("1883"),
        "--help must show the MQTT port default:\n{stdout}"
    );
}

/// The first stderr line containing `tool`, from `tool` on, waiting (bounded) until it is printed.
async fn printed_command(adapter: &Adapter, tool: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(line) = adapter.stderr_tail().lines().find(|l| l.contains(tool)) {
            let at = line.find(tool).expect("contains tool");
            return line[at..].trim().to_string();
        }
        assert!(
            Instant::now() < deadline,
            "the demo registry must print a {tool} command line; stderr:\n{}",
            adapter.stderr_tail()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn demo_registry_prints_working_mosquitto_commands() {
    use tokio::io::AsyncBufReadExt;
    let mut adapter = Adapter::start_demo().await;
    let sub_line = printed_command(&adapter, "mosquitto_sub").await;
    let pub_line = printed_command(&adapter, "mosquitto_pub").await;
    assert!(
        sub_line.contains(&adapter.port.to_string())
            && pub_line.contains(&adapter.port.to_string()),
        "the printed commands must target the adapter's port {}:\n{sub_line}\n{pub_line}",
        adapter.port
    );

    // Run the printed subscriber, line-buffered with debug output so its SUBACK is visible.
    let mut sub = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(format!("exec stdbuf -oL {sub_line} -d -C 1 -W 10"))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("run the printed mosquitto_sub");
    let mut lines = tokio::io::BufReader::new(sub.stdout.take().expect("stdout")).lines();
    tokio::time::timeout(WAIT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains("SUBACK") {
                return;
            }
        }
        panic!("the printed mosquitto_sub ended before its SUBACK");
    })
    .await
    .expect("the printed mosquitto_sub got no SUBACK");
    let subscriber = adapter.next_event().await;
    assert_eq!(subscriber.event_type, "connect");

    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new("sh")
            .arg("-c")
            .arg(&pub_line)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the printed mosquitto_pub did not finish")
    .expect("run the printed mosquitto_pub");
    assert!(
        out.status.success(),
        "the printed mosquitto_pub failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = tokio::time::timeout(WAIT, sub.wait())
        .await
        .expect("the printed mosquitto_sub received nothing")
        .expect("wait mosquitto_sub");
    assert!(
        status.success(),
        "the printed mosquitto_sub must receive the printed publish (exit {status})"
    );
    adapter.shutdown().await;
}
