//! Keep-alive for every connection from one timer wheel: a connection notes when it last read
//! (a tick in its [`ConnectionControl`]), and one task walks the wheel every [`TICK`], ending
//! the connections whose 1.5 × keep-alive has passed without a packet. An idle connection holds
//! a 16-byte wheel entry instead of a timer of its own in its future (~150 bytes with the
//! instants it kept).

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::broker::{ConnectionControl, Kick};

/// The wheel's resolution: a connection ends at most two ticks after its deadline, never before.
pub const TICK: Duration = Duration::from_millis(100);
/// Slots of the wheel (102.4 s at 100 ms); a later deadline waits through several turns.
const SLOTS: usize = 1024;

/// One connection on the wheel.
struct Entry {
    control: Weak<ConnectionControl>,
    /// The tick at which it is looked at next.
    due: u32,
    /// 1.5 × keep-alive, in ticks.
    period: u32,
}

struct Wheel {
    slots: Vec<Vec<Entry>>,
    /// The next tick to look at.
    next: u32,
}

/// The keep-alive wheel shared by every connection of a server.
pub struct KeepAliveWheel {
    start: Instant,
    wheel: Mutex<Wheel>,
}

impl KeepAliveWheel {
    pub fn new() -> Arc<Self> {
        Arc::new(KeepAliveWheel {
            start: Instant::now(),
            wheel: Mutex::new(Wheel {
                slots: (0..SLOTS).map(|_| Vec::new()).collect(),
                next: 0,
            }),
        })
    }

    /// The current tick.
    pub fn now(&self) -> u32 {
        (self.start.elapsed().as_millis() / TICK.as_millis()) as u32
    }

    /// Watches `control`'s connection: it ends (kicked with [`Kick::KeepAlive`]) once
    /// `period` passes after its last [`ConnectionControl::read_at`] without another.
    pub fn watch(&self, control: &Arc<ConnectionControl>, period: Duration) {
        let now = self.now();
        control.read_at(now);
        let period = period.as_millis().div_ceil(TICK.as_millis()).max(1) as u32;
        // One tick more: `now` was rounded down, so the deadline is never early.
        self.insert(Entry {
            control: Arc::downgrade(control),
            due: now.saturating_add(period).saturating_add(1),
            period,
        });
    }

    fn insert(&self, entry: Entry) {
        let mut wheel = self.wheel.lock().unwrap_or_else(|p| p.into_inner());
        // Never behind the hand: an entry for a tick already looked at goes to the next one.
        let at = entry.due.max(wheel.next);
        wheel.slots[at as usize % SLOTS].push(entry);
    }

    /// Looks at every slot up to now: ends the connections past their deadline, moves the
    /// others to their next one.
    fn turn(&self) {
        let now = self.now();
        loop {
            let mut due = {
                let mut wheel = self.wheel.lock().unwrap_or_else(|p| p.into_inner());
                if wheel.next > now {
                    return;
                }
                let tick = wheel.next;
                wheel.next += 1;
                let slot = &mut wheel.slots[tick as usize % SLOTS];
                if slot.is_empty() {
                    continue;
                }
                let (due, later): (Vec<Entry>, Vec<Entry>) = std::mem::take(slot)
                    .into_iter()
                    .partition(|e| e.due <= tick);
                *slot = later;
                due
            };
            for mut entry in due.drain(..) {
                let Some(control) = entry.control.upgrade() else {
                    continue; // the connection is gone
                };
                if control.is_cancelled() {
                    continue; // ending anyway
                }
                // Time a connection is pushed back (not reading) does not count against it.
                if control.paused() {
                    control.read_at(now);
                }
                let deadline = control
                    .last_read()
                    .saturating_add(entry.period)
                    .saturating_add(1);
                if deadline <= now {
                    control.kick(Kick::KeepAlive);
                } else {
                    entry.due = deadline;
                    self.insert(entry);
                }
            }
        }
    }

    /// Runs the wheel until `stop` is cancelled.
    pub async fn run(self: Arc<Self>, stop: CancellationToken) {
        let mut ticks = tokio::time::interval(TICK);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = ticks.tick() => self.turn(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::{ConnectionMeta, Kick};

    #[tokio::test(start_paused = true)]
    async fn a_quiet_connection_ends_after_its_period_and_a_reading_one_does_not() {
        let wheel = KeepAliveWheel::new();
        let stop = CancellationToken::new();
        tokio::spawn(wheel.clone().run(stop.clone()));
        let quiet = ConnectionControl::new_for_test(ConnectionMeta::default());
        let reading = ConnectionControl::new_for_test(ConnectionMeta::default());
        wheel.watch(&quiet, Duration::from_millis(1500));
        wheel.watch(&reading, Duration::from_millis(1500));
        for i in 0..30 {
            tokio::time::sleep(TICK).await;
            reading.read_at(wheel.now());
            if i == 13 {
                assert_eq!(quiet.kicked(), None, "ended before its 1.5 s");
            }
        }
        assert_eq!(quiet.kicked(), Some(Kick::KeepAlive));
        assert_eq!(reading.kicked(), None);
        stop.cancel();
    }
}
