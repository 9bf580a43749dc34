//! Development sign-in: `POST /v1/dev/token` signs a token for whatever user name it is
//! given, so the browser client can be tried without an identity provider. Only served
//! when `DEV_TOKENS` is on, which the config refuses in production.

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chat_common::token::{sign_hs256, Identity};
use secrecy::{ExposeSecret, SecretSlice};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::auth::MAX_SUB_CHARS;
use crate::error::{CommandError, ErrorCode, HttpError};
use crate::protocol::client::DevTokenRequest;
use crate::protocol::json;
use crate::rest::Body;
use crate::state::AppState;

/// Lifetime of a dev token: a working day, so a browser tab stays signed in.
const TTL_SECS: i64 = 12 * 3600;
/// Longest display name accepted.
const MAX_NAME_CHARS: usize = 128;

/// Signs HS256 tokens the gateway's own verifier accepts (same secret, issuer, audience).
pub struct DevTokens {
    /// Zeroed on drop and never printed.
    secret: SecretSlice<u8>,
    issuer: Option<String>,
    audience: Option<String>,
}

impl DevTokens {
    /// A signer with the gateway's HS256 secret and the `iss`/`aud` it checks.
    pub fn new(secret: &[u8], issuer: Option<String>, audience: Option<String>) -> Self {
        Self { secret: secret.to_vec().into(), issuer, audience }
    }

    /// A token for `req`, or why the request is unusable.
    fn mint(&self, req: &DevTokenRequest) -> Result<Minted, HttpError> {
        let user_id = req.user_id.trim();
        if user_id.is_empty() || user_id.chars().count() > MAX_SUB_CHARS {
            return Err(HttpError::bad_request(format!("user_id must be 1 to {MAX_SUB_CHARS} characters")));
        }
        let name = req.name.as_deref().map(str::trim).filter(|n| !n.is_empty());
        if name.is_some_and(|n| n.chars().count() > MAX_NAME_CHARS) {
            return Err(HttpError::bad_request(format!("name must be at most {MAX_NAME_CHARS} characters")));
        }
        // The gateway refuses such a token at sign-in (U+0000 cannot be stored): say so now.
        if user_id.contains('\0') || name.is_some_and(|n| n.contains('\0')) {
            return Err(HttpError::bad_request("user_id and name must not contain U+0000"));
        }
        let role = req.role.as_deref().filter(|r| !r.is_empty());
        let who =
            Identity { sub: user_id, name, role, issuer: self.issuer.as_deref(), audience: self.audience.as_deref() };
        let (token, exp) = sign_hs256(&who, chrono::Utc::now().timestamp(), TTL_SECS, self.secret.expose_secret())
            .map_err(|e| {
                tracing::error!(error = %e, "signing a dev token");
                HttpError(CommandError::new(ErrorCode::Internal, "internal error"))
            })?;
        Ok(Minted { token, user_id: user_id.to_owned(), exp })
    }
}

/// A signed token, for `user_id`, valid until `exp` (Unix seconds).
struct Minted {
    token: String,
    user_id: String,
    exp: i64,
}

/// The dev-token route; only merged into the gateway's router when `DEV_TOKENS` is on.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(dev_token))
}

#[utoipa::path(post, path = "/v1/dev/token", tag = "dev", security(()), request_body = DevTokenRequest,
    responses((status = 201, description = "`{token, user_id, expires_at}`"), (status = 400, description = "invalid user_id or name"),
        (status = 404, description = "dev tokens are off (the default; always in production)")))]
/// `POST /v1/dev/token {user_id, name?, role?}` → 201 `{token, user_id, expires_at}`.
async fn dev_token(State(state): State<AppState>, Body(req): Body<DevTokenRequest>) -> Result<Response, HttpError> {
    // The route is only mounted with a signer; without one it is an unknown path.
    let Some(signer) = state.dev_tokens() else {
        return Err(crate::rest::not_found().await);
    };
    let minted = signer.mint(&req)?;
    tracing::info!(user = %minted.user_id, "dev token issued");
    let body = json::dev_token_body(&minted.token, &minted.user_id, minted.exp);
    Ok((StatusCode::CREATED, Json(body)).into_response())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Verifier;

    fn request(user_id: &str, role: Option<&str>) -> DevTokenRequest {
        DevTokenRequest { user_id: user_id.into(), name: Some("Alice".into()), role: role.map(Into::into) }
    }

    #[test]
    fn a_dev_token_passes_the_gateways_own_verification() {
        let signer = DevTokens::new(b"s3cret", Some("issuer".into()), Some("aud".into()));
        let minted = signer.mint(&request(" alice ", Some("admin"))).expect("minted");
        let claims = Verifier::hs256(b"s3cret", Some("issuer"), Some("aud")).verify(&minted.token).expect("valid");
        assert_eq!(claims.sub, "alice");
        assert_eq!(claims.name.as_deref(), Some("Alice"));
        assert!(claims.is_admin());
        assert!(Verifier::hs256(b"other", None, None).verify(&minted.token).is_err());
    }

    #[test]
    fn an_empty_or_overlong_user_id_is_refused() {
        let signer = DevTokens::new(b"s3cret", None, None);
        assert!(signer.mint(&request("  ", None)).is_err());
        assert!(signer.mint(&request(&"x".repeat(MAX_SUB_CHARS + 1), None)).is_err());
    }

    #[test]
    fn a_nul_in_the_user_id_or_name_is_refused_before_signing() {
        let signer = DevTokens::new(b"s3cret", None, None);
        assert!(signer.mint(&request("a\0b", None)).is_err());
        let named = DevTokenRequest { user_id: "alice".into(), name: Some("A\0".into()), role: None };
        assert!(signer.mint(&named).is_err());
    }
}
