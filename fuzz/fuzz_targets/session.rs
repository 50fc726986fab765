//! Arbitrary bytes into sessions, through in-memory duplex streams against an in-process broker
//! core: frame checks, codec decode, packet handling and encoding back. An input is up to
//! [`MAX_SESSIONS`] sessions run one after the other against the same core, separated by
//! [`NEXT`]. The first byte of each picks how its stream starts (raw bytes, or an accepted MQTT
//! 3.1.1 / MQTT 5 / persistent MQTT 5 CONNECT followed by the rest) and which of three MQTT
//! client ids it uses, so the fuzzer spends its time past authentication, and a later session
//! can fill an offline session's queue, resume it, or push its client id past the offline
//! bound. The core runs with bounds a few packets reach (queue, in-flight window, retained
//! count and bytes and their share, offline sessions, subscriptions, topic length and levels,
//! topic aliases, packet and pre-authentication CONNECT size). Each session must end once its
//! input is used up (no hang, no panic), and what the adapter writes back must be whole MQTT
//! frames.
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

/// Separates the sessions of one input.
const NEXT: &[u8] = b"\n--next-session--\n";

/// Sessions run per input; the rest of a longer input is the last session's.
const MAX_SESSIONS: usize = 4;

/// The MQTT client ids a session may take (all of client `c1`): more than
/// `max_offline_sessions` below, so the bound is reached.
const MQTT_CLIENT_IDS: [&[u8]; 3] = [b"fuzz-device", b"fuzz-2", b"fuzz-3"];

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

/// A fresh broker core per input, with bounds small enough that a few packets reach each.
fn context() -> Arc<SessionContext> {
    let shared = shared();
    let broker = Broker::new(BrokerConfig {
        queue: QueueLimits {
            max_messages: 4,
            max_bytes: 512,
        },
        max_retained: 4,
        max_retained_bytes: 256,
        retained_client_share: 50,
        max_offline_sessions: 1,
    });
    let limits =
        Limits::new(64, 2, NonZeroU32::new(1000), false).with_session_bounds(SessionBounds {
            max_subscriptions: 4,
            topic: TopicBounds {
                max_length: 64,
                max_levels: 6,
            },
        });
    Arc::new(SessionContext {
        broker,
        hooks: Hooks::new(shared.registry.clone(), shared.registry.clone()),
        connect_timeout: Duration::from_secs(5),
        max_packet_size: 1024,
        // The accepted CONNECTs below are 40 to 50 bytes.
        max_connect_size: 128,
        max_keep_alive: 0,
        // Never run: sessions here end when their input does, before any keep-alive passes.
        keep_alive: mqtt_adapter::session::keep_alive::KeepAliveWheel::new(),
        topic_alias_maximum: 2,
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
fn connect(version: u8, clean: bool, mqtt_client_id: &[u8]) -> Vec<u8> {
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
    string(&mut body, mqtt_client_id);
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

/// Feeds one session `input` and checks what it wrote back.
async fn session(ctx: Arc<SessionContext>, input: Vec<u8>) {
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
}

/// One session's bytes: its first byte picks the start and the MQTT client id.
fn session_input(data: &[u8]) -> Option<Vec<u8>> {
    let (&mode, rest) = data.split_first()?;
    let id = MQTT_CLIENT_IDS[usize::from(mode >> 2) % MQTT_CLIENT_IDS.len()];
    let mut input = match mode % 4 {
        0 => Vec::new(),
        1 => connect(4, true, id),
        2 => connect(5, true, id),
        _ => connect(5, false, id),
    };
    input.extend_from_slice(rest);
    Some(input)
}

/// Splits an input into at most [`MAX_SESSIONS`] sessions at [`NEXT`].
fn sessions(mut data: &[u8]) -> Vec<&[u8]> {
    let mut parts = Vec::new();
    while parts.len() + 1 < MAX_SESSIONS {
        let Some(at) = data.windows(NEXT.len()).position(|w| w == NEXT) else {
            break;
        };
        parts.push(&data[..at]);
        data = &data[at + NEXT.len()..];
    }
    parts.push(data);
    parts
}

async fn run(data: &[u8]) {
    let ctx = context();
    let broker = ctx.broker.clone();
    for part in sessions(data) {
        if let Some(input) = session_input(part) {
            session(ctx.clone(), input).await;
        }
    }
    broker.stop();
}

fuzz_target!(|data: &[u8]| {
    RUNTIME.with(|rt| rt.block_on(run(data)));
});
