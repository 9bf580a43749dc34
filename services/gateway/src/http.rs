//! HTTP routes of the gateway: health, readiness and the WebSocket endpoint.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use crate::state::AppState;
use crate::{api, attachments, ws};

/// Every route the gateway serves.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/ws", get(ws::upgrade))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .merge(api::router())
        .merge(attachments::router())
        .fallback(api::not_found)
        .with_state(state)
}

/// Liveness: the process is up and serving HTTP.
async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({"status": "ok"}))
}

/// Readiness: 503 while draining or while a backend is unreachable, so the load
/// balancer sends new connections elsewhere.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let readiness = state.readiness();
    let status = if readiness.is_ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let body = serde_json::json!({
        "status": if readiness.is_ready() { "ready" } else { "not_ready" },
        "checks": readiness,
    });
    (status, Json(body))
}
