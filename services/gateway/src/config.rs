//! The gateway's configuration: flags or environment variables, read once, and the
//! settings each part of the gateway is built from.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use secrecy::{ExposeSecret, SecretString};

use crate::auth::{JwtAlgorithm, KeyConfig, KeyError, Verifier};
use crate::devtoken::DevTokens;
use crate::discovery::Targets;
use crate::ratelimit::Rates;
use crate::state::ConnSettings;

/// Configuration of a gateway. Every flag can also be set through the environment
/// variable named beside it.
#[derive(Debug, Clone, Parser)]
#[command(name = "chat-gateway", version, about = "Chat WebSocket gateway")]
// A gateway waits for the message service, which itself waits for Postgres: more attempts.
#[command(mut_arg("startup_attempts", |a| a
    .default_value("40")
    .help("Attempts to reach the message service and Redis at start before giving up")))]
pub struct Config {
    /// Address for HTTP and WebSocket (`/ws`).
    #[arg(long, env = "GATEWAY_ADDR", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// gRPC URL of the message service; several may be given, comma-separated. Calls are
    /// balanced across every address the URLs' names resolve to (on Kubernetes: a
    /// headless Service naming each pod).
    #[arg(long, env = "MESSAGE_SERVICE_URL", default_value = "http://127.0.0.1:50051", value_delimiter = ',')]
    pub message_service_url: Vec<String>,

    /// How often the message service's names are resolved again, in ms, so pods that come
    /// and go join and leave the balancer.
    #[arg(long, env = "MESSAGE_SERVICE_DNS_REFRESH_MS", default_value_t = 5_000)]
    pub message_service_dns_refresh_ms: u64,

    /// PEM CA bundle the message service's certificate must chain to. With
    /// MESSAGE_TLS_CERT and MESSAGE_TLS_KEY: calls go over mTLS, and the files are re-read
    /// when they change.
    #[arg(long, env = "MESSAGE_TLS_CA")]
    pub message_tls_ca: Option<PathBuf>,

    /// PEM client certificate chain the gateway presents to the message service.
    #[arg(long, env = "MESSAGE_TLS_CERT")]
    pub message_tls_cert: Option<PathBuf>,

    /// PEM private key of MESSAGE_TLS_CERT.
    #[arg(long, env = "MESSAGE_TLS_KEY")]
    pub message_tls_key: Option<PathBuf>,

    /// The name the message service's certificate must carry: gateways dial pod
    /// addresses, which no certificate names.
    #[arg(long, env = "MESSAGE_TLS_SERVER_NAME", default_value = "chat-message")]
    pub message_tls_server_name: String,

    /// Redis, its channel prefix, and the start-up retries.
    #[command(flatten)]
    pub backend: chat_common::config::BackendFlags,

    /// Signature algorithm of client tokens, pinned: `HS256`, `RS256` or `ES256`.
    #[arg(long, env = "JWT_ALGORITHM", value_enum, default_value_t = JwtAlgorithm::Hs256)]
    pub jwt_algorithm: JwtAlgorithm,

    /// HS256 key that signs client tokens (required with HS256).
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<SecretString>,

    /// PEM file with the public key that verifies RS256/ES256 tokens.
    #[arg(long, env = "JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<PathBuf>,

    /// When set, tokens must carry this `iss`.
    #[arg(long, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// When set, tokens must carry this `aud`.
    #[arg(long, env = "JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Browser origins allowed to open WebSockets, comma-separated (`https://app.example.com`).
    /// Empty allows every origin (dev); requests without an `Origin` header (non-browser
    /// clients) are never refused by this check.
    #[arg(long, env = "ALLOWED_ORIGINS", default_value = "", value_delimiter = ',')]
    pub allowed_origins: Vec<String>,

    /// Interval of server WebSocket pings; a connection silent for twice this is dropped.
    #[arg(long, env = "HEARTBEAT_MS", default_value_t = 25_000)]
    pub heartbeat_ms: u64,

    /// Seconds a client has to send its `auth` frame when the handshake carried no token.
    #[arg(long, env = "AUTH_TIMEOUT_SECS", default_value_t = 10)]
    pub auth_timeout_secs: u64,

    /// Largest accepted text frame, in bytes; larger ones get `too_large`.
    #[arg(long, env = "MAX_FRAME_BYTES", default_value_t = 65_536)]
    pub max_frame_bytes: usize,

