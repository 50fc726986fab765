//! MQTT over TLS and mTLS (SPEC §6): rumqttc and `mosquitto_pub --cafile` connect; with a client CA,
//! a client without a certificate, or with one from another CA, never reaches CONNECT; with
//! `SMQ_MQTT_ADAPTER_CERT_CN_AS_USERNAME` the certificate's CN must be the username; an idle socket
//! does not hold the TLS listener up; the dev-certs script makes a PKI mosquitto accepts.

mod common;

use std::path::Path;

use common::*;
use rumqttc::{ConnectReturnCode, ConnectionError, QoS, TlsConfiguration, Transport};
use tokio::io::AsyncReadExt;

fn tls_options(
    port: u16,
    mqtt_id: &str,
    user: &str,
    pass: &str,
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> rumqttc::MqttOptions {
    let mut opts = v4_options(port, mqtt_id, user, pass);
    let read = |p: &Path| std::fs::read(p).expect("read PEM");
    opts.set_transport(Transport::tls_with_config(TlsConfiguration::Simple {
        ca: read(ca),
        alpn: None,
        client_auth: client.map(|(cert, key)| (read(cert), read(key))),
    }));
    opts
}

async fn start_tls(pki: &TestPki, mtls: bool, extra: &[(&str, &str)]) -> Adapter {
    let env = pki.env(mtls);
    let mut all: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    all.extend_from_slice(extra);
    Adapter::start_with(CLIENTS, &all).await
}

/// Runs `mosquitto_pub` against the TLS port with `tls_args` and returns whether it succeeded, with stderr.
async fn mosquitto_pub_tls(
    port: u16,
    tls_args: &[&str],
    user: &str,
    pass: &str,
    topic: &str,
    payload: &str,
) -> (bool, String) {
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new("mosquitto_pub")
            .args(["-h", "localhost", "-p", &port.to_string(), "-V", "mqttv311"])
            .args(tls_args)
            .args(["-i", &format!("mp-{user}"), "-u", user, "-P", pass])
            .args(["-t", topic, "-m", payload, "-q", "1"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("mosquitto_pub did not finish within the wait")
    .expect("run mosquitto_pub");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn tls_serves_rumqttc_and_mosquitto_pub() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = TestPki::new(dir.path(), "srv");
    let mut adapter = start_tls(&pki, false, &[]).await;
    let port = adapter.ports.mqtts;

    let mut sub =
        V4Client::connect_with(tls_options(port, "tls-sub", "c2", "s2", &pki.ca_pem, None)).await;
    adapter.expect_connect("c2").await;
    sub.subscribe("m/d1/c/ch1/tls", QoS::AtLeastOnce).await;

    let ca = pki.ca_pem.to_str().expect("UTF-8 path");
    let (ok, stderr) = mosquitto_pub_tls(
        port,
        &["--cafile", ca],
        "c1",
        "s1",
        "m/d1/c/ch1/tls",
        "over-tls",
    )
    .await;
    assert!(ok, "mosquitto_pub --cafile failed: {stderr}");
    let got = sub.next_publish().await;
    assert_eq!(&got.payload[..], b"over-tls");
    adapter.expect_connect("c1").await;
    adapter.expect_disconnect("c1").await;

    // A client that does not trust the server's CA is refused by the TLS handshake itself.
    let other = TestPki::new(dir.path(), "other");
    let refused =
        V4Client::try_connect(tls_options(port, "tls-x", "c3", "s3", &other.ca_pem, None)).await;
    assert!(
        refused.is_err(),
        "a client distrusting the server connected"
    );

    sub.disconnect().await;
    adapter.expect_disconnect("c2").await;
    assert_next_event_is_sentinel(&mut adapter).await;
    adapter.shutdown().await;
}

#[tokio::test]
async fn mtls_requires_a_certificate_from_the_client_ca() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = TestPki::new(dir.path(), "srv");
    let mut adapter = start_tls(&pki, true, &[]).await;
    let port = adapter.ports.mqtts;
    let ca = pki.ca_pem.as_path();

    // No client certificate: the handshake fails, no CONNACK, no event.
    let none = V4Client::try_connect(tls_options(port, "m-none", "c1", "s1", ca, None)).await;
    let err = none
        .err()
        .expect("a client without a certificate connected");
    assert!(
        !matches!(err, ConnectionError::ConnectionRefused(_)),
        "refused at CONNECT instead of at the handshake: {err}"
    );

    // A certificate from another CA: the same.
    let other = TestPki::new(dir.path(), "rogue");
    let (cert, key) = other.client("c1");
    let rogue = V4Client::try_connect(tls_options(
        port,
        "m-rogue",
        "c1",
        "s1",
        ca,
        Some((&cert, &key)),
    ))
    .await;
    assert!(rogue.is_err(), "a certificate from another CA was accepted");
    assert_next_event_is_sentinel(&mut adapter).await;

    // The right certificate: connected, and the password check still applies.
    let (cert, key) = pki.client("c1");
    let good = V4Client::connect_with(tls_options(
        port,
        "m-good",
        "c1",
        "s1",
        ca,
        Some((&cert, &key)),
    ))
    .await;
    adapter.expect_connect("c1").await;
    let bad_pass = V4Client::try_connect(tls_options(
        port,
        "m-pass",
        "c1",
        "nope",
        ca,
        Some((&cert, &key)),
    ))
    .await;
    assert!(
        matches!(
            bad_pass,
            Err(ConnectionError::ConnectionRefused(
                ConnectReturnCode::NotAuthorized
            ))
        ),
        "wrong password over mTLS: {:?}",
        bad_pass.err()
    );
    // Without the CN rule a certificate may carry any username.
    let (cert2, key2) = pki.client("someone-else");
    let other_user = V4Client::connect_with(tls_options(
        port,
        "m-any",
        "c2",
        "s2",
        ca,
        Some((&cert2, &key2)),
    ))
    .await;
    adapter.expect_connect("c2").await;

    // mosquitto_pub with --cafile --cert --key.
    let path = |p: &Path| p.to_str().expect("UTF-8 path").to_owned();
    let (ok, stderr) = mosquitto_pub_tls(
        port,
        &[
            "--cafile",
            &path(ca),
            "--cert",
            &path(&cert),
            "--key",
            &path(&key),
        ],
        "c1",
        "s1",
        "m/d1/c/ch1/mtls",
        "hi",
    )
    .await;
    assert!(
        ok,
        "mosquitto_pub with a client certificate failed: {stderr}"
    );
    adapter.expect_connect("c1").await;
    adapter.expect_disconnect("c1").await;

    good.disconnect().await;
    adapter.expect_disconnect("c1").await;
    other_user.disconnect().await;
    adapter.expect_disconnect("c2").await;
    adapter.shutdown().await;
}

#[tokio::test]
async fn cn_must_equal_username_when_required() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = TestPki::new(dir.path(), "srv");
    let mut adapter = start_tls(
        &pki,
        true,
        &[("SMQ_MQTT_ADAPTER_CERT_CN_AS_USERNAME", "true")],
    )
    .await;
    let port = adapter.ports.mqtts;
    let (cert, key) = pki.client("c1");
    let ca = pki.ca_pem.as_path();

    let mismatch = V4Client::try_connect(tls_options(
        port,
        "cn-x",
        "c2",
        "s2",
        ca,
        Some((&cert, &key)),
    ))
    .await;
    assert!(
        matches!(
            mismatch,
            Err(ConnectionError::ConnectionRefused(
                ConnectReturnCode::NotAuthorized
            ))
        ),
        "CN c1 with username c2: {:?}",
        mismatch.err()
    );
    assert_next_event_is_sentinel(&mut adapter).await;

    let matching = V4Client::connect_with(tls_options(
        port,
        "cn-ok",
        "c1",
        "s1",
        ca,
        Some((&cert, &key)),
    ))
    .await;
    adapter.expect_connect("c1").await;
    matching.disconnect().await;
    adapter.expect_disconnect("c1").await;
    adapter.shutdown().await;
}

#[tokio::test]
async fn idle_socket_neither_blocks_tls_nor_stays_open() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = TestPki::new(dir.path(), "srv");
    let mut adapter = start_tls(&pki, false, &[("SMQ_MQTT_ADAPTER_HANDSHAKE_TIMEOUT", "1")]).await;
    let port = adapter.ports.mqtts;

    // A socket that never starts its handshake.
    let mut idle = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let client =
        V4Client::connect_with(tls_options(port, "busy", "c1", "s1", &pki.ca_pem, None)).await;
    adapter.expect_connect("c1").await;
    client.disconnect().await;
    adapter.expect_disconnect("c1").await;

    // The handshake timeout closes it.
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(WAIT, idle.read(&mut buf))
        .await
        .expect("the idle socket was not closed within the wait");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "idle socket got data: {read:?}"
    );
    let (_, metrics) = http_get(adapter.ports.http, "/metrics").await;
    assert_eq!(
        metric(
            &metrics,
            "mqtt_adapter_handshake_errors_total{listener=\"tls\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
    adapter.shutdown().await;
}

#[tokio::test]
async fn dev_certs_script_makes_a_pki_mosquitto_accepts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/certs/make-dev-certs.sh");
    let status = std::process::Command::new("bash")
        .arg(script)
        .arg(dir.path())
        .arg("c1")
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run make-dev-certs.sh");
    assert!(status.success(), "make-dev-certs.sh: {status}");
    let file = |name: &str| dir.path().join(name).to_str().expect("UTF-8").to_owned();
    let mut adapter = Adapter::start_with(
        CLIENTS,
        &[
            ("SMQ_MQTT_ADAPTER_SERVER_CERT", &file("server.crt")),
            ("SMQ_MQTT_ADAPTER_SERVER_KEY", &file("server.key")),
            ("SMQ_MQTT_ADAPTER_CLIENT_CA_CERTS", &file("ca.crt")),
            ("SMQ_MQTT_ADAPTER_CERT_CN_AS_USERNAME", "true"),
        ],
    )
    .await;
    let port = adapter.ports.mqtts;
    let (ok, stderr) = mosquitto_pub_tls(
        port,
        &[
            "--cafile",
            &file("ca.crt"),
            "--cert",
            &file("client.crt"),
            "--key",
            &file("client.key"),
        ],
        "c1",
        "s1",
        "m/d1/c/ch1/dev",
        "x",
    )
    .await;
    assert!(
        ok,
        "mosquitto_pub with the script's certificates failed: {stderr}"
    );
    adapter.expect_connect("c1").await;
    adapter.expect_disconnect("c1").await;
    adapter.shutdown().await;
}

