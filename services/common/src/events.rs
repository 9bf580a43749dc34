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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chat_proto::v1::Typing;
    use fred::interfaces::EventInterface;

    use super::*;
    use crate::redis::RedisConfig;

    fn redis() -> RedisConfig {
        let url = std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
        RedisConfig { url, cluster: false }
    }

    fn typing(room_id: &str) -> Event {
        Event::Typing(Typing { room_id: room_id.to_owned(), user_id: "alice".to_owned(), active: true })
    }

    #[tokio::test]
    async fn a_room_event_arrives_stamped_on_the_rooms_channel() {
        let redis = redis();
        // A prefix of its own, so parallel runs sharing the Redis don't hear each other.
        let channels = Channels::new(&format!("test-events-{}", std::process::id()));
        let subscriber = redis.builder(Duration::from_secs(2), 8).unwrap().build_subscriber_client().unwrap();
        subscriber.init().await.expect("redis reachable");
        let mut heard = subscriber.message_rx();
        redis.subscriber(subscriber.clone()).subscribe(&channels.room("7")).await.unwrap();
        let client = redis.builder(Duration::from_secs(2), 8).unwrap().build().unwrap();
        client.init().await.unwrap();
        let failures = Counter::default();
        let bus = EventBus::new(redis.publisher(client), channels.clone(), failures.clone());

        bus.room("7", typing("7")).await.expect("published");

        let message = tokio::time::timeout(Duration::from_secs(5), heard.recv()).await.expect("heard").unwrap();
        assert_eq!(&*message.channel, channels.room("7"));
        let envelope = Envelope::decode(message.value.as_bytes().expect("binary payload")).unwrap();
        assert_eq!(envelope.event, Some(typing("7")));
        assert!(envelope.published_at_us > 0, "stamped");
        assert_eq!(failures.get(), 0);
        bus.quit().await;
        let _ = subscriber.quit().await;
    }

    #[tokio::test]
    async fn a_failed_publish_is_counted_and_names_its_channel() {
        // Nothing listens on port 1, and the command timeout is short.
        let unreachable = RedisConfig { url: "redis://127.0.0.1:1".to_owned(), cluster: false };
        let client = unreachable.builder(Duration::from_millis(200), 8).unwrap().build().unwrap();
        let failures = Counter::default();
        let bus = EventBus::new(unreachable.publisher(client), Channels::new("chat"), failures.clone());

        let err = bus.user("bob", typing("7")).await.unwrap_err();

        assert!(err.to_string().starts_with("publish on chat:user:{bob} failed"), "{err}");
        assert_eq!(failures.get(), 1);
    }
}
