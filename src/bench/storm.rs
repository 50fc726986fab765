//! connect-storm: N clients CONNECT with credentials at a target rate (with a bound on handshakes
//! in flight), each holds its connection for a while, then disconnects. Counts accepted, refused
//! and failed connects and times CONNECT -> CONNACK.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::client::{new_client, ClientError};
use super::options::{Connection, OptionError, Storm};
use super::report::{latency_histogram, progress, Percentiles, Report};

const CONNECT_WAIT: Duration = Duration::from_secs(30);

enum Outcome {
    /// Accepted after this many ns; CONNACK arrived at `at_ns` after the run's start.
    Accepted {
        latency_ns: u64,
        at_ns: u64,
    },
    Refused,
    Failed,
}

pub async fn run(storm: &Storm) -> Result<Report, OptionError> {
    if storm.clients == 0 {
        return Err(OptionError::Zero("--clients"));
    }
    if storm.concurrency == 0 {
        return Err(OptionError::Zero("--concurrency"));
    }
    let conn = Connection::resolve(&storm.common, 100)?;
    let bar = progress(storm.clients as u64, "connects", storm.common.json);
    let handshakes = Arc::new(Semaphore::new(storm.concurrency));
    let live = Arc::new(AtomicU64::new(0));
    let peak = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let mut pace = (storm.rate > 0).then(|| {
        let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / storm.rate as f64));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        t
    });
    let mut clients = JoinSet::new();
    for n in 0..storm.clients {
        if let Some(pace) = pace.as_mut() {
            pace.tick().await;
        }
        let permit = match handshakes.clone().acquire_owned().await {
            Ok(permit) => permit,
            Err(_) => break,
        };
        let (conn, live, peak, hold, bar) = (
            conn.clone(),
            live.clone(),
            peak.clone(),
            storm.hold,
            bar.clone(),
        );
        clients.spawn(async move {
            let (handle, mut stream) = new_client(
                &conn,
                &conn.client_id("storm", n),
                conn.credentials_for(n),
                64,
            );
            let began = Instant::now();
            let result = tokio::time::timeout(CONNECT_WAIT, stream.connected()).await;
            let connack = Instant::now();
            drop(permit);
            bar.inc(1);
            let outcome = match result {
                Ok(Ok(())) => Outcome::Accepted {
                    latency_ns: connack.duration_since(began).as_nanos() as u64,
                    at_ns: connack.duration_since(start).as_nanos() as u64,
                },
                Ok(Err(ClientError::Refused(_))) => return Outcome::Refused,
                Ok(Err(ClientError::Failed(_))) | Err(_) => return Outcome::Failed,
            };
            let now = live.fetch_add(1, Ordering::Relaxed) + 1;
            peak.fetch_max(now, Ordering::Relaxed);
            // Hold: keep the connection served (pings) until the hold time is up.
            let dropped = tokio::time::timeout(hold, async {
                loop {
                    match stream.next().await {
                        Ok(Some(_)) => continue,
                        _ => return,
                    }
                }
            })
            .await
            .is_ok();
            live.fetch_sub(1, Ordering::Relaxed);
            if dropped {
                // The broker closed an accepted connection during the hold.
                return Outcome::Failed;
            }
            handle.disconnect().await;
            let _ = tokio::time::timeout(Duration::from_secs(2), async {
                while let Ok(Some(_)) = stream.next().await {}
            })
            .await;
            outcome
        });
    }
    let (mut accepted, mut refused, mut failed, mut last_ns) = (0u64, 0u64, 0u64, 0u64);
    let mut connack = latency_histogram();
    while let Some(result) = clients.join_next().await {
        match result {
            Ok(Outcome::Accepted { latency_ns, at_ns }) => {
                accepted += 1;
                connack.saturating_record(latency_ns);
                last_ns = last_ns.max(at_ns);
            }
            Ok(Outcome::Refused) => refused += 1,
            Ok(Outcome::Failed) | Err(_) => failed += 1,
        }
    }
    bar.finish_and_clear();
    let window = Duration::from_nanos(last_ns);
    Ok(Report {
        scenario: "connect-storm",
        broker: format!("{}:{}", conn.host, conn.port),
        mqtt_version: conn.version,
        qos: None,
        payload_size: None,
        clients: storm.clients,
        connected: accepted,
        refused_connects: refused,
        failed_connects: failed,
        refused_subscriptions: 0,
        sent: 0,
        acknowledged: 0,
        expected: 0,
        received: 0,
        lost: 0,
        elapsed_s: start.elapsed().as_secs_f64(),
        connects_per_s: (accepted > 0 && !window.is_zero())
            .then(|| accepted as f64 / window.as_secs_f64()),
        msgs_per_s: None,
        peak_connected: Some(peak.load(Ordering::Relaxed)),
        latency: None,
        connack_latency: Percentiles::from_ns(&connack),
    })
}
