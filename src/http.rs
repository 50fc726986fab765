//! The operations endpoint: `GET /health` (200 while serving, 503 while starting or draining),
//! `GET /metrics` (Prometheus text), and the admin API (`admin.rs`) when a token is set.
//!
//! The port faces the same network as the device ports, so it is served like one: a cap on
//! concurrent connections inside the descriptor reserve (beyond it a socket is closed at accept,
//! counted; see [`crate::listener::descriptors`]), a deadline for a connection's first request
//! headers, an idle timeout between requests, and a longest life per connection (then it is
//! closed once its request, if any, is answered), so half-sent requests and idle keep-alive
//! connections cannot hold sockets or descriptors.
//!
//! hyper's `header_read_timeout` runs from accept to the first request's headers, and for
//! every later request from the end of the previous answer to the end of its headers: one value
//! for the header deadline and the idle wait. The two get their own values here: a watch over
//! the connection's requests ([`Requests`]) closes it at whichever applies, and hyper's timer,
//! set to the longer of the two, stays as a backstop.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::listener::descriptors::OpenSockets;
use crate::metrics::Metrics;

/// Where the adapter is in its life, as `/health` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Starting = 0,
    Serving = 1,
    Draining = 2,
}

/// The phase shared between the server and the HTTP handlers.
#[derive(Debug)]
pub struct Health {
    phase: AtomicU8,
    version: &'static str,
    instance_id: String,
}

impl Health {
    pub fn new(instance_id: String) -> Arc<Health> {
        Arc::new(Health {
            phase: AtomicU8::new(Phase::Starting as u8),
            version: env!("CARGO_PKG_VERSION"),
            instance_id,
        })
    }

    pub fn set(&self, phase: Phase) {
        self.phase.store(phase as u8, Ordering::Release);
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Starting,
            1 => Phase::Serving,
            _ => Phase::Draining,
        }
    }
}

#[derive(Clone)]
struct Ops {
    health: Arc<Health>,
    metrics: Arc<Metrics>,
}

/// How long one HTTP connection may be held. How many there may be is the HTTP share of the
/// descriptor account ([`OpenSockets`]).
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Time from accept until the first request's headers are read.
    pub header_timeout: Duration,
    /// Time from an answer until the next request's headers are read (keep-alive).
    pub idle_timeout: Duration,
    /// Longest life of one connection (keep-alive included).
    pub max_connection_age: Duration,
}

/// One connection's requests, as its watch sees them: the service marks each request from the
/// moment its headers are read until it is answered.
#[derive(Debug)]
struct Requests {
    state: Mutex<RequestsState>,
    /// A request began or was answered: the deadline moved.
    changed: Notify,
}

#[derive(Debug)]
struct RequestsState {
    accepted: Instant,
    served: u64,
    in_flight: u32,
    answered: Instant,
}

impl Requests {
    fn new() -> Arc<Requests> {
        let now = Instant::now();
        Arc::new(Requests {
            state: Mutex::new(RequestsState {
                accepted: now,
                served: 0,
                in_flight: 0,
                answered: now,
            }),
            changed: Notify::new(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, RequestsState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A request's headers were read; it is in flight until the guard is dropped.
    fn begin(self: &Arc<Self>) -> InFlight {
        let mut state = self.state();
        state.served += 1;
        state.in_flight += 1;
        drop(state);
        self.changed.notify_one();
        InFlight(self.clone())
    }

    /// When the connection is to be closed if no request comes: `None` while one is in flight.
    fn deadline(&self, limits: &HttpLimits) -> Option<Instant> {
        let state = self.state();
        match (state.in_flight, state.served) {
            (0, 0) => Some(state.accepted + limits.header_timeout),
            (0, _) => Some(state.answered + limits.idle_timeout),
            _ => None,
        }
    }
}

/// A request in flight; answered when dropped.
struct InFlight(Arc<Requests>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let mut state = self.0.state();
        state.in_flight -= 1;
        state.answered = Instant::now();
        drop(state);
        self.0.changed.notify_one();
    }
}

/// Waits for `deadline`, or forever without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// How long a connection closing at shutdown or at its age limit may take to answer.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Serves `/health`, `/metrics` and, when `admin` is given, the admin API, until `stop` is
/// cancelled. Each connection is counted in `sockets`, beside the device sockets.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    admin: Option<Router>,
    limits: HttpLimits,
    sockets: Arc<OpenSockets>,
    stop: CancellationToken,
) {
    let mut app = Router::new()
        .route("/health", get(health_handler))
        .route("/metrics", get(metrics_handler))
        .with_state(Ops {
            health,
            metrics: metrics.clone(),
        });
    if let Some(admin) = admin {
        app = app.merge(admin);
    }
    let gauge = metrics.listener_connections.with_label_values(&["http"]);
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, most likely: back off instead of spinning.
                tracing::warn!(error = %e, "HTTP accept failed");
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let open = match sockets.admit_http(gauge.clone()) {
            Ok(open) => open,
            Err(refusal) => {
                metrics.limit_hit(refusal.limit());
                drop(stream);
                continue;
            }
        };
        let requests = Requests::new();
        let service = {
            let app = TowerToHyperService::new(app.clone());
            let requests = requests.clone();
            hyper::service::service_fn(move |request| {
                let in_flight = requests.begin();
                let answer = app.call(request);
                async move {
                    let answer = answer.await;
                    drop(in_flight);
                    answer
                }
            })
        };
        let stop = stop.clone();
        connections.spawn(async move {
            let _open = open;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout.max(limits.idle_timeout))
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            let age = tokio::time::sleep(limits.max_connection_age);
            tokio::pin!(age);
            loop {
                tokio::select! {
                    _ = connection.as_mut() => return,
                    _ = stop.cancelled() => break,
                    _ = age.as_mut() => break,
                    _ = requests.changed.notified() => {}
                    _ = until(requests.deadline(&limits)) => {
                        // No request in flight: nothing to answer, closed at once.
                        if requests.deadline(&limits).is_some_and(|at| at <= Instant::now()) {
                            return;
                        }
                    }
                }
            }
            connection.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(CLOSE_GRACE, connection).await;
        });
    }
    connections.close();
    let _ = tokio::time::timeout(CLOSE_GRACE, connections.wait()).await;
}

async fn health_handler(State(ops): State<Ops>) -> impl IntoResponse {
    let phase = ops.health.phase();
    let (status, text) = match phase {
        Phase::Serving => (StatusCode::OK, "pass"),
        Phase::Starting | Phase::Draining => (StatusCode::SERVICE_UNAVAILABLE, "fail"),
    };
    let body = serde_json::json!({
        "status": text,
        "version": ops.health.version,
        "instance_id": ops.health.instance_id,
    });
    (
        status,
        [(header::CONTENT_TYPE, "application/health+json")],
        body.to_string(),
    )
}

async fn metrics_handler(State(ops): State<Ops>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        ops.metrics.render(),
    )
}
