//! Publishes stored events to Redis, where every gateway holding a member's socket hears them.

use std::time::Duration;

use chat_common::channels::Channels;
use chat_common::startup::Retry;
use chat_proto::v1::{envelope::Event, Envelope, Message, MessageCreated};
use fred::prelude::{Client, ClientLike, PubsubInterface};
use prost::Message as _;

/// Handle to the publishing Redis connection; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    client: Client,
    channels: Channels,
}

/// Publishing failed. The event is already stored, so gateways recover it from Postgres
/// (gap repair); the caller logs this and carries on.
#[derive(Debug, thiserror::Error)]
#[error("publish to {channel} failed: {source}")]
pub struct PublishError {
    channel: String,
    #[source]
    source: fred::error::Error,
}

impl Publisher {
    /// Connects with bounded retries; later disconnects are retried forever in the background.
    pub async fn connect(url: &str, channels: Channels, retry: Retry) -> anyhow::Result<Self> {
        // Publishing is on the send path: a Redis outage must fail fast, not stall sends.
        let client = chat_common::redis::builder(url, Duration::from_secs(1), 32)?.build()?;
        retry.run("Redis", || client.init()).await?;
        Ok(Self { client, channels })
    }

    /// True while the Redis connection is up.
    pub fn is_connected(&self) -> bool {
        self.client.is_connected()
    }

    /// Publishes a stored message on its room's channel.
    pub async fn message_created(&self, message: &Message) -> Result<(), PublishError> {
        let channel = self.channels.room(&message.room_id);
        let envelope = Envelope {
            trace_context: Default::default(),
            event: Some(Event::MessageCreated(MessageCreated { message: Some(message.clone()) })),
        };
        self.publish(channel, envelope).await
    }

    async fn publish(&self, channel: String, envelope: Envelope) -> Result<(), PublishError> {
        let payload = envelope.encode_to_vec();
        match self.client.publish::<i64, _, _>(channel.as_str(), payload).await {
            Ok(_receivers) => Ok(()),
            Err(source) => Err(PublishError { channel, source }),
        }
    }

    /// Closes the connection after pending commands are written.
    pub async fn quit(&self) {
        if let Err(err) = self.client.quit().await {
            tracing::debug!(%err, "redis quit");
        }
    }
}