    /// Most connections this gateway holds at once (0: no limit). Past it, new upgrades
    /// get 503 and `/readyz` reports the gateway full; open connections stay.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,

    /// Most simultaneous connections of one user across the cluster (0: no limit).
    #[arg(long, env = "MAX_CONNECTIONS_PER_USER", default_value_t = 10)]
    pub max_connections_per_user: u32,

    /// Largest request line plus headers, in bytes (413 above).
    #[arg(long, env = "MAX_HEADER_BYTES", default_value_t = 16 * 1024)]
    pub max_header_bytes: usize,

    /// Rooms one connection may have joined at once.
    #[arg(long, env = "MAX_ROOMS_PER_CONNECTION", default_value_t = 500)]
    pub max_rooms_per_connection: usize,

    /// Milliseconds between readiness turning 503 and connections being told to
    /// reconnect, after SIGTERM: time for the load balancer to stop sending new ones.
    #[arg(long, env = "DRAIN_DELAY_MS", default_value_t = 0)]
    pub drain_delay_ms: u64,

    /// Commands per second one connection may send (0: unlimited) ...
    #[arg(long, env = "RATE_CONN_PER_SEC", default_value_t = 100)]
    pub rate_conn_per_sec: u32,

    /// ... and how many at once.
    #[arg(long, env = "RATE_CONN_BURST", default_value_t = 200)]
    pub rate_conn_burst: u32,

    /// Commands per second all of one user's connections on a gateway may send (0: unlimited) ...
    #[arg(long, env = "RATE_USER_PER_SEC", default_value_t = 200)]
    pub rate_user_per_sec: u32,

    /// ... and how many at once.
    #[arg(long, env = "RATE_USER_BURST", default_value_t = 400)]
    pub rate_user_burst: u32,

    /// A gateway without a presence heartbeat for this long counts as dead and its users
    /// go offline; the bound on a crashed gateway's ghosts is 4/3 of this.
    #[arg(long, env = "PRESENCE_STALE_MS", default_value_t = 30_000)]
    pub presence_stale_ms: u64,

    /// How often, in ms, a gateway rewrites its users' presence counts from the
    /// connections it really holds: a count left too high by a failed decrement, or lost
    /// while Redis was down, is right again within one period.
    #[arg(long, env = "PRESENCE_RECOUNT_MS", default_value_t = 15_000)]
    pub presence_recount_ms: u64,

    /// Most online user ids a `join` or `presence` answer lists; `presence` says
    /// `online_truncated` beyond it. Bounds the Redis work of one command.
    #[arg(long, env = "PRESENCE_MAX_ONLINE", default_value_t = 1_000)]
    pub presence_max_online: usize,

    /// Most rooms a user's online/offline change is announced in (the most recently
    /// active first); match it to the message service's MAX_ROOMS_PER_USER.
    #[arg(long, env = "PRESENCE_MAX_ROOMS", default_value_t = 1_000)]
    pub presence_max_rooms: u32,

    /// Frames queued for one connection before it counts as too slow and is disconnected.
    #[arg(long, env = "OUTBOUND_QUEUE", default_value_t = 1024)]
    pub outbound_queue: usize,

    /// Deadline of each gRPC call to the message service, in milliseconds.
    #[arg(long, env = "GRPC_TIMEOUT_MS", default_value_t = 5_000)]
    pub grpc_timeout_ms: u64,

    /// Seconds that open connections get to close after SIGTERM.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 20)]
    pub shutdown_grace_secs: u64,

    /// `production` refuses development conveniences (`DEV_TOKENS`); `make run` sets
    /// `development`.
    #[arg(long, env = "ENVIRONMENT", value_enum, default_value_t = Environment::Production)]
    pub environment: Environment,

    /// Run in production without ALLOWED_ORIGINS, JWT_ISSUER or JWT_AUDIENCE: any web page
    /// could open sockets with a visitor's token, and a token minted for another service
    /// that shares the key would be accepted. Say so explicitly, or set them.
    #[arg(long, env = "ALLOW_INSECURE_PRODUCTION", default_value_t = false, action = clap::ArgAction::Set)]
    pub allow_insecure_production: bool,

    /// Serve `POST /v1/dev/token`, which signs a token for any user name it is given, so
    /// the browser client can sign in by name. Development only: refused in production.
    #[arg(long, env = "DEV_TOKENS")]
    pub dev_tokens: bool,

