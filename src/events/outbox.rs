//! The memory outbox in front of the stdout sink: sessions hand events over without waiting (a
//! bounded intake channel); one task keeps them in order in a bounded memory queue and writes
//! them oldest first, retrying a batch with backoff. What overflows is dropped (counted and
//! logged). External stores use the durable [`EventLog`](super::EventLog) instead; the
//! [`OutboxStats`] counters serve both.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{ConnectionEvent, EventSink, OutboxStats};

const MAX_BATCH: usize = 512;
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);

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
    /// Starts the task draining into `sink`, with a memory queue of `capacity` events: what
    /// overflows is dropped (counted and logged). The task ends once every `Outbox` clone is
    /// dropped.
    pub fn start(sink: Box<dyn EventSink>, capacity: usize) -> (Outbox, JoinHandle<()>) {
        let capacity = capacity.max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let stats = Arc::new(OutboxStats::default());
        let queue = Queue::new(capacity, stats.clone());
        let task = tokio::spawn(drain(sink, rx, queue));
        (Outbox { tx, stats }, task)
    }

    /// Queues an event; never waits. A full intake drops the event, counted and logged.
    pub fn emit(&self, event: ConnectionEvent) {
        self.stats.pending.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.tx.try_send(Item::Event(event)) {
            self.stats.pending.fetch_sub(1, Ordering::Relaxed);
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            if let mpsc::error::TrySendError::Full(Item::Event(event)) = e {
                tracing::warn!(client_id = %event.client_id.escape_debug(), event_type = event.event_type.as_str(),
                    "event buffer full, event dropped");
            }
        }
    }

    /// Waits until every event queued before this call is acknowledged by the store (or dropped
    /// as overflow), or the timeout passes. Returns whether everything was delivered.
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

/// The events not yet delivered, oldest first.
struct Queue {
    memory: VecDeque<ConnectionEvent>,
    capacity: usize,
    /// Events taken from memory for the batch in flight (they still count against capacity).
    in_flight: usize,
    /// Events ever queued, and how many of them are delivered or dropped: flush waiters wait
    /// for `done` to reach `queued` as it was when they asked.
    queued: u64,
    done: u64,
    waiters: Vec<(u64, oneshot::Sender<()>)>,
    stats: Arc<OutboxStats>,
    /// Whether the queue overflowed since it was last empty (logged once).
    overflowing: bool,
}

impl Queue {
    fn new(capacity: usize, stats: Arc<OutboxStats>) -> Queue {
        Queue {
            memory: VecDeque::new(),
            capacity,
            in_flight: 0,
            queued: 0,
            done: 0,
            waiters: Vec::new(),
            stats,
            overflowing: false,
        }
    }

    /// Takes items handed over by sessions: events go to memory while it has room, the rest
    /// are dropped (counted).
    fn accept(&mut self, items: Vec<Item>) {
        for item in items {
            match item {
                Item::Flush(waiter) => self.waiters.push((self.queued, waiter)),
                Item::Event(event) => {
                    self.queued += 1;
                    if self.memory.len() + self.in_flight < self.capacity {
                        self.memory.push_back(event);
                    } else {
                        if !self.overflowing {
                            self.overflowing = true;
                            tracing::warn!(
                                "event buffer full: events are dropped (and counted) until the sink catches up"
                            );
                        }
                        self.count_dropped(1);
                    }
                }
            }
        }
        self.wake_waiters();
    }

    fn count_dropped(&mut self, n: u64) {
        self.done += n;
        self.stats.dropped.fetch_add(n, Ordering::Relaxed);
        self.stats.pending.fetch_sub(n, Ordering::Relaxed);
    }

    fn next_batch(&mut self) -> Option<Vec<ConnectionEvent>> {
        if self.memory.is_empty() {
            return None;
        }
        let n = self.memory.len().min(MAX_BATCH);
        let events: Vec<_> = self.memory.drain(..n).collect();
        self.in_flight = events.len();
        Some(events)
    }

    fn delivered(&mut self, batch: Vec<ConnectionEvent>) {
        let n = batch.len() as u64;
        self.stats.published.fetch_add(n, Ordering::Relaxed);
        self.in_flight = 0;
        self.done += n;
        self.stats.pending.fetch_sub(n, Ordering::Relaxed);
        if self.memory.is_empty() {
            self.overflowing = false;
        }
        self.wake_waiters();
    }

    /// A batch the sink did not take goes back to the front of the queue.
    fn retry(&mut self, batch: Vec<ConnectionEvent>) {
        for event in batch.into_iter().rev() {
            self.memory.push_front(event);
        }
        self.in_flight = 0;
    }

    fn wake_waiters(&mut self) {
        let mut i = 0;
        while i < self.waiters.len() {
            if self.waiters[i].0 <= self.done {
                let (_, waiter) = self.waiters.swap_remove(i);
                let _ = waiter.send(());
            } else {
                i += 1;
            }
        }
    }

    /// Shutdown with events undelivered: they are lost (logged).
    fn abandon(&mut self, in_flight: Option<Vec<ConnectionEvent>>) {
        let n = in_flight.map_or(0, |b| b.len()) + self.memory.len();
        if n > 0 {
            tracing::warn!(
                events = n,
                "event sink unavailable at shutdown: events lost"
            );
        }
    }
}

async fn drain(mut sink: Box<dyn EventSink>, mut rx: mpsc::Receiver<Item>, mut queue: Queue) {
    let mut backoff = RETRY_MIN;
    loop {
        let mut items = Vec::new();
        while let Ok(item) = rx.try_recv() {
            items.push(item);
        }
        queue.accept(items);
        let Some(batch) = queue.next_batch() else {
            match rx.recv().await {
                Some(item) => queue.accept(vec![item]),
                None => break,
            }
            continue;
        };

        // Keep taking events in while the sink works on the batch, so sessions never wait.
        let result = {
            let publish = sink.publish(&batch);
            tokio::pin!(publish);
            loop {
                tokio::select! {
                    result = &mut publish => break Some(result),
                    item = rx.recv() => match item {
                        Some(item) => queue.accept(vec![item]),
                        None => break None,
                    },
                }
            }
        };
        match result {
            None => {
                queue.abandon(Some(batch));
                return;
            }
            Some(Ok(())) => {
                backoff = RETRY_MIN;
                queue.delivered(batch);
            }
            Some(Err(e)) => {
                tracing::warn!(store = sink.name(), error = %e, retry_in = ?backoff,
                    events = batch.len(), "event sink did not take events, retrying");
                let pause = tokio::time::sleep(backoff);
                tokio::pin!(pause);
                backoff = (backoff * 2).min(RETRY_MAX);
                let closed = loop {
                    tokio::select! {
                        _ = &mut pause => break false,
                        item = rx.recv() => match item {
                            Some(item) => queue.accept(vec![item]),
                            None => break true,
                        },
                    }
                };
                queue.retry(batch);
                if closed {
                    queue.abandon(None);
                    return;
                }
            }
        }
    }
    queue.abandon(None);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::SinkError;
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

    use crate::events::test_event as event;

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
