//! Which topic filters have subscribers: counted per filter as subscriptions enter and leave the
//! trie, so something outside the core (the bus bridge) can follow the interest of this
//! instance without walking the trie. Changes are coalesced: a follower reads the whole set
//! when told it changed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::{watch, Notify};

/// Subscriptions per filter (a share group counts once, by its inner filter).
#[derive(Debug)]
pub struct FilterInterest {
    counts: Mutex<HashMap<Box<str>, usize>>,
    changed: Notify,
    /// Advances whenever the set of filters changes.
    generation: AtomicU64,
    /// The generation the follower has caught up with.
    synced: watch::Sender<u64>,
}

impl Default for FilterInterest {
    fn default() -> Self {
        FilterInterest {
            counts: Mutex::default(),
            changed: Notify::new(),
            generation: AtomicU64::new(0),
            synced: watch::channel(0).0,
        }
    }
}

impl FilterInterest {
    fn counts(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, usize>> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A subscription to `filter` entered the trie.
    pub(super) fn add(&self, filter: &str) {
        let mut counts = self.counts();
        let count = counts.entry(filter.into()).or_default();
        *count += 1;
        if *count == 1 {
            self.generation.fetch_add(1, Ordering::AcqRel);
            drop(counts);
            self.changed.notify_one();
        }
    }

    /// A subscription to `filter` left the trie.
    pub(super) fn remove(&self, filter: &str) {
        let mut counts = self.counts();
        let Some(count) = counts.get_mut(filter) else {
            return;
        };
        *count -= 1;
        if *count == 0 {
            counts.remove(filter);
            self.generation.fetch_add(1, Ordering::AcqRel);
            drop(counts);
            self.changed.notify_one();
        }
    }

    /// The filters with at least one subscription, and the generation they are.
    pub fn filters(&self) -> (Vec<String>, u64) {
        let counts = self.counts();
        let generation = self.generation.load(Ordering::Acquire);
        (counts.keys().map(|f| f.to_string()).collect(), generation)
    }

    /// The current generation of the set of filters.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The follower has acted on every change up to `generation`.
    pub fn mark_synced(&self, generation: u64) {
        self.synced.send_if_modified(|s| {
            let newer = generation > *s;
            *s = (*s).max(generation);
            newer
        });
    }

    /// Waits (at most `timeout`) until the follower has acted on `generation`; returns whether
    /// it did.
    pub async fn wait_synced(&self, generation: u64, timeout: Duration) -> bool {
        let mut synced = self.synced.subscribe();
        tokio::time::timeout(timeout, synced.wait_for(|&s| s >= generation))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Resolves once the set of filters changed since the last call (or at once when it changed
    /// before anyone waited).
    pub async fn changed(&self) {
        self.changed.notified().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_filter_is_listed_while_it_has_a_subscription() {
        let interest = FilterInterest::default();
        interest.add("m/d/c/ch/#");
        interest.add("m/d/c/ch/#");
        interest.changed().await;
        assert_eq!(interest.filters(), (vec!["m/d/c/ch/#".to_owned()], 1));
        interest.remove("m/d/c/ch/#");
        assert_eq!(interest.filters().1, 1);
        interest.remove("m/d/c/ch/#");
        interest.changed().await;
        assert_eq!(interest.filters(), (vec![], 2));
        // Removing what is not there changes nothing.
        interest.remove("x");
        assert_eq!(interest.generation(), 2);
        let wait = Duration::from_millis(10);
        assert!(!interest.wait_synced(2, wait).await);
        interest.mark_synced(2);
        assert!(interest.wait_synced(1, wait).await && interest.wait_synced(2, wait).await);
    }
}
