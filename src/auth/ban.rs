//! Credential brute-force defence: CONNECTs refused for bad or missing credentials are counted per
//! peer IP; an IP with too many within a minute is banned for a while, and the listeners close its
//! new sockets at accept. The table of IPs is bounded, so a storm of source addresses cannot grow
//! it without limit: when it is full, new IPs are not tracked (and so not banned) until entries
//! expire, while the bans already in place hold.

use std::collections::HashMap;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The window in which failures are counted.
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// Peer IPs tracked at most (about 64 bytes each).
pub const MAX_TRACKED_IPS: usize = 100_000;

/// What recording a failed CONNECT did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Counted; the IP is not banned (yet).
    Counted,
    /// This failure (the `failures`th within the window) started a ban of the IP.
    BanStarted { failures: u32 },
    /// The table is full: the IP is not tracked. `first` is true for the first such failure
    /// since the table last had room (to log once).
    Untracked { first: bool },
}

#[derive(Debug, Clone, Copy)]
struct Record {
    window_start: Instant,
    failures: u32,
    banned_until: Option<Instant>,
}

impl Record {
    /// Whether the record still means something at `now`.
    fn live(&self, now: Instant) -> bool {
        match self.banned_until {
            Some(until) => now < until,
            None => now.duration_since(self.window_start) < FAILURE_WINDOW,
        }
    }
}

/// Failed CONNECTs per IP and the bans they caused.
#[derive(Debug)]
pub struct AuthBans {
    max_failures: u32,
    ban: Duration,
    capacity: usize,
    table: Mutex<HashMap<IpAddr, Record>>,
    full: AtomicBool,
}

impl AuthBans {
    /// Bans an IP for `ban` once it has `max_failures` failed CONNECTs within a minute; tracks
    /// at most `capacity` IPs.
    pub fn new(max_failures: NonZeroU32, ban: Duration, capacity: usize) -> Self {
        AuthBans {
            max_failures: max_failures.get(),
            ban,
            capacity,
            table: Mutex::new(HashMap::new()),
            full: AtomicBool::new(false),
        }
    }

    /// How long a ban lasts.
    pub fn ban_duration(&self) -> Duration {
        self.ban
    }

    fn table(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Record>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether new sockets from `ip` are to be closed now.
    pub fn is_banned(&self, ip: IpAddr) -> bool {
        self.is_banned_at(ip.to_canonical(), Instant::now())
    }

    fn is_banned_at(&self, ip: IpAddr, now: Instant) -> bool {
        let mut table = self.table();
        match table.get(&ip).and_then(|r| r.banned_until) {
            Some(until) if now < until => true,
            Some(_) => {
                // The ban is over: the IP starts afresh.
                table.remove(&ip);
                false
            }
            None => false,
        }
    }

    /// Counts a CONNECT from `ip` refused for its credentials.
    pub fn record_failure(&self, ip: IpAddr) -> Failure {
        self.record_failure_at(ip.to_canonical(), Instant::now())
    }

    fn record_failure_at(&self, ip: IpAddr, now: Instant) -> Failure {
        let mut table = self.table();
        if !table.contains_key(&ip) && table.len() >= self.capacity {
            table.retain(|_, r| r.live(now));
            if table.len() >= self.capacity {
                let first = !self.full.swap(true, Ordering::Relaxed);
                return Failure::Untracked { first };
            }
        }
        self.full.store(false, Ordering::Relaxed);
        let record = table.entry(ip).or_insert(Record {
            window_start: now,
            failures: 0,
            banned_until: None,
        });
        if record.banned_until.is_some_and(|until| now < until) {
            // A socket accepted before the ban: the ban is not extended.
            return Failure::Counted;
        }
        if !record.live(now) {
            *record = Record {
                window_start: now,
                failures: 0,
                banned_until: None,
            };
        }
        record.failures += 1;
        if record.failures >= self.max_failures {
            record.banned_until = Some(now + self.ban);
            return Failure::BanStarted {
                failures: record.failures,
            };
        }
        Failure::Counted
    }

    /// Drops records whose window or ban is over (housekeeping).
    pub fn forget_expired(&self) {
        let now = Instant::now();
        let mut table = self.table();
        table.retain(|_, r| r.live(now));
        table.shrink_to_fit();
    }

    /// IPs tracked now.
    pub fn tracked(&self) -> usize {
        self.table().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    fn bans(max: u32, capacity: usize) -> AuthBans {
        AuthBans::new(
            NonZeroU32::new(max).expect("non-zero"),
            Duration::from_secs(60),
            capacity,
        )
    }

    #[test]
    fn the_nth_failure_within_the_window_bans_until_the_ban_ends() {
        let b = bans(3, 10);
        let t0 = Instant::now();
        assert_eq!(b.record_failure_at(ip(2), t0), Failure::Counted);
        assert_eq!(b.record_failure_at(ip(2), t0), Failure::Counted);
        assert!(!b.is_banned_at(ip(2), t0));
        assert_eq!(
            b.record_failure_at(ip(2), t0 + Duration::from_secs(59)),
            Failure::BanStarted { failures: 3 }
        );
        assert!(b.is_banned_at(ip(2), t0 + Duration::from_secs(60)));
        assert!(!b.is_banned_at(ip(3), t0), "other IPs are not affected");
        // Failures during the ban do not extend it.
        assert_eq!(
            b.record_failure_at(ip(2), t0 + Duration::from_secs(100)),
            Failure::Counted
        );
        assert!(!b.is_banned_at(ip(2), t0 + Duration::from_secs(120)));
        assert_eq!(b.tracked(), 0, "an ended ban leaves nothing behind");
    }

    #[test]
    fn failures_spread_over_more_than_the_window_do_not_ban() {
        let b = bans(3, 10);
        let t0 = Instant::now();
        b.record_failure_at(ip(2), t0);
        b.record_failure_at(ip(2), t0 + Duration::from_secs(30));
        assert_eq!(
            b.record_failure_at(ip(2), t0 + Duration::from_secs(61)),
            Failure::Counted
        );
        assert!(!b.is_banned_at(ip(2), t0 + Duration::from_secs(61)));
    }

    #[test]
    fn a_full_table_tracks_no_new_ip_but_keeps_its_bans() {
        let b = bans(1, 2);
        let t0 = Instant::now();
        assert!(matches!(
            b.record_failure_at(ip(2), t0),
            Failure::BanStarted { .. }
        ));
        assert!(matches!(
            b.record_failure_at(ip(3), t0),
            Failure::BanStarted { .. }
        ));
        assert_eq!(
            b.record_failure_at(ip(4), t0),
            Failure::Untracked { first: true }
        );
        assert_eq!(
            b.record_failure_at(ip(5), t0),
            Failure::Untracked { first: false }
        );
        assert!(b.is_banned_at(ip(2), t0) && b.is_banned_at(ip(3), t0));
        assert!(!b.is_banned_at(ip(4), t0));
        assert_eq!(b.tracked(), 2);
        // Once the bans are over their room is free again.
        let later = t0 + Duration::from_secs(61);
        assert!(matches!(
            b.record_failure_at(ip(4), later),
            Failure::BanStarted { .. }
        ));
        assert_eq!(b.tracked(), 1);
    }

    #[test]
    fn ipv4_mapped_ipv6_is_the_same_peer() {
        let b = bans(2, 10);
        let mapped: IpAddr = "::ffff:127.0.0.2".parse().expect("address");
        b.record_failure(ip(2));
        assert!(matches!(
            b.record_failure(mapped),
            Failure::BanStarted { .. }
        ));
        assert!(b.is_banned(ip(2)));
    }
}