#[tokio::test]
async fn bad_tls_settings_stop_start_up_naming_the_variable() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = TestPki::new(dir.path(), "srv");
    let key = pki.server_key.to_str().expect("UTF-8 path");
    let cert = pki.server_cert.to_str().expect("UTF-8 path");
    let cases: [(&[(&str, &str)], &str); 3] = [
        (
            &[
                ("SMQ_MQTT_ADAPTER_SERVER_CERT", "/nonexistent/server.crt"),
                ("SMQ_MQTT_ADAPTER_SERVER_KEY", key),
            ],
            "SMQ_MQTT_ADAPTER_SERVER_CERT",
        ),
        (
            &[("SMQ_MQTT_ADAPTER_SERVER_CERT", cert)],
            "SMQ_MQTT_ADAPTER_SERVER_KEY",
        ),
        (
            &[
                ("SMQ_MQTT_ADAPTER_SERVER_CERT", cert),
                ("SMQ_MQTT_ADAPTER_SERVER_KEY", key),
                // A key is not a CA certificate.
                ("SMQ_MQTT_ADAPTER_CLIENT_CA_CERTS", key),
            ],
            "SMQ_MQTT_ADAPTER_CLIENT_CA_CERTS",
        ),
    ];
    for (env, var) in cases {
        let cmd = adapter_command(free_port(), None, env);
        let (status, _, stderr) = run_to_exit(cmd).await;
        assert!(!status.success(), "started with {env:?}");
        assert!(stderr.contains(var), "stderr does not name {var}: {stderr}");
    }
}

