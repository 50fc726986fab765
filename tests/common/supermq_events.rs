//! Reads events written in the `supermq` layout back from each store, as SuperMQ's consumers
//! would: the three Redis streams `events.supermq.mqtt.client_*` (one `data` field each), the
//! JetStream subjects `events.supermq.mqtt.client_*` and a unique RabbitMQ queue bound to
//! `events.supermq.mqtt.*` (bodies decoded with the `messaging.Message` proto).

use std::time::Instant;

use futures_util::StreamExt;
use mqtt_adapter::bridge::message::Message;
use prost::Message as _;
use serde_json::Value;

use super::stores::{bind_events_queue, StoreKind, StoreServer, STORE_WAIT};

/// The three streams of the layout.
pub const STREAMS: [&str; 3] = [
    "supermq.mqtt.client_connect",
    "supermq.mqtt.client_subscribe",
    "supermq.mqtt.client_disconnect",
];

/// One stored event: the stream it is in (without the `events.` prefix) and its JSON object.
#[derive(Debug, Clone)]
pub struct SupermqEntry {
    pub stream: String,
    pub data: Value,
}

impl SupermqEntry {
    pub fn occurred_at(&self) -> u64 {
        self.data["occurred_at"]
            .as_u64()
            .unwrap_or_else(|| panic!("occurred_at must be a JSON integer: {self:?}"))
    }

    pub fn subscriber_id(&self) -> &str {
        self.data["subscriber_id"].as_str().unwrap_or_default()
    }
}

fn json(text: &[u8]) -> Value {
    serde_json::from_slice(text)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(text)))
}

/// A `messaging.Message` body carrying only the JSON `payload`.
fn decode_body(body: &[u8]) -> Value {
    let message = Message::decode(body).expect("body is a protobuf messaging.Message");
    let payload = message.payload.clone();
    assert_eq!(
        Message {
            payload: Default::default(),
            ..message
        },
        Message::default(),
        "only the payload is set"
    );
    json(&payload)
}

async fn redis_entries(store: &StoreServer) -> Result<Vec<SupermqEntry>, String> {
    let client = redis::Client::open(store.url()).map_err(|e| e.to_string())?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let mut entries = Vec::new();
    for stream in STREAMS {
        let page: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
            .arg(format!("events.{stream}"))
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .map_err(|e| e.to_string())?;
        for (_, pairs) in page {
            assert_eq!(pairs.len(), 2, "one field per entry: {pairs:?}");
            assert_eq!(pairs[0], "data", "the field is data: {pairs:?}");
            entries.push(SupermqEntry {
                stream: stream.to_owned(),
                data: json(pairs[1].as_bytes()),
            });
        }
    }
    let seed: u64 = redis::cmd("XLEN")
        .arg("supermq.mqtt")
        .query_async(&mut conn)
        .await
        .map_err(|e| e.to_string())?;
    assert_eq!(seed, 0, "nothing in the seed's stream");
    Ok(entries)
}

async fn nats_entries(store: &StoreServer) -> Result<Vec<SupermqEntry>, String> {
    let client = async_nats::connect(store.url())
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
    let mut entries = Vec::new();
    if state.messages == 0 {
        return Ok(entries);
    }
    for seq in state.first_sequence..=state.last_sequence {
        let message = stream
            .get_raw_message(seq)
            .await
            .map_err(|e| e.to_string())?;
        let subject = message.subject.as_str();
        let stream = subject
            .strip_prefix("events.")
            .unwrap_or_else(|| panic!("subject {subject:?} outside events."));
        assert!(STREAMS.contains(&stream), "unexpected subject {subject:?}");
        entries.push(SupermqEntry {
            stream: stream.to_owned(),
            data: decode_body(&message.payload),
        });
    }
    Ok(entries)
}

/// Waits (bounded) until the private store holds at least `n` events and returns them all.
pub async fn wait_store_entries(store: &StoreServer, n: usize) -> Vec<SupermqEntry> {
    let deadline = Instant::now() + STORE_WAIT;
    loop {
        let got = match store.kind {
            StoreKind::Redis => redis_entries(store).await,
            StoreKind::Nats => nats_entries(store).await,
        };
        if let Ok(entries) = &got {
            if entries.len() >= n {
                return entries.clone();
            }
        }
        assert!(Instant::now() < deadline, "fewer than {n} events: {got:?}");
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// A unique, exclusive queue on the machine's RabbitMQ bound to `events.supermq.mqtt.*`.
pub struct SupermqQueue {
    _conn: lapin::Connection,
    consumer: lapin::Consumer,
}

impl SupermqQueue {
    pub async fn bind() -> SupermqQueue {
        let (conn, consumer) = bind_events_queue("events.supermq.mqtt.*").await;
        SupermqQueue {
            _conn: conn,
            consumer,
        }
    }

    /// The next `n` events of the session `subscriber_id` (others share the exchange), with
    /// each delivery's routing key and properties checked.
    pub async fn entries(&mut self, subscriber_id: &str, n: usize) -> Vec<SupermqEntry> {
        let mut got = Vec::new();
        while got.len() < n {
            let delivery = tokio::time::timeout(STORE_WAIT, self.consumer.next())
                .await
                .unwrap_or_else(|_| panic!("only {got:?} of {n} events from RabbitMQ"))
                .expect("consumer stream ended")
                .expect("delivery");
            let key = delivery.routing_key.as_str();
            let stream = key
                .strip_prefix("events.")
                .unwrap_or_else(|| panic!("routing key {key:?} outside events."));
            let entry = SupermqEntry {
                stream: stream.to_owned(),
                data: decode_body(&delivery.data),
            };
            if entry.subscriber_id() != subscriber_id {
                continue;
            }
            let props = &delivery.properties;
            assert_eq!(
                props.content_type().as_ref().map(|c| c.as_str()),
                Some("application/octet-stream")
            );
            assert_eq!(
                props.app_id().as_ref().map(|a| a.as_str()),
                Some("supermq-publisher")
            );
            assert_eq!(props.delivery_mode(), &Some(2), "events must be persistent");
            got.push(entry);
        }
        got
    }
}
