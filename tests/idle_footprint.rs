//! What an idle connection costs in heap. An in-process adapter (the library's `Server`) behind
//! a counting allocator takes N authenticated connections over TCP (CONNECT with keep-alive 60,
//! one SUBSCRIBE to a topic of its own, as devices do), then the bytes and blocks still
//! allocated are divided by N. The clients are blocking std sockets: they allocate nothing.
//!
//! `cargo test --test idle_footprint -- --nocapture` prints the profile (blocks per connection
//! by size): what an idle session holds. The bounds keep it from growing back unnoticed. This
//! is the debug build, whose futures are larger than release's (benches/RESULTS.md has the
//! release RSS).

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use common::raw::{self, Connect, V311, V5};
use mqtt_adapter::config::Config;
use mqtt_adapter::Server;

/// Counts live bytes and blocks, and live blocks by size (32-byte buckets; the last one is
/// everything from 2 KiB up).
struct Counting;

const BUCKET: usize = 32;
const BUCKETS: usize = 65;

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);
static LIVE_BLOCKS: AtomicI64 = AtomicI64::new(0);
static BY_SIZE: [AtomicI64; BUCKETS] = [const { AtomicI64::new(0) }; BUCKETS];

fn bucket(size: usize) -> usize {
    (size.div_ceil(BUCKET)).min(BUCKETS - 1)
}

fn count(size: usize, sign: i64) {
    LIVE_BYTES.fetch_add(sign * size as i64, Ordering::Relaxed);
    LIVE_BLOCKS.fetch_add(sign, Ordering::Relaxed);
    BY_SIZE[bucket(size)].fetch_add(sign, Ordering::Relaxed);
}

// SAFETY: every call is forwarded to the system allocator unchanged; only counters are added.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            count(layout.size(), 1);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            count(layout.size(), 1);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        count(layout.size(), -1);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            count(layout.size(), -1);
            count(new_size, 1);
        }
        p
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

struct Snapshot {
    bytes: i64,
    blocks: i64,
    by_size: Vec<i64>,
}

fn snapshot() -> Snapshot {
    Snapshot {
        bytes: LIVE_BYTES.load(Ordering::Relaxed),
        blocks: LIVE_BLOCKS.load(Ordering::Relaxed),
        by_size: BY_SIZE.iter().map(|c| c.load(Ordering::Relaxed)).collect(),
    }
}

const CLIENTS: &str = r#"
[[clients]]
id = "dev"
secret = "dev-secret"
[[connections]]
client = "dev"
domain = "d1"
channel = "ch1"
actions = ["publish", "subscribe"]
"#;

/// Reads one whole MQTT packet; returns its first byte.
fn read_packet(stream: &mut TcpStream) -> u8 {
    let mut first = [0u8; 1];
    stream.read_exact(&mut first).expect("packet");
    let (mut len, mut shift) = (0usize, 0);
    loop {
        let mut b = [0u8; 1];
        stream.read_exact(&mut b).expect("length");
        len |= usize::from(b[0] & 0x7F) << shift;
        shift += 7;
        if b[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).expect("body");
    first[0]
}

/// Opens `n` idle sessions (CONNECT, CONNACK, SUBSCRIBE, SUBACK) from `first`.
fn open(port: u16, version: u8, first: usize, n: usize, out: &mut Vec<TcpStream>) {
    for i in first..first + n {
        let mut stream = TcpStream::connect(("127.0.0.1", port)).expect("connect");
        let id = format!("idle-{version}-{i}");
        let mut connect = Connect::new(version, &id, "dev", "dev-secret");
        connect.keep_alive = 60;
        stream.write_all(&connect.encode()).expect("CONNECT");
        assert_eq!(read_packet(&mut stream), 0x20, "CONNACK");
        let topic = format!("m/d1/c/ch1/idle/{i}");
        stream
            .write_all(&raw::subscribe(version, 1, &[(topic.as_str(), 0)]))
            .expect("SUBSCRIBE");
        assert_eq!(read_packet(&mut stream), 0x90, "SUBACK");
        out.push(stream);
    }
}

/// Heap per idle connection of `version`: (bytes, blocks, blocks by size bucket).
async fn per_connection(version: u8, n: usize) -> (f64, f64, Vec<f64>) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("clients.toml");
    std::fs::write(&path, CLIENTS).expect("clients file");
    let mut config = Config::defaults();
    config.host = "127.0.0.1".parse().expect("address");
    (config.mqtt_port, config.ws_port, config.http_port) = (0, 0, 0);
    config.clients_file = Some(path);
    config.connect_rate_per_ip = 0;
    config.data_dir = dir.path().join("data");
    let server = Server::start(&config).await.expect("server starts");
    let port = server.mqtt_addr().port();

    let held = tokio::task::spawn_blocking(move || {
        let mut held = Vec::with_capacity(n + 100);
        // One-off allocations first (lazy tables, the trie's shared levels, metric labels).
        open(port, version, 0, 100, &mut held);
        std::thread::sleep(Duration::from_millis(300));
        let before = snapshot();
        open(port, version, 100, n, &mut held);
        // Let the connect events through the outbox and the sessions settle.
        std::thread::sleep(Duration::from_millis(500));
        let after = snapshot();
        (held, before, after)
    });
    let (held, before, after) = held.await.expect("clients");
    let n = n as f64;
    let by_size = (before.by_size.iter().zip(&after.by_size))
        .map(|(b, a)| (a - b) as f64 / n)
        .collect();
    let result = (
        (after.bytes - before.bytes) as f64 / n,
        (after.blocks - before.blocks) as f64 / n,
        by_size,
    );
    drop(held);
    server.shutdown().await;
    result
}

fn print_profile(version: u8, bytes: f64, blocks: f64, by_size: &[f64]) {
    println!("MQTT {version}: {bytes:.0} B in {blocks:.2} blocks per idle connection");
    for (i, per) in by_size.iter().enumerate() {
        if per.abs() >= 0.05 {
            let (lo, hi) = ((i.max(1) - 1) * BUCKET + 1, i * BUCKET);
            let range = if i == BUCKETS - 1 {
                format!("{lo}+ B")
            } else {
                format!("{lo}-{hi} B")
            };
            println!("  {range:>12}: {per:.2} blocks");
        }
    }
}

/// Heap bytes an idle, subscribed session may hold in the debug build (2,209-2,219 B measured:
/// the task cell with the session future 993-1,024 B, the broker `Session` 321-352 B, tokio's
/// socket registration 225-256 B, the connection control 97-128 B, twelve blocks of at most
/// 32 B: ids, filter, trie level, one-entry maps).
const MAX_HEAP_PER_CONNECTION: f64 = 2560.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_subscribed_connection_holds_little_heap() {
    for version in [V311, V5] {
        let (bytes, blocks, by_size) = per_connection(version, 500).await;
        print_profile(version, bytes, blocks, &by_size);
        assert!(
            bytes <= MAX_HEAP_PER_CONNECTION,
            "MQTT {version}: {bytes:.0} B of heap per idle connection (bound {MAX_HEAP_PER_CONNECTION})"
        );
    }
}
