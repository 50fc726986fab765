//! Message scenarios (fan-in, fan-out, pairs, latency) as one plan: which topics are published,
//! how much and how fast, and which filters are subscribed. Subscribers connect and subscribe
//! first, publishers start together, and every delivery is counted and timed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::client::{new_client, ClientError, ClientEvent};
use super::options::{Connection, Latency, Load, OptionError, Throughput};
use super::payload;
use super::report::{latency_histogram, progress, Percentiles, Report};

/// How long a client may take to connect (and subscribe) before it counts as failed.
const CONNECT_WAIT: Duration = Duration::from_secs(30);

/// One publisher: its topic, how many messages (or until the deadline), and the subscribers
/// (indexes into `Plan::filters`) that receive what it sends.
struct PublisherPlan {
    topic: String,
    count: Option<u64>,
    receivers: Vec<usize>,
}

struct Plan {
    scenario: &'static str,
    publishers: Vec<PublisherPlan>,
    filters: Vec<String>,
    duration: Option<Duration>,
    /// Publishes per second per publisher; `None`: as fast as the connection takes them.
    rate: Option<u64>,
}

fn split(count: u64, parts: usize, i: usize) -> u64 {
    let parts = parts as u64;
    count / parts + u64::from((i as u64) < count % parts)
}

impl Plan {
    fn throughput(scenario: &'static str, t: &Throughput) -> Result<Plan, OptionError> {
        if t.clients == 0 {
            return Err(OptionError::Zero("--clients"));
        }
        let n = t.clients;
        let count = |parts: usize, i: usize| t.duration.is_none().then(|| split(t.count, parts, i));
        let (publishers, filters) = match scenario {
            "fan-in" => (
                (0..n)
                    .map(|i| PublisherPlan {
                        topic: t.load.topic(i),
                        count: count(n, i),
                        receivers: vec![0],
                    })
                    .collect(),
                vec![t.load.filter_all()],
            ),
            "fan-out" => (
                vec![PublisherPlan {
                    topic: t.load.topic(0),
                    count: count(1, 0),
                    receivers: (0..n).collect(),
                }],
                vec![t.load.topic(0); n],
            ),
            _ => (
                (0..n)
                    .map(|i| PublisherPlan {
                        topic: t.load.topic(i),
                        count: count(n, i),
                        receivers: vec![i],
                    })
                    .collect(),
                (0..n).map(|i| t.load.topic(i)).collect(),
            ),
        };
        Ok(Plan {
            scenario,
            publishers,
            filters,
            duration: t.duration,
            rate: None,
        })
    }

    fn latency(l: &Latency) -> Result<Plan, OptionError> {
        if l.rate == 0 {
            return Err(OptionError::Zero("--rate"));
        }
        Ok(Plan {
            scenario: "latency",
            publishers: vec![PublisherPlan {
                topic: l.load.topic(0),
                count: l.duration.is_none().then_some(l.count),
                receivers: vec![0],
            }],
            filters: vec![l.load.topic(0)],
            duration: l.duration,
            rate: Some(l.rate),
        })
    }
}

#[derive(Default)]
struct Counters {
    connected: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
    refused_subscriptions: AtomicU64,
    sent: AtomicU64,
    acknowledged: AtomicU64,
    received: AtomicU64,
    expected: AtomicU64,
    /// ns since the epoch of the last delivery.
    last_delivery_ns: AtomicU64,
}

impl Counters {
    fn count_connect_error(&self, error: &ClientError) {
        match error {
            ClientError::Refused(_) => self.refused.fetch_add(1, Ordering::Relaxed),
            ClientError::Failed(_) => self.failed.fetch_add(1, Ordering::Relaxed),
        };
    }
}

pub async fn run_throughput(scenario: &'static str, t: &Throughput) -> Result<Report, OptionError> {
    let plan = Plan::throughput(scenario, t)?;
    let conn = Connection::resolve(&t.common, t.load.inflight)?;
    run(plan, &conn, &t.load, t.common.json).await
}

pub async fn run_latency(l: &Latency) -> Result<Report, OptionError> {
    let plan = Plan::latency(l)?;
    let conn = Connection::resolve(&l.common, l.load.inflight)?;
    run(plan, &conn, &l.load, l.common.json).await
}