    /// Seconds a connection may go on being refused by the rate limit, without pausing
    /// for the `retry_after_ms` it was told, before it is closed with 1008. A burst is
    /// refused for its excess, never closed (docs/protocol.md, "Rate limits").
    #[arg(long, env = "RATE_ABUSE_AFTER_SECS", default_value_t = 10)]
    pub rate_abuse_after_secs: u64,

    /// Milliseconds a socket write may make no progress (the client's receive window
    /// stays shut) before the connection is closed: a WebSocket with 1013, an HTTP
    /// response by dropping it. Each stalled socket pins kernel send buffer.
    #[arg(long, env = "WRITE_STALL_TIMEOUT_MS", default_value_t = 10_000)]
    pub write_stall_timeout_ms: u64,

    /// Log format and trace export.
    #[command(flatten)]
    pub telemetry: chat_common::telemetry::TelemetryConfig,

    /// `/v1` requests per second one user may make on a gateway (0: unlimited); past it,
    /// 429 `rate_limited` with `Retry-After`. A REST send also spends a token of the
    /// user's WebSocket command bucket (RATE_USER_*), like a WebSocket send.
    #[arg(long, env = "REST_RATE_PER_SEC", default_value_t = 20)]
    pub rest_rate_per_sec: u32,

    /// ... and how many at once.
    #[arg(long, env = "REST_RATE_BURST", default_value_t = 100)]
    pub rest_rate_burst: u32,

    /// Searches per second one user may run on a gateway, WebSocket and REST together
    /// (0: unlimited); past it, `rate_limited`. A search costs Postgres milliseconds, a
    /// send microseconds: the command rate alone would let one user's searches take a
    /// database core from everyone else.
    #[arg(long, env = "RATE_SEARCH_PER_SEC", default_value_t = 2)]
    pub rate_search_per_sec: u32,

    /// ... and how many at once.
    #[arg(long, env = "RATE_SEARCH_BURST", default_value_t = 10)]
    pub rate_search_burst: u32,

    /// Attachment uploads and downloads a gateway streams at once.
    #[arg(long, env = "ATTACHMENT_TRANSFERS", default_value_t = 16)]
    pub attachment_transfers: usize,

    /// Of those, how many one user may have at once (more: 429 `rate_limited`), so a
    /// slow or hostile client cannot hold every slot.
    #[arg(long, env = "ATTACHMENT_TRANSFERS_PER_USER", default_value_t = 4)]
    pub attachment_transfers_per_user: usize,

    /// Milliseconds a transfer waits for a free slot before it gets 503 `unavailable`
    /// with `Retry-After`.
    #[arg(long, env = "ATTACHMENT_TRANSFER_WAIT_MS", default_value_t = 10_000)]
    pub attachment_transfer_wait_ms: u64,

    /// Seconds an upload may send nothing, or a download's client read nothing, before
    /// it is cut off and its slot freed.
    #[arg(long, env = "ATTACHMENT_STALL_SECS", default_value_t = 30)]
    pub attachment_stall_secs: u64,
}

/// Where the gateway runs, for what it may allow. (Variants carry no `///`: clap would
/// list them in `--help`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Environment {
    Development,
    Production,
}

