//! The operations endpoint: `GET /health` (200 while serving, 503 while starting or draining),
//! `GET /metrics` (Prometheus text), and the admin API (`admin.rs`) when a token is set.
//!
//! The port faces the same network as the device ports, so it is served like one: a cap on
//! concurrent connections (beyond it a socket is closed at accept, counted), a deadline for a
//! request's headers, and a longest life per connection (then it is closed once its request, if
//! any, is answered), so half-sent requests cannot hold sockets or descriptors.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::sync::Semaphore;
use tokio_util::task::TaskTracker;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

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

/// What one HTTP connection may hold, and how many there may be.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Concurrent connections; beyond, a new socket is closed at accept.
    pub max_connections: usize,
    /// Time a request's headers may take to arrive.
    pub header_timeout: Duration,
    /// Longest life of one connection (keep-alive included).
    pub max_connection_age: Duration,
}

/// How long a connection closing at shutdown or at its age limit may take to answer.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Serves `/health`, `/metrics` and, when `admin` is given, the admin API, until `stop` is
/// cancelled.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    admin: Option<Router>,
    limits: HttpLimits,
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
    let slots = Arc::new(Semaphore::new(limits.max_connections));
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            metrics.limit_hit("http_connections");
            drop(stream);
            continue;
        };
        let service = TowerToHyperService::new(app.clone());
        let stop = stop.clone();
        connections.spawn(async move {
            let _slot = slot;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                _ = stop.cancelled() => {}
                _ = tokio::time::sleep(limits.max_connection_age) => {}
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
