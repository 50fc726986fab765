//! Hot path of every PUBLISH and SUBSCRIBE: SuperMQ topic parsing, and topic parsing plus the
//! authorization decision against the static registry (an in-memory hit, which is also what a
//! cached remote decision costs once the supermq backend's cache answers).

mod common;

use std::path::Path;

use criterion::{black_box, Criterion};
use mqtt_adapter::auth::{authorize_topic, Identity, StaticRegistry, TopicDecision};
use mqtt_adapter::topic::{parse, Usage};

const REGISTRY: &str = r#"
[[clients]]
id = "bench"
secret = "bench-secret"
[[connections]]
client = "bench"
domain = "bench-domain"
channel = "bench-channel"
actions = ["publish", "subscribe"]
"#;

fn topic_parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("topic_parse");
    for (name, topic, usage) in [
        (
            "publish_plain_subtopic",
            "m/bench-domain/c/bench-channel/bench/7",
            Usage::Publish,
        ),
        (
            "publish_percent_encoded",
            "/m/bench-domain/c/bench-channel/a%2Fb/c",
            Usage::Publish,
        ),
        (
            "subscribe_wildcard",
            "m/bench-domain/c/bench-channel/bench/#",
            Usage::Subscribe,
        ),
    ] {
        group.bench_function(name, |b| b.iter(|| parse(black_box(topic), usage)));
    }
    group.finish();
}

fn authorize(c: &mut Criterion) {
    let registry = StaticRegistry::from_toml(REGISTRY, Path::new("bench.toml"))
        .expect("the bench registry is valid");
    let who = Identity {
        client_id: "bench".into(),
        anonymous: false,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("tokio runtime");
    let mut group = c.benchmark_group("authorize_topic");
    for (name, topic, allowed) in [
        (
            "publish_allowed",
            "m/bench-domain/c/bench-channel/bench/7",
            true,
        ),
        (
            "publish_denied",
            "m/bench-domain/c/other-channel/bench/7",
            false,
        ),
    ] {
        let decision = runtime.block_on(authorize_topic(&registry, &who, topic, Usage::Publish));
        assert_eq!(
            matches!(decision, TopicDecision::Allow(_)),
            allowed,
            "{topic}"
        );
        group.bench_function(name, |b| {
            b.to_async(&runtime)
                .iter(|| authorize_topic(&registry, &who, black_box(topic), Usage::Publish))
        });
    }
    group.finish();
}

fn main() {
    let mut criterion = common::criterion();
    topic_parse(&mut criterion);
    authorize(&mut criterion);
    criterion.final_summary();
}
