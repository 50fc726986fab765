//! Event stores for the tests: a private `redis-server` or `nats-server -js` on a free port (so each
//! test owns a clean store it can stop and start again on the same port), and a unique queue on the
//! machine's RabbitMQ bound to the `events` exchange. Each reads back the stored connection events.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;

use super::adapter::{free_port, Event};

/// Upper bound for events to reach a store after it is (back) up: the outbox's retry backoff is at
/// most 5 s, so this leaves ample room on a loaded machine. Never a synchronisation sleep.
pub const STORE_WAIT: Duration = Duration::from_secs(60);
/// Pause between two reads of a store while waiting for events to arrive.
const POLL: Duration = Duration::from_millis(50);

/// One stored event: the four seed fields, the field names in stored order, and any extra fields.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub event: Event,
    pub keys: Vec<String>,
    pub extra: BTreeMap<String, String>,
}

const SEED_KEYS: [&str; 4] = ["client_id", "event_type", "instance", "occurred_at"];

impl StoredEvent {
    /// Asserts the exact seed format: the four fields and nothing else.
    pub fn assert_seed_format(&self) {
        let mut keys = self.keys.clone();
        keys.sort_unstable();
        assert_eq!(keys, SEED_KEYS, "stored event fields: {self:?}");
        assert!(self.extra.is_empty(), "extra fields: {self:?}");
    }

    /// From a Redis stream entry's flat field/value pairs (occurred_at a decimal string).
    fn from_pairs(pairs: &[String]) -> StoredEvent {
        assert_eq!(pairs.len() % 2, 0, "odd field/value list: {pairs:?}");
        let mut map = BTreeMap::new();
        let mut keys = Vec::new();
        for pair in pairs.chunks(2) {
            keys.push(pair[0].clone());
            map.insert(pair[0].clone(), pair[1].clone());
        }
        let take = |map: &mut BTreeMap<String, String>, key: &str| {
            map.remove(key)
                .unwrap_or_else(|| panic!("entry without {key}: {pairs:?}"))
        };
        let event = Event {
            client_id: take(&mut map, "client_id"),
            event_type: take(&mut map, "event_type"),
            instance: take(&mut map, "instance"),
            occurred_at: take(&mut map, "occurred_at")
                .parse()
                .unwrap_or_else(|e| panic!("occurred_at is not decimal ns ({e}): {pairs:?}")),
        };
        StoredEvent {
            event,
            keys,
            extra: map,
        }
    }

