//! Who is online, rebuilt by pairing connection events. A session is keyed by (instance,
//! client id); one client id may hold several sessions on one instance (different MQTT client
//! identifiers), so each key counts its open sessions. What does not pair is counted, never
//! hidden: a `disconnect` with no open session is an anomaly (a trimmed stream, a lost event,
//! two adapters sharing one instance name).
//!
//! A restarted adapter writes a `disconnect` with reason `crash_recovery` for each session its
//! crash left open, before it accepts anyone. The first of them closes every session the
//! stream still shows open on that instance, so sessions whose own `disconnect` was lost in the
//! crash do not stay online forever; the rest of that run of recovery events then pair with
//! the sessions it closed.

use std::collections::{BTreeMap, HashMap, VecDeque};

use serde::Serialize;

use super::event::StreamEvent;
use super::recent::RecentEvents;
use crate::events::EventType;

/// Anomalies kept for display (the counters keep counting past it).
pub const MAX_ANOMALIES: usize = 100;

/// A session's key: which instance, which client id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionKey {
    pub instance: String,
    pub client_id: String,
}

/// A client id online on one instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Online {
    /// Open sessions.
    pub sessions: u32,
    /// `occurred_at` of the connect that brought the client online (no session open before it).
    pub since: i64,
}

/// What one instance's events added up to.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct InstanceStats {
    /// Client ids online now.
    pub online: u64,
    /// Sessions open now.
    pub sessions: u64,
    pub connects: u64,
    pub disconnects: u64,
    /// `disconnect`s that matched no open session.
    pub unmatched_disconnects: u64,
    /// `disconnect`s by `reason` (only present with event details on).
    pub disconnect_reasons: BTreeMap<String, u64>,
    /// Restarts after a crash (runs of `crash_recovery` disconnects).
    pub crash_recoveries: u64,
    /// Sessions closed by those restarts.
    pub closed_by_recovery: u64,
    /// Latest `occurred_at` seen from the instance.
    pub last_event_at: i64,
    /// Sessions the current run of `crash_recovery` events closed and has not yet matched.
    #[serde(skip)]
    recovery_credits: HashMap<String, u32>,
    #[serde(skip)]
    in_recovery: bool,
}

/// A disconnect that matched nothing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Anomaly {
    pub instance: String,
    pub client_id: String,
    pub occurred_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A change in who is online, for the one-line-per-change output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A client id's session count on an instance went up or down and is now `sessions` (0: offline).
    Sessions {
        key: SessionKey,
        sessions: u32,
        at: i64,
        reason: Option<String>,
    },
    /// An instance restarted after a crash and closed `closed` sessions.
    Recovered {
        instance: String,
        closed: u64,
        at: i64,
    },
    Anomaly(Anomaly),
}

/// The presence state: fed events in stream order, asked who is online.
#[derive(Debug, Default)]
pub struct Presence {
    /// A fast keyed hash: a replay looks a key up for every event.
    online: HashMap<SessionKey, Online, super::FastHash>,
    instances: BTreeMap<String, InstanceStats>,
    anomalies: VecDeque<Anomaly>,
    recent: RecentEvents,
    /// Events applied, repeats included.
    pub events: u64,
    /// Events recognised as repeats of a recent one (at-least-once delivery), and skipped.
    pub repeats: u64,
    /// Stored entries that were not connection events.
    pub malformed: u64,
    changes: Option<Vec<Change>>,
}

