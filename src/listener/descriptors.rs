//! The process's file descriptors, shared by every listener. Device sockets (MQTT over TCP,
//! TLS, WebSocket) and the HTTP port's sockets are counted in one account that keeps them below
//! the open file limit less a reserve; [`Descriptors`] is an accept loop's answer to running out
//! all the same.
//!
//! The reserve is the adapter's own files and connections (listeners, the event and message
//! logs, the state store, NATS, the platform: [`OWN_FILES`], a quarter of the limit if that is
//! lower) plus the HTTP port's connections (`SMQ_MQTT_ADAPTER_HTTP_MAX_CONNECTIONS`, at most a
//! quarter of the limit). Device sockets never take the reserve, so `/health` is reachable
//! through a device flood; HTTP sockets never go beyond their share, so an HTTP flood leaves
//! the devices their room and neither takes the descriptors the process needs for itself.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::net::TcpListener;

/// Descriptors kept for the adapter's own files and connections (a quarter of the open file
/// limit if that is lower).
const OWN_FILES: usize = 64;

/// The process's soft limit of open files, read each time (an operator may change it live).
fn open_file_limit() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return usize::MAX;
    }
    usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
}

/// Why a socket is closed at accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// It would take a descriptor of the reserve (`limit="file_descriptors"`).
    Descriptors,
    /// The HTTP port has `SMQ_MQTT_ADAPTER_HTTP_MAX_CONNECTIONS` open (`limit="http_connections"`).
    HttpConnections,
}

impl Refusal {
    /// The `limit` label it is counted under.
    pub fn limit(self) -> &'static str {
        match self {
            Refusal::Descriptors => "file_descriptors",
            Refusal::HttpConnections => "http_connections",
        }
    }
}

/// How the open file limit is shared out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shares {
    /// Device sockets open at most.
    devices: usize,
    /// HTTP sockets open at most.
    http: usize,
}

impl Shares {
    fn of(limit: usize, http_max_connections: usize) -> Shares {
        let own = (limit / 4).min(OWN_FILES);
        let http = (limit / 4).min(http_max_connections);
        Shares {
            devices: limit.saturating_sub(own + http),
            http,
        }
    }
}

/// The sockets open on every listener, devices' and the HTTP port's, and the rule that admits
/// one more of each.
#[derive(Debug)]
pub struct OpenSockets {
    devices: Arc<AtomicUsize>,
    http: Arc<AtomicUsize>,
    http_max_connections: usize,
}

impl OpenSockets {
    pub fn new(http_max_connections: usize) -> Arc<OpenSockets> {
        Arc::new(OpenSockets {
            devices: Arc::default(),
            http: Arc::default(),
            http_max_connections,
        })
    }

    fn shares(&self) -> Shares {
        Shares::of(open_file_limit(), self.http_max_connections)
    }

    /// One more device socket, counted (and in `gauge`) until the guard is dropped; refused
    /// when it would take a descriptor of the reserve.
    pub fn admit_device(&self, gauge: prometheus::IntGauge) -> Result<OpenSocket, Refusal> {
        if self.devices.load(Ordering::Relaxed) >= self.shares().devices {
            return Err(Refusal::Descriptors);
        }
        Ok(OpenSocket::new(gauge, self.devices.clone()))
    }

    /// One more HTTP socket, counted (and in `gauge`) until the guard is dropped; refused
    /// beyond the HTTP cap or the HTTP share of the reserve.
    pub fn admit_http(&self, gauge: prometheus::IntGauge) -> Result<OpenSocket, Refusal> {
        let open = self.http.load(Ordering::Relaxed);
        if open >= self.http_max_connections {
            return Err(Refusal::HttpConnections);
        }
        if open >= self.shares().http {
            return Err(Refusal::Descriptors);
        }
        Ok(OpenSocket::new(gauge, self.http.clone()))
    }
}

/// One open socket: keeps its listener's gauge and its account right on every path out of the
/// connection task.
pub struct OpenSocket(prometheus::IntGauge, Arc<AtomicUsize>);

impl OpenSocket {
    fn new(gauge: prometheus::IntGauge, count: Arc<AtomicUsize>) -> Self {
        gauge.inc();
        count.fetch_add(1, Ordering::Relaxed);
        OpenSocket(gauge, count)
    }
}