    /// From a JSON body (NATS, RabbitMQ): an object whose occurred_at is a JSON integer.
    pub fn from_json(body: &[u8]) -> StoredEvent {
        let value: Value = serde_json::from_slice(body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(body)
            )
        });
        let obj = value.as_object().expect("body is a JSON object");
        let string = |key: &str| {
            obj.get(key)
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("{key} must be a JSON string in {value}"))
                .to_owned()
        };
        let event = Event {
            client_id: string("client_id"),
            event_type: string("event_type"),
            instance: string("instance"),
            occurred_at: obj
                .get("occurred_at")
                .and_then(Value::as_u64)
                .unwrap_or_else(|| panic!("occurred_at must be a JSON integer in {value}")),
        };
        let extra = obj
            .iter()
            .filter(|(k, _)| !SEED_KEYS.contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
            .collect();
        StoredEvent {
            event,
            keys: obj.keys().cloned().collect(),
            extra,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreKind {
    Redis,
    Nats,
}

/// A private store server process; killed when dropped.
pub struct StoreServer {
    pub kind: StoreKind,
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl StoreServer {
    pub async fn start(kind: StoreKind) -> StoreServer {
        let mut server = StoreServer {
            kind,
            port: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
        };
        server.start_again().await;
        server
    }

    pub fn url(&self) -> String {
        match self.kind {
            StoreKind::Redis => format!("redis://127.0.0.1:{}", self.port),
            StoreKind::Nats => format!("nats://127.0.0.1:{}", self.port),
        }
    }

    /// Starts the server (again) on the same port with the same data directory.
    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "store already running");
        let port = self.port.to_string();
        let dir = self.dir.path();
        let mut cmd = match self.kind {
            StoreKind::Redis => {
                let mut cmd = Command::new("redis-server");
                // Append-only file, so entries stored before a stop are still there after it.
                cmd.args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
                    .args(["--appendonly", "yes", "--appendfsync", "always"])
                    .arg("--dir")
                    .arg(dir);
                cmd
            }
            StoreKind::Nats => {
                let mut cmd = Command::new("nats-server");
                cmd.args(["-js", "-a", "127.0.0.1", "-p", &port])
                    .arg("-sd")
                    .arg(dir);
                cmd
            }
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let name = format!("{:?}", self.kind);
        self.child = Some(
            cmd.spawn()
                .unwrap_or_else(|e| panic!("spawn {name} server: {e}")),
        );
        let deadline = Instant::now() + STORE_WAIT;
        while !self.answers().await {
            assert!(
                Instant::now() < deadline,
                "{name} server on port {port} not ready"
            );
            tokio::time::sleep(POLL).await;
        }
    }

    async fn answers(&self) -> bool {
        match self.kind {
            StoreKind::Redis => self.redis_entries().await.is_ok(),
            StoreKind::Nats => async_nats::connect(self.url()).await.is_ok(),
        }
    }

    /// Stops the server (SIGTERM, so it keeps what it stored) and waits until it is gone.
    pub fn stop(&mut self) {
        let mut child = self.child.take().expect("store running");
        let pid = libc::pid_t::try_from(child.id()).expect("pid fits pid_t");
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        child.wait().expect("wait for store exit");
    }

    async fn redis_entries(&self) -> Result<Vec<StoredEvent>, String> {
        let client = redis::Client::open(self.url()).map_err(|e| e.to_string())?;
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        // In pages: one XRANGE of thousands of entries can outlast the client's response
        // timeout on a loaded machine.
        let mut events = Vec::new();
        let mut start = "-".to_owned();
        loop {
            let page: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
                .arg("supermq.mqtt")
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(500)
                .query_async(&mut conn)
                .await
                .map_err(|e| e.to_string())?;
            let Some((last, _)) = page.last() else {
                return Ok(events);
            };
            start = format!("({last}");
            events.extend(page.iter().map(|(_, pairs)| StoredEvent::from_pairs(pairs)));
        }
    }

    async fn nats_entries(&self) -> Result<Vec<StoredEvent>, String> {
        let client = async_nats::connect(self.url())
            .await
            .map_err(|e| e.to_string())?;
        let js = async_nats::jetstream::new(client);
        let mut stream = js.get_stream("events").await.map_err(|e| e.to_string())?;
        let state = stream
            .info()
            .await
            .map_err(|e| e.to_string())?
            .state
            .clone();
        let mut events = Vec::new();
        if state.messages == 0 {
            return Ok(events);
        }
        for seq in state.first_sequence..=state.last_sequence {
            let message = stream
                .get_raw_message(seq)
                .await
                .map_err(|e| e.to_string())?;
            assert_eq!(message.subject.as_str(), "events.supermq.mqtt");
            events.push(StoredEvent::from_json(&message.payload));
        }
        Ok(events)
    }

    /// How many events are stored (cheap: `XLEN`, or the stream's message count).
    pub async fn count(&self) -> Result<u64, String> {
        match self.kind {
            StoreKind::Redis => {
                let client = redis::Client::open(self.url()).map_err(|e| e.to_string())?;
                let mut conn = client
                    .get_multiplexed_async_connection()
                    .await
                    .map_err(|e| e.to_string())?;
                redis::cmd("XLEN")
                    .arg("supermq.mqtt")
                    .query_async(&mut conn)
                    .await
                    .map_err(|e| e.to_string())
            }
            StoreKind::Nats => {
                let client = async_nats::connect(self.url())
                    .await
                    .map_err(|e| e.to_string())?;
                let js = async_nats::jetstream::new(client);
                let mut stream = js.get_stream("events").await.map_err(|e| e.to_string())?;
                Ok(stream
                    .info()
                    .await
                    .map_err(|e| e.to_string())?
                    .state
                    .messages)
            }
        }
    }

    /// Everything stored so far, in stream order.
    pub async fn entries(&self) -> Result<Vec<StoredEvent>, String> {
        match self.kind {
            StoreKind::Redis => self.redis_entries().await,
            StoreKind::Nats => self.nats_entries().await,
        }
    }

    /// Waits (bounded by [`STORE_WAIT`]) until at least `n` events are stored and returns them all.
    pub async fn wait_events(&self, n: usize) -> Vec<StoredEvent> {
        let deadline = Instant::now() + STORE_WAIT;
        loop {
            let got = self.entries().await;
            match &got {
                Ok(events) if events.len() >= n => return events.clone(),
                _ => {}
            }
            assert!(
                Instant::now() < deadline,
                "{:?}: fewer than {n} events after {STORE_WAIT:?}: {:?}",
                self.kind,
                got.map(|e| e.len())
            );
            tokio::time::sleep(POLL).await;
        }
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The machine's RabbitMQ (or `SMQ_TEST_AMQP_URL`).
pub fn amqp_url() -> String {
    std::env::var("SMQ_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// A unique, exclusive queue bound to the `events` exchange with the events routing key.
pub struct AmqpQueue {
    _conn: lapin::Connection,
    consumer: lapin::Consumer,
}

/// A unique, exclusive, auto-deleted queue on the machine's RabbitMQ bound to the `events`
/// exchange (declared as the adapter declares it, so whichever comes first they match) with
/// `binding`, and a consumer on it. The connection must outlive the consumer.
pub async fn bind_events_queue(binding: &str) -> (lapin::Connection, lapin::Consumer) {
    use lapin::options::*;
    use lapin::types::FieldTable;
    let conn = lapin::Connection::connect(&amqp_url(), lapin::ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ (set SMQ_TEST_AMQP_URL if it is not on 127.0.0.1:5672)");
    let channel = conn.create_channel().await.expect("AMQP channel");
    let durable = ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .exchange_declare(
            "events".into(),
            lapin::ExchangeKind::Topic,
            durable,
            FieldTable::default(),
        )
        .await
        .expect("declare exchange events");
    let name = format!("mqtt-adapter-test-{}", uuid::Uuid::new_v4());
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        auto_delete: true,
        ..Default::default()
    };
    channel
        .queue_declare(name.as_str().into(), exclusive, FieldTable::default())
        .await
        .expect("declare queue");
    channel
        .queue_bind(
            name.as_str().into(),
            "events".into(),
            binding.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind queue");
    let no_ack = BasicConsumeOptions {
        no_ack: true,
        ..Default::default()
    };
    let consumer = channel
        .basic_consume(
            name.as_str().into(),
            "test".into(),
            no_ack,
            FieldTable::default(),
        )
        .await
        .expect("consume");
    (conn, consumer)
}

impl AmqpQueue {
    pub async fn bind() -> AmqpQueue {
        let (conn, consumer) = bind_events_queue("events.supermq.mqtt").await;
        AmqpQueue {
            _conn: conn,
            consumer,
        }
    }

    /// Waits for `n` events of `instance` without parsing more than their instance.
    pub async fn count_until(&mut self, instance: &str, n: usize) {
        let mut got = 0;
        while got < n {
            let delivery = tokio::time::timeout(STORE_WAIT, self.consumer.next())
                .await
                .unwrap_or_else(|_| panic!("only {got} of {n} events from RabbitMQ"))
                .expect("consumer stream ended")
                .expect("delivery");
            if StoredEvent::from_json(&delivery.data).event.instance == instance {
                got += 1;
            }
        }
    }

    /// The next `n` events whose instance is `instance` (others share the exchange), with each
    /// delivery's persistence flag checked.
    pub async fn events(&mut self, instance: &str, n: usize) -> Vec<StoredEvent> {
        let mut got = Vec::new();
        while got.len() < n {
            let delivery = tokio::time::timeout(STORE_WAIT, self.consumer.next())
                .await
                .unwrap_or_else(|_| {
                    panic!("only {} of {n} events from RabbitMQ: {got:?}", got.len())
                })
                .expect("consumer stream ended")
                .expect("delivery");
            let event = StoredEvent::from_json(&delivery.data);
            if event.event.instance != instance {
                continue;
            }
            assert_eq!(delivery.routing_key.as_str(), "events.supermq.mqtt");
            assert_eq!(
                delivery.properties.delivery_mode(),
                &Some(2),
                "events must be persistent"
            );
            got.push(event);
        }
        got
    }
}

/// A clients file with `n` devices `dev-<i>` (secret `s-<i>`).
pub fn devices_file(n: usize) -> String {
    let mut toml = String::new();
    for i in 0..n {
        toml.push_str(&format!(
            "[[clients]]\nid = \"dev-{i}\"\nsecret = \"s-{i}\"\n"
        ));
    }
    toml.push_str("[[clients]]\nid = \"late\"\nsecret = \"sl\"\n");
    toml
}

/// At-least-once delivery may repeat an event after a store failure; repeats carry the same
/// occurred_at, so they are set aside here and every session is then checked exactly once.
pub fn without_repeats(events: Vec<StoredEvent>) -> Vec<StoredEvent> {
    let mut seen = BTreeSet::new();
    events
        .into_iter()
        .filter(|e| {
            seen.insert((
                e.event.client_id.clone(),
                e.event.event_type.clone(),
                e.event.occurred_at,
            ))
        })
        .collect()
}

pub fn es_env<'a>(url: &'a str, data_dir: &'a str) -> Vec<(&'static str, &'a str)> {
    vec![
        ("SMQ_ES_URL", url),
        ("SMQ_MQTT_ADAPTER_DATA_DIR", data_dir),
        // The store may be down at shutdown: don't wait long for it.
        ("SMQ_MQTT_ADAPTER_SHUTDOWN_TIMEOUT", "1"),
    ]
}

pub fn path_str(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}
