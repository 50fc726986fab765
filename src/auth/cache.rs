//! The decision cache in front of the platform's auth services: positive and negative answers
//! are kept for their own TTLs in a bounded map, and concurrent lookups of the same missing key
//! share one call (a storm of 1,000 devices with the same credentials makes one request).
//! Failures (service down or slow) are never cached, so the next lookup asks again.

use std::future::Future;
use std::hash::Hash;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use moka::Expiry;

/// A cached answer that is either an allow or a deny, each with its own TTL.
pub trait Decision: Clone + Send + Sync + 'static {
    fn allows(&self) -> bool;
}

impl Decision for bool {
    fn allows(&self) -> bool {
        *self
    }
}

impl Decision for Option<String> {
    fn allows(&self) -> bool {
        self.is_some()
    }
}

/// How long answers live and how many are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheSettings {
    pub allow_ttl: Duration,
    pub deny_ttl: Duration,
    pub max_entries: u64,
}

impl Default for CacheSettings {
    fn default() -> Self {
        CacheSettings {
            allow_ttl: Duration::from_secs(10),
            deny_ttl: Duration::from_secs(2),
            max_entries: 100_000,
        }
    }
}

/// Counters of one cache, for the metrics endpoint.
#[derive(Debug, Default)]
pub struct CacheMetrics {
    /// Lookups answered without a call of their own (from the cache, or by joining a call
    /// already in flight for the same key).
    pub hits: AtomicU64,
    /// Lookups that made a call to the service.
    pub misses: AtomicU64,
    /// Calls that failed (service unavailable, timeout); their answer is not cached.
    pub failures: AtomicU64,
}

struct DecisionExpiry {
    allow_ttl: Duration,
    deny_ttl: Duration,
}

impl<K, V: Decision> Expiry<K, V> for DecisionExpiry {
    fn expire_after_create(&self, _key: &K, value: &V, _created_at: Instant) -> Option<Duration> {
        Some(if value.allows() {
            self.allow_ttl
        } else {
            self.deny_ttl
        })
    }
}

/// A bounded, TTL'd, single-flight cache of decisions keyed by `K`.
pub struct DecisionCache<K, V> {
    entries: moka::future::Cache<K, V>,
    metrics: Arc<CacheMetrics>,
}

