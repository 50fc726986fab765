//! Recognises repeated events. Delivery to the stores is at-least-once: after a lost
//! acknowledgement the adapter sends a whole batch again, so the same event (same instance,
//! client id, type and `occurred_at`) can appear twice, a few hundred entries apart. Pairing a
//! repeat would count a session twice, so the last [`WINDOW`] events are remembered.

use std::collections::{HashSet, VecDeque};
use std::hash::{DefaultHasher, Hash, Hasher};

use super::event::StreamEvent;

/// Events remembered: many outbox batches (512 events each) of several instances interleaved.
pub const WINDOW: usize = 65_536;

/// The fingerprints of the last [`WINDOW`] distinct events.
#[derive(Debug, Default)]
pub struct RecentEvents {
    order: VecDeque<u64>,
    seen: HashSet<u64>,
}

impl RecentEvents {
    /// Records `event`; `true` if it is a repeat of one recorded before.
    pub fn is_repeat(&mut self, event: &StreamEvent) -> bool {
        let fingerprint = fingerprint(event);
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

/// 64 bits of hash: a false "repeat" needs a collision among 65,536 events (odds ~1e-10).
fn fingerprint(event: &StreamEvent) -> u64 {
    let mut hasher = DefaultHasher::new();
    (
        &event.instance,
        &event.client_id,
        event.event_type.as_str(),
        event.occurred_at,
    )
        .hash(&mut hasher);
    hasher.finish()
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
