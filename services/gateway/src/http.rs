//! HTTP routes of the gateway: health, readiness and the WebSocket endpoint.

use std::sync::Arc;

use axum::extract::{MatchedPath, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::{Extension, Json, Router};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement, SecurityScheme};
use utoipa::{Modify, OpenApi};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::error::{CommandError, ErrorCode, HttpError};
use crate::protocol::json;
use crate::state::{AppState, Readiness};
use crate::{attachments, devtoken, rest, web, ws};

/// Every route the gateway serves. Each is registered with its OpenAPI description,
/// so `/openapi.json` cannot miss one.
pub fn router(state: AppState) -> Router {
    let mut routes = OpenApiRouter::with_openapi(ApiDoc::openapi())
        .routes(routes!(ws_upgrade))
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(readyz_local))
        .routes(routes!(openapi_json))
        .routes(routes!(metrics))
        .merge(rest::router())
        .merge(attachments::router());
    if state.dev_tokens().is_some() {
        routes = routes.merge(devtoken::router());
    }
    let (router, openapi) = routes.split_for_parts();
    let openapi = Arc::new(openapi);
    router
        .merge(web::router())
        // Matched routes only: their path template is the label, so a scan of random
        // paths cannot grow the series.
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), record_request))
        .fallback(rest::not_found)
        .layer(Extension(openapi))
        .layer(axum::middleware::from_fn_with_state(state.clone(), limit_headers))
        .with_state(state)
}

/// Counts and times each request by method, route template and status.
async fn record_request(
    State(state): State<AppState>,
    route: Option<MatchedPath>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let started = std::time::Instant::now();
    let method = req.method().clone();
    let response = next.run(req).await;
    let route = route.as_ref().map_or("", MatchedPath::as_str);
    state.metrics().http_request(method.as_str(), route, response.status().as_u16(), started.elapsed());
    response
}

/// Refuses requests whose URI and headers together exceed `MAX_HEADER_BYTES` (413).
/// The default, 16 KiB, leaves room for a token of 8 KiB in a header or the query.
async fn limit_headers(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let limit = state.settings().max_header_bytes;
    let size = req.uri().to_string().len()
        + req.headers().iter().map(|(name, value)| name.as_str().len() + value.len() + 4).sum::<usize>();
    if size > limit {
        let err = CommandError::new(ErrorCode::TooLarge, format!("request headers over {limit} bytes"));
        return HttpError(err).into_response();
    }
    next.run(req).await
}

#[derive(OpenApi)]
#[openapi(
    info(title = "chat gateway", description = "HTTP API of the chat gateway (client contract v1)"),
    modifiers(&BearerAuth)
)]
struct ApiDoc;

/// Declares the Bearer JWT that every `/v1` route takes.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let scheme =
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).bearer_format("JWT").build());
        openapi.components.get_or_insert_with(Default::default).add_security_scheme("bearer", scheme);
        openapi.security = Some(vec![SecurityRequirement::new("bearer", Vec::<String>::new())]);
    }
}

/// `GET /metrics`: Prometheus metrics (OpenMetrics text).
#[utoipa::path(get, path = "/metrics", tag = "meta", security(()), responses((status = 200, description = "metrics in the OpenMetrics text format")))]
async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        state.metrics().encode(),
    )
}

/// `GET /openapi.json`: this document.
#[utoipa::path(get, path = "/openapi.json", tag = "meta", responses((status = 200, description = "the OpenAPI document")))]
async fn openapi_json(Extension(doc): Extension<Arc<utoipa::openapi::OpenApi>>) -> impl IntoResponse {
    Json(doc.as_ref().clone())
}

/// `GET /ws`: the WebSocket endpoint (see docs/protocol.md).
#[utoipa::path(get, path = "/ws", tag = "websocket",
    params(("token" = Option<String>, Query, description = "JWT, when no Authorization header is sent")),
    responses((status = 101, description = "upgraded to a WebSocket"), (status = 401, description = "refused token"),
        (status = 503, description = "the gateway is shutting down, or full (`MAX_CONNECTIONS`)")))]
async fn ws_upgrade(
    state: State<AppState>,
    query: axum::extract::Query<std::collections::HashMap<String, String>>,
    headers: axum::http::HeaderMap,
    upgrade: axum::extract::ws::WebSocketUpgrade,
    raw: Option<Extension<axum::extract::ConnectInfo<crate::socket::RawWriter>>>,
) -> axum::response::Response {
    // Absent only when the router is served without `socket::Listener` (some tests).
    let raw = raw.map(|Extension(axum::extract::ConnectInfo(raw))| raw);
    ws::upgrade(state, query, headers, upgrade, raw).await
}

/// Liveness: the process is up and serving HTTP.
#[utoipa::path(get, path = "/healthz", tag = "meta", security(()), responses((status = 200, description = "`{status:\"ok\"}`")))]
async fn healthz() -> impl IntoResponse {
    Json(json::health_body())
}

/// Readiness: 503 while draining, full (`MAX_CONNECTIONS`) or while a backend is
/// unreachable, so the load balancer sends new connections elsewhere.
#[utoipa::path(get, path = "/readyz", tag = "meta", security(()), responses((status = 200, description = "ready"), (status = 503, description = "draining, full, or a backend is down")))]
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let readiness = state.readiness();
    readiness_reply(&readiness, readiness.is_ready())
}

/// Local readiness, for the load balancer's probe: 503 only while draining or full.
/// A backend outage is every gateway's at once and shows in `/readyz`, in `unavailable`
/// answers and in metrics, not here (docs/deploy.md).
#[utoipa::path(get, path = "/readyz/local", tag = "meta", security(()), responses((status = 200, description = "takes new clients"), (status = 503, description = "draining or full")))]
async fn readyz_local(State(state): State<AppState>) -> impl IntoResponse {
    let readiness = state.readiness();
    readiness_reply(&readiness, readiness.takes_new_clients())
}

fn readiness_reply(readiness: &Readiness, ready: bool) -> impl IntoResponse {
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(json::readiness_body(readiness, ready)))
}
