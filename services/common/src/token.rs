//! Signing HS256 tokens the gateways accept, for development: `chatctl` and the
//! gateway's dev sign-in (`DEV_TOKENS`) mint the same claims the same way. Whoever holds
//! the secret can be anyone, admin included.

use jsonwebtoken::{encode, EncodingKey, Header};
use serde::Serialize;

/// Who a token speaks for, and for which issuer and audience.
#[derive(Debug, Clone, Copy, Default)]
pub struct Identity<'a> {
    /// The user id (`sub`).
    pub sub: &'a str,
    /// Display name (`name`).
    pub name: Option<&'a str>,
    /// Role (`role`); `admin` grants admin rights.
    pub role: Option<&'a str>,
    /// `iss`, when the gateways check one.
    pub issuer: Option<&'a str>,
    /// `aud`, when the gateways check one.
    pub audience: Option<&'a str>,
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    exp: i64,
    iat: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    role: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
}

/// A token for `who`, valid `ttl_secs` from `now` (Unix seconds), signed with `secret`.
/// Returns the token and its `exp`.
pub fn sign_hs256(
    who: &Identity<'_>,
    now: i64,
    ttl_secs: i64,
    secret: &[u8],
) -> Result<(String, i64), jsonwebtoken::errors::Error> {
    let exp = now + ttl_secs;
    let claims =
        Claims { sub: who.sub, exp, iat: now, name: who.name, role: who.role, iss: who.issuer, aud: who.audience };
    let token = encode(&Header::default(), &claims, &EncodingKey::from_secret(secret))?;
    Ok((token, exp))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};

    #[test]
    fn a_signed_token_carries_exactly_the_given_claims() {
        let who = Identity { sub: "alice", name: Some("Alice"), role: Some("admin"), ..Identity::default() };
        let now = 4_000_000_000;
        let (token, exp) = sign_hs256(&who, now, 60, b"s3cret").expect("signed");
        assert_eq!(exp, now + 60);
        let data = decode::<serde_json::Value>(
            &token,
            &DecodingKey::from_secret(b"s3cret"),
            &Validation::new(Algorithm::HS256),
        )
        .expect("valid");
        assert_eq!(
            data.claims,
            serde_json::json!({"sub": "alice", "exp": now + 60, "iat": now, "name": "Alice", "role": "admin"})
        );
    }
}