async fn run(
    plan: Plan,
    conn: &Connection,
    load: &Load,
    json: bool,
) -> Result<Report, OptionError> {
    if load.payload_size < payload::HEADER {
        return Err(OptionError::PayloadTooSmall {
            min: payload::HEADER,
        });
    }
    let epoch = Instant::now();
    let counters = Arc::new(Counters::default());
    let stop_subscribers = CancellationToken::new();

    // Subscribers first; each reports whether it is ready to receive.
    let mut subscribers = JoinSet::new();
    let (ready_tx, mut ready_rx) = mpsc::channel::<(usize, bool)>(plan.filters.len().max(1));
    for (i, filter) in plan.filters.iter().enumerate() {
        subscribers.spawn(subscriber(
            conn.clone(),
            i,
            filter.clone(),
            load.qos,
            load.payload_size,
            counters.clone(),
            ready_tx.clone(),
            stop_subscribers.clone(),
            epoch,
        ));
    }
    drop(ready_tx);
    let mut ready = vec![false; plan.filters.len()];
    while let Some((i, ok)) = ready_rx.recv().await {
        ready[i] = ok;
    }

    // Publishers connect, then all start on one signal.
    let planned_total: u64 = plan.publishers.iter().filter_map(|p| p.count).sum();
    let bar = progress(planned_total, "sent", json);
    let (go_tx, go_rx) = watch::channel(None::<Instant>);
    let mut publishers = JoinSet::new();
    let (connected_tx, mut connected_rx) = mpsc::channel::<()>(plan.publishers.len().max(1));
    for (i, p) in plan.publishers.iter().enumerate() {
        let fanout = p.receivers.iter().filter(|&&r| ready[r]).count() as u64;
        publishers.spawn(publisher(
            conn.clone(),
            i,
            p.topic.clone(),
            p.count,
            plan.rate,
            fanout,
            load.qos,
            load.payload_size,
            load.drain,
            counters.clone(),
            connected_tx.clone(),
            go_rx.clone(),
            epoch,
        ));
    }
    drop(connected_tx);
    while connected_rx.recv().await.is_some() {}
    let start = Instant::now();
    let deadline = plan.duration.map(|d| start + d);
    let _ = go_tx.send(Some(start));
    let start_ns = start.duration_since(epoch).as_nanos() as u64;

    let ticker = {
        let bar = bar.clone();
        let counters = counters.clone();
        tokio::spawn(async move {
            loop {
                bar.set_position(counters.sent.load(Ordering::Relaxed));
                bar.set_message(format!(
                    "received {}  refused {}  failed {}",
                    counters.received.load(Ordering::Relaxed),
                    counters.refused.load(Ordering::Relaxed),
                    counters.failed.load(Ordering::Relaxed)
                ));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline.into()).await;
        let _ = go_tx.send(None);
    }
    while publishers.join_next().await.is_some() {}

    // Drain: wait for the deliveries still in flight, until all came or none came for `drain`.
    let expected = counters.expected.load(Ordering::Relaxed);
    let mut last = counters.received.load(Ordering::Relaxed);
    let mut quiet_since = Instant::now();
    while counters.received.load(Ordering::Relaxed) < expected && quiet_since.elapsed() < load.drain
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let now = counters.received.load(Ordering::Relaxed);
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
    }
    stop_subscribers.cancel();
    let mut latency = latency_histogram();
    while let Some(result) = subscribers.join_next().await {
        if let Ok(histogram) = result {
            // Same bounds on both sides: adding cannot fail.
            let _ = latency.add(&histogram);
        }
    }
    ticker.abort();
    bar.finish_and_clear();

    let received = counters.received.load(Ordering::Relaxed);
    let last_ns = counters.last_delivery_ns.load(Ordering::Relaxed);
    let window = Duration::from_nanos(last_ns.saturating_sub(start_ns));
    Ok(Report {
        scenario: plan.scenario,
        broker: format!("{}:{}", conn.host, conn.port),
        mqtt_version: conn.version,
        qos: Some(load.qos),
        payload_size: Some(load.payload_size),
        clients: plan.publishers.len().max(plan.filters.len()),
        connected: counters.connected.load(Ordering::Relaxed),
        refused_connects: counters.refused.load(Ordering::Relaxed),
        failed_connects: counters.failed.load(Ordering::Relaxed),
        refused_subscriptions: counters.refused_subscriptions.load(Ordering::Relaxed),
        sent: counters.sent.load(Ordering::Relaxed),
        acknowledged: counters.acknowledged.load(Ordering::Relaxed),
        expected,
        received,
        lost: expected.saturating_sub(received),
        elapsed_s: window.as_secs_f64(),
        msgs_per_s: (received > 0 && !window.is_zero())
            .then(|| received as f64 / window.as_secs_f64()),
        connects_per_s: None,
        peak_connected: None,
        latency: Percentiles::from_ns(&latency),
        connack_latency: None,
    })
}

#[allow(clippy::too_many_arguments)]
async fn subscriber(
    conn: Connection,
    n: usize,
    filter: String,
    qos: u8,
    payload_size: usize,
    counters: Arc<Counters>,
    ready: mpsc::Sender<(usize, bool)>,
    stop: CancellationToken,
    epoch: Instant,
) -> Histogram<u64> {
    let mut latency = latency_histogram();
    let (handle, mut stream) = new_client(
        &conn,
        &conn.client_id("sub", n),
        conn.credentials_for(n),
        payload_size,
    );
    let setup = async {
        stream.connected().await?;
        counters.connected.fetch_add(1, Ordering::Relaxed);
        handle.subscribe(&filter, qos).await?;
        loop {
            match stream.next().await? {
                Some(ClientEvent::Subscribed { granted }) => return Ok(granted),
                Some(_) => continue,
                None => return Err(ClientError::Failed("closed before SUBACK".into())),
            }
        }
    };
    match tokio::time::timeout(CONNECT_WAIT, setup).await {
        Ok(Ok(true)) => {
            let _ = ready.send((n, true)).await;
        }
        Ok(Ok(false)) => {
            counters
                .refused_subscriptions
                .fetch_add(1, Ordering::Relaxed);
            let _ = ready.send((n, false)).await;
            return latency;
        }
        Ok(Err(e)) => {
            counters.count_connect_error(&e);
            let _ = ready.send((n, false)).await;
            return latency;
        }
        Err(_) => {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            let _ = ready.send((n, false)).await;
            return latency;
        }
    }
    drop(ready);
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            event = stream.next() => match event {
                Ok(Some(ClientEvent::Delivered(body))) => {
                    if let Some(ns) = payload::latency_ns(&body, epoch) {
                        latency.saturating_record(ns);
                    }
                    counters.received.fetch_add(1, Ordering::Relaxed);
                    counters
                        .last_delivery_ns
                        .fetch_max(epoch.elapsed().as_nanos() as u64, Ordering::Relaxed);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => {
                    counters.failed.fetch_add(1, Ordering::Relaxed);
                    return latency;
                }
            }
        }
    }
    handle.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(Some(_)) = stream.next().await {}
    })
    .await;
    latency
}

