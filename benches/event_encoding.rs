//! Encoding one connection event for its store: the JSON body (stdout, NATS JetStream and
//! RabbitMQ carry it) and the flat field/value list of a Redis Streams XADD.

mod common;

use criterion::{black_box, Criterion};
use mqtt_adapter::events::{ConnectionEvent, EventType};

fn event() -> ConnectionEvent {
    ConnectionEvent {
        client_id: "5c1f7a2e-9d1b-4d7e-8a51-3f0e2b6c9d10".into(),
        event_type: EventType::Connect,
        instance: "mqtt-adapter-1".into(),
        occurred_at: 1_696_852_656_381_976_408,
        details: Default::default(),
    }
}

fn encodings(c: &mut Criterion) {
    let event = event();
    c.bench_function("event_json", |b| b.iter(|| black_box(&event).to_json()));
    c.bench_function("event_redis_fields", |b| {
        b.iter(|| black_box(&event).fields())
    });
}

fn main() {
    let mut criterion = common::criterion();
    encodings(&mut criterion);
    criterion.final_summary();
}