/// A setting that parses but cannot work; the message names the setting.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Shared(#[from] chat_common::config::ConfigError),
    #[error("JWT_SECRET must be set (and not empty) for HS256 tokens")]
    NoJwtSecret,
    #[error("JWT_PUBLIC_KEY_FILE must be set for {0} tokens")]
    NoPublicKeyFile(JwtAlgorithm),
    #[error("cannot read JWT_PUBLIC_KEY_FILE {}: {cause}", path.display())]
    UnreadablePublicKey { path: PathBuf, cause: std::io::Error },
    #[error(transparent)]
    PublicKey(#[from] KeyError),
    #[error(
        "DEV_TOKENS is refused with ENVIRONMENT=production (the default): anyone could sign in as anyone. Set \
         ENVIRONMENT=development for a local cluster"
    )]
    DevTokensInProduction,
    #[error("DEV_TOKENS needs JWT_ALGORITHM=HS256: the gateway signs dev tokens with JWT_SECRET")]
    DevTokensNeedHs256,
    #[error(
        "JWT_SECRET is {0}; refused with ENVIRONMENT=production (the default). Use at least 32 \
         random bytes (e.g. `openssl rand -base64 48`), or set ENVIRONMENT=development for a local cluster"
    )]
    WeakSecret(&'static str),
    #[error(
        "{0} not set; refused with ENVIRONMENT=production (the default): set them, or \
         ALLOW_INSECURE_PRODUCTION=true to run without, or ENVIRONMENT=development for a local cluster"
    )]
    Unhardened(String),
    #[error(
        "ALLOWED_ORIGINS=* lets every web page open sockets; refused with ENVIRONMENT=production (the default): \
         name the origins, or set ALLOW_INSECURE_PRODUCTION=true"
    )]
    EveryOrigin,
    #[error("MESSAGE_SERVICE_URL: {0}")]
    MessageServiceUrl(String),
    #[error(transparent)]
    PartialTls(#[from] chat_common::tls::PartialTls),
    #[error("MESSAGE_TLS_SERVER_NAME must be a DNS name")]
    TlsServerName,
    #[error("{setting} must be at least {min}")]
    TooSmall { setting: &'static str, min: u64 },
}

impl Config {
    /// The message service's URLs, parsed.
    pub fn message_targets(&self) -> Result<Targets, ConfigError> {
        Targets::parse(&self.message_service_url).map_err(ConfigError::MessageServiceUrl)
    }

    /// The client certificate, its key and the CA of the message service, when calls go
    /// over mTLS.
    pub fn message_tls(&self) -> Option<chat_common::tls::TlsFiles> {
        self.tls_files().ok().flatten()
    }

    fn tls_files(&self) -> Result<Option<chat_common::tls::TlsFiles>, chat_common::tls::PartialTls> {
        chat_common::tls::TlsFiles::from_settings(
            ("MESSAGE_TLS_CERT", &self.message_tls_cert),
            ("MESSAGE_TLS_KEY", &self.message_tls_key),
            ("MESSAGE_TLS_CA", &self.message_tls_ca),
        )
    }

    /// Rejects values that parse but cannot work, with a message naming the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.telemetry.validate()?;
        match self.jwt_algorithm {
            JwtAlgorithm::Hs256 if self.hs256_secret().is_empty() => return Err(ConfigError::NoJwtSecret),
            alg @ (JwtAlgorithm::Rs256 | JwtAlgorithm::Es256) if self.jwt_public_key_file.is_none() => {
                return Err(ConfigError::NoPublicKeyFile(alg));
            }
            _ => {}
        }
        if self.environment == Environment::Production && self.jwt_algorithm == JwtAlgorithm::Hs256 {
            if let Some(weakness) = secret_weakness(self.hs256_secret()) {
                return Err(ConfigError::WeakSecret(weakness));
            }
        }
        if self.dev_tokens {
            if self.environment == Environment::Production {
                return Err(ConfigError::DevTokensInProduction);
            }
            if self.jwt_algorithm != JwtAlgorithm::Hs256 {
                return Err(ConfigError::DevTokensNeedHs256);
            }
        }
        self.message_targets()?;
        self.tls_files()?;
        if rustls::pki_types::ServerName::try_from(self.message_tls_server_name.as_str()).is_err() {
            return Err(ConfigError::TlsServerName);
        }
        at_least("MESSAGE_SERVICE_DNS_REFRESH_MS", self.message_service_dns_refresh_ms, 100)?;
        self.backend.validate()?;
        at_least("HEARTBEAT_MS", self.heartbeat_ms, 100)?;
        at_least("OUTBOUND_QUEUE", self.outbound_queue as u64, 8)?;
        at_least("PRESENCE_STALE_MS", self.presence_stale_ms, 600)?;
        at_least("MAX_HEADER_BYTES", self.max_header_bytes as u64, 1024)?;
        at_least("PRESENCE_RECOUNT_MS", self.presence_recount_ms, 100)?;
        at_least("PRESENCE_MAX_ONLINE", self.presence_max_online as u64, 1)?;
        at_least("PRESENCE_MAX_ROOMS", self.presence_max_rooms as u64, 1)?;
        at_least("MAX_FRAME_BYTES", self.max_frame_bytes as u64, 1024)?;
        at_least("RATE_ABUSE_AFTER_SECS", self.rate_abuse_after_secs, 1)?;
        at_least("WRITE_STALL_TIMEOUT_MS", self.write_stall_timeout_ms, 100)?;
        at_least("ATTACHMENT_TRANSFERS", self.attachment_transfers as u64, 1)?;
        at_least("ATTACHMENT_TRANSFERS_PER_USER", self.attachment_transfers_per_user as u64, 1)?;
        at_least("ATTACHMENT_STALL_SECS", self.attachment_stall_secs, 1)?;
        if self.environment == Environment::Production && !self.allow_insecure_production {
            if self.allowed_origins.iter().any(|o| o.trim() == "*") {
                return Err(ConfigError::EveryOrigin);
            }
            let unset: Vec<&str> = [
                ("ALLOWED_ORIGINS", self.allowed_origins.iter().all(|o| o.trim().is_empty())),
                ("JWT_ISSUER", self.jwt_issuer.as_deref().is_none_or(str::is_empty)),
                ("JWT_AUDIENCE", self.jwt_audience.as_deref().is_none_or(str::is_empty)),
            ]
            .into_iter()
            .filter_map(|(name, unset)| unset.then_some(name))
            .collect();
            if !unset.is_empty() {
                return Err(ConfigError::Unhardened(unset.join(", ")));
            }
        }
        Ok(())
    }

    /// The token verifier: the pinned algorithm with its key (read from its file for
    /// RS256/ES256), and the `iss`/`aud` to check.
    pub fn verifier(&self) -> Result<Verifier, ConfigError> {
        let keys = self.jwt_keys()?;
        Ok(Verifier::new(&keys, self.jwt_issuer.as_deref(), self.jwt_audience.as_deref())?)
    }

    /// The token verification key, read from its file for RS256/ES256.
    pub fn jwt_keys(&self) -> Result<KeyConfig, ConfigError> {
        let pem = || {
            let path = self.jwt_public_key_file.as_ref().ok_or(ConfigError::NoPublicKeyFile(self.jwt_algorithm))?;
            std::fs::read(path).map_err(|cause| ConfigError::UnreadablePublicKey { path: path.clone(), cause })
        };
        Ok(match self.jwt_algorithm {
            JwtAlgorithm::Rs256 => KeyConfig::Rs256 { public_pem: pem()? },
            JwtAlgorithm::Es256 => KeyConfig::Es256 { public_pem: pem()? },
            JwtAlgorithm::Hs256 => KeyConfig::Hs256 { secret: self.hs256_secret().as_bytes().to_vec() },
        })
    }

    /// The dev-token signer, when `DEV_TOKENS` is on (validation has made sure it may be).
    pub fn dev_tokens(&self) -> Option<DevTokens> {
        self.dev_tokens
            .then(|| DevTokens::new(self.hs256_secret().as_bytes(), self.jwt_issuer.clone(), self.jwt_audience.clone()))
    }

    fn hs256_secret(&self) -> &str {
        self.jwt_secret.as_ref().map(ExposeSecret::expose_secret).unwrap_or_default()
    }

    /// Per-connection limits and timings.
    pub fn conn_settings(&self) -> ConnSettings {
        let origins = self.allowed_origins.iter().map(|o| o.trim()).filter(|o| !o.is_empty());
        ConnSettings {
            allowed_origins: origins.map(str::to_owned).collect::<Arc<[String]>>(),
            max_rooms: self.max_rooms_per_connection,
            max_header_bytes: self.max_header_bytes,
            heartbeat: Duration::from_millis(self.heartbeat_ms),
            auth_timeout: Duration::from_secs(self.auth_timeout_secs),
            max_frame_bytes: self.max_frame_bytes,
            outbound_queue: self.outbound_queue,
        }
    }

    /// Command rates and bursts per connection and per user.
    pub fn rates(&self) -> Rates {
        Rates {
            conn_per_sec: self.rate_conn_per_sec,
            conn_burst: self.rate_conn_burst,
            user_per_sec: self.rate_user_per_sec,
            user_burst: self.rate_user_burst,
            abuse_after: Duration::from_secs(self.rate_abuse_after_secs),
        }
    }

    /// `/v1` request rates per user.
    /// Searches per user.
    pub fn search_rates(&self) -> crate::rest_limits::RestRates {
        crate::rest_limits::RestRates { per_sec: self.rate_search_per_sec, burst: self.rate_search_burst }
    }

    pub fn rest_rates(&self) -> crate::rest_limits::RestRates {
        crate::rest_limits::RestRates { per_sec: self.rest_rate_per_sec, burst: self.rest_rate_burst }
    }

    /// Attachment transfers at once, how long one waits for a slot, and how long a
    /// stalled client keeps one.
    pub fn transfers(&self) -> crate::attachments::Transfers {
        crate::attachments::Transfers::new(
            self.attachment_transfers,
            self.attachment_transfers_per_user,
            Duration::from_millis(self.attachment_transfer_wait_ms),
            Duration::from_secs(self.attachment_stall_secs),
        )
    }

    /// How often the message service's names are resolved again.
    pub fn dns_refresh(&self) -> Duration {
        Duration::from_millis(self.message_service_dns_refresh_ms)
    }

    /// Deadline of each gRPC call.
    pub fn grpc_timeout(&self) -> Duration {
        Duration::from_millis(self.grpc_timeout_ms)
    }

    /// How long a gateway may miss its presence heartbeats before it counts as dead.
    pub fn presence_stale(&self) -> Duration {
        Duration::from_millis(self.presence_stale_ms)
    }

    /// How often presence counts are rewritten from the connections held.
    pub fn presence_recount(&self) -> Duration {
        Duration::from_millis(self.presence_recount_ms)
    }

    /// Between readiness turning 503 and connections being told to reconnect.
    pub fn drain_delay(&self) -> Duration {
        Duration::from_millis(self.drain_delay_ms)
    }

    /// How long a socket write may make no progress before the connection is closed.
    pub fn write_stall_timeout(&self) -> Duration {
        Duration::from_millis(self.write_stall_timeout_ms)
    }

    /// What open connections get to close after SIGTERM.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }
}

