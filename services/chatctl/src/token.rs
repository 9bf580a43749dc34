//! Minting HS256 tokens the gateways accept (development and tests only: whoever holds
//! `JWT_SECRET` can be anyone, admin included).

use anyhow::Context;
use chat_common::token::{sign_hs256, Identity};
use clap::Args;

/// Claims and signing key shared by `chatctl token` and by `--user` on the other commands.
#[derive(Args, Clone, Debug)]
pub struct MintOpts {
    /// Display name (`name` claim).
    #[arg(long)]
    pub name: Option<String>,
    /// Role (`role` claim); `admin` grants admin rights.
    #[arg(long)]
    pub role: Option<String>,
    /// Signing key; must match the gateways' JWT_SECRET.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub secret: Option<String>,
    /// `iss` claim, if the gateways check one.
    #[arg(long, env = "JWT_ISSUER")]
    pub issuer: Option<String>,
    /// `aud` claim, if the gateways check one.
    #[arg(long, env = "JWT_AUDIENCE")]
    pub audience: Option<String>,
}

/// Signs a token for `sub`, valid for `ttl_secs` from now.
///
/// The checks mirror the gateway's (1–128 character `sub`) so a bad value fails here
/// with a clear message rather than as a bare 401 later.
pub fn mint(sub: &str, ttl_secs: i64, opts: &MintOpts) -> anyhow::Result<String> {
    anyhow::ensure!(!sub.is_empty() && sub.chars().count() <= 128, "the user id must be 1 to 128 characters");
    anyhow::ensure!(ttl_secs > 0, "--ttl must be positive");
    let secret = opts.secret.as_deref().filter(|s| !s.is_empty()).context(
        "minting a token needs the gateways' signing key: pass --secret or set JWT_SECRET \
         (`make run` prints the one it uses)",
    )?;
    let who = Identity {
        sub,
        name: opts.name.as_deref(),
        role: opts.role.as_deref(),
        issuer: opts.issuer.as_deref(),
        audience: opts.audience.as_deref(),
    };
    let (token, _exp) =
        sign_hs256(&who, chrono::Utc::now().timestamp(), ttl_secs, secret.as_bytes()).context("signing the token")?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{decode, DecodingKey, Validation};

    fn opts(secret: Option<&str>) -> MintOpts {
        MintOpts {
            name: Some("Alice".into()),
            role: Some("admin".into()),
            secret: secret.map(str::to_owned),
            issuer: None,
            audience: None,
        }
    }

    #[test]
    fn minted_tokens_verify_with_the_same_secret_and_carry_the_claims() -> anyhow::Result<()> {
        let token = mint("alice", 60, &opts(Some("s3cret")))?;
        let data = decode::<serde_json::Value>(
            &token,
            &DecodingKey::from_secret(b"s3cret"),
            &Validation::new(jsonwebtoken::Algorithm::HS256),
        )?;
        assert_eq!(data.claims["sub"], "alice");
        assert_eq!(data.claims["name"], "Alice");
        assert_eq!(data.claims["role"], "admin");
        Ok(())
    }

    #[test]
    fn minting_refuses_a_missing_secret_and_bad_subjects() {
        let missing = mint("alice", 60, &opts(None)).map(|_| ()).unwrap_err();
        assert!(format!("{missing:#}").contains("JWT_SECRET"), "{missing:#}");
        assert!(mint("", 60, &opts(Some("k"))).is_err());
        assert!(mint(&"x".repeat(129), 60, &opts(Some("k"))).is_err());
        assert!(mint("alice", 0, &opts(Some("k"))).is_err());
    }
}
