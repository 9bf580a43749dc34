//! JWTs signed the way the test clusters verify them.

use serde_json::{json, Value};

/// The secret every test cluster signs tokens with.
pub const SECRET: &str = "e2e-test-secret-at-least-32-bytes";

/// A token for `sub`, valid for an hour.
pub fn token(sub: &str) -> String {
    token_with(json!({"sub": sub, "exp": chrono::Utc::now().timestamp() + 3600}))
}

/// A token with exactly these claims, signed with the cluster secret.
pub fn token_with(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("signing")
}
