//! The admin API on the HTTP port (only with `SMQ_MQTT_ADAPTER_ADMIN_TOKEN`): who is connected
//! right now, and closing a device's session. Every request needs `Authorization: Bearer
//! <token>`, compared in constant time.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::{json, Value};

use crate::auth::constant_time_eq;
use crate::broker::{Broker, Kick, LiveClient};

/// Default and largest page of `GET /clients`.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 10_000;
/// How long `DELETE` waits for the session's end (its `disconnect` event) before answering.
const KICK_WAIT: Duration = Duration::from_secs(5);

#[derive(Clone)]
struct Admin {
    token: Arc<str>,
    broker: Arc<Broker>,
}

/// The admin routes, to merge into the HTTP router.
pub fn routes<S: Clone + Send + Sync + 'static>(token: &str, broker: Arc<Broker>) -> Router<S> {
    let admin = Admin {
        token: token.into(),
        broker,
    };
    Router::new()
        .route("/clients", get(list))
        .route("/clients/:mqtt_client_id", get(one).delete(kick))
        // Every matched route needs the token; an unknown path stays a plain 404.
        .route_layer(middleware::from_fn_with_state(admin.clone(), require_token))
        .with_state(admin)
}

/// Passes the request on when it carries the token, else answers 401.
async fn require_token(
    State(admin): State<Admin>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(bearer_token)
        .unwrap_or("");
    if constant_time_eq(presented.as_bytes(), admin.token.as_bytes()) {
        return next.run(request).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        [(header::WWW_AUTHENTICATE, "Bearer")],
        json!({"error": "missing or wrong bearer token"}).to_string(),
    )
        .into_response()
}

/// The token of an `Authorization: Bearer <token>` value; the scheme is case-insensitive
/// (RFC 9110 11.1), so `bearer` and `BEARER` are accepted too.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start_matches(' '))
}

fn entry(client: &LiveClient) -> Value {
    json!({
        "client_id": client.key.client_id,
        "mqtt_client_id": client.key.mqtt_client_id,
        "remote_addr": client.meta.remote_addr,
        "transport": client.meta.transport,
        "protocol_version": client.meta.protocol_version,
        "keep_alive": client.meta.keep_alive,
        "connected_at": client.meta.connected_at,
        "subscriptions": client.subscriptions,
    })
}

fn json_response(status: StatusCode, body: Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn bad_request(why: String) -> Response {
    json_response(StatusCode::BAD_REQUEST, json!({ "error": why }))
}

fn number(query: &HashMap<String, String>, name: &str, default: usize) -> Result<usize, String> {
    match query.get(name) {
        None => Ok(default),
        Some(v) => v
            .parse()
            .map_err(|_| format!("{name} must be a non-negative integer")),
    }
}

async fn list(
    State(admin): State<Admin>,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let (limit, offset) = match (
        number(&query, "limit", DEFAULT_LIMIT),
        number(&query, "offset", 0),
    ) {
        (Ok(l), Ok(o)) => (l, o),
        (Err(e), _) | (_, Err(e)) => return bad_request(e),
    };
    if limit > MAX_LIMIT {
        return bad_request(format!("limit must be at most {MAX_LIMIT}"));
    }
    // Only the page is copied: a small page of many sessions stays small.
    let client_id = query.get("client_id");
    let (total, clients) = admin.broker.live_page(
        |key| client_id.is_none_or(|id| key.client_id == *id),
        offset,
        limit,
    );
    let page: Vec<Value> = clients.iter().map(entry).collect();
    json_response(StatusCode::OK, json!({ "total": total, "clients": page }))
}

async fn one(State(admin): State<Admin>, Path(mqtt_client_id): Path<String>) -> Response {
    let (_, found) = admin
        .broker
        .live_page(|key| key.mqtt_client_id == mqtt_client_id, 0, 1);
    match found.first() {
        Some(client) => json_response(StatusCode::OK, entry(client)),
        None => not_found(&mqtt_client_id),
    }
}

fn not_found(mqtt_client_id: &str) -> Response {
    json_response(
        StatusCode::NOT_FOUND,
        json!({ "error": format!("no connected client {mqtt_client_id:?}") }),
    )
}

/// Ends every live session with this MQTT client identifier as an administrative close and
/// answers once each has ended (its will published, its `disconnect` emitted).
async fn kick(State(admin): State<Admin>, Path(mqtt_client_id): Path<String>) -> Response {
    let kicked = admin
        .broker
        .kick(|k| k.mqtt_client_id == mqtt_client_id, Kick::Administrative);
    if kicked.is_empty() {
        return not_found(&mqtt_client_id);
    }
    tracing::info!(mqtt_client_id = %mqtt_client_id.escape_debug(), sessions = kicked.len(), "closed by the admin API");
    for control in kicked {
        if tokio::time::timeout(KICK_WAIT, control.ended())
            .await
            .is_err()
        {
            tracing::warn!(mqtt_client_id = %mqtt_client_id.escape_debug(), "kicked session did not end within 5 s");
        }
    }
    StatusCode::NO_CONTENT.into_response()
}
