//! A test's own `nats-server -js` on a free port, killed on drop; can be stopped and started
//! again on the same port.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::adapter::free_port;

pub struct NatsServer {
    pub port: u16,
    /// The `nats-server` executable (from PATH unless told otherwise).
    binary: String,
    /// Whether JetStream is on (`-js`).
    jetstream: bool,
    child: Option<Child>,
    store: tempfile::TempDir,
    log: PathBuf,
}

impl NatsServer {
    pub async fn start() -> NatsServer {
        NatsServer::start_on(free_port()).await
    }

    /// Starts on a given port (e.g. one an adapter was told about before NATS was up).
    pub async fn start_on(port: u16) -> NatsServer {
        NatsServer::start_binary("nats-server", port, true).await
    }

    /// Starts a given `nats-server` executable (e.g. an older version) on `port`, with or
    /// without JetStream.
    pub async fn start_binary(binary: &str, port: u16, jetstream: bool) -> NatsServer {
        let store = tempfile::tempdir().expect("nats store dir");
        let log = store.path().join("nats.log");
        let mut server = NatsServer {
            port,
            binary: binary.to_owned(),
            jetstream,
            child: None,
            store,
            log,
        };
        server.launch().await;
        server
    }

    async fn launch(&mut self) {
        let log = std::fs::File::create(&self.log).expect("nats log");
        let mut command = Command::new(&self.binary);
        if self.jetstream {
            command
                .arg("-js")
                .arg("-sd")
                .arg(self.store.path().join("js"));
        }
        let child = command
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .expect("spawn nats-server (is it installed?)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                Instant::now() < deadline,
                "nats-server did not listen on {}: {}",
                self.port,
                std::fs::read_to_string(&self.log).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Kills the server (no goodbye to clients) and waits until it is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        self.launch().await;
    }

    /// A NATS client for the test itself.
    pub async fn client(&self) -> async_nats::Client {
        async_nats::connect(self.url())
            .await
            .expect("connect to the test's nats-server")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}
