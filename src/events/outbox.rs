//! The outbox between sessions and the event store: a bounded queue that sessions fill without
//! waiting, drained in order by one task that retries the sink until it acknowledges.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{ConnectionEvent, EventSink};

const MAX_BATCH: usize = 512;
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Counters an operator needs to see the outbox's health.
#[derive(Debug, Default)]
pub struct OutboxStats {
    /// Events accepted but not yet acknowledged by the store.
    pub pending: AtomicU64,
    pub published: AtomicU64,
    /// Events lost because the queue was full.
    pub dropped: AtomicU64,
}

enum Item {
    Event(ConnectionEvent),
    Flush(oneshot::Sender<()>),
}

/// The sending side, shared by every session.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Item>,
    stats: Arc<OutboxStats>,
}

impl Outbox {
    /// Starts the task draining into `sink`. The task ends once every `Outbox` clone is dropped
    /// and the queue is delivered.
    pub fn start(sink: Box<dyn EventSink>, capacity: usize) -> (Outbox, JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let stats = Arc::new(OutboxStats::default());
        let task = tokio::spawn(drain(sink, rx, stats.clone()));
        (Outbox { tx, stats }, task)
    }

    /// Queues an event; never waits. A full queue drops the event, counted and logged.
    pub fn emit(&self, event: ConnectionEvent) {
        self.stats.pending.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.tx.try_send(Item::Event(event)) {
            self.stats.pending.fetch_sub(1, Ordering::Relaxed);
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            if let mpsc::error::TrySendError::Full(Item::Event(event)) = e {
                tracing::warn!(client_id = %event.client_id, event_type = event.event_type.as_str(),
                    "event buffer full, event dropped");
            }
        }
    }

    /// Waits until every event queued before this call is acknowledged by the store, or the
    /// timeout passes. Returns whether everything was delivered.
    pub async fn flush(&self, timeout: Duration) -> bool {
        let (done_tx, done_rx) = oneshot::channel();
        let flushed = async {
            self.tx.send(Item::Flush(done_tx)).await.ok()?;
            done_rx.await.ok()
        };
        matches!(tokio::time::timeout(timeout, flushed).await, Ok(Some(())))
    }

    pub fn stats(&self) -> Arc<OutboxStats> {
        self.stats.clone()
    }
}

async fn drain(
    mut sink: Box<dyn EventSink>,
    mut rx: mpsc::Receiver<Item>,
    stats: Arc<OutboxStats>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut waiters = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut next = Some(first);
        while let Some(item) = next.take() {
            match item {
                Item::Event(e) => batch.push(e),
                Item::Flush(w) => waiters.push(w),
            }
            if batch.len() < MAX_BATCH {
                next = rx.try_recv().ok();
            }
        }
        deliver(sink.as_mut(), &batch, &stats).await;
        batch.clear();
        for waiter in waiters.drain(..) {
            let _ = waiter.send(());
        }
    }
}

/// Retries the batch with capped exponential backoff until the store takes it: events are
/// delayed while the store is down, never silently lost.
async fn deliver(sink: &mut dyn EventSink, batch: &[ConnectionEvent], stats: &OutboxStats) {
    if batch.is_empty() {
        return;
    }
    let mut backoff = RETRY_MIN;
    loop {
        match sink.publish(batch).await {
            Ok(()) => {
                let n = batch.len() as u64;
                stats.pending.fetch_sub(n, Ordering::Relaxed);
                stats.published.fetch_add(n, Ordering::Relaxed);
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in = ?backoff, events = batch.len(),
                    "event store refused events, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(RETRY_MAX);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{EventType, SinkError};
    use async_trait::async_trait;
    use std::sync::Mutex;

    /// A sink that fails its first `failures` calls, then records what it is given.
    struct FlakySink {
        failures: usize,
        got: Arc<Mutex<Vec<ConnectionEvent>>>,
    }

    #[async_trait]
    impl EventSink for FlakySink {
        fn name(&self) -> &'static str {
            "flaky"
        }
        async fn publish(&mut self, batch: &[ConnectionEvent]) -> Result<(), SinkError> {
            if self.failures > 0 {
                self.failures -= 1;
                return Err(SinkError {
                    store: "flaky",
                    message: "down".into(),
                });
            }
            self.got.lock().unwrap().extend_from_slice(batch);
            Ok(())
        }
    }

    fn event(i: i64) -> ConnectionEvent {
        ConnectionEvent {
            client_id: format!("c{i}"),
            event_type: EventType::Connect,
            instance: String::new(),
            occurred_at: i,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn delivers_in_order_after_failures() {
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = FlakySink {
            failures: 3,
            got: got.clone(),
        };
        let (outbox, _task) = Outbox::start(Box::new(sink), 100);
        for i in 0..50 {
            outbox.emit(event(i));
        }
        assert!(outbox.flush(Duration::from_secs(60)).await);
        let got = got.lock().unwrap();
        let order: Vec<i64> = got.iter().map(|e| e.occurred_at).collect();
        assert_eq!(order, (0..50).collect::<Vec<_>>());
        assert_eq!(outbox.stats().pending.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn full_queue_counts_drops() {
        let got = Arc::new(Mutex::new(Vec::new()));
        // The sink never succeeds, so the queue (capacity 4) fills up.
        let sink = FlakySink {
            failures: usize::MAX,
            got,
        };
        let (outbox, _task) = Outbox::start(Box::new(sink), 4);
        for i in 0..20 {
            outbox.emit(event(i));
        }
        assert!(outbox.stats().dropped.load(Ordering::Relaxed) >= 15);
    }
}
