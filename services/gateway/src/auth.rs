//! Client authentication: JWT verification and where a token may come from.

use jsonwebtoken::{decode, errors::ErrorKind, Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};

/// Seconds of clock skew tolerated on `exp` and `nbf`.
pub const LEEWAY_SECS: u64 = 30;
/// Longest user id (`sub`).
pub const MAX_SUB_CHARS: usize = 128;
/// Longest token accepted at all; anything longer is rejected before parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// The claims the gateway uses. `sub` is the user id everywhere downstream.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// Defaulted so a missing `sub` is reported as such, not as a JSON error.
    #[serde(default)]
    pub sub: String,
    pub exp: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

impl Claims {
    /// The JWT role `admin`: the only thing "admin" ever means.
    pub fn is_admin(&self) -> bool {
        self.role.as_deref() == Some("admin")
    }
}

/// Why a token was refused. The message is safe to show the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("token expired")]
    Expired,
    #[error("token is larger than {MAX_TOKEN_BYTES} bytes")]
    TooLarge,
    #[error("token has no usable sub (1 to {MAX_SUB_CHARS} characters, no U+0000)")]
    BadSubject,
    /// The `name` is stored with every message its user sends, and no stored string may
    /// hold U+0000; refused here so the user learns why at once, not at each send.
    #[error("token name must not contain U+0000")]
    BadName,
    #[error("invalid token: {0}")]
    Invalid(String),
}

impl AuthError {
    /// The failure's label in `chat_gateway_auth_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            AuthError::Expired => "expired",
            AuthError::TooLarge => "too_large",
            AuthError::BadSubject => "bad_subject",
            AuthError::BadName => "bad_name",
            AuthError::Invalid(_) => "invalid",
        }
    }
}

/// The one signature algorithm client tokens must use (`JWT_ALGORITHM`). (Variants carry
/// no `///`: clap would list them in `--help`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum JwtAlgorithm {
    #[value(name = "HS256")]
    Hs256,
    #[value(name = "RS256")]
    Rs256,
    #[value(name = "ES256")]
    Es256,
}

impl std::fmt::Display for JwtAlgorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Hs256 => "HS256",
            Self::Rs256 => "RS256",
            Self::Es256 => "ES256",
        })
    }
}

/// Which signatures the gateway accepts: exactly one algorithm, pinned, so a token can
/// never choose how it is checked (no `none`, no HS256 signed with a public key).
#[derive(Debug, Clone)]
pub enum KeyConfig {
    /// HMAC-SHA256 with a shared secret.
    Hs256 { secret: Vec<u8> },
    /// RSA PKCS#1 v1.5 SHA-256, verified with a PEM public key.
    Rs256 { public_pem: Vec<u8> },
    /// ECDSA P-256 SHA-256, verified with a PEM public key.
    Es256 { public_pem: Vec<u8> },
}

/// A key that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid JWT public key: {0}")]
pub struct KeyError(String);

/// Verifies tokens against one key and one pinned algorithm.
pub struct Verifier {
    key: DecodingKey,
    validation: Validation,
}

impl Verifier {
    /// An HS256 verifier. `iss` and `aud` are checked only when configured.
    pub fn hs256(secret: &[u8], issuer: Option<&str>, audience: Option<&str>) -> Self {
        Self::with_key(DecodingKey::from_secret(secret), Algorithm::HS256, issuer, audience)
    }

    /// A verifier for the configured algorithm and key.
    pub fn new(keys: &KeyConfig, issuer: Option<&str>, audience: Option<&str>) -> Result<Self, KeyError> {
        let (key, alg) = match keys {
            KeyConfig::Hs256 { secret } => (DecodingKey::from_secret(secret), Algorithm::HS256),
            KeyConfig::Rs256 { public_pem } => {
                (DecodingKey::from_rsa_pem(public_pem).map_err(|e| KeyError(e.to_string()))?, Algorithm::RS256)
            }
            KeyConfig::Es256 { public_pem } => {
                (DecodingKey::from_ec_pem(public_pem).map_err(|e| KeyError(e.to_string()))?, Algorithm::ES256)
            }
        };
        Ok(Self::with_key(key, alg, issuer, audience))
    }

