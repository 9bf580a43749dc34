//! The browser chat client, served at `/`: plain ES modules compiled into the binary,
//! so every gateway serves exactly the client of its own version. `web/sdk/` is the
//! TypeScript SDK's build output (`clients/ts`, `npm run sync-web`); a test there checks
//! the copy is fresh.

use axum::extract::Path;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::state::AppState;

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// Every file under `/app/`: name, content type, contents.
const ASSETS: &[(&str, &str, &str)] = &[
    ("app.js", JS, include_str!("../web/app.js")),
    ("view.js", JS, include_str!("../web/view.js")),
    ("style.css", CSS, include_str!("../web/style.css")),
    ("sdk/index.js", JS, include_str!("../web/sdk/index.js")),
    ("sdk/client.js", JS, include_str!("../web/sdk/client.js")),
    ("sdk/types.js", JS, include_str!("../web/sdk/types.js")),
    ("sdk/errors.js", JS, include_str!("../web/sdk/errors.js")),
    ("sdk/http.js", JS, include_str!("../web/sdk/http.js")),
];

const INDEX: &str = include_str!("../web/index.html");

/// Scripts and styles only from this origin, no inline script at all: even if some user
/// text did reach the DOM as markup, it could not run. Images may be `blob:` URLs
/// (attachments are fetched with the Bearer token and shown from memory).
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; \
                   connect-src 'self' ws: wss:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; \
                   form-action 'none'";

/// `GET /` (the page) and `GET /app/{file}` (its modules and styles).
pub fn router() -> Router<AppState> {
    Router::new().route("/", get(index)).route("/app/{*file}", get(asset))
}

async fn index() -> Response {
    let mut res = respond("text/html; charset=utf-8", INDEX);
    let headers = res.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    res
}

async fn asset(Path(file): Path<String>) -> Response {
    match ASSETS.iter().find(|(name, _, _)| *name == file) {
        Some((_, content_type, body)) => respond(content_type, body),
        None => crate::rest::not_found().await.into_response(),
    }
}

fn respond(content_type: &'static str, body: &'static str) -> Response {
    let mut res = body.into_response();
    let headers = res.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    // Revalidate every time: a restarted gateway may be a newer version.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    res
}
