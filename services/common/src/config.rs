//! Flags both services take the same way: where Redis is, the channel prefix they must
//! agree on, and how long to keep trying the backends at start.

use std::time::Duration;

use fred::clients::Client;
use fred::interfaces::ClientLike;

use crate::channels::Channels;
use crate::redis::RedisConfig;
use crate::startup::{Retry, Unreachable};

/// Redis, the channel prefix and the start-up retries; flattened into both services'
/// `Config`. The gateway raises the `STARTUP_ATTEMPTS` default (it waits for the
/// message service, which waits for Postgres).
#[derive(Debug, Clone, clap::Args)]
pub struct BackendFlags {
    /// Redis (single server or cluster).
    #[command(flatten)]
    pub redis: RedisConfig,

    /// Prefix of every Redis channel name; the gateways and the message service must use
    /// the same one.
    #[arg(long, env = "REDIS_CHANNEL_PREFIX", default_value = "chat")]
    pub redis_channel_prefix: String,

    /// Attempts to reach each backend at start before giving up.
    #[arg(long, env = "STARTUP_ATTEMPTS", default_value_t = 20)]
    pub startup_attempts: u32,

    /// Milliseconds between those attempts.
    #[arg(long, env = "STARTUP_RETRY_MS", default_value_t = 500)]
    pub startup_retry_ms: u64,
}

/// A shared setting that parses but cannot work; the message names the setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("REDIS_URL must be a redis:// URL")]
    RedisUrl,
    #[error("REDIS_CHANNEL_PREFIX must be non-empty and contain no braces")]
    ChannelPrefix,
    #[error("OTEL_EXPORTER_OTLP_ENDPOINT must be an http:// or https:// URL, not {0:?}")]
    OtlpEndpoint(String),
}

/// Redis could not be reached at start.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid Redis configuration: {0}")]
    Config(#[from] fred::error::Error),
    #[error(transparent)]
    Unreachable(#[from] Unreachable),
}

impl BackendFlags {
    /// Rejects a Redis URL or channel prefix that cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.redis.validate()?;
        // Braces would break the Redis Cluster hash tags of the channel names.
        if self.redis_channel_prefix.is_empty() || self.redis_channel_prefix.contains(['{', '}']) {
            return Err(ConfigError::ChannelPrefix);
        }
        Ok(())
    }

    /// The channel names under the configured prefix.
    pub fn channels(&self) -> Channels {
        Channels::new(&self.redis_channel_prefix)
    }

    /// The start-up retry policy.
    pub fn startup_retry(&self) -> Retry {
        Retry { attempts: self.startup_attempts, delay: Duration::from_millis(self.startup_retry_ms) }
    }

    /// A Redis client for commands and publishing, connected with the start-up retries;
    /// later disconnects are retried forever in the background. Commands fail after
    /// `command_timeout` rather than queue while Redis is down.
    pub async fn connect_redis(&self, command_timeout: Duration) -> Result<Client, ConnectError> {
        let client = self.redis.builder(command_timeout, 32)?.build()?;
        self.startup_retry().run("Redis", || client.init()).await?;
        Ok(client)
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        backend: BackendFlags,
    }

    fn parse(args: &[&str]) -> BackendFlags {
        Flags::parse_from(std::iter::once("test").chain(args.iter().copied())).backend
    }

    #[test]
    fn defaults_reach_a_local_redis_under_the_chat_prefix() {
        let flags = parse(&[]);
        assert_eq!(flags.redis.url, "redis://127.0.0.1:6379");
        assert!(!flags.redis.cluster);
        assert_eq!(flags.channels(), Channels::new("chat"));
        assert_eq!(flags.startup_retry().delay, Duration::from_millis(500));
        assert_eq!(flags.validate(), Ok(()));
    }

    #[test]
    fn a_prefix_with_braces_or_none_at_all_is_refused() {
        for prefix in ["", "a{b", "c}"] {
            assert_eq!(parse(&["--redis-channel-prefix", prefix]).validate(), Err(ConfigError::ChannelPrefix));
        }
        assert_eq!(parse(&["--redis-url", "http://x"]).validate(), Err(ConfigError::RedisUrl));
    }
}