    fn with_key(key: DecodingKey, alg: Algorithm, issuer: Option<&str>, audience: Option<&str>) -> Self {
        let mut validation = Validation::new(alg);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp", "sub"]);
        if let Some(iss) = issuer {
            validation.set_issuer(&[iss]);
            validation.required_spec_claims.insert("iss".into());
        }
        match audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                validation.required_spec_claims.insert("aud".into());
            }
            // Without a configured audience, a token that names one is still fine.
            None => validation.validate_aud = false,
        }
        Self { key, validation }
    }

    /// The claims of a valid token.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::TooLarge);
        }
        let data = decode::<Claims>(token, &self.key, &self.validation).map_err(|err| match err.kind() {
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::MissingRequiredClaim(c) if c == "sub" => AuthError::BadSubject,
            _ => AuthError::Invalid(err.to_string()),
        })?;
        let claims = data.claims;
        let n = claims.sub.chars().count();
        if n == 0 || n > MAX_SUB_CHARS || claims.sub.contains('\0') {
            return Err(AuthError::BadSubject);
        }
        if claims.name.as_deref().is_some_and(|name| name.contains('\0')) {
            return Err(AuthError::BadName);
        }
        Ok(claims)
    }
}

/// The token of an `Authorization: Bearer <jwt>` header value.
pub fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    const SECRET: &[u8] = b"test-secret";

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    fn sign(claims: serde_json::Value) -> String {
        encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(SECRET)).unwrap()
    }

    fn verifier() -> Verifier {
        Verifier::hs256(SECRET, None, None)
    }

    #[test]
    fn a_valid_token_yields_its_claims() {
        let token = sign(json!({"sub": "alice", "exp": now() + 60, "name": "Alice", "role": "admin"}));
        let claims = verifier().verify(&token).unwrap();
        assert_eq!(claims.sub, "alice");
        assert_eq!(claims.name.as_deref(), Some("Alice"));
        assert!(claims.is_admin());
    }

    #[test]
    fn expiry_is_enforced_with_30_seconds_of_leeway() {
        let within = sign(json!({"sub": "alice", "exp": now() - 10}));
        assert!(verifier().verify(&within).is_ok());
        let expired = sign(json!({"sub": "alice", "exp": now() - 120}));
        assert_eq!(verifier().verify(&expired), Err(AuthError::Expired));
    }

    #[test]
    fn exp_is_required() {
        let token = sign(json!({"sub": "alice"}));
        assert!(matches!(verifier().verify(&token), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn sub_must_be_present_and_at_most_128_characters() {
        let missing = sign(json!({"exp": now() + 60}));
        assert_eq!(verifier().verify(&missing), Err(AuthError::BadSubject));
        let empty = sign(json!({"sub": "", "exp": now() + 60}));
        assert_eq!(verifier().verify(&empty), Err(AuthError::BadSubject));
        let long = sign(json!({"sub": "x".repeat(129), "exp": now() + 60}));
        assert_eq!(verifier().verify(&long), Err(AuthError::BadSubject));
    }

    #[test]
    fn a_sub_or_name_holding_nul_is_refused() {
        let sub = sign(json!({"sub": "al\u{0}ice", "exp": now() + 60}));
        assert_eq!(verifier().verify(&sub), Err(AuthError::BadSubject));
        let name = sign(json!({"sub": "alice", "name": "Al\u{0}ice", "exp": now() + 60}));
        assert_eq!(verifier().verify(&name), Err(AuthError::BadName));
        assert_eq!(AuthError::BadName.to_string(), "token name must not contain U+0000");
        // Other control characters are stored as given, like in every other string.
        let tab = sign(json!({"sub": "alice", "name": "Al\tice\u{1}", "exp": now() + 60}));
        assert_eq!(verifier().verify(&tab).map(|c| c.name), Ok(Some("Al\tice\u{1}".to_owned())));
    }

    #[test]
    fn a_token_signed_with_another_key_is_refused() {
        let token =
            encode(&Header::default(), &json!({"sub": "a", "exp": now() + 60}), &EncodingKey::from_secret(b"other"))
                .unwrap();
        assert!(matches!(verifier().verify(&token), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn unsigned_alg_none_tokens_are_refused() {
        use base64_url as b64;
        let header = b64::encode(br#"{"alg":"none","typ":"JWT"}"#);
        let body = b64::encode(format!(r#"{{"sub":"alice","exp":{}}}"#, now() + 60).as_bytes());
        let token = format!("{header}.{body}.");
        assert!(matches!(verifier().verify(&token), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn garbage_and_oversized_tokens_are_refused() {
        assert!(matches!(verifier().verify("not a jwt"), Err(AuthError::Invalid(_))));
        assert_eq!(verifier().verify(&"a".repeat(MAX_TOKEN_BYTES + 1)), Err(AuthError::TooLarge));
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let v = Verifier::hs256(SECRET, Some("https://auth.example"), Some("chat"));
        let good = sign(json!({"sub": "a", "exp": now() + 60, "iss": "https://auth.example", "aud": "chat"}));
        assert!(v.verify(&good).is_ok());
        let wrong_iss = sign(json!({"sub": "a", "exp": now() + 60, "iss": "evil", "aud": "chat"}));
        assert!(v.verify(&wrong_iss).is_err());
        let wrong_aud = sign(json!({"sub": "a", "exp": now() + 60, "iss": "https://auth.example", "aud": "x"}));
        assert!(v.verify(&wrong_aud).is_err());
        // Without configuration, an aud claim is not a reason to refuse.
        assert!(verifier().verify(&wrong_aud).is_ok());
    }

    const RSA_PRIVATE: &[u8] = include_bytes!("../testdata/rsa_private.pem");
    const RSA_PUBLIC: &[u8] = include_bytes!("../testdata/rsa_public.pem");
    const EC_PRIVATE: &[u8] = include_bytes!("../testdata/ec_private.pem");
    const EC_PUBLIC: &[u8] = include_bytes!("../testdata/ec_public.pem");

    fn rs256() -> Verifier {
        Verifier::new(&KeyConfig::Rs256 { public_pem: RSA_PUBLIC.to_vec() }, None, None).unwrap()
    }

    #[test]
    fn rs256_and_es256_tokens_verify_with_their_public_keys() {
        let claims = json!({"sub": "alice", "exp": now() + 60});
        let rsa =
            encode(&Header::new(Algorithm::RS256), &claims, &EncodingKey::from_rsa_pem(RSA_PRIVATE).unwrap()).unwrap();
        assert_eq!(rs256().verify(&rsa).unwrap().sub, "alice");
        let es = Verifier::new(&KeyConfig::Es256 { public_pem: EC_PUBLIC.to_vec() }, None, None).unwrap();
        let ec =
            encode(&Header::new(Algorithm::ES256), &claims, &EncodingKey::from_ec_pem(EC_PRIVATE).unwrap()).unwrap();
        assert_eq!(es.verify(&ec).unwrap().sub, "alice");
        // Each verifier takes only its own algorithm.
        assert!(es.verify(&rsa).is_err());
        assert!(rs256().verify(&ec).is_err());
        assert!(rs256().verify(&sign(claims)).is_err());
    }

    #[test]
    fn an_hs256_token_signed_with_the_rsa_public_key_is_refused() {
        // The classic confusion attack: the public key is public, so an attacker can
        // HMAC with it; a verifier that let the token pick the algorithm would accept.
        let forged = encode(
            &Header::new(Algorithm::HS256),
            &json!({"sub": "admin", "role": "admin", "exp": now() + 60}),
            &EncodingKey::from_secret(RSA_PUBLIC),
        )
        .unwrap();
        assert!(matches!(rs256().verify(&forged), Err(AuthError::Invalid(_))));
    }

    #[test]
    fn a_token_not_valid_before_a_future_time_is_refused() {
        let token = sign(json!({"sub": "alice", "exp": now() + 3600, "nbf": now() + 600}));
        assert!(matches!(verifier().verify(&token), Err(AuthError::Invalid(_))));
        let within_leeway = sign(json!({"sub": "alice", "exp": now() + 3600, "nbf": now() + 10}));
        assert!(verifier().verify(&within_leeway).is_ok());
    }

    #[test]
    fn unusable_public_keys_are_a_configuration_error() {
        assert!(Verifier::new(&KeyConfig::Rs256 { public_pem: b"not a key".to_vec() }, None, None).is_err());
        assert!(Verifier::new(&KeyConfig::Es256 { public_pem: RSA_PUBLIC.to_vec() }, None, None).is_err());
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
        assert_eq!(bearer("Bearer"), None);
    }

    /// Minimal unpadded base64url for hand-made test tokens.
    mod base64_url {
        pub fn encode(input: &[u8]) -> String {
            const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
            let mut out = String::new();
            for chunk in input.chunks(3) {
                let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
                let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
                for i in 0..=chunk.len() {
                    out.push(T[((n >> (18 - 6 * i)) & 63) as usize] as char);
                }
            }
            out
        }
    }
}
