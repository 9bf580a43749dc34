//! The message service's configuration: flags or environment variables, read once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use secrecy::{ExposeSecret, SecretString};

/// Configuration of the message service. Every flag can also be set through the
/// environment variable named beside it. `Debug` shows no password: the database URL is
/// a secret.
#[derive(Debug, Clone, Parser)]
#[command(name = "chat-message", version, about = "Chat message service (gRPC)")]
#[command(mut_arg("startup_attempts", |a| a.help("Attempts to reach Postgres and Redis at start before giving up")))]
pub struct Config {
    /// Without a command, the service runs.
    #[command(subcommand)]
    pub command: Option<Command>,

    /// Address the gRPC server listens on.
    #[arg(long, env = "MESSAGE_ADDR", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Address of the Prometheus `/metrics` endpoint.
    #[arg(long, env = "METRICS_ADDR", default_value = "127.0.0.1:9091")]
    pub metrics_addr: SocketAddr,

    /// Postgres connection URL. The database is created if it does not exist.
    #[arg(long, env = "DATABASE_URL", default_value = "postgres://localhost/chat", hide_env_values = true)]
    pub database_url: SecretString,

    /// Create the database named in DATABASE_URL when it is missing.
    #[arg(long, env = "CREATE_DATABASE", default_value_t = true, action = clap::ArgAction::Set)]
    pub create_database: bool,

    /// Apply the migrations at start. Off where a `chat-message migrate` Job with a DDL
    /// role migrates: the service then waits for the schema its release needs (newer is
    /// fine) and needs only a role that reads and writes rows.
    #[arg(long, env = "MIGRATE_ON_START", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate_on_start: bool,

    /// Maximum Postgres connections in the pool.
    #[arg(long, env = "DB_MAX_CONNECTIONS", default_value_t = 20)]
    pub db_max_connections: u32,

    /// Group-commit workers. Each stores everything queued for its rooms in one
    /// transaction at a time, so fewer workers make bigger batches and less Postgres work
    /// per message; more overlap more commits (worth it when fsync, not CPU, is the
    /// limit). Two doubled sends/s over ten on 2 cores (docs/benchmarks.md).
    #[arg(long, env = "COMMIT_WORKERS", default_value_t = 2)]
    pub commit_workers: u32,

    /// Longest message text, in characters.
    #[arg(long, env = "MAX_TEXT_CHARS", default_value_t = crate::validate::MAX_TEXT_CHARS)]
    pub max_text_chars: usize,

    /// Most members one room may have; adding more is refused with `conflict`. Bounds
    /// what a `join` or `presence` in the room costs.
    #[arg(long, env = "MAX_MEMBERS_PER_ROOM", default_value_t = 10_000)]
    pub max_members_per_room: u32,

    /// Most rooms one user may belong to; adding them to another is refused with
    /// `conflict`. Bounds a user's presence announcements and `rooms` page.
    #[arg(long, env = "MAX_ROOMS_PER_USER", default_value_t = 1_000)]
    pub max_rooms_per_user: u32,

    /// Redis, its channel prefix, and the start-up retries.
    #[command(flatten)]
    pub backend: chat_common::config::BackendFlags,

    /// Milliseconds between SIGTERM and refusing new calls, while the health service
    /// reports NOT_SERVING and calls are still served: time for gateways to move their
    /// calls to other replicas (they watch each replica's health, and re-resolve the
    /// Service every MESSAGE_SERVICE_DNS_REFRESH_MS). 0 refuses at once.
    #[arg(long, env = "DRAIN_DELAY_MS", default_value_t = 0)]
    pub drain_delay_ms: u64,

    /// PEM certificate chain of the gRPC port. With GRPC_TLS_KEY and GRPC_TLS_CLIENT_CA:
    /// mTLS, re-read when the files change.
    #[arg(long, env = "GRPC_TLS_CERT")]
    pub grpc_tls_cert: Option<PathBuf>,

    /// PEM private key of GRPC_TLS_CERT.
    #[arg(long, env = "GRPC_TLS_KEY")]
    pub grpc_tls_key: Option<PathBuf>,

    /// PEM CA bundle that callers' client certificates must chain to; a caller without
    /// one is refused at the handshake.
    #[arg(long, env = "GRPC_TLS_CLIENT_CA")]
    pub grpc_tls_client_ca: Option<PathBuf>,

    /// Where offline members' webhooks are POSTed (http:// or https://). Unset: none.
    #[arg(long, env = "WEBHOOK_URL")]
    pub webhook_url: Option<String>,

