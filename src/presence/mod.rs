//! `mqtt-adapter presence`: who is online, rebuilt from the connection events every adapter
//! instance writes to the event stream. `source/` reads the stream (Redis or NATS) from its
//! start, `event` decodes entries, `state` pairs them per (instance, client id), `recent`
//! skips repeats of at-least-once delivery, `report` prints, `run` ties them together.

pub mod event;
pub mod recent;
pub mod report;
pub mod run;
pub mod source;
pub mod state;

pub use event::StreamEvent;
pub use run::{run, PresenceError};
pub use state::{Change, Presence};

/// The hash of the replay's maps and fingerprints: ahash with keys drawn once per process (a
/// replay hashes every event several times, and SipHash was a tenth of its CPU).
#[derive(Clone)]
pub struct FastHash(ahash::RandomState);

impl Default for FastHash {
    fn default() -> Self {
        use std::hash::BuildHasher;
        let keys = std::collections::hash_map::RandomState::new();
        let key = |i: u64| keys.hash_one(i);
        FastHash(ahash::RandomState::with_seeds(
            key(0),
            key(1),
            key(2),
            key(3),
        ))
    }
}

impl std::hash::BuildHasher for FastHash {
    type Hasher = ahash::AHasher;

    fn build_hasher(&self) -> ahash::AHasher {
        self.0.build_hasher()
    }
}

impl std::fmt::Debug for FastHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FastHash")
    }
}