#[allow(clippy::too_many_arguments)]
async fn publisher(
    conn: Connection,
    n: usize,
    topic: String,
    count: Option<u64>,
    rate: Option<u64>,
    fanout: u64,
    qos: u8,
    payload_size: usize,
    drain: Duration,
    counters: Arc<Counters>,
    connected: mpsc::Sender<()>,
    mut go: watch::Receiver<Option<Instant>>,
    epoch: Instant,
) {
    let (handle, mut stream) = new_client(
        &conn,
        &conn.client_id("pub", n),
        conn.credentials_for(n),
        payload_size,
    );
    match tokio::time::timeout(CONNECT_WAIT, stream.connected()).await {
        Ok(Ok(())) => {
            counters.connected.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Err(e)) => {
            counters.count_connect_error(&e);
            return;
        }
        Err(_) => {
            counters.failed.fetch_add(1, Ordering::Relaxed);
            return;
        }
    }
    drop(connected);

    // The stream is driven by its own task; the publishing loop only queues requests.
    let sent = Arc::new(AtomicU64::new(0));
    let acked = Arc::new(AtomicU64::new(0));
    let done = CancellationToken::new();
    let driver = {
        let (counters, sent, acked, done) =
            (counters.clone(), sent.clone(), acked.clone(), done.clone());
        tokio::spawn(async move {
            loop {
                match stream.next().await {
                    Ok(Some(ClientEvent::Sent)) => {
                        sent.fetch_add(1, Ordering::Relaxed);
                        counters.sent.fetch_add(1, Ordering::Relaxed);
                        counters.expected.fetch_add(fanout, Ordering::Relaxed);
                    }
                    Ok(Some(ClientEvent::Acknowledged)) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                        counters.acknowledged.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(_) => {
                        if !done.is_cancelled() {
                            counters.failed.fetch_add(1, Ordering::Relaxed);
                        }
                        break;
                    }
                }
            }
        })
    };

    // Wait for the common start.
    if go.wait_for(|start| start.is_some()).await.is_err() {
        return;
    }
    let mut ticker = rate.map(|r| {
        let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / r as f64));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        t
    });
    let mut queued = 0u64;
    loop {
        if count.is_some_and(|c| queued >= c) || (count.is_none() && go.borrow().is_none()) {
            break;
        }
        if let Some(ticker) = ticker.as_mut() {
            ticker.tick().await;
        }
        let body = payload::encode(queued, epoch, payload_size);
        if handle.publish(&topic, qos, body).await.is_err() {
            break;
        }
        queued += 1;
    }
    // Everything queued must have left (and, for QoS > 0, been acknowledged) before we hang up.
    let _ = tokio::time::timeout(drain.max(Duration::from_secs(1)) * 4, async {
        loop {
            let s = sent.load(Ordering::Relaxed);
            let a = acked.load(Ordering::Relaxed);
            if s >= queued && (qos == 0 || a >= s) {
                break;
            }
            if driver.is_finished() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    done.cancel();
    handle.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(2), driver).await;
}
