//! One way to reach Redis for both services: a single server or a Redis Cluster, and
//! pub/sub that matches it (sharded `SPUBLISH`/`SSUBSCRIBE` on a cluster, so each
//! channel's traffic stays on the shard owning its hash slot instead of being
//! broadcast to every node).

use std::collections::HashMap;
use std::time::Duration;

use fred::clients::{Client, SubscriberClient};
use fred::interfaces::{ClientLike, EventInterface, PubsubInterface};
use fred::prelude::{Builder, Config, ReconnectPolicy};
use tracing::Instrument;

/// Where Redis is and how to use it; flattened into both services' `Config`.
#[derive(Debug, Clone, clap::Args)]
pub struct RedisConfig {
    /// Redis URL: `redis://host:port` (with `REDIS_CLUSTER`, any one node of the cluster).
    #[arg(long = "redis-url", env = "REDIS_URL", default_value = "redis://127.0.0.1:6379", hide_env_values = true)]
    pub url: String,

    /// `true` for a Redis Cluster: nodes are discovered from the URL's node, and pub/sub
    /// is sharded. Every service of a deployment must agree.
    #[arg(long = "redis-cluster", env = "REDIS_CLUSTER", default_value_t = false, action = clap::ArgAction::Set)]
    pub cluster: bool,
}

impl RedisConfig {
    /// Rejects a URL that is not a Redis URL.
    pub fn validate(&self) -> Result<(), crate::config::ConfigError> {
        if !self.url.starts_with("redis://") && !self.url.starts_with("rediss://") {
            return Err(crate::config::ConfigError::RedisUrl);
        }
        Ok(())
    }

    /// A builder that reconnects forever with capped exponential backoff and fails
    /// commands after `command_timeout` instead of queueing them while Redis is down.
    ///
    /// `broadcast_capacity` sizes the pub/sub message buffer of subscriber clients: a
    /// consumer that falls further behind than that loses messages (and must repair them).
    pub fn builder(&self, command_timeout: Duration, broadcast_capacity: usize) -> Result<Builder, fred::error::Error> {
        let config = if self.cluster { Config::from_url_clustered(&self.url)? } else { Config::from_url(&self.url)? };
        let mut builder = Builder::from_config(config);
        builder
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
            .with_connection_config(|c| {
                c.connection_timeout = Duration::from_secs(2);
                c.internal_command_timeout = Duration::from_secs(2);
            })
            .with_performance_config(|p| {
                p.default_command_timeout = command_timeout;
                p.broadcast_channel_capacity = broadcast_capacity;
            });
        Ok(builder)
    }

    /// A publishing handle over `client`.
    pub fn publisher(&self, client: Client) -> PubSub<Client> {
        PubSub { client, sharded: self.cluster }
    }

    /// A subscribing handle over `client`.
    pub fn subscriber(&self, client: SubscriberClient) -> PubSub<SubscriberClient> {
        PubSub { client, sharded: self.cluster }
    }
}

/// A Redis client with the pub/sub flavour of its deployment; cheap to clone.
#[derive(Clone)]
pub struct PubSub<C> {
    client: C,
    sharded: bool,
}

impl<C: PubsubInterface + ClientLike + EventInterface> PubSub<C> {
    /// The underlying client, for everything that is not pub/sub.
    pub fn client(&self) -> &C {
        &self.client
    }

    /// Publishes `payload` on `channel`.
    pub async fn publish(&self, channel: &str, payload: Vec<u8>) -> Result<(), fred::error::Error> {
        if self.sharded {
            self.client.spublish::<i64, _, _>(channel, payload).await.map(drop)
        } else {
            self.client.publish::<i64, _, _>(channel, payload).await.map(drop)
        }
    }

    /// Publishes on `channel` inside a `redis.publish` span; `payload` gets that span's
    /// W3C trace context to carry inside the message, so subscribers continue the trace.
    pub async fn publish_traced(
        &self,
        channel: &str,
        payload: impl FnOnce(HashMap<String, String>) -> Vec<u8>,
    ) -> Result<(), fred::error::Error> {
        let span = crate::telemetry::publish_span(channel);
        let bytes = payload(crate::propagation::to_map(&span));
        self.publish(channel, bytes).instrument(span).await
    }

    /// Subscribes to `channel`.
    pub async fn subscribe(&self, channel: &str) -> Result<(), fred::error::Error> {
        if self.sharded {
            self.client.ssubscribe(channel).await
        } else {
            self.client.subscribe(channel).await
        }
    }

    /// Unsubscribes from `channel`.
    pub async fn unsubscribe(&self, channel: &str) -> Result<(), fred::error::Error> {
        if self.sharded {
            self.client.sunsubscribe(channel).await
        } else {
            self.client.unsubscribe(channel).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str, cluster: bool) -> RedisConfig {
        RedisConfig { url: url.to_owned(), cluster }
    }

    #[test]
    fn rediss_urls_get_tls_and_cluster_mode_is_the_switch() {
        assert!(config("redis://127.0.0.1:6379", false).builder(Duration::from_secs(1), 8).is_ok());
        let tls = Config::from_url("rediss://redis.example:6380").unwrap();
        assert!(tls.tls.is_some(), "rediss:// must connect over TLS");
        assert!(config("redis://127.0.0.1:7000", true).builder(Duration::from_secs(1), 8).is_ok());
        assert!(config("http://x", false).validate().is_err());
    }
}
