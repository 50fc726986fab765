//! Arbitrary bytes into a session, through an in-memory duplex stream against an in-process
//! broker core: frame checks, codec decode, packet handling and encoding back. The first input
//! byte picks how the stream starts (raw bytes, or an accepted MQTT 3.1.1 / MQTT 5 / persistent
//! MQTT 5 CONNECT followed by the rest), so the fuzzer spends its time past authentication too.
//! Each input must end its session once the input is used up (no hang, no panic), and what the
//! adapter writes back must be whole MQTT frames.
#![no_main]

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use mqtt_adapter::auth::StaticRegistry;
use mqtt_adapter::broker::{Broker, BrokerConfig, QueueLimits};
use mqtt_adapter::hooks::Hooks;
use mqtt_adapter::metrics::Metrics;
use mqtt_adapter::session::limits::{Limits, SessionBounds};
use mqtt_adapter::session::{self, SessionContext};
use mqtt_adapter::topic::TopicBounds;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

const REGISTRY: &str = r#"
[[clients]]
id = "c1"
secret = "s1"
[[connections]]
client = "c1"
domain = "d1"
channel = "ch1"
actions = ["publish", "subscribe"]
[[acl]]
client = "c1"
topics = ["t/#"]
actions = ["publish", "subscribe"]
[anonymous]
topics = ["a/#"]
"#;

/// A session that ends takes far less than this; beyond it the input hangs the session.
const HANG: Duration = Duration::from_secs(10);

struct Shared {
    registry: Arc<StaticRegistry>,
    metrics: Arc<Metrics>,
}

fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| Shared {
        registry: Arc::new(
            StaticRegistry::from_toml(REGISTRY, Path::new("fuzz.toml")).expect("fuzz registry"),
        ),
        metrics: Metrics::new(),
    })
}

thread_local! {
    static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
}

/// A fresh broker core per input, small bounds so the limits are reached.
fn context() -> Arc<SessionContext> {
    let shared = shared();
    let broker = Broker::new(BrokerConfig {
        queue: QueueLimits {
            max_messages: 16,
            max_bytes: 4096,
        },
        max_retained: 4,
        max_retained_bytes: 4096,
        retained_client_share: 50,
        max_offline_sessions: 4,
    });
    let limits =
        Limits::new(64, 8, NonZeroU32::new(1000), false).with_session_bounds(SessionBounds {
            max_subscriptions: 8,
            topic: TopicBounds {
                max_length: 128,
                max_levels: 8,
            },
        });
    Arc::new(SessionContext {
        broker,
        hooks: Hooks::new(shared.registry.clone(), shared.registry.clone()),
        connect_timeout: Duration::from_secs(5),
        max_packet_size: 4096,
        max_connect_size: 1024,
        max_keep_alive: 0,
        topic_alias_maximum: 4,
        shutdown: CancellationToken::new(),
        metrics: shared.metrics.clone(),
        limits,
        rights: Arc::default(),
    })
}

fn string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

/// An accepted CONNECT of `c1` (MQTT 5 persistent: session expiry 60 s).
fn connect(version: u8, clean: bool) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, b"MQTT");
    body.push(version);
    body.push(0xC0 | if clean { 0x02 } else { 0 });
    body.extend_from_slice(&0u16.to_be_bytes());
    if version == 5 {
        if clean {
            body.push(0);
        } else {
            body.extend_from_slice(&[5, 0x11, 0, 0, 0, 60]);
        }
    }
    string(&mut body, b"fuzz-device");
    string(&mut body, b"c1");
    string(&mut body, b"s1");
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    packet
}

/// Asserts `out` is a sequence of whole MQTT frames.
fn assert_frames(out: &[u8]) {
    let mut at = 0;
    while at < out.len() {
        let mut len = 0usize;
        let mut used = 0;
        loop {
            let byte = *out
                .get(at + 1 + used)
                .unwrap_or_else(|| panic!("cut remaining length at {at} in {out:?}"));
            len |= usize::from(byte & 0x7F) << (7 * used);
            used += 1;
            if byte & 0x80 == 0 {
                break;
            }
            assert!(used < 4, "remaining length over 4 bytes at {at}");
        }
        at += 1 + used + len;
        assert!(at <= out.len(), "frame cut short: {out:?}");
    }
}

async fn run(input: Vec<u8>) {
    let ctx = context();
    let broker = ctx.broker.clone();
    let (device, server) = tokio::io::duplex(16 * 1024);
    let peer: SocketAddr = "127.0.0.1:1883".parse().expect("address");
    let (mut read, mut write) = tokio::io::split(device);
    let feed = async {
        let _ = write.write_all(&input).await;
        let _ = write.shutdown().await;
    };
    let drain = async {
        let mut out = Vec::new();
        let _ = read.read_to_end(&mut out).await;
        out
    };
    let served = tokio::time::timeout(HANG, async {
        tokio::join!(session::serve(ctx, server, peer), feed, drain)
    })
    .await;
    let ((), (), out) = served.expect("the session did not end after its input");
    assert_frames(&out);
    broker.stop();
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut input = match mode % 4 {
        0 => Vec::new(),
        1 => connect(4, true),
        2 => connect(5, true),
        _ => connect(5, false),
    };
    input.extend_from_slice(rest);
    RUNTIME.with(|rt| rt.block_on(run(input)));
});
