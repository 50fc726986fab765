//! Persistent sessions kept by the state store: what the broker core writes, and when, and how
//! it reads them back at start-up.
//!
//! - CONNECT writes the session record and its deliveries ([`Broker::keep_connected`]);
//!   SUBSCRIBE and UNSUBSCRIBE write the record ([`Broker::keep_subscriptions`]);
//! - an offline session's QoS 1/2 deliveries are appended one by one, before the publisher's
//!   acknowledgement (`Session::deliver`);
//! - an online session's deliveries are written at checkpoints only ([`Broker::checkpoint`]),
//!   never per message, and when its connection ends;
//! - expiry and replacement remove the session (`Broker::discard`).
//!
//! A session whose process died with its connection open comes back as ended at the restart:
//! its expiry and its will's delay run from then.

use std::sync::Arc;
use std::time::Duration;

use super::queue::{Mailbox, MailboxImage};
use super::session::{Durable, State};
use super::{Broker, DeferredWill, Expiry, Message, Session, SessionKey};
use crate::state::{unix_ms_now, KeptWill, SessionRecord, StateError, StateTicket, WillDue};

/// How often online persistent sessions whose deliveries changed are written.
pub const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(1);

/// Publishes a will the state store kept, for a session this process did not see connect:
/// given the session key, the will and the message to publish.
pub type WillRoute = Arc<dyn Fn(&SessionKey, &KeptWill, Arc<Message>) + Send + Sync>;

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The session record of `session` as its state is now.
pub(super) fn record_of(session: &Session, state: &State) -> SessionRecord {
    SessionRecord {
        key: session.key.clone(),
        expiry: state.expiry,
        ended_ms: state.durable.as_ref().and_then(|d| d.ended_ms),
        next_seq: state.mailbox.image_seq(),
        subscriptions: state
            .subscriptions
            .iter()
            .map(|(f, o)| (f.to_string(), *o))
            .collect(),
        will: state.durable.as_ref().and_then(|d| d.will.clone()),
    }
}

/// What restoring the kept sessions found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Restored {
    /// Sessions held again (offline, until their devices resume).
    pub sessions: usize,
    /// Their kept deliveries.
    pub deliveries: usize,
    /// Sessions whose expiry passed while the process was down (removed).
    pub expired: usize,
    /// Wills that fell due while the process was down (published now).
    pub wills: usize,
}

impl Broker {
    /// Writes the session at CONNECT: its record (with the connection's will, which is kept
    /// with it until the connection ends normally) and its deliveries. A session that is not
    /// persistent writes nothing. The CONNACK may wait for the ticket.
    pub fn keep_connected(&self, session: &Arc<Session>, will: Option<KeptWill>) -> StateTicket {
        if !self.state.keeps_sessions() {
            return StateTicket::done();
        }
        let mut state = session.lock();
        if state.expiry == Expiry::WithConnection {
            // Resumed with an expiry of 0: it ends with this connection and is no longer kept.
            return match state.durable.take() {
                Some(_) => self.state.remove_session(&session.key),
                None => StateTicket::done(),
            };
        }
        // A session kept already has its deliveries in the store (written when its connection
        // ended, appended since): only its record changes.
        let deliveries = match state.durable.is_some() {
            true => None,
            false => Some(state.mailbox.image().entries),
        };
        let durable = state.durable.get_or_insert_with(Box::default);
        durable.will = will;
        durable.ended_ms = None;
        if let Some(entries) = &deliveries {
            durable.changed = false;
            durable.next_position = entries.len() as u64;
        }
        let record = record_of(session, &state);
        self.state.put_session(record, deliveries)
    }

    /// Writes the session record after its subscriptions changed; a SUBACK may wait for it.
    pub fn keep_subscriptions(&self, session: &Session) -> StateTicket {
        let state = session.lock();
        if state.durable.is_none() {
            return StateTicket::done();
        }
        self.state.put_session(record_of(session, &state), None)
    }

    /// Sets the session's expiry (MQTT 5 Session Expiry Interval on DISCONNECT); takes effect
    /// when the connection ends.
    pub fn set_expiry(&self, session: &Session, expiry: Expiry) {
        session.lock().expiry = expiry;
    }

    /// The connection of a durable session ended: writes the record (ended now, the will as
    /// due) and every delivery it holds. Called under the session's lock.
    pub(super) fn keep_ended(
        &self,
        session: &Session,
        state: &mut State,
        will: Option<(Arc<Message>, Duration)>,
    ) {
        let Some(durable) = state.durable.as_mut() else {
            return;
        };
        let now = unix_ms_now();
        durable.ended_ms = Some(now);
        durable.will = match (durable.will.take(), will) {
            (Some(kept), Some((message, delay))) => Some(KeptWill {
                message,
                due: WillDue::At(now.saturating_add(ms(delay))),
                ..kept
            }),
            // Ended normally, or its will went out at once.
            _ => None,
        };
        self.write_all(session, state);
    }

