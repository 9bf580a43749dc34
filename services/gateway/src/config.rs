//! The gateway's configuration: flags or environment variables, read once.

use std::net::SocketAddr;
use std::time::Duration;

use chat_common::startup::Retry;
use clap::Parser;

/// Configuration of a gateway. Every flag can also be set through the environment
/// variable named beside it.
#[derive(Clone, Parser)]
#[command(name = "chat-gateway", version, about = "Chat WebSocket gateway")]
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

    /// Redis (single server or cluster).
    #[command(flatten)]
    pub redis: chat_common::redis::RedisConfig,

    /// Prefix of every Redis channel name; the message service must use the same one.
    #[arg(long, env = "REDIS_CHANNEL_PREFIX", default_value = "chat")]
    pub redis_channel_prefix: String,

    /// Signature algorithm of client tokens, pinned: `HS256`, `RS256` or `ES256`.
    #[arg(long, env = "JWT_ALGORITHM", default_value = "HS256", value_parser = ["HS256", "RS256", "ES256"])]
    pub jwt_algorithm: String,

    /// HS256 key that signs client tokens (required with HS256).
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,

    /// PEM file with the public key that verifies RS256/ES256 tokens.
    #[arg(long, env = "JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<std::path::PathBuf>,

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

    /// Frames queued for one connection before it counts as too slow and is disconnected.
    #[arg(long, env = "OUTBOUND_QUEUE", default_value_t = 1024)]
    pub outbound_queue: usize,

    /// Deadline of each gRPC call to the message service, in milliseconds.
    #[arg(long, env = "GRPC_TIMEOUT_MS", default_value_t = 5_000)]
    pub grpc_timeout_ms: u64,

    /// Attempts to reach the message service and Redis at start before giving up.
    #[arg(long, env = "STARTUP_ATTEMPTS", default_value_t = 40)]
    pub startup_attempts: u32,

    /// Milliseconds between those attempts.
    #[arg(long, env = "STARTUP_RETRY_MS", default_value_t = 500)]
    pub startup_retry_ms: u64,

    /// Seconds that open connections get to close after SIGTERM.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 20)]
    pub shutdown_grace_secs: u64,

    /// `production` refuses development conveniences (`DEV_TOKENS`); `make run` sets
    /// `development`.
    #[arg(long, env = "ENVIRONMENT", default_value = "production", value_parser = ["development", "production"])]
    pub environment: String,

    /// Serve `POST /v1/dev/token`, which signs a token for any user name it is given, so
    /// the browser client can sign in by name. Development only: refused in production.
    #[arg(long, env = "DEV_TOKENS")]
    pub dev_tokens: bool,

    /// Log format and trace export.
    #[command(flatten)]
    pub telemetry: chat_common::telemetry::TelemetryConfig,
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("message_service_url", &self.message_service_url)
            .field("redis", &self.redis)
            .field("jwt_secret", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl Config {
    /// The message service's URLs, parsed.
    pub fn message_targets(&self) -> Result<crate::discovery::Targets, String> {
        crate::discovery::Targets::parse(&self.message_service_url)
    }

    /// Rejects values that parse but cannot work, with a message naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        self.telemetry.validate()?;
        match self.jwt_algorithm.as_str() {
            "HS256" if self.jwt_secret.as_deref().unwrap_or_default().is_empty() => {
                return Err("JWT_SECRET must be set (and not empty) for HS256 tokens".into());
            }
            "RS256" | "ES256" if self.jwt_public_key_file.is_none() => {
                return Err(format!("JWT_PUBLIC_KEY_FILE must be set for {} tokens", self.jwt_algorithm));
            }
            _ => {}
        }
        if self.dev_tokens {
            if self.environment == "production" {
                return Err("DEV_TOKENS is refused with ENVIRONMENT=production (the default): anyone could sign in \
                            as anyone. Set ENVIRONMENT=development for a local cluster"
                    .into());
            }
            if self.jwt_algorithm != "HS256" {
                return Err("DEV_TOKENS needs JWT_ALGORITHM=HS256: the gateway signs dev tokens with JWT_SECRET".into());
            }
        }
        self.message_targets().map_err(|e| format!("MESSAGE_SERVICE_URL: {e}"))?;
        if self.message_service_dns_refresh_ms < 100 {
            return Err("MESSAGE_SERVICE_DNS_REFRESH_MS must be at least 100".into());
        }
        self.redis.validate()?;
        if self.redis_channel_prefix.is_empty() || self.redis_channel_prefix.contains(['{', '}']) {
            return Err("REDIS_CHANNEL_PREFIX must be non-empty and contain no braces".into());
        }
        if self.heartbeat_ms < 100 {
            return Err("HEARTBEAT_MS must be at least 100".into());
        }
        if self.outbound_queue < 8 {
            return Err("OUTBOUND_QUEUE must be at least 8".into());
        }
        if self.presence_stale_ms < 600 {
            return Err("PRESENCE_STALE_MS must be at least 600".into());
        }
        if self.max_header_bytes < 1024 {
            return Err("MAX_HEADER_BYTES must be at least 1024".into());
        }
        if self.max_frame_bytes < 1024 {
            return Err("MAX_FRAME_BYTES must be at least 1024".into());
        }
        Ok(())
    }

    /// The token verification key, read from its file for RS256/ES256.
    pub fn jwt_keys(&self) -> Result<crate::auth::KeyConfig, String> {
        use crate::auth::KeyConfig;
        let pem = || {
            let path = self.jwt_public_key_file.as_ref().ok_or("JWT_PUBLIC_KEY_FILE is not set")?;
            std::fs::read(path).map_err(|e| format!("cannot read JWT_PUBLIC_KEY_FILE {}: {e}", path.display()))
        };
        Ok(match self.jwt_algorithm.as_str() {
            "RS256" => KeyConfig::Rs256 { public_pem: pem()? },
            "ES256" => KeyConfig::Es256 { public_pem: pem()? },
            _ => KeyConfig::Hs256 { secret: self.jwt_secret.clone().unwrap_or_default().into_bytes() },
        })
    }

    /// The start-up retry policy.
    pub fn startup_retry(&self) -> Retry {
        Retry { attempts: self.startup_attempts, delay: Duration::from_millis(self.startup_retry_ms) }
    }

    /// The heartbeat interval.
    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_ms)
    }
}
