//! Encoding one connection event for its store. Today's only format is the JSON body (stdout,
//! NATS JetStream and RabbitMQ all carry it); the Redis Streams field list joins this file when
//! the Redis sink lands.

mod common;

use criterion::{black_box, Criterion};
use mqtt_adapter::events::{ConnectionEvent, EventType};

fn json(c: &mut Criterion) {
    let event = ConnectionEvent {
        client_id: "5c1f7a2e-9d1b-4d7e-8a51-3f0e2b6c9d10".into(),
        event_type: EventType::Connect,
        instance: "mqtt-adapter-1".into(),
        occurred_at: 1_696_852_656_381_976_408,
    };
    c.bench_function("event_json", |b| b.iter(|| black_box(&event).to_json()));
}

fn main() {
    let mut criterion = common::criterion();
    json(&mut criterion);
    criterion.final_summary();
}