/// The shortest HS256 secret accepted in production: RFC 7518 §3.2 asks for a key at least
/// as long as the hash output (256 bits).
pub const MIN_HS256_SECRET_BYTES: usize = 32;

/// Secrets shipped in this repository's local and dev set-ups: public, so anyone could
/// sign tokens with them.
const KNOWN_DEV_SECRETS: &[&str] = &["dev-secret-change-me", "dev-only-not-a-secret"];

/// Why an HS256 secret is unfit for production, if it is.
fn secret_weakness(secret: &str) -> Option<&'static str> {
    if KNOWN_DEV_SECRETS.contains(&secret) {
        Some("a published development placeholder")
    } else if secret.len() < MIN_HS256_SECRET_BYTES {
        Some("shorter than 32 bytes")
    } else {
        None
    }
}

fn at_least(setting: &'static str, value: u64, min: u64) -> Result<(), ConfigError> {
    if value < min {
        return Err(ConfigError::TooSmall { setting, min });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRONG: &str = "0123456789abcdef0123456789abcdef";

    fn parse(args: &[&str]) -> Config {
        Config::parse_from(std::iter::once("chat-gateway").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_are_hs256_in_production_with_text_logs_and_40_startup_attempts() {
        let config = parse(&["--jwt-secret", STRONG]);
        assert_eq!(config.jwt_algorithm, JwtAlgorithm::Hs256);
        assert_eq!(config.environment, Environment::Production);
        assert_eq!(config.telemetry.log_format, chat_common::telemetry::LogFormat::Text);
        assert_eq!(config.backend.startup_attempts, 40);
        assert_eq!(config.backend.startup_retry_ms, 500);
        assert_eq!(config.backend.redis_channel_prefix, "chat");
        assert!(!config.allow_insecure_production);
    }

    #[test]
    fn production_needs_origins_issuer_and_audience_unless_told_otherwise() {
        let message = |args: &[&str]| parse(args).validate().map_err(|e| e.to_string());
        let refused = message(&["--jwt-secret", STRONG]).unwrap_err();
        assert!(refused.starts_with("ALLOWED_ORIGINS, JWT_ISSUER, JWT_AUDIENCE not set; refused with"), "{refused}");
        let issuer_only = ["--jwt-secret", STRONG, "--allowed-origins", "https://a.example", "--jwt-issuer", "auth"];
        assert!(message(&issuer_only).unwrap_err().starts_with("JWT_AUDIENCE not set;"));
        let hardened = [&issuer_only[..], &["--jwt-audience", "chat"]].concat();
        assert_eq!(message(&hardened), Ok(()));
        let every_origin = [&hardened[..], &["--allowed-origins", "*"]].concat();
        assert!(message(&every_origin).unwrap_err().starts_with("ALLOWED_ORIGINS=* lets every web page"));
        assert_eq!(message(&["--jwt-secret", STRONG, "--allow-insecure-production", "true"]), Ok(()));
        assert_eq!(message(&["--jwt-secret", STRONG, "--environment", "development"]), Ok(()));
    }

    #[test]
    fn the_algorithm_and_environment_keep_their_spellings() {
        let config = parse(&["--jwt-algorithm", "ES256", "--environment", "development", "--log-format", "json"]);
        assert_eq!(config.jwt_algorithm, JwtAlgorithm::Es256);
        assert_eq!(config.environment, Environment::Development);
        assert_eq!(config.telemetry.log_format, chat_common::telemetry::LogFormat::Json);
        assert!(Config::try_parse_from(["chat-gateway", "--jwt-algorithm", "hs256"]).is_err());
        assert!(Config::try_parse_from(["chat-gateway", "--environment", "staging"]).is_err());
    }

    #[test]
    fn refusals_name_the_setting() {
        let message = |args: &[&str]| parse(args).validate().map_err(|e| e.to_string()).unwrap_err();
        assert_eq!(message(&[]), "JWT_SECRET must be set (and not empty) for HS256 tokens");
        assert_eq!(message(&["--jwt-algorithm", "RS256"]), "JWT_PUBLIC_KEY_FILE must be set for RS256 tokens");
        assert_eq!(
            message(&["--jwt-secret", STRONG, "--dev-tokens"]),
            "DEV_TOKENS is refused with ENVIRONMENT=production (the default): anyone could sign in as anyone. Set \
             ENVIRONMENT=development for a local cluster"
        );
        assert_eq!(message(&["--jwt-secret", STRONG, "--heartbeat-ms", "99"]), "HEARTBEAT_MS must be at least 100");
        assert_eq!(
            message(&["--jwt-secret", STRONG, "--message-tls-ca", "ca.crt"]),
            "MESSAGE_TLS_CERT, MESSAGE_TLS_KEY and MESSAGE_TLS_CA go together: set all three (mTLS) or none"
        );
        assert_eq!(
            message(&["--jwt-secret", STRONG, "--rate-abuse-after-secs", "0"]),
            "RATE_ABUSE_AFTER_SECS must be at least 1"
        );
        assert_eq!(
            message(&["--jwt-secret", STRONG, "--write-stall-timeout-ms", "99"]),
            "WRITE_STALL_TIMEOUT_MS must be at least 100"
        );
        assert_eq!(
            message(&["--jwt-secret", STRONG, "--presence-recount-ms", "99"]),
            "PRESENCE_RECOUNT_MS must be at least 100"
        );
        assert_eq!(
            message(&["--jwt-secret", STRONG, "--presence-max-online", "0"]),
            "PRESENCE_MAX_ONLINE must be at least 1"
        );
        assert_eq!(
            message(&["--jwt-secret", STRONG, "--redis-channel-prefix", "a{b}"]),
            "REDIS_CHANNEL_PREFIX must be non-empty and contain no braces"
        );
    }

    #[test]
    fn production_refuses_a_short_or_published_hs256_secret() {
        let message = |args: &[&str]| parse(args).validate().map_err(|e| e.to_string());
        let short = "s".repeat(MIN_HS256_SECRET_BYTES - 1);
        for weak in ["dev-secret-change-me", "dev-only-not-a-secret", short.as_str()] {
            let refused = message(&["--jwt-secret", weak]).unwrap_err();
            assert!(refused.starts_with("JWT_SECRET is ") && refused.contains("ENVIRONMENT=production"), "{refused}");
            assert!(message(&["--jwt-secret", weak, "--environment", "development"]).is_ok(), "{weak}");
        }
        let strong = "s".repeat(MIN_HS256_SECRET_BYTES);
        assert!(message(&["--jwt-secret", &strong, "--allow-insecure-production", "true"]).is_ok());
    }

    #[test]
    fn debug_output_does_not_show_the_jwt_secret() {
        let config = parse(&["--jwt-secret", "hunter2-very-secret"]);
        let debug = format!("{config:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(debug.contains("jwt_secret"), "{debug}");
    }
}
