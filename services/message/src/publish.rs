//! Publishes stored events to Redis, where every gateway holding a member's socket hears them.

use std::time::Duration;

use chat_common::channels::Channels;
use chat_common::redis::{PubSub, RedisConfig};
use chat_common::startup::Retry;
use chat_proto::v1::{envelope::Event, Envelope, Message, MessageCreated};
use fred::prelude::{Client, ClientLike};
use prost::Message as _;

/// Handle to the publishing Redis connection; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    bus: PubSub<Client>,
    channels: Channels,
    /// Counts failed publishes.
    errors: prometheus_client::metrics::counter::Counter,
}

impl Publisher {
    /// Connects with bounded retries; later disconnects are retried forever in the background.
    pub async fn connect(redis: &RedisConfig, channels: Channels, retry: Retry) -> anyhow::Result<Self> {
        // Publishing is on the send path: a Redis outage must fail fast, not stall sends.
        let client = redis.builder(Duration::from_secs(1), 32)?.build()?;
        retry.run("Redis", || client.init()).await?;
        Ok(Self { bus: redis.publisher(client), channels, errors: Default::default() })
    }

    /// The same publisher, counting its failures in `metrics`.
    pub fn with_metrics(self, metrics: crate::metrics::Metrics) -> Self {
        Self { errors: metrics.redis_errors, ..self }
    }

    /// True while the Redis connection is up.
    pub fn is_connected(&self) -> bool {
        self.bus.client().is_connected()
    }

    /// Publishes an event on a room's channel. Failures are logged, not returned: the
    /// change is already stored, and gateways repair lost messages from Postgres.
    pub async fn room_event(&self, room_id: &str, event: Event) {
        self.publish(self.channels.room(room_id), event).await
    }

    /// Publishes an event on a user's channel (every connection of that user).
    pub async fn user_event(&self, user_id: &str, event: Event) {
        self.publish(self.channels.user(user_id), event).await
    }

    /// Publishes a stored message on its room's channel.
    pub async fn message_created(&self, message: &Message) {
        let event = Event::MessageCreated(MessageCreated { message: Some(message.clone()) });
        self.room_event(&message.room_id, event).await
    }

    async fn publish(&self, channel: String, event: Event) {
        // Gateways continue the trace from here: their delivery spans are children of the publish.
        let published =
            self.bus.publish_traced(&channel, |trace| Envelope::stamped(event).traced(trace).encode_to_vec()).await;
        if let Err(err) = published {
            tracing::warn!(%err, %channel, "event stored but not published");
            self.errors.inc();
        }
    }

    /// Closes the connection after pending commands are written.
    pub async fn quit(&self) {
        if let Err(err) = self.bus.client().quit().await {
            tracing::debug!(%err, "redis quit");
        }
    }
}
