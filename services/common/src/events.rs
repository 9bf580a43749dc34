//! The event bus: envelopes published on Redis for every gateway to hear, by the message
//! service (stored changes) and by the gateways themselves (typing, presence, admin pushes).

use chat_proto::v1::envelope::Event;
use chat_proto::v1::{Envelope, Message, MessageCreated};
use fred::clients::Client;
use fred::interfaces::ClientLike;
use prometheus_client::metrics::counter::Counter;
use prost::Message as _;

use crate::channels::Channels;
use crate::redis::PubSub;

/// A publish that did not reach Redis. Callers decide what it means: a gateway command
/// fails and is retried, a stored change is repaired from Postgres later.
#[derive(Debug, thiserror::Error)]
#[error("publish on {channel} failed: {source}")]
pub struct PublishError {
    channel: String,
    source: fred::error::Error,
}

/// Handle to a publishing Redis connection; cheap to clone.
#[derive(Clone)]
pub struct EventBus {
    bus: PubSub<Client>,
    channels: Channels,
    /// Counts failed publishes, in the owning service's metrics.
    failures: Counter,
}

impl EventBus {
    /// A bus over a connected client; `failures` counts the publishes that fail.
    pub fn new(bus: PubSub<Client>, channels: Channels, failures: Counter) -> Self {
        Self { bus, channels, failures }
    }

    /// Publishes on a room's channel.
    pub async fn room(&self, room_id: &str, event: Event) -> Result<(), PublishError> {
        self.publish(self.channels.room(room_id), event).await
    }

    /// Publishes on a user's channel (every connection of that user).
    pub async fn user(&self, user_id: &str, event: Event) -> Result<(), PublishError> {
        self.publish(self.channels.user(user_id), event).await
    }

    /// Publishes to every connection on every gateway.
    pub async fn everyone(&self, event: Event) -> Result<(), PublishError> {
        self.publish(self.channels.broadcast().to_owned(), event).await
    }

    /// Publishes a stored message on its room's channel.
    pub async fn message_created(&self, message: &Message) -> Result<(), PublishError> {
        let event = Event::MessageCreated(MessageCreated { message: Some(message.clone()) });
        self.room(&message.room_id, event).await
    }

    /// True while the Redis connection is up.
    pub fn is_connected(&self) -> bool {
        self.bus.client().is_connected()
    }

    /// Closes the connection after pending commands are written.
    pub async fn quit(&self) {
        if let Err(err) = self.bus.client().quit().await {
            tracing::debug!(%err, "redis quit");
        }
    }

    async fn publish(&self, channel: String, event: Event) -> Result<(), PublishError> {
        // Gateways continue the trace from here: their delivery spans are children of the publish.
        let published =
            self.bus.publish_traced(&channel, |trace| Envelope::stamped(event).traced(trace).encode_to_vec()).await;
        published.map_err(|source| {
            self.failures.inc();
            PublishError { channel, source }
        })
    }
}