impl<K, V> DecisionCache<K, V>
where
    K: Hash + Eq + Send + Sync + 'static,
    V: Decision,
{
    pub fn new(settings: CacheSettings) -> Self {
        let entries = moka::future::Cache::builder()
            .max_capacity(settings.max_entries)
            .expire_after(DecisionExpiry {
                allow_ttl: settings.allow_ttl,
                deny_ttl: settings.deny_ttl,
            })
            .build();
        DecisionCache {
            entries,
            metrics: Arc::default(),
        }
    }

    pub fn metrics(&self) -> Arc<CacheMetrics> {
        self.metrics.clone()
    }

    /// Drops every cached decision `which` selects (a revocation); the next lookup of each asks
    /// the service again.
    pub async fn forget(&self, which: impl Fn(&K, &V) -> bool) -> usize {
        let doomed: Vec<Arc<K>> = self
            .entries
            .iter()
            .filter(|(k, v)| which(k, v))
            .map(|(k, _)| k)
            .collect();
        for key in &doomed {
            self.entries.invalidate(key.as_ref()).await;
        }
        doomed.len()
    }

    /// The cached decision for `key`, or the result of `fetch` (run by at most one of the
    /// concurrent callers asking for the same key). A failed fetch is returned to every caller
    /// that waited on it and is not cached.
    pub async fn get_or_fetch<F, E>(&self, key: K, fetch: F) -> Result<V, Arc<E>>
    where
        F: Future<Output = Result<V, E>>,
        E: Send + Sync + 'static,
    {
        let fetched = AtomicBool::new(false);
        let result = self
            .entries
            .try_get_with(key, async {
                fetched.store(true, Ordering::Relaxed);
                fetch.await
            })
            .await;
        let counter = match (fetched.load(Ordering::Relaxed), &result) {
            (false, _) => &self.metrics.hits,
            (true, Ok(_)) => &self.metrics.misses,
            (true, Err(_)) => {
                self.metrics.misses.fetch_add(1, Ordering::Relaxed);
                &self.metrics.failures
            }
        };
        counter.fetch_add(1, Ordering::Relaxed);
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> CacheSettings {
        CacheSettings {
            allow_ttl: Duration::from_secs(60),
            deny_ttl: Duration::from_secs(60),
            max_entries: 100,
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn concurrent_misses_make_one_call() {
        let cache: Arc<DecisionCache<String, bool>> = Arc::new(DecisionCache::new(settings()));
        let calls = Arc::new(AtomicU64::new(0));
        let (release_tx, release_rx) = tokio::sync::watch::channel(false);
        let mut waiters = Vec::new();
        for _ in 0..50 {
            let cache = cache.clone();
            let calls = calls.clone();
            let mut release = release_rx.clone();
            waiters.push(tokio::spawn(async move {
                cache
                    .get_or_fetch("k".to_owned(), async move {
                        calls.fetch_add(1, Ordering::SeqCst);
                        let _ = release.wait_for(|r| *r).await;
                        Ok::<_, std::io::Error>(true)
                    })
                    .await
            }));
        }
        // Let every waiter reach the cache while the one call is held open.
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        release_tx.send(true).expect("waiters alive");
        for w in waiters {
            assert!(w.await.expect("task").expect("decision"));
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(cache.metrics.misses.load(Ordering::SeqCst), 1);
        assert_eq!(cache.metrics.hits.load(Ordering::SeqCst), 49);
    }

    #[tokio::test]
    async fn failures_are_not_cached_and_denials_are() {
        let cache: DecisionCache<String, bool> = DecisionCache::new(settings());
        let err = cache
            .get_or_fetch("k".to_owned(), async { Err::<bool, _>("down") })
            .await;
        assert!(err.is_err());
        let denied = cache
            .get_or_fetch("k".to_owned(), async { Ok::<_, &str>(false) })
            .await;
        assert_eq!(denied, Ok(false));
        let cached = cache
            .get_or_fetch("k".to_owned(), async { Ok::<_, &str>(true) })
            .await;
        assert_eq!(cached, Ok(false), "the denial is served from the cache");
        assert_eq!(cache.metrics.failures.load(Ordering::SeqCst), 1);
        assert_eq!(cache.metrics.misses.load(Ordering::SeqCst), 2);
        assert_eq!(cache.metrics.hits.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn forget_drops_only_the_selected_entries() {
        let cache: DecisionCache<String, bool> = DecisionCache::new(settings());
        for key in ["a1", "a2", "b1"] {
            let _ = cache
                .get_or_fetch(key.to_owned(), async { Ok::<_, &str>(true) })
                .await;
        }
        assert_eq!(cache.forget(|k, _| k.starts_with('a')).await, 2);
        let a1 = cache.get_or_fetch("a1".to_owned(), async { Ok::<_, &str>(false) });
        assert_eq!(a1.await, Ok(false), "asked again");
        let b1 = cache.get_or_fetch("b1".to_owned(), async { Ok::<_, &str>(false) });
        assert_eq!(b1.await, Ok(true), "still cached");
    }

    #[tokio::test]
    async fn deny_ttl_is_separate_from_allow_ttl() {
        let cache: DecisionCache<String, bool> = DecisionCache::new(CacheSettings {
            allow_ttl: Duration::from_secs(60),
            deny_ttl: Duration::ZERO,
            max_entries: 100,
        });
        for key in ["a", "b"] {
            let _ = cache
                .get_or_fetch(key.to_owned(), async move { Ok::<_, &str>(key == "a") })
                .await;
        }
        let a = cache.get_or_fetch("a".to_owned(), async { Ok::<_, &str>(false) });
        assert_eq!(a.await, Ok(true), "allow still cached");
        let b = cache.get_or_fetch("b".to_owned(), async { Ok::<_, &str>(true) });
        assert_eq!(b.await, Ok(true), "deny with TTL 0 is asked again");
    }
}
