//! Runs the real `mqtt-adapter` binary on free ports and reads the connection events it writes to stdout.
//!
//! Every stdout line must be one event; a line that is not is reported as a test failure at the point
//! the test reads it, so "stdout carries only events" is checked by every test that reads events.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::mpsc;

/// The instance name every test adapter runs with; every event must carry it.
pub const INSTANCE: &str = "test-inst";

/// Upper bound for anything a test awaits (an event, a packet, a close); never a synchronisation sleep.
pub const WAIT: Duration = Duration::from_secs(5);

/// How long start-up may take before the test gives up.
const READY_WAIT: Duration = Duration::from_secs(15);

/// One parsed connection event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub client_id: String,
    pub event_type: String,
    pub instance: String,
    pub occurred_at: u64,
}

/// Parses one stdout line and checks the exact event format of SPEC §4 (four keys, integer ns).
pub fn parse_event(line: &str) -> Result<Event, String> {
    let value: Value = serde_json::from_str(line)
        .map_err(|e| format!("stdout line is not a JSON event ({e}): {line:?}"))?;
    let obj = value
        .as_object()
        .ok_or_else(|| format!("stdout line is not a JSON object: {line:?}"))?;
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    if keys != ["client_id", "event_type", "instance", "occurred_at"] {
        return Err(format!(
            "event must have exactly client_id, event_type, instance, occurred_at; got {keys:?} in {line:?}"
        ));
    }
    let string = |key: &str| {
        obj[key]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| format!("{key} must be a JSON string in {line:?}"))
    };
    let occurred_at = obj["occurred_at"]
        .as_u64()
        .ok_or_else(|| format!("occurred_at must be a JSON integer in {line:?}"))?;
    // 2020-01-01 in ns: anything smaller is seconds, ms or µs, not ns.
    if occurred_at < 1_577_836_800_000_000_000 {
        return Err(format!(
            "occurred_at must be Unix time in nanoseconds, got {occurred_at} in {line:?}"
        ));
    }
    let event_type = string("event_type")?;
    if event_type != "connect" && event_type != "disconnect" {
        return Err(format!(
            "event_type must be connect or disconnect in {line:?}"
        ));
    }
    Ok(Event {
        client_id: string("client_id")?,
        event_type,
        instance: string("instance")?,
        occurred_at,
    })
}

/// A free TCP port on 127.0.0.1 (bound, read, released).
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    listener.local_addr().expect("local addr").port()
}

/// The adapter command with a clean SMQ_* environment: the MQTT port, the clients file (if any), the test
/// instance name, free ports for the other listeners, `memory` state (no data directory), then
/// `extra_env` (which may override any of them).
pub fn adapter_command(
    port: u16,
    clients_file: Option<&std::path::Path>,
    extra_env: &[(&str, &str)],
) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_mqtt-adapter"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("SMQ_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("SMQ_MQTT_ADAPTER_MQTT_PORT", port.to_string())
        .env("SMQ_MQTT_ADAPTER_INSTANCE", INSTANCE)
        .env("SMQ_MQTT_ADAPTER_LOG_LEVEL", "info")
        // Other listeners have fixed default ports; keep parallel test adapters off them.
        .env("SMQ_MQTT_ADAPTER_WS_PORT", free_port().to_string())
        .env("SMQ_MQTT_ADAPTER_HTTP_PORT", free_port().to_string())
        .env("SMQ_MQTT_ADAPTER_MQTTS_PORT", free_port().to_string())
        .env("SMQ_MQTT_ADAPTER_WSS_PORT", free_port().to_string())
        // The default (`local`) would lock ./data, shared by every command run at once; an
        // [`Adapter`] runs with `local` in its own data directory.
        .env("SMQ_MQTT_ADAPTER_STATE", "memory");
    if let Some(path) = clients_file {
        cmd.env("SMQ_MQTT_ADAPTER_CLIENTS_FILE", path);
    }
    for (key, value) in extra_env {
        cmd.env(key, value);
    }
    cmd
}

