//! The connection storm shared by the event benches: `sessions` devices (MQTT 3.1.1, anonymous)
//! connect, get CONNACK, send DISCONNECT and wait for the close, `concurrency` at a time; the
//! CONNECT -> CONNACK latencies are kept. Included with `#[path]` beside `tests/common` as
//! `common`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use crate::common::{raw, Connect, RawClient, V311};

pub struct Storm {
    pub started: Instant,
    pub finished: Instant,
    pub latencies: Vec<Duration>,
}

/// `sessions` connect/disconnect cycles, `concurrency` workers in parallel.
pub async fn storm(port: u16, sessions: usize, concurrency: usize) -> Storm {
    let next = Arc::new(Mutex::new(0usize));
    let latencies = Arc::new(Mutex::new(Vec::with_capacity(sessions)));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency {
        let (next, latencies) = (next.clone(), latencies.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = {
                    let mut n = next.lock().await;
                    if *n >= sessions {
                        return;
                    }
                    *n += 1;
                    *n
                };
                let id = format!("storm-{i}");
                let t0 = Instant::now();
                let mut device =
                    RawClient::connect_ok(port, &Connect::new(V311, &id, "", "")).await;
                let took = t0.elapsed();
                device.send(&raw::disconnect(V311)).await;
                device.expect_closed().await;
                latencies.lock().await.push(took);
            }
        }));
    }
    for w in workers {
        w.await.expect("storm worker");
    }
    let finished = Instant::now();
    let mut latencies = std::mem::take(&mut *latencies.lock().await);
    latencies.sort_unstable();
    Storm {
        started,
        finished,
        latencies,
    }
}

pub fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1000.0
}
