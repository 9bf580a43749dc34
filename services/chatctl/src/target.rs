//! Where to connect and as whom: the options every networked command shares.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use hyper::http::uri::Authority;

use crate::token::{mint, MintOpts};

/// Connection and identity options shared by `connect`, `send` and the admin commands.
#[derive(Args, Clone, Debug)]
pub struct ConnOpts {
    /// Gateway base URL: `http://host:port` or `ws://host:port` (a trailing `/ws` is ignored).
    #[arg(long, env = "CHAT_URL", default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// Token to present as `Authorization: Bearer`.
    #[arg(long, env = "CHAT_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Act as this user id instead: mints a short-lived token (needs --secret / JWT_SECRET).
    /// Takes precedence over a CHAT_TOKEN from the environment.
    #[arg(long)]
    pub user: Option<String>,
    /// Lifetime of a minted token, in seconds (`connect` refreshes it before it runs out).
    #[arg(long, default_value_t = 600)]
    pub ttl: i64,
    /// Seconds to wait for a connection or a reply before giving up.
    #[arg(long, env = "CHAT_TIMEOUT", default_value_t = 10)]
    pub timeout: u64,
    #[command(flatten)]
    pub mint: MintOpts,
}

impl ConnOpts {
    /// The parsed gateway address and the credentials to present there.
    ///
    /// `token_on_command_line` says whether `--token` was typed rather than taken from
    /// `CHAT_TOKEN`: typing both `--token` and `--user` is a mistake worth refusing, while a
    /// `--user` over an exported token is the usual way to act as someone else for a while.
    pub fn resolve(&self, token_on_command_line: bool) -> anyhow::Result<(Target, Credentials)> {
        let target = Target::parse(&self.url)?;
        let creds = match (&self.user, &self.token) {
            (Some(_), Some(_)) if token_on_command_line => bail!("give either --token or --user, not both"),
            (Some(user), _) => Credentials {
                token: mint(user, self.ttl, &self.mint)?,
                minter: Some(Minter { user: user.clone(), ttl: self.ttl, opts: self.mint.clone() }),
            },
            (None, Some(token)) if !token.trim().is_empty() => {
                Credentials { token: token.trim().to_owned(), minter: None }
            }
            _ => bail!(
                "no identity: pass --token <jwt> (or set CHAT_TOKEN), or --user <id> with --secret \
                 (or JWT_SECRET) to mint one"
            ),
        };
        Ok((target, creds))
    }

    /// The per-step timeout.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout.max(1))
    }
}

/// A token to present, and how to make a fresh one when it was minted here.
#[derive(Clone, Debug)]
pub struct Credentials {
    /// The bearer token.
    pub token: String,
    /// Present when the token was minted from `--user`: `connect` uses it to refresh.
    pub minter: Option<Minter>,
}

/// Everything needed to mint another token for the same user.
#[derive(Clone, Debug)]
pub struct Minter {
    user: String,
    /// Lifetime of each token, in seconds.
    pub ttl: i64,
    opts: MintOpts,
}

impl Minter {
    /// A fresh token for the same user and claims.
    pub fn mint(&self) -> anyhow::Result<String> {
        mint(&self.user, self.ttl, &self.opts)
    }
}

/// A gateway: its WebSocket URL and the HTTP origin of its REST API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// `ws://host:port[/prefix]/ws`.
    pub ws_url: String,
    /// `host:port`, for the TCP connection and the `Host` header.
    pub authority: String,
    /// A path prefix before `/ws` and `/v1` (empty, or `/something` without a trailing slash),
    /// for gateways published under a sub-path by a proxy.
    pub prefix: String,
}

impl Target {
    /// Parses `http://host:port`, `ws://host:port/ws`, or a bare `host:port`.
    pub fn parse(url: &str) -> anyhow::Result<Self> {
        let url = url.trim();
        let rest = match url.split_once("://") {
            Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
                "http" | "ws" => rest,
                // TLS would need a TLS stack in this binary; deployments terminate TLS at
                // the ingress, so talk to a gateway (or a port-forward) directly instead.
                "https" | "wss" => bail!("{url}: TLS is not supported by chatctl; use an http:// or ws:// address"),
                other => bail!("{url}: unsupported scheme {other:?}; use http:// or ws://"),
            },
            None => url,
        };
        anyhow::ensure!(!rest.contains(['?', '#']), "{url}: give the gateway's base URL, without query or fragment");
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let parsed: Authority = authority.parse().with_context(|| format!("{url}: not a host[:port]"))?;
        anyhow::ensure!(!authority.is_empty() && !authority.contains('@'), "{url}: not a host[:port]");
        let authority = match parsed.port_u16() {
            Some(_) => authority.to_owned(),
            None => format!("{authority}:80"),
        };
        let mut prefix = path.trim_end_matches('/');
        // People paste the WebSocket endpoint itself; the base is what comes before it.
        if let Some(stripped) = prefix.strip_suffix("/ws") {
            prefix = stripped;
        }
        let prefix = prefix.to_owned();
        Ok(Self { ws_url: format!("ws://{authority}{prefix}/ws"), authority, prefix })
    }

    /// The request target for an HTTP `path` (starting with `/`).
    pub fn http_path(&self, path: &str) -> String {
        format!("{}{path}", self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_in_every_accepted_spelling() -> anyhow::Result<()> {
        for url in ["http://127.0.0.1:8080", "ws://127.0.0.1:8080/ws", "127.0.0.1:8080", "http://127.0.0.1:8080/"] {
            let t = Target::parse(url)?;
            assert_eq!(t.ws_url, "ws://127.0.0.1:8080/ws", "{url}");
            assert_eq!(t.authority, "127.0.0.1:8080", "{url}");
            assert_eq!(t.http_path("/v1/push"), "/v1/push", "{url}");
        }
        let t = Target::parse("http://chat.local/gw/")?;
        assert_eq!(t.ws_url, "ws://chat.local:80/gw/ws");
        assert_eq!(t.http_path("/v1/push"), "/gw/v1/push");
        Ok(())
    }

    #[test]
    fn unusable_urls_are_refused_with_a_reason() {
        for url in ["https://x:1", "wss://x:1/ws", "ftp://x", "http://", "http://x:1/?a=b", "http://u@x:1"] {
            assert!(Target::parse(url).is_err(), "{url}");
        }
    }

    fn opts(token: Option<&str>, user: Option<&str>) -> ConnOpts {
        ConnOpts {
            url: "http://127.0.0.1:8080".into(),
            token: token.map(str::to_owned),
            user: user.map(str::to_owned),
            ttl: 60,
            timeout: 10,
            mint: MintOpts { name: None, role: None, secret: Some("k".into()), issuer: None, audience: None },
        }
    }

    #[test]
    fn identity_comes_from_a_token_or_a_minted_user_never_from_nothing() -> anyhow::Result<()> {
        let (_, c) = opts(Some("abc"), None).resolve(true)?;
        assert_eq!(c.token, "abc");
        assert!(c.minter.is_none());
        let (_, c) = opts(Some("abc"), Some("bob")).resolve(false)?;
        assert_ne!(c.token, "abc", "--user wins over CHAT_TOKEN");
        assert!(c.minter.is_some());
        assert!(opts(Some("abc"), Some("bob")).resolve(true).is_err());
        let none = opts(None, None).resolve(false).map(|_| ()).unwrap_err();
        assert!(format!("{none}").contains("--token"), "{none}");
        Ok(())
    }
}
