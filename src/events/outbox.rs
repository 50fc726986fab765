//! The outbox between sessions and the event store, shared by every sink. Sessions hand events
//! over without waiting (a bounded intake channel); one task keeps them in order in a bounded
//! memory queue that spills to the on-disk [`Spool`] when it is full or the store is down, and
//! delivers them oldest first, retrying each batch with backoff until the store acknowledges it.
//!
//! Order: every event in memory is older than every event in the spool (once the spool holds
//! anything, new events go behind it until it is drained), so delivering memory first, then the
//! spool, keeps the order in which events occurred, across restarts too. At shutdown whatever is
//! still in memory is put in front of the spool.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::spool::{Spool, SpoolBatch};
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
    /// Events lost because the queue or the spool was full.
    pub dropped: AtomicU64,
    /// Events waiting in the spool file.
    pub spooled: AtomicU64,
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
    /// Starts the task draining into `sink`, with a memory queue of `capacity` events and no
    /// spool: what overflows is dropped (counted and logged). The task ends once every `Outbox`
    /// clone is dropped.
    pub fn start(sink: Box<dyn EventSink>, capacity: usize) -> (Outbox, JoinHandle<()>) {
        Outbox::launch(sink, capacity, None)
    }

    /// Like [`Outbox::start`], with `spool` taking what the memory queue cannot hold. Events
    /// left in the spool by an earlier run are delivered before any new one.
    pub fn start_with_spool(
        sink: Box<dyn EventSink>,
        capacity: usize,
        spool: Spool,
    ) -> (Outbox, JoinHandle<()>) {
        Outbox::launch(sink, capacity, Some(spool))
    }

    fn launch(
        sink: Box<dyn EventSink>,
        capacity: usize,
        spool: Option<Spool>,
    ) -> (Outbox, JoinHandle<()>) {
        let capacity = capacity.max(1);
        let (tx, rx) = mpsc::channel(capacity);
        let stats = Arc::new(OutboxStats::default());
        let queue = Queue::new(capacity, spool, stats.clone());
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
                tracing::warn!(client_id = %event.client_id, event_type = event.event_type.as_str(),
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

/// Where the batch in flight came from.
enum Source {
    Memory,
    Spool(SpoolBatch),
}

struct Batch {
    events: Vec<ConnectionEvent>,
    source: Source,
}

/// The events not yet delivered: memory (oldest), then the spool.
struct Queue {
    memory: VecDeque<ConnectionEvent>,
    capacity: usize,
    spool: Option<Spool>,
    /// Events taken from memory for the batch in flight (they still count against capacity).
    in_flight: usize,
    /// Events ever queued, and how many of them are delivered or dropped: flush waiters wait
    /// for `done` to reach `queued` as it was when they asked.
    queued: u64,
    done: u64,
    waiters: Vec<(u64, oneshot::Sender<()>)>,
    stats: Arc<OutboxStats>,
    /// Whether the memory queue overflowed (into the spool, or dropped without one) and the
    /// spool dropped its oldest, since the queue was last empty: each is logged once.
    spilling: bool,
    spool_full: bool,
    /// The last delivery attempt failed.
    store_down: bool,
}

impl Queue {
    fn new(capacity: usize, spool: Option<Spool>, stats: Arc<OutboxStats>) -> Queue {
        let replayed = spool.as_ref().map_or(0, Spool::len);
        if replayed > 0 {
            tracing::info!(
                events = replayed,
                "delivering events spooled by an earlier run first"
            );
        }
        stats.pending.fetch_add(replayed, Ordering::Relaxed);
        stats.spooled.store(replayed, Ordering::Relaxed);
        Queue {
            memory: VecDeque::new(),
            capacity,
            spool,
            in_flight: 0,
            queued: replayed,
            done: 0,
            waiters: Vec::new(),
            stats,
            spilling: false,
            spool_full: false,
            store_down: false,
        }
    }

    fn spool_len(&self) -> u64 {
        self.spool.as_ref().map_or(0, Spool::len)
    }

    /// Takes items handed over by sessions: events go to memory while it has room and the
    /// spool is empty, otherwise behind the spool (or are dropped when there is no spool).
    fn accept(&mut self, items: Vec<Item>) {
        let mut overflow = Vec::new();
        for item in items {
            match item {
                Item::Flush(waiter) => self.waiters.push((self.queued, waiter)),
                Item::Event(event) => {
                    self.queued += 1;
                    let room = self.memory.len() + self.in_flight < self.capacity;
                    // During an outage new events go to disk (when there is a spool), so a
                    // crash then loses at most what was in memory when the store failed.
                    let to_memory = room && !(self.store_down && self.spool.is_some());
                    if overflow.is_empty() && to_memory && self.spool_len() == 0 {
                        self.memory.push_back(event);
                    } else {
                        overflow.push(event);
                    }
                }
            }
        }
        if !overflow.is_empty() {
            self.spill(overflow);
        }
        self.wake_waiters();
    }

    fn spill(&mut self, events: Vec<ConnectionEvent>) {
        let n = events.len() as u64;
        let Some(spool) = self.spool.as_mut() else {
            if !self.spilling {
                self.spilling = true;
                tracing::warn!(
                    "event buffer full: events are dropped (and counted) until the store catches up"
                );
            }
            self.count_dropped(n);
            return;
        };
        if !self.spilling {
            self.spilling = true;
            tracing::warn!("event store unreachable or behind: spooling events to disk");
        }
        match spool.append(&events) {
            Ok(0) => {}
            Ok(dropped) => {
                if !self.spool_full {
                    self.spool_full = true;
                    tracing::warn!(
                        events = dropped,
                        "event spool full: the oldest events are dropped (and counted) until the store catches up"
                    );
                }
                self.count_dropped(dropped);
            }
            Err(e) => {
                tracing::warn!(error = %e, events = n, "cannot write the event spool, events dropped");
                self.count_dropped(n);
            }
        }
        self.stats
            .spooled
            .store(self.spool_len(), Ordering::Relaxed);
    }

    fn count_dropped(&mut self, n: u64) {
        self.done += n;
        self.stats.dropped.fetch_add(n, Ordering::Relaxed);
        self.stats.pending.fetch_sub(n, Ordering::Relaxed);
    }

    /// The oldest undelivered events: memory first, then the spool.
    fn next_batch(&mut self) -> Option<Batch> {
        if !self.memory.is_empty() {
            let n = self.memory.len().min(MAX_BATCH);
            let events: Vec<_> = self.memory.drain(..n).collect();
            self.in_flight = events.len();
            return Some(Batch {
                events,
                source: Source::Memory,
            });
        }
        let spool = self.spool.as_mut().filter(|s| !s.is_empty())?;
        match spool.peek(MAX_BATCH) {
            Ok(batch) => Some(Batch {
                events: batch.events.clone(),
                source: Source::Spool(batch),
            }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the event spool; retrying");
                None
            }
        }
    }

    fn delivered(&mut self, batch: Batch) {
        let n = batch.events.len() as u64;
        self.stats.published.fetch_add(n, Ordering::Relaxed);
        match batch.source {
            Source::Memory => {
                self.in_flight = 0;
                self.done += n;
                self.stats.pending.fetch_sub(n, Ordering::Relaxed);
                if self.memory.is_empty() && self.spool_len() == 0 {
                    self.spilling = false;
                    self.spool_full = false;
                }
            }
            Source::Spool(spooled) => {
                let spool = self.spool.as_mut().expect("a spool batch has a spool");
                match spool.consume(&spooled) {
                    Ok(live) => {
                        self.done += live;
                        self.stats.pending.fetch_sub(live, Ordering::Relaxed);
                    }
                    Err(e) => tracing::warn!(error = %e,
                        "cannot record delivery in the event spool; these events may be sent again"),
                }
                self.stats
                    .spooled
                    .store(self.spool_len(), Ordering::Relaxed);
                if self.spool_len() == 0 && self.spilling {
                    self.spilling = false;
                    self.spool_full = false;
                    tracing::info!("event spool drained");
                }
            }
        }
        self.wake_waiters();
    }

    /// A batch the store did not take goes back to the front of the queue.
    fn retry(&mut self, batch: Batch) {
        if let Source::Memory = batch.source {
            for event in batch.events.into_iter().rev() {
                self.memory.push_front(event);
            }
            self.in_flight = 0;
        }
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

    /// Shutdown with events undelivered: the batch in flight and the memory queue go in front
    /// of the spool so the next start delivers them first.
    fn persist(&mut self, in_flight: Option<Batch>) {
        let mut events = Vec::new();
        if let Some(Batch {
            events: batch,
            source: Source::Memory,
        }) = in_flight
        {
            events.extend(batch);
        }
        events.extend(self.memory.drain(..));
        self.in_flight = 0;
        if events.is_empty() {
            return;
        }
        let n = events.len();
        match self.spool.as_mut() {
            Some(spool) => match spool.prepend(&events) {
                Ok(dropped) => {
                    tracing::info!(
                        events = n,
                        spooled = spool.len(),
                        "events not yet delivered saved to the spool for the next start"
                    );
                    if dropped > 0 {
                        tracing::warn!(events = dropped, "event spool full, oldest events dropped");
                        self.count_dropped(dropped);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, events = n,
                        "cannot save undelivered events to the spool; they are lost");
                    self.count_dropped(n as u64);
                }
            },
            None => tracing::warn!(
                events = n,
                "event store unreachable at shutdown: events lost"
            ),
        }
        self.stats
            .spooled
            .store(self.spool_len(), Ordering::Relaxed);
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

        // Keep taking events in while the store works on the batch, so sessions never wait
        // and a long outage spills to the spool instead of filling the intake channel.
        let result = {
            let publish = sink.publish(&batch.events);
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
                queue.persist(Some(batch));
                return;
            }
            Some(Ok(())) => {
                queue.store_down = false;
                backoff = RETRY_MIN;
                queue.delivered(batch);
            }
            Some(Err(e)) => {
                queue.store_down = true;
                tracing::warn!(store = sink.name(), error = %e, retry_in = ?backoff,
                    events = batch.events.len(), "event store did not take events, retrying");
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
                    queue.persist(None);
                    return;
                }
            }
        }
    }
    queue.persist(None);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{DataDir, SinkError};
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

    #[tokio::test(start_paused = true)]
    async fn overflow_spills_to_the_spool_and_order_is_kept() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = DataDir::open(dir.path()).expect("data dir");
        let spool = Spool::open(&data, 1 << 20).expect("spool");
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = FlakySink {
            failures: 5,
            got: got.clone(),
        };
        let (outbox, _task) = Outbox::start_with_spool(Box::new(sink), 4, spool);
        for i in 0..100 {
            outbox.emit(event(i));
            tokio::task::yield_now().await;
        }
        assert!(outbox.stats().spooled.load(Ordering::Relaxed) > 0);
        assert!(outbox.flush(Duration::from_secs(600)).await);
        let order: Vec<i64> = got.lock().unwrap().iter().map(|e| e.occurred_at).collect();
        assert_eq!(order, (0..100).collect::<Vec<_>>());
        assert_eq!(outbox.stats().dropped.load(Ordering::Relaxed), 0);
        assert_eq!(outbox.stats().spooled.load(Ordering::Relaxed), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn undelivered_events_survive_a_restart_and_go_first() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = DataDir::open(dir.path()).expect("data dir");
        let down = FlakySink {
            failures: usize::MAX,
            got: Arc::new(Mutex::new(Vec::new())),
        };
        let spool = Spool::open(&data, 1 << 20).expect("spool");
        let (outbox, task) = Outbox::start_with_spool(Box::new(down), 4, spool);
        for i in 0..10 {
            outbox.emit(event(i));
            tokio::task::yield_now().await;
        }
        assert!(!outbox.flush(Duration::from_secs(1)).await);
        drop(outbox);
        task.await.expect("drain task");

        let got = Arc::new(Mutex::new(Vec::new()));
        let up = FlakySink {
            failures: 0,
            got: got.clone(),
        };
        let spool = Spool::open(&data, 1 << 20).expect("reopen spool");
        assert_eq!(spool.len(), 10);
        let (outbox, _task) = Outbox::start_with_spool(Box::new(up), 4, spool);
        outbox.emit(event(10));
        outbox.emit(event(11));
        assert!(outbox.flush(Duration::from_secs(60)).await);
        let order: Vec<i64> = got.lock().unwrap().iter().map(|e| e.occurred_at).collect();
        assert_eq!(order, (0..12).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn during_an_outage_new_events_go_to_disk() {
        let dir = tempfile::tempdir().expect("temp dir");
        let data = DataDir::open(dir.path()).expect("data dir");
        let spool = Spool::open(&data, 1 << 20).expect("spool");
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = FlakySink {
            failures: 3,
            got: got.clone(),
        };
        let (outbox, _task) = Outbox::start_with_spool(Box::new(sink), 1000, spool);
        outbox.emit(event(0));
        // The first attempt fails at once; the drain task then waits out its backoff, and the
        // paused clock does not move while this task keeps yielding.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        for i in 1..=10 {
            outbox.emit(event(i));
            tokio::task::yield_now().await;
        }
        assert_eq!(
            outbox.stats().spooled.load(Ordering::Relaxed),
            10,
            "events emitted while the store is down are on disk despite room in memory"
        );
        assert!(outbox.flush(Duration::from_secs(60)).await);
        let order: Vec<i64> = got.lock().unwrap().iter().map(|e| e.occurred_at).collect();
        assert_eq!(order, (0..=10).collect::<Vec<_>>());
    }
}