impl Drop for OpenSocket {
    fn drop(&mut self) {
        self.0.dec();
        self.1.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The accept loop's answer to running out of file descriptors: a socket beyond the open file
/// limit less a reserve is closed at accept. Should the process run out all the same (its own
/// files), one descriptor held back is released to accept and at once close the connection at
/// the head of the backlog (so it is refused, not left hanging), then taken again. One log line
/// per episode.
pub(super) struct Descriptors {
    reserve: Option<std::fs::File>,
    /// In an episode: connections are being closed.
    out: bool,
    /// This episode was logged (its end is logged too).
    announced: bool,
    last_warning: Option<std::time::Instant>,
    /// Connections closed since the last warning.
    closed: u64,
}

/// Episodes that follow each other closely (sockets come and go at the bound) share one line.
const WARN_EVERY: Duration = Duration::from_secs(10);

impl Descriptors {
    pub(super) fn new() -> Self {
        Descriptors {
            reserve: std::fs::File::open("/dev/null").ok(),
            out: false,
            announced: false,
            last_warning: None,
            closed: 0,
        }
    }

    pub(super) fn exhausted(e: &std::io::Error) -> bool {
        matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
    }

    pub(super) fn running_out(&mut self, cause: &str, listener: &'static str) {
        self.closed += 1;
        if std::mem::replace(&mut self.out, true) {
            return;
        }
        if self
            .last_warning
            .is_none_or(|at| at.elapsed() >= WARN_EVERY)
        {
            tracing::warn!(cause, listener, closed = self.closed,
                "file descriptors running out: new connections are closed until some are free (raise the open file limit or lower SMQ_MQTT_ADAPTER_MAX_CONNECTIONS)");
            self.last_warning = Some(std::time::Instant::now());
            self.announced = true;
            self.closed = 0;
        }
    }

    pub(super) fn available(&mut self, listener: &'static str) {
        if std::mem::replace(&mut self.out, false) && std::mem::take(&mut self.announced) {
            tracing::info!(listener, "file descriptors available again: accepting");
        }
        if self.reserve.is_none() {
            self.reserve = std::fs::File::open("/dev/null").ok();
        }
    }

    /// Closes one waiting connection with the reserve descriptor; false when there was no
    /// reserve or no connection could be taken (the caller then backs off).
    pub(super) fn shed(&mut self, listener: &TcpListener) -> bool {
        if self.reserve.take().is_none() {
            return false;
        }
        // The connection is already queued: accept does not wait. Dropped at once: closed.
        let shed = matches!(listener.accept().now_or_never(), Some(Ok(_)));
        self.reserve = std::fs::File::open("/dev/null").ok();
        shed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_http_cap_sits_inside_the_reserve() {
        // (open file limit, HTTP cap) -> (device sockets, HTTP sockets). The defaults (cap 64)
        // keep 128 descriptors from device sockets, half of a limit below 256; a larger cap
        // grows the reserve, by a quarter of the limit at most.
        for (limit, cap, devices, http) in [
            (1024, 64, 896, 64),
            (256, 64, 128, 64),
            (128, 64, 64, 32),
            (1 << 20, 500, (1 << 20) - 564, 500),
            (128, 1000, 64, 32),
            (0, 64, 0, 0),
        ] {
            assert_eq!(
                Shares::of(limit, cap),
                Shares { devices, http },
                "limit {limit}, HTTP cap {cap}"
            );
        }
    }

    #[test]
    fn each_kind_is_counted_against_its_own_share() {
        let gauge = || prometheus::IntGauge::new("g", "g").expect("gauge");
        let sockets = OpenSockets::new(2);
        let first = sockets.admit_http(gauge()).expect("first HTTP socket");
        let second = sockets.admit_http(gauge()).expect("second HTTP socket");
        assert!(matches!(
            sockets.admit_http(gauge()),
            Err(Refusal::HttpConnections)
        ));
        let device = sockets.admit_device(gauge()).expect("a device socket");
        assert_eq!(sockets.devices.load(Ordering::Relaxed), 1);
        drop((first, second, device));
        assert_eq!(sockets.http.load(Ordering::Relaxed), 0);
        assert_eq!(sockets.devices.load(Ordering::Relaxed), 0);
    }
}