    /// `whsec_<base64>`: the Standard Webhooks secret the receiver verifies signatures with.
    #[arg(long, env = "WEBHOOK_SECRET", hide_env_values = true)]
    pub webhook_secret: Option<SecretString>,

    /// Seconds a webhook is retried (non-2xx, timeout, refused) before it is marked dead.
    #[arg(long, env = "WEBHOOK_RETRY_FOR_SECS", default_value_t = 86_400)]
    pub webhook_retry_for_secs: u64,

    /// Milliseconds before the first retry; each later one doubles it, with jitter, up to
    /// an hour.
    #[arg(long, env = "WEBHOOK_RETRY_BASE_MS", default_value_t = 1_000)]
    pub webhook_retry_base_ms: u64,

    /// Milliseconds one attempt may take, connection included.
    #[arg(long, env = "WEBHOOK_TIMEOUT_MS", default_value_t = 10_000)]
    pub webhook_timeout_ms: u64,

    /// Milliseconds between two looks at the outbox and the due webhooks.
    #[arg(long, env = "WEBHOOK_POLL_MS", default_value_t = 250)]
    pub webhook_poll_ms: u64,

    /// Seconds that in-flight RPCs get to finish after SIGTERM.
    #[arg(long, env = "SHUTDOWN_GRACE_SECS", default_value_t = 20)]
    pub shutdown_grace_secs: u64,

    /// Log format and trace export.
    #[command(flatten)]
    pub telemetry: chat_common::telemetry::TelemetryConfig,

    /// Bytes one user may upload per ATTACHMENT_QUOTA_WINDOW_SECS, finished or not, sent
    /// or not (0: no quota). Past it uploads get `rate_limited` until old ones age out.
    #[arg(long, env = "ATTACHMENT_QUOTA_BYTES", default_value_t = 1024 * 1024 * 1024)]
    pub attachment_quota_bytes: u64,

    /// The rolling window of the upload quota, in seconds.
    #[arg(long, env = "ATTACHMENT_QUOTA_WINDOW_SECS", default_value_t = 86_400)]
    pub attachment_quota_window_secs: u64,

    /// Seconds after which an upload that no message carries is deleted (by a collector
    /// that runs at half this interval, at most every 5 minutes).
    #[arg(long, env = "ATTACHMENT_UNATTACHED_TTL_SECS", default_value_t = 86_400)]
    pub attachment_unattached_ttl_secs: u64,

    /// Attachment downloads one replica streams at once; more wait up to 2 s, then get
    /// `unavailable`.
    #[arg(long, env = "ATTACHMENT_STREAMS", default_value_t = crate::grpc::DEFAULT_STREAMS)]
    pub attachment_streams: usize,
}

/// What the binary does instead of serving.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Apply the migrations to DATABASE_URL (a role that may change the schema), grant
    /// DB_APP_ROLE the rights to read and write rows, and exit.
    Migrate {
        /// The role the service connects as: granted SELECT, INSERT, UPDATE and DELETE on
        /// every table and EXECUTE on every function, nothing else.
        #[arg(long, env = "DB_APP_ROLE")]
        grant_to: Option<String>,
    },
}