/// Runs a command that is expected to stop by itself (a start-up error, `--help`), bounded by
/// [`READY_WAIT`]; returns its status, stdout and stderr.
pub async fn run_to_exit(mut cmd: Command) -> (ExitStatus, String, String) {
    cmd.stdin(Stdio::null());
    let output = tokio::time::timeout(
        READY_WAIT,
        tokio::process::Command::from(cmd)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("mqtt-adapter kept running; it should have stopped by itself")
    .expect("run mqtt-adapter");
    (
        output.status,
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The ports an adapter command was given, read back from its environment.
#[derive(Debug, Clone, Copy)]
pub struct Ports {
    pub mqtts: u16,
    pub ws: u16,
    pub wss: u16,
    pub http: u16,
}

impl Ports {
    pub fn of(cmd: &Command) -> Ports {
        let port = |var: &str| {
            cmd.get_envs()
                .find(|(k, _)| *k == var)
                .and_then(|(_, v)| v?.to_str()?.parse().ok())
                .unwrap_or_else(|| panic!("{var} is not set on the adapter command"))
        };
        Ports {
            mqtts: port("SMQ_MQTT_ADAPTER_MQTTS_PORT"),
            ws: port("SMQ_MQTT_ADAPTER_WS_PORT"),
            wss: port("SMQ_MQTT_ADAPTER_WSS_PORT"),
            http: port("SMQ_MQTT_ADAPTER_HTTP_PORT"),
        }
    }
}

/// A running adapter process; dropping it kills the process.
pub struct Adapter {
    child: Child,
    pub port: u16,
    /// The other listeners' ports (TLS ones are open only when certificates are configured).
    pub ports: Ports,
    events: mpsc::UnboundedReceiver<Result<Event, String>>,
    /// Every event read so far, for the whole-run checks in [`assert_paired`].
    pub seen: Vec<Event>,
    stderr_path: PathBuf,
    clients_path: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl Adapter {
    /// The clients file the adapter was started with (to rewrite it before a SIGHUP).
    pub fn clients_file(&self) -> &std::path::Path {
        self.clients_path
            .as_deref()
            .expect("the adapter was started with a clients file")
    }

    /// Waits (bounded by `wait`) until the adapter's log holds `needle`; returns the log.
    pub async fn wait_log(&self, needle: &str, wait: Duration) -> String {
        let deadline = Instant::now() + wait;
        loop {
            let log = self.stderr();
            if log.contains(needle) {
                return log;
            }
            assert!(
                Instant::now() < deadline,
                "the log did not show {needle:?} within {wait:?}; stderr:\n{}",
                self.stderr_tail()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the adapter with `clients_toml` as its static clients file and waits until it accepts TCP.
    pub async fn start(clients_toml: &str) -> Adapter {
        Adapter::start_with(clients_toml, &[]).await
    }

    /// Like [`Adapter::start`], with extra environment variables (e.g. the connect timeout).
    pub async fn start_with(clients_toml: &str, extra_env: &[(&str, &str)]) -> Adapter {
        Adapter::launch(Some(clients_toml), extra_env).await
    }

    /// Starts the adapter with no clients file and extra environment variables (e.g. the
    /// `supermq` auth backend, which needs none).
    pub async fn start_without_clients_file(extra_env: &[(&str, &str)]) -> Adapter {
        Adapter::launch(None, extra_env).await
    }

    /// Starts the adapter with no clients file: the built-in demo registry.
    pub async fn start_demo() -> Adapter {
        Adapter::launch(None, &[]).await
    }

    async fn launch(clients_toml: Option<&str>, extra_env: &[(&str, &str)]) -> Adapter {
        // A port picked by `free_port` can be taken again before the adapter binds it (a parallel
        // test, a client's ephemeral port): start again with fresh ports in that case only.
        let mut attempts = 0;
        loop {
            match Adapter::launch_once(clients_toml, extra_env).await {
                Ok(adapter) => return adapter,
                Err(stderr) if stderr.contains("cannot listen on") && attempts < 3 => attempts += 1,
                Err(stderr) => panic!("mqtt-adapter exited during start-up; stderr:\n{stderr}"),
            }
        }
    }

    async fn launch_once(
        clients_toml: Option<&str>,
        extra_env: &[(&str, &str)],
    ) -> Result<Adapter, String> {
        let dir = tempfile::tempdir().expect("create temp dir");
        let clients_path = clients_toml.map(|toml| {
            let path = dir.path().join("clients.toml");
            std::fs::write(&path, toml).expect("write clients file");
            path
        });
        let stderr_path = dir.path().join("adapter.stderr");
        let stderr = std::fs::File::create(&stderr_path).expect("create stderr file");
        let port = free_port();
        // A private data directory unless the test names one (to restart on the same event log).
        let data_dir = dir.path().join("data");
        let data_dir = data_dir.to_string_lossy().into_owned();
        let mut env = vec![
            ("SMQ_MQTT_ADAPTER_DATA_DIR", data_dir.as_str()),
            ("SMQ_MQTT_ADAPTER_STATE", "local"),
        ];
        env.extend_from_slice(extra_env);

        let mut cmd = adapter_command(port, clients_path.as_deref(), &env);
        let ports = Ports::of(&cmd);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        let mut child = cmd.spawn().expect("spawn mqtt-adapter");

        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(parse_event(&line)).is_err() {
                    break;
                }
            }
        });

        let mut adapter = Adapter {
            child,
            port,
            ports,
            events: rx,
            seen: Vec::new(),
            stderr_path,
            clients_path: clients_path.clone(),
            _dir: dir,
        };
        adapter.wait_ready().await?;
        Ok(adapter)
    }

    /// Waits until every listener is up; `Err(stderr)` if the process exited first.
    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_WAIT;
        let mut backoff = Duration::from_millis(10);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("(exit {status})\n{}", self.stderr_tail()));
            }
            // Every listener is bound once /health answers 200.
            if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .is_ok()
                && matches!(
                    super::ops::try_http_get(self.ports.http, "/health").await,
                    Ok((200, _))
                )
            {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "mqtt-adapter did not accept TCP on port {} within {READY_WAIT:?}; stderr:\n{}",
                self.port,
                self.stderr_tail()
            );
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }

    /// The next event, or a panic if none arrives within [`WAIT`] or stdout held a non-event line.
    pub async fn next_event(&mut self) -> Event {
        match tokio::time::timeout(WAIT, self.events.recv()).await {
            Err(_) => panic!(
                "no event on stdout within {WAIT:?}; seen so far: {:?}",
                self.seen
            ),
            Ok(None) => panic!(
                "stdout closed (adapter exited?) while waiting for an event; seen so far: {:?}",
                self.seen
            ),
            Ok(Some(Err(bad))) => panic!("{bad}"),
            Ok(Some(Ok(event))) => {
                assert_eq!(event.instance, INSTANCE, "event instance: {event:?}");
                self.seen.push(event.clone());
                event
            }
        }
    }

    /// Awaits the next event and asserts its client id and type.
    pub async fn expect_event(&mut self, client_id: &str, event_type: &str) -> Event {
        let event = self.next_event().await;
        assert_eq!(
            (event.client_id.as_str(), event.event_type.as_str()),
            (client_id, event_type),
            "unexpected event {event:?}; seen so far: {:?}",
            self.seen
        );
        event
    }

    /// Awaits `expected.len()` events and asserts they are exactly `expected` (client id, type) in
    /// any order, for sessions that end concurrently.
    pub async fn expect_events_unordered(&mut self, expected: &[(&str, &str)]) -> Vec<Event> {
        let mut got = Vec::new();
        for _ in expected {
            got.push(self.next_event().await);
        }
        let mut have: Vec<(&str, &str)> = got
            .iter()
            .map(|e| (e.client_id.as_str(), e.event_type.as_str()))
            .collect();
        let mut want = expected.to_vec();
        have.sort_unstable();
        want.sort_unstable();
        assert_eq!(have, want, "events (any order); got {got:?}");
        got
    }

    pub async fn expect_connect(&mut self, client_id: &str) -> Event {
        self.expect_event(client_id, "connect").await
    }

    pub async fn expect_disconnect(&mut self, client_id: &str) -> Event {
        self.expect_event(client_id, "disconnect").await
    }

    /// The adapter's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM to the adapter.
    pub fn terminate(&self) {
        self.signal(libc::SIGTERM);
    }

    /// Sends `signal` (e.g. `libc::SIGINT`) to the adapter.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) with a pid we spawned and still own; no memory is touched.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({signal}) failed");
    }

    /// Reads events until stdout closes (the process exited), bounded by [`WAIT`].
    pub async fn events_until_eof(&mut self) -> Vec<Event> {
        let mut rest = Vec::new();
        loop {
            match tokio::time::timeout(WAIT, self.events.recv()).await {
                Err(_) => panic!("stdout still open {WAIT:?} after the last event; got {rest:?}"),
                Ok(None) => return rest,
                Ok(Some(Err(bad))) => panic!("{bad}"),
                Ok(Some(Ok(event))) => {
                    assert_eq!(event.instance, INSTANCE, "event instance: {event:?}");
                    self.seen.push(event.clone());
                    rest.push(event);
                }
            }
        }
    }

    /// Waits (bounded) for the process to exit and returns its status.
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "mqtt-adapter still running {WAIT:?} after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then: every remaining event is read, the process exits 0, and the whole run's events pair up.
    /// Returns the events emitted after SIGTERM.
    pub async fn shutdown(self) -> Vec<Event> {
        self.shutdown_by(libc::SIGTERM).await
    }

    /// [`Adapter::shutdown`] with another signal (SIGINT must behave like SIGTERM).
    pub async fn shutdown_by(mut self, signal: libc::c_int) -> Vec<Event> {
        self.signal(signal);
        let rest = self.events_until_eof().await;
        let status = self.wait_exit().await;
        assert!(
            status.success(),
            "mqtt-adapter exit status after signal {signal}: {status} (want 0)"
        );
        assert_paired(&self.seen);
        rest
    }

    /// `kill -9`: the process dies without closing anything; waits until it is gone.
    pub async fn kill(mut self) {
        self.signal(libc::SIGKILL);
        self.wait_exit().await;
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Everything the adapter logged so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

impl Drop for Adapter {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- mqtt-adapter stderr (tail) ---\n{}\n--- events seen ---\n{:?}",
                self.stderr_tail(),
                self.seen
            );
        }
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whole-run check: per client id, disconnects never outnumber connects at any point, every connect has
/// exactly one disconnect, and each disconnect can be matched to a distinct earlier connect.
pub fn assert_paired(events: &[Event]) {
    let mut by_client: BTreeMap<&str, (Vec<u64>, Vec<u64>)> = BTreeMap::new();
    for event in events {
        let entry = by_client.entry(event.client_id.as_str()).or_default();
        if event.event_type == "connect" {
            entry.0.push(event.occurred_at);
        } else {
            entry.1.push(event.occurred_at);
            assert!(
                entry.1.len() <= entry.0.len(),
                "disconnect without an open connect for {:?}: {event:?}; all events: {events:?}",
                event.client_id
            );
        }
    }
    for (client, (mut connects, mut disconnects)) in by_client {
        assert_eq!(
            connects.len(),
            disconnects.len(),
            "client {client:?}: {} connects but {} disconnects; all events: {events:?}",
            connects.len(),
            disconnects.len()
        );
        connects.sort_unstable();
        disconnects.sort_unstable();
        for (c, d) in connects.iter().zip(&disconnects) {
            assert!(
                d > c,
                "client {client:?}: a disconnect is not later than its connect (connects {connects:?}, disconnects {disconnects:?})"
            );
        }
    }
}

/// Asserts that `disconnect` ends the session `connect` started: same client, later occurred_at.
pub fn assert_session(connect: &Event, disconnect: &Event) {
    assert_eq!(connect.event_type, "connect");
    assert_eq!(disconnect.event_type, "disconnect");
    assert_eq!(connect.client_id, disconnect.client_id);
    assert!(
        disconnect.occurred_at > connect.occurred_at,
        "disconnect.occurred_at {} must be > connect.occurred_at {}",
        disconnect.occurred_at,
        connect.occurred_at
    );
}

/// Open descriptors of process `pid`.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|dir| dir.count())
        .unwrap_or(0)
}

/// Lowers the open file limit of process `pid` (ours: the adapter we spawned).
pub fn lower_file_limit(pid: u32, limit: u64) {
    let new = libc::rlimit {
        rlim_cur: limit,
        rlim_max: limit,
    };
    // SAFETY: prlimit reads `new`, which we own, and writes nothing (old is null).
    let rc = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &new,
            std::ptr::null_mut(),
        )
    };
    assert_eq!(rc, 0, "prlimit({pid}, RLIMIT_NOFILE, {limit})");
}