impl Presence {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts recording [`Change`]s for [`Presence::take_changes`] (off by default: a full
    /// replay does not need them).
    pub fn record_changes(&mut self) {
        self.changes.get_or_insert_with(Vec::new);
    }

    pub fn take_changes(&mut self) -> Vec<Change> {
        self.changes
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    /// Counts an entry that could not be read as an event.
    pub fn malformed(&mut self) {
        self.malformed += 1;
    }

    /// Applies the next event of the stream.
    pub fn apply(&mut self, event: StreamEvent) {
        self.events += 1;
        if self.recent.is_repeat(&event) {
            self.repeats += 1;
            return;
        }
        let recovery = event.is_crash_recovery();
        let stats = self.stats(&event.instance);
        stats.last_event_at = stats.last_event_at.max(event.occurred_at);
        if !recovery && stats.in_recovery {
            // The restart's run of recovery events is over.
            stats.in_recovery = false;
            stats.recovery_credits.clear();
        }
        match event.event_type {
            EventType::Connect => self.connect(event),
            EventType::Disconnect if recovery => self.recover(event),
            EventType::Disconnect => self.disconnect(event),
            // Not a session boundary: presence has nothing to pair.
            EventType::Subscribe => {}
        }
    }

    fn connect(&mut self, event: StreamEvent) {
        let key = SessionKey {
            instance: event.instance,
            client_id: event.client_id,
        };
        let stats = self.stats(&key.instance);
        stats.connects += 1;
        stats.sessions += 1;
        let sessions = self.online.get(&key).map_or(1, |o| o.sessions + 1);
        self.record(|| Change::Sessions {
            key: key.clone(),
            sessions,
            at: event.occurred_at,
            reason: None,
        });
        match self.online.get_mut(&key) {
            Some(online) => online.sessions = sessions,
            None => {
                self.stats(&key.instance).online += 1;
                let online = Online {
                    sessions,
                    since: event.occurred_at,
                };
                self.online.insert(key, online);
            }
        }
    }

    fn disconnect(&mut self, event: StreamEvent) {
        let stats = self.stats(&event.instance);
        stats.disconnects += 1;
        if let Some(reason) = &event.reason {
            *stats.disconnect_reasons.entry(reason.clone()).or_default() += 1;
        }
        let key = SessionKey {
            instance: event.instance,
            client_id: event.client_id,
        };
        let Some(online) = self.online.get_mut(&key) else {
            return self.anomaly(key, event.occurred_at, event.reason);
        };
        online.sessions -= 1;
        let sessions = online.sessions;
        let stats = self.stats(&key.instance);
        stats.sessions -= 1;
        if sessions == 0 {
            stats.online -= 1;
            self.online.remove(&key);
        }
        self.record(|| Change::Sessions {
            key,
            sessions,
            at: event.occurred_at,
            reason: event.reason,
        });
    }

    fn recover(&mut self, event: StreamEvent) {
        let stats = self.stats(&event.instance);
        stats.disconnects += 1;
        *stats
            .disconnect_reasons
            .entry(super::event::CRASH_RECOVERY.to_owned())
            .or_default() += 1;
        if !stats.in_recovery {
            stats.in_recovery = true;
            stats.crash_recoveries += 1;
            self.close_instance(&event.instance, event.occurred_at);
        }
        let stats = self.stats(&event.instance);
        match stats.recovery_credits.get_mut(&event.client_id) {
            Some(credits) if *credits > 0 => *credits -= 1,
            _ => {
                let key = SessionKey {
                    instance: event.instance,
                    client_id: event.client_id,
                };
                self.anomaly(key, event.occurred_at, event.reason);
            }
        }
    }

    /// Closes every open session of `instance`, as its restart after a crash did.
    fn close_instance(&mut self, instance: &str, at: i64) {
        let keys: Vec<SessionKey> = self
            .online
            .keys()
            .filter(|k| k.instance == instance)
            .cloned()
            .collect();
        let mut closed = 0u64;
        let mut credits = HashMap::new();
        for key in keys {
            if let Some(online) = self.online.remove(&key) {
                closed += u64::from(online.sessions);
                self.record(|| Change::Sessions {
                    key: key.clone(),
                    sessions: 0,
                    at,
                    reason: Some(super::event::CRASH_RECOVERY.to_owned()),
                });
                credits.insert(key.client_id, online.sessions);
            }
        }
        let stats = self.stats(instance);
        stats.closed_by_recovery += closed;
        stats.sessions = 0;
        stats.online = 0;
        stats.recovery_credits = credits;
        self.record(|| Change::Recovered {
            instance: instance.to_owned(),
            closed,
            at,
        });
    }

    fn anomaly(&mut self, key: SessionKey, occurred_at: i64, reason: Option<String>) {
        self.stats(&key.instance).unmatched_disconnects += 1;
        let anomaly = Anomaly {
            instance: key.instance,
            client_id: key.client_id,
            occurred_at,
            reason,
        };
        if self.anomalies.len() == MAX_ANOMALIES {
            self.anomalies.pop_front();
        }
        self.anomalies.push_back(anomaly.clone());
        self.record(|| Change::Anomaly(anomaly));
    }

    fn stats(&mut self, instance: &str) -> &mut InstanceStats {
        // Looked up before inserted: the name is copied once per instance, not once per event.
        if !self.instances.contains_key(instance) {
            self.instances
                .insert(instance.to_owned(), InstanceStats::default());
        }
        self.instances
            .get_mut(instance)
            .expect("inserted just above")
    }

    fn record(&mut self, change: impl FnOnce() -> Change) {
        if let Some(changes) = &mut self.changes {
            changes.push(change());
        }
    }

    /// Online client ids, sorted by instance then client id.
    pub fn online(&self) -> Vec<(&SessionKey, &Online)> {
        let mut online: Vec<_> = self.online.iter().collect();
        online.sort_unstable_by(|a, b| a.0.cmp(b.0));
        online
    }

    pub fn instances(&self) -> &BTreeMap<String, InstanceStats> {
        &self.instances
    }

    /// The latest [`MAX_ANOMALIES`] anomalies, oldest first.
    pub fn anomalies(&self) -> impl Iterator<Item = &Anomaly> {
        self.anomalies.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny stream script: `+a/c1` connect, `-a/c1` disconnect, `!a/c1` crash_recovery,
    /// `~a/c1` takeover; `occurred_at` is the position.
    fn replay(script: &str) -> Presence {
        let mut presence = Presence::new();
        presence.record_changes();
        for (i, step) in script.split_whitespace().enumerate() {
            let (op, rest) = step.split_at(1);
            let (instance, client) = rest.split_once('/').expect("instance/client");
            let (event_type, reason) = match op {
                "+" => (EventType::Connect, None),
                "-" => (EventType::Disconnect, None),
                "!" => (EventType::Disconnect, Some("crash_recovery")),
                "~" => (EventType::Disconnect, Some("takeover")),
                _ => panic!("bad step {step}"),
            };
            presence.apply(StreamEvent {
                client_id: client.into(),
                event_type,
                instance: instance.into(),
                occurred_at: i as i64 + 1,
                reason: reason.map(str::to_owned),
            });
        }
        presence
    }

    fn online(presence: &Presence) -> Vec<(String, u32)> {
        presence
            .online()
            .into_iter()
            .map(|(k, o)| (format!("{}/{}", k.instance, k.client_id), o.sessions))
            .collect()
    }

    #[test]
    fn pairs_per_instance_and_client_and_counts_sessions() {
        let p = replay("+a/c1 +a/c1 +b/c1 +a/c2 -a/c1 -a/c2");
        assert_eq!(online(&p), [("a/c1".into(), 1), ("b/c1".into(), 1)]);
        let a = &p.instances()["a"];
        assert_eq!(
            (a.connects, a.disconnects, a.online, a.sessions),
            (3, 2, 1, 1)
        );
        // Online since the first connect, kept while a session stays open.
        assert_eq!(p.online()[0].1.since, 1);
    }

    #[test]
    fn a_disconnect_without_a_connect_is_an_anomaly() {
        let mut p = replay("-a/ghost +a/c1 -a/c1 -a/c1");
        assert!(online(&p).is_empty());
        assert_eq!(p.instances()["a"].unmatched_disconnects, 2);
        let ghosts: Vec<_> = p.anomalies().map(|a| a.client_id.as_str()).collect();
        assert_eq!(ghosts, ["ghost", "c1"]);
        assert!(matches!(p.take_changes()[0], Change::Anomaly(_)));
    }

    #[test]
    fn crash_recovery_closes_the_instance_and_pairs_its_own_events() {
        // c3's disconnect was lost in the crash (no recovery event for it): still closed.
        let p = replay("+a/c1 +a/c1 +a/c2 +a/c3 +b/c9 !a/c1 !a/c1 !a/c2 +a/c1");
        assert_eq!(online(&p), [("a/c1".into(), 1), ("b/c9".into(), 1)]);
        let a = &p.instances()["a"];
        assert_eq!(a.crash_recoveries, 1);
        assert_eq!(a.closed_by_recovery, 4);
        assert_eq!(a.unmatched_disconnects, 0);
        assert_eq!(a.disconnect_reasons["crash_recovery"], 3);
        assert_eq!((a.online, a.sessions), (1, 1));
    }

    #[test]
    fn recovery_events_beyond_the_open_sessions_are_anomalies() {
        // The second restart's recovery event names a session the stream never showed open.
        let p = replay("+a/c1 !a/c1 +a/c2 !a/c7");
        assert!(online(&p).is_empty());
        let a = &p.instances()["a"];
        assert_eq!((a.crash_recoveries, a.closed_by_recovery), (2, 2));
        assert_eq!(a.unmatched_disconnects, 1);
    }

    #[test]
    fn takeover_is_a_reason_like_any_other() {
        let p = replay("+a/c1 ~a/c1 +b/c1");
        assert_eq!(online(&p), [("b/c1".into(), 1)]);
        assert_eq!(p.instances()["a"].disconnect_reasons["takeover"], 1);
    }

    #[test]
    fn repeated_events_are_skipped() {
        let mut p = Presence::new();
        let connect = StreamEvent {
            client_id: "c1".into(),
            event_type: EventType::Connect,
            instance: "a".into(),
            occurred_at: 5,
            reason: None,
        };
        p.apply(connect.clone());
        p.apply(connect);
        assert_eq!(p.repeats, 1);
        assert_eq!(online(&p), [("a/c1".into(), 1)]);
    }
}
