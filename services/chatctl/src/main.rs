//! `chatctl`: a command-line companion for the chat cluster.
//!
//! `chatctl token --sub alice` mints a development token signed with `JWT_SECRET`.
#![forbid(unsafe_code)]

use anyhow::Context;
use clap::{Parser, Subcommand};
use jsonwebtoken::{encode, EncodingKey, Header};
use serde::Serialize;

#[derive(Parser)]
#[command(name = "chatctl", version, about = "Chat cluster command-line tool")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mint an HS256 token for development and tests.
    Token {
        /// User id (`sub`).
        #[arg(long)]
        sub: String,
        /// Display name (`name`).
        #[arg(long)]
        name: Option<String>,
        /// Role; `admin` grants admin rights.
        #[arg(long)]
        role: Option<String>,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 24 * 3600)]
        ttl: i64,
        /// Signing key; must match the gateways' JWT_SECRET.
        #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
        secret: String,
        /// `iss` claim, if the gateways check one.
        #[arg(long, env = "JWT_ISSUER")]
        issuer: Option<String>,
        /// `aud` claim, if the gateways check one.
        #[arg(long, env = "JWT_AUDIENCE")]
        audience: Option<String>,
    },
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

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Cmd::Token { sub, name, role, ttl, secret, issuer, audience } => {
            anyhow::ensure!(!sub.is_empty() && sub.chars().count() <= 128, "--sub must be 1 to 128 characters");
            anyhow::ensure!(!secret.is_empty(), "JWT_SECRET (or --secret) must not be empty");
            let now = chrono::Utc::now().timestamp();
            let claims = Claims {
                sub: &sub,
                exp: now + ttl,
                iat: now,
                name: name.as_deref(),
                role: role.as_deref(),
                iss: issuer.as_deref(),
                aud: audience.as_deref(),
            };
            let token = encode(&Header::default(), &claims, &EncodingKey::from_secret(secret.as_bytes()))
                .context("signing the token")?;
            println!("{token}");
        }
    }
    Ok(())
}
