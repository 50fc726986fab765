//! The operations endpoint: `GET /health` (200 while serving, 503 while starting or draining),
//! `GET /metrics` (Prometheus text), and the admin API (`admin.rs`) when a token is set.

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

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

/// Serves `/health`, `/metrics` and, when `admin` is given, the admin API, until `stop` is
/// cancelled.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    admin: Option<Router>,
    stop: CancellationToken,
) {
    let mut app = Router::new()
        .route("/health", get(health_handler))
        .route("/metrics", get(metrics_handler))
        .with_state(Ops { health, metrics });
    if let Some(admin) = admin {
        app = app.merge(admin);
    }
    let result = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    if let Err(e) = result {
        tracing::warn!(error = %e, "HTTP server stopped");
    }
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