/// A setting that parses but cannot work; the message names the setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error(transparent)]
    Shared(#[from] chat_common::config::ConfigError),
    #[error("DATABASE_URL must be a postgres:// URL")]
    DatabaseUrl,
    #[error("{0} must be at least 1")]
    Zero(&'static str),
    #[error("MAX_MEMBERS_PER_ROOM must be at least 2 (a direct room has two)")]
    MembersPerRoom,
    #[error("COMMIT_WORKERS must be between 1 and DB_MAX_CONNECTIONS (each holds a connection)")]
    CommitWorkers,
    #[error("DB_APP_ROLE must be a role name of 1 to 63 bytes")]
    AppRole,
    #[error(transparent)]
    PartialTls(#[from] chat_common::tls::PartialTls),
    #[error("WEBHOOK_URL must be an http:// or https:// URL")]
    WebhookUrl,
    #[error("WEBHOOK_SECRET must be set with WEBHOOK_URL: receivers verify every webhook's signature")]
    NoWebhookSecret,
    #[error(transparent)]
    WebhookSecret(#[from] crate::webhooks::SecretError),
}

impl Config {
    /// Rejects values that parse but cannot work, with a message naming the setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.telemetry.validate()?;
        let url = self.database_url.expose_secret();
        if !url.starts_with("postgres://") && !url.starts_with("postgresql://") {
            return Err(ConfigError::DatabaseUrl);
        }
        self.backend.validate()?;
        if self.max_text_chars == 0 {
            return Err(ConfigError::Zero("MAX_TEXT_CHARS"));
        }
        if self.max_members_per_room < 2 {
            return Err(ConfigError::MembersPerRoom);
        }
        if self.max_rooms_per_user == 0 {
            return Err(ConfigError::Zero("MAX_ROOMS_PER_USER"));
        }
        if self.db_max_connections == 0 {
            return Err(ConfigError::Zero("DB_MAX_CONNECTIONS"));
        }
        if self.commit_workers == 0 || self.commit_workers > self.db_max_connections {
            return Err(ConfigError::CommitWorkers);
        }
        if self.attachment_quota_window_secs == 0 {
            return Err(ConfigError::Zero("ATTACHMENT_QUOTA_WINDOW_SECS"));
        }
        if self.attachment_unattached_ttl_secs == 0 {
            return Err(ConfigError::Zero("ATTACHMENT_UNATTACHED_TTL_SECS"));
        }
        if self.attachment_streams == 0 {
            return Err(ConfigError::Zero("ATTACHMENT_STREAMS"));
        }
        self.tls_files()?;
        self.webhooks()?;
        if let Some(Command::Migrate { grant_to: Some(role) }) = &self.command {
            if role.is_empty() || role.len() > 63 {
                return Err(ConfigError::AppRole);
            }
        }
        Ok(())
    }

    /// `DATABASE_URL` with a user name filled in when it has none. Without one the
    /// driver asks the OS, which in containers and minimal shells (no `USER`) yields a
    /// role that does not exist; libpq's habit is the login name, and failing that the
    /// conventional `postgres` superuser.
    pub fn database_url(&self) -> SecretString {
        let url = self.database_url.expose_secret();
        let Some((scheme, rest)) = url.split_once("://") else { return self.database_url.clone() };
        let authority = rest.split(['/', '?']).next().unwrap_or_default();
        if authority.contains('@') {
            return self.database_url.clone();
        }
        let user = ["PGUSER", "USER", "LOGNAME"]
            .iter()
            .filter_map(|v| std::env::var(v).ok())
            .find(|v| !v.is_empty())
            .unwrap_or_else(|| "postgres".to_owned());
        format!("{scheme}://{user}@{rest}").into()
    }

    /// The membership caps.
    pub fn membership_limits(&self) -> crate::store::MembershipLimits {
        crate::store::MembershipLimits {
            members_per_room: self.max_members_per_room,
            rooms_per_user: self.max_rooms_per_user,
        }
    }

    /// The gRPC port's certificate, key and client CA, when it runs mTLS.
    pub fn server_tls(&self) -> Option<chat_common::tls::TlsFiles> {
        self.tls_files().ok().flatten()
    }

    fn tls_files(&self) -> Result<Option<chat_common::tls::TlsFiles>, chat_common::tls::PartialTls> {
        chat_common::tls::TlsFiles::from_settings(
            ("GRPC_TLS_CERT", &self.grpc_tls_cert),
            ("GRPC_TLS_KEY", &self.grpc_tls_key),
            ("GRPC_TLS_CLIENT_CA", &self.grpc_tls_client_ca),
        )
    }

    /// Where and how offline members' webhooks go, when `WEBHOOK_URL` is set.
    pub fn webhooks(&self) -> Result<Option<crate::webhooks::WebhookConfig>, ConfigError> {
        let Some(url) = &self.webhook_url else { return Ok(None) };
        let url = reqwest::Url::parse(url).map_err(|_| ConfigError::WebhookUrl)?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ConfigError::WebhookUrl);
        }
        let secret = self.webhook_secret.as_ref().ok_or(ConfigError::NoWebhookSecret)?;
        for (setting, value) in
            [("WEBHOOK_TIMEOUT_MS", self.webhook_timeout_ms), ("WEBHOOK_POLL_MS", self.webhook_poll_ms)]
        {
            if value == 0 {
                return Err(ConfigError::Zero(setting));
            }
        }
        Ok(Some(crate::webhooks::WebhookConfig {
            url,
            secret: crate::webhooks::Secret::parse(secret.expose_secret())?,
            retry_for: Duration::from_secs(self.webhook_retry_for_secs),
            retry_base: Duration::from_millis(self.webhook_retry_base_ms),
            timeout: Duration::from_millis(self.webhook_timeout_ms),
            poll: Duration::from_millis(self.webhook_poll_ms),
            prefix: self.backend.redis_channel_prefix.clone(),
        }))
    }

    /// What the service does with the schema at start.
    pub fn schema(&self) -> crate::store::Schema {
        if self.migrate_on_start {
            crate::store::Schema::Migrate
        } else {
            crate::store::Schema::Await
        }
    }

    /// How long the service reports NOT_SERVING before it refuses calls.
    pub fn drain_delay(&self) -> Duration {
        Duration::from_millis(self.drain_delay_ms)
    }

    /// The shutdown grace period.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    /// The upload quota and the downloads streamed at once.
    pub fn attachment_limits(&self) -> crate::attachments::AttachmentLimits {
        crate::attachments::AttachmentLimits::new(
            self.attachment_quota_bytes,
            Duration::from_secs(self.attachment_quota_window_secs),
            self.attachment_streams,
        )
    }

    /// How old an upload no message carries may get.
    pub fn unattached_ttl(&self) -> Duration {
        Duration::from_secs(self.attachment_unattached_ttl_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_url(url: &str) -> Config {
        Config::parse_from(["chat-message", "--database-url", url])
    }

    #[test]
    fn membership_caps_default_to_10000_members_and_1000_rooms_and_refuse_nonsense() {
        let c = with_url("postgres://localhost/chat");
        assert_eq!(c.membership_limits(), crate::store::MembershipLimits::default());
        assert_eq!((c.max_members_per_room, c.max_rooms_per_user), (10_000, 1_000));
        let one = Config::parse_from(["chat-message", "--max-members-per-room", "1"]);
        assert_eq!(one.validate(), Err(ConfigError::MembersPerRoom));
        let none = Config::parse_from(["chat-message", "--max-rooms-per-user", "0"]);
        assert_eq!(none.validate(), Err(ConfigError::Zero("MAX_ROOMS_PER_USER")));
    }

    #[test]
    fn a_database_url_with_a_user_is_kept() {
        let c = with_url("postgres://app:pw@db:5432/chat");
        assert_eq!(c.database_url().expose_secret(), "postgres://app:pw@db:5432/chat");
    }

    #[test]
    fn a_database_url_without_a_user_gets_one() {
        let url = with_url("postgres://localhost/chat").database_url();
        let (_, rest) = url.expose_secret().split_once("://").unwrap();
        let (user, host) = rest.split_once('@').expect("a user was filled in");
        assert!(!user.is_empty());
        assert_eq!(host, "localhost/chat");
    }

    #[test]
    fn debug_output_does_not_show_the_database_password() {
        let c = with_url("postgres://app:hunter2@db:5432/chat");
        for debug in [format!("{c:?}"), format!("{:?}", c.database_url())] {
            assert!(!debug.contains("hunter2"), "{debug}");
        }
    }

    #[test]
    fn help_never_prints_the_urls_credentials_from_the_environment() {
        let command = <Config as clap::CommandFactory>::command();
        for env in ["DATABASE_URL", "REDIS_URL"] {
            let arg = command.get_arguments().find(|a| a.get_env().is_some_and(|e| e == env));
            let arg = arg.unwrap_or_else(|| panic!("no argument reads {env}"));
            assert!(arg.is_hide_env_values_set(), "{env} shows its environment value in --help");
        }
    }

    #[test]
    fn defaults_and_refusals_are_unchanged() {
        let c = with_url("postgres://localhost/chat");
        assert_eq!(c.backend.startup_attempts, 20);
        assert_eq!(c.backend.redis_channel_prefix, "chat");
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(
            with_url("mysql://x").validate().map_err(|e| e.to_string()),
            Err("DATABASE_URL must be a postgres:// URL".into())
        );
        let workers = Config::parse_from(["chat-message", "--db-max-connections", "5", "--commit-workers", "6"]);
        assert_eq!(workers.validate(), Err(ConfigError::CommitWorkers));
        let half_tls = Config::parse_from(["chat-message", "--grpc-tls-cert", "c.pem", "--grpc-tls-key", "k.pem"]);
        assert_eq!(
            half_tls.validate().map_err(|e| e.to_string()),
            Err("GRPC_TLS_CERT, GRPC_TLS_KEY and GRPC_TLS_CLIENT_CA go together: set all three (mTLS) or none".into())
        );
    }
}
