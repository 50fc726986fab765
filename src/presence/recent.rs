//! Recognises repeated events. Delivery to the stores is at-least-once: after a lost
//! acknowledgement the adapter sends a whole batch again, so the same event (same instance,
//! client id, type and `occurred_at`) can appear twice, a few hundred entries apart. Pairing a
//! repeat would count a session twice, so the last [`WINDOW`] events are remembered.

use std::collections::{HashSet, VecDeque};
use std::hash::{BuildHasher, BuildHasherDefault, Hasher};

use super::event::StreamEvent;

/// Events remembered: many outbox batches (512 events each) of several instances interleaved.
pub const WINDOW: usize = 65_536;

/// The fingerprints of the last [`WINDOW`] distinct events.
#[derive(Debug, Default)]
pub struct RecentEvents {
    order: VecDeque<u64>,
    /// Fingerprints are hashes already: the set uses them as they are.
    seen: HashSet<u64, BuildHasherDefault<Prehashed>>,
    /// Keyed per process (a fingerprint never leaves it).
    hasher: super::FastHash,
}

/// The identity hash of a `u64` that is itself a hash.
#[derive(Debug, Default)]
struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

impl RecentEvents {
    /// Records `event`; `true` if it is a repeat of one recorded before.
    pub fn is_repeat(&mut self, event: &StreamEvent) -> bool {
        let fingerprint = self.fingerprint(event);
        if !self.seen.insert(fingerprint) {
            return true;
        }
        self.order.push_back(fingerprint);
        if self.order.len() > WINDOW {
            if let Some(oldest) = self.order.pop_front() {
                self.seen.remove(&oldest);
            }
        }
        false
    }
}

impl RecentEvents {
    /// 64 bits of hash: a false "repeat" needs a collision among 65,536 events (odds ~1e-10).
    fn fingerprint(&self, event: &StreamEvent) -> u64 {
        self.hasher.hash_one((
            &event.instance,
            &event.client_id,
            event.event_type.as_str(),
            event.occurred_at,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::EventType;

    fn event(client: &str, at: i64) -> StreamEvent {
        StreamEvent {
            client_id: client.into(),
            event_type: EventType::Connect,
            instance: "a".into(),
            occurred_at: at,
            reason: None,
        }
    }

    #[test]
    fn a_resent_batch_is_recognised_and_new_events_are_not() {
        let mut recent = RecentEvents::default();
        let batch: Vec<StreamEvent> = (0..600).map(|i| event("c", i)).collect();
        assert!(batch.iter().all(|e| !recent.is_repeat(e)));
        assert!(batch.iter().all(|e| recent.is_repeat(e)));
        assert!(!recent.is_repeat(&event("other", 0)));
        let mut disconnect = event("c", 0);
        disconnect.event_type = EventType::Disconnect;
        assert!(!recent.is_repeat(&disconnect));
    }

    #[test]
    fn memory_is_bounded_by_the_window() {
        let mut recent = RecentEvents::default();
        for i in 0..(WINDOW as i64 + 10) {
            recent.is_repeat(&event("c", i));
        }
        assert_eq!(recent.seen.len(), WINDOW);
        // The oldest fell out of the window, so it no longer counts as a repeat.
        assert!(!recent.is_repeat(&event("c", 0)));
    }
}
