//! Redis pub/sub channel names.
//!
//! Every name starts with a configurable prefix so that several clusters (or test runs)
//! can share one Redis without hearing each other. The id sits inside `{}`: a Redis
//! Cluster hash tag, so sharded pub/sub keeps each room (or user) on one shard.

/// Builds channel names under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channels {
    room_prefix: String,
    user_prefix: String,
    broadcast: String,
}

/// The key of a user's presence: a hash of gateway id → that gateway's connection
/// count, present while the user has a connection anywhere (gateways keep it; the
/// message service reads it to tell who was offline).
pub fn presence_key(prefix: &str, user: &str) -> String {
    format!("{prefix}:presence:{{{user}}}")
}

impl Channels {
    /// Channels under `prefix`, e.g. `chat` gives `chat:room:{42}`.
    pub fn new(prefix: &str) -> Self {
        Self {
            room_prefix: format!("{prefix}:room:{{"),
            user_prefix: format!("{prefix}:user:{{"),
            broadcast: format!("{prefix}:broadcast"),
        }
    }

    /// The channel carrying a room's events.
    pub fn room(&self, room_id: &str) -> String {
        format!("{}{room_id}}}", self.room_prefix)
    }

    /// The channel carrying events addressed to every connection of one user.
    pub fn user(&self, user_id: &str) -> String {
        format!("{}{user_id}}}", self.user_prefix)
    }

    /// The channel every gateway hears: events for every connection (admin pushes to all).
    pub fn broadcast(&self) -> &str {
        &self.broadcast
    }

    /// The room id of a room channel name, or `None` for any other channel.
    pub fn room_of<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel.strip_prefix(&self.room_prefix)?.strip_suffix('}')
    }

    /// The user id of a user channel name, or `None` for any other channel.
    pub fn user_of<'a>(&self, channel: &'a str) -> Option<&'a str> {
        channel.strip_prefix(&self.user_prefix)?.strip_suffix('}')
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn room_and_user_channels_round_trip() {
        let c = Channels::new("chat");
        assert_eq!(c.room("42"), "chat:room:{42}");
        assert_eq!(c.user("alice"), "chat:user:{alice}");
        assert_eq!(c.room_of("chat:room:{42}"), Some("42"));
        assert_eq!(c.user_of("chat:user:{alice}"), Some("alice"));
    }

    #[test]
    fn channels_of_another_prefix_or_kind_are_not_recognised() {
        let c = Channels::new("chat");
        assert_eq!(c.room_of("other:room:{42}"), None);
        assert_eq!(c.room_of("chat:user:{42}"), None);
        assert_eq!(c.user_of("chat:room:{alice}"), None);
    }
}