    /// Writes the record and every delivery the session holds (replacing the kept ones);
    /// later appends follow them.
    fn write_all(&self, session: &Session, state: &mut State) {
        let image = state.mailbox.image();
        if let Some(d) = state.durable.as_mut() {
            d.changed = false;
            d.next_position = image.entries.len() as u64;
        }
        drop(
            self.state
                .put_session(record_of(session, state), Some(image.entries)),
        );
    }

    /// Writes the deliveries of every online durable session that changed since the last
    /// checkpoint; returns how many sessions were written.
    pub fn checkpoint(&self) -> usize {
        if !self.state.keeps_sessions() {
            return 0;
        }
        let mut written = 0;
        for session in self.sessions() {
            let mut state = session.lock();
            if state.attached.is_none() {
                continue;
            }
            let Some(d) = state.durable.as_mut() else {
                continue;
            };
            if !d.changed {
                continue;
            }
            self.write_all(&session, &mut state);
            written += 1;
        }
        written
    }

    /// Runs [`Broker::checkpoint`] every [`CHECKPOINT_INTERVAL`] until the broker stops.
    pub fn start_checkpoints(&self) {
        if !self.state.keeps_sessions() {
            return;
        }
        let (broker, stop) = (self.me.clone(), self.stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHECKPOINT_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => {}
                }
                let Some(broker) = broker.upgrade() else {
                    return;
                };
                broker.checkpoint();
            }
        });
    }

    /// Holds again every session the state store kept, offline, with its subscriptions and
    /// deliveries; removes those whose expiry passed while the process was down. Wills that
    /// fell due meanwhile are published through `route`, the others wait for their delay.
    /// Call once, before the listeners accept.
    pub fn restore_sessions(&self, route: WillRoute) -> Result<Restored, StateError> {
        let mut restored = Restored::default();
        if !self.state.keeps_sessions() {
            return Ok(restored);
        }
        let now = unix_ms_now();
        let mut due_now = Vec::new();
        for loaded in self.state.load_sessions()? {
            let mut record = loaded.record;
            // Died with its connection open: it ended at this restart.
            let crashed = record.ended_ms.is_none();
            let ended = record.ended_ms.unwrap_or(now);
            let will_at = record.will.as_ref().map(|w| match w.due {
                WillDue::At(at) => at,
                WillDue::AfterEnd(delay) => ended.saturating_add(ms(delay)),
            });
            let left = match record.expiry {
                Expiry::WithConnection => Some(Duration::ZERO),
                Expiry::After(d) => Some(Duration::from_millis(
                    ended.saturating_add(ms(d)).saturating_sub(now),
                )),
                Expiry::Never => None,
            };
            if left == Some(Duration::ZERO) {
                // The session ended while the process was down, and its will with it.
                restored.expired += 1;
                if let Some(will) = record.will.take() {
                    due_now.push((record.key.clone(), will));
                }
                drop(self.state.remove_session(&record.key));
                continue;
            }
            let deliveries = loaded.deliveries.len();
            let id = self
                .next_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let session = Arc::new(Session::new(id, record.key.clone(), record.expiry));
            let mut rewrite = crashed;
            {
                let mut state = session.lock();
                state.mailbox = Mailbox::from_image(MailboxImage {
                    next_seq: record.next_seq,
                    entries: loaded.deliveries,
                });
                let mut durable = Box::new(Durable {
                    next_position: deliveries as u64,
                    changed: false,
                    will: None,
                    ended_ms: Some(ended),
                });
                if let (Some(mut will), Some(at)) = (record.will.take(), will_at) {
                    if at <= now {
                        due_now.push((record.key.clone(), will));
                        rewrite = true;
                    } else {
                        will.due = WillDue::At(at);
                        let publish = {
                            let (route, key, kept) =
                                (route.clone(), record.key.clone(), will.clone());
                            Box::new(move |m: Arc<Message>| route(&key, &kept, m))
                        };
                        state.will = Some(DeferredWill {
                            message: will.message.clone(),
                            publish,
                        });
                        durable.will = Some(will);
                        self.schedule_will(
                            &session,
                            state.generation,
                            Duration::from_millis(at - now),
                        );
                    }
                }
                state.durable = Some(durable);
                if let Some(left) = left {
                    self.schedule_expiry(&session, state.generation, left);
                }
                if rewrite {
                    // Ended now, as far as the next restart is concerned.
                    drop(self.state.put_session(record_of(&session, &state), None));
                }
            }
            let evicted = {
                self.table().insert(record.key.clone(), session.clone());
                for (filter, options) in &record.subscriptions {
                    self.subscribe(&session, filter, *options);
                }
                self.went_offline(&session)
            };
            for old in evicted {
                self.discard(&old);
            }
            restored.sessions += 1;
            restored.deliveries += deliveries;
        }
        restored.wills = due_now.len();
        for (key, will) in due_now {
            let message = will.message.clone();
            route(&key, &will, message);
        }
        Ok(restored)
    }
}
