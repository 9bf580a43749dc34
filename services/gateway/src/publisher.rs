//! Publishes events that the gateway itself originates — typing, presence, admin pushes
//! and disconnects — on Redis, for every gateway to hear.

use chat_common::channels::Channels;
use chat_common::redis::PubSub;
use chat_proto::v1::{envelope::Event, Envelope};
use fred::prelude::Client;
use prost::Message as _;

use crate::error::{CommandError, ErrorCode};

/// Handle to a publishing Redis connection; cheap to clone.
#[derive(Clone)]
pub struct Publisher {
    bus: PubSub<Client>,
    channels: Channels,
    /// Counts failed publishes.
    errors: prometheus_client::metrics::counter::Counter,
}

impl Publisher {
    /// A publisher over a connected client.
    pub fn new(bus: PubSub<Client>, channels: Channels, errors: prometheus_client::metrics::counter::Counter) -> Self {
        Self { bus, channels, errors }
    }

    /// Publishes on a room's channel.
    pub async fn room(&self, room_id: &str, event: Event) -> Result<(), CommandError> {
        self.publish(self.channels.room(room_id), event).await
    }

    /// Publishes on a user's channel (every connection of that user).
    pub async fn user(&self, user_id: &str, event: Event) -> Result<(), CommandError> {
        self.publish(self.channels.user(user_id), event).await
    }

    /// Publishes to every connection on every gateway.
    pub async fn everyone(&self, event: Event) -> Result<(), CommandError> {
        self.publish(self.channels.broadcast().to_owned(), event).await
    }

    async fn publish(&self, channel: String, event: Event) -> Result<(), CommandError> {
        let published =
            self.bus.publish_traced(&channel, |trace| Envelope::stamped(event).traced(trace).encode_to_vec()).await;
        published.map_err(|err| {
            tracing::warn!(%err, %channel, "publish failed");
            self.errors.inc();
            CommandError::new(ErrorCode::Unavailable, "event bus unavailable; retry")
        })
    }
}