#[tokio::test]
async fn sighup_reloads_the_certificate_for_new_handshakes_only() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pki = TestPki::new(dir.path(), "srv");
    let mut adapter = start_tls(&pki, false, &[]).await;
    let port = adapter.ports.mqtts;
    let mut open =
        V4Client::connect_with(tls_options(port, "tls-open", "c2", "s2", &pki.ca_pem, None)).await;
    adapter.expect_connect("c2").await;
    open.subscribe("m/d1/c/ch1/reload", QoS::AtLeastOnce).await;

    // A broken file is refused and the old pair keeps serving.
    std::fs::write(&pki.server_cert, "not a certificate").expect("break cert");
    adapter.signal(libc::SIGHUP);
    adapter.wait_log("TLS reload refused", WAIT).await;
    let old =
        V4Client::connect_with(tls_options(port, "tls-old", "c1", "s1", &pki.ca_pem, None)).await;
    adapter.expect_connect("c1").await;
    old.disconnect().await;
    adapter.expect_disconnect("c1").await;

    // The pair of another CA: new handshakes use it, the open session stays.
    let next = TestPki::new(dir.path(), "next");
    std::fs::copy(&next.server_cert, &pki.server_cert).expect("copy cert");
    std::fs::copy(&next.server_key, &pki.server_key).expect("copy key");
    adapter.signal(libc::SIGHUP);
    adapter
        .wait_log("TLS certificate and key reloaded", WAIT)
        .await;
    let refused =
        V4Client::try_connect(tls_options(port, "tls-x", "c3", "s3", &pki.ca_pem, None)).await;
    assert!(refused.is_err(), "the old certificate is still served");
    let mut fresh =
        V4Client::connect_with(tls_options(port, "tls-new", "c1", "s1", &next.ca_pem, None)).await;
    adapter.expect_connect("c1").await;
    fresh
        .publish("m/d1/c/ch1/reload", QoS::AtLeastOnce, false, b"after")
        .await;
    assert_eq!(&open.next_publish().await.payload[..], b"after");
    fresh.disconnect().await;
    adapter.expect_disconnect("c1").await;
    open.disconnect().await;
    adapter.expect_disconnect("c2").await;
    adapter.shutdown().await;
}
