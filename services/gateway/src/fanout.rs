//! Room fan-out: one Redis subscription per room that has local listeners, and delivery
//! of each event to every local connection that joined the room.
//!
//! An event is turned into its JSON frame once per gateway; each connection's queue
//! gets a cheap clone of the same bytes.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::ws::{Message as WsMessage, Utf8Bytes};
use chat_common::channels::Channels;
use chat_common::startup::Retry;
use chat_proto::v1::{envelope::Event, Envelope};
use fred::clients::SubscriberClient;
use fred::prelude::{ClientLike, EventInterface, PubsubInterface};
use fred::types::Message as RedisMessage;
use prost::Message as _;
use tokio_util::sync::CancellationToken;

use crate::error::{CommandError, ErrorCode};
use crate::outbox::Outbox;
use crate::protocol;

/// Events buffered between Redis and the dispatcher before the oldest are dropped
/// (and later repaired from Postgres).
const REDIS_BUFFER: usize = 16 * 1024;

type Listeners = HashMap<u64, Outbox>;

/// Handle to this gateway's room subscriptions; cheap to clone.
#[derive(Clone)]
pub struct Fanout {
    inner: Arc<Inner>,
}

struct Inner {
    subscriber: SubscriberClient,
    channels: Channels,
    /// Room id → local connections that joined it. Read on every event, written on
    /// join/leave; never held across an await.
    rooms: RwLock<HashMap<String, Listeners>>,
    /// Serialises subscribe/unsubscribe so a join never returns before its room's
    /// subscription is live, and a leave never unsubscribes under a concurrent join.
    transitions: tokio::sync::Mutex<()>,
}

impl Fanout {
    /// Connects the subscriber, with bounded retries. After that, fred reconnects on its
    /// own and `manage_subscriptions` restores every room subscription.
    pub async fn connect(url: &str, channels: Channels, retry: Retry) -> anyhow::Result<Self> {
        let subscriber =
            chat_common::redis::builder(url, Duration::from_secs(2), REDIS_BUFFER)?.build_subscriber_client()?;
        retry.run("Redis", || subscriber.init()).await?;
        let _resubscribe = subscriber.manage_subscriptions();
        Ok(Self {
            inner: Arc::new(Inner {
                subscriber,
                channels,
                rooms: RwLock::new(HashMap::new()),
                transitions: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// True while the Redis subscriber connection is up.
    pub fn is_connected(&self) -> bool {
        self.inner.subscriber.is_connected()
    }

    /// Delivers `outbox`'s connection every later event of `room`. Subscribes the
    /// gateway to the room first if this is its first local listener.
    pub async fn join(&self, room: &str, outbox: &Outbox) -> Result<(), CommandError> {
        let _guard = self.inner.transitions.lock().await;
        let subscribed = self.read_rooms().contains_key(room);
        if !subscribed {
            let channel = self.inner.channels.room(room);
            self.inner.subscriber.subscribe(channel).await.map_err(|err| {
                tracing::warn!(%err, room, "redis subscribe failed");
                CommandError::new(ErrorCode::Unavailable, "event bus unavailable; retry")
            })?;
        }
        self.write_rooms().entry(room.to_owned()).or_default().insert(outbox.id(), outbox.clone());
        Ok(())
    }

    /// Stops delivering `room` to connection `conn`; unsubscribes the gateway when it
    /// was the room's last local listener.
    pub async fn leave(&self, room: &str, conn: u64) {
        let _guard = self.inner.transitions.lock().await;
        let now_empty = {
            let mut rooms = self.write_rooms();
            match rooms.get_mut(room) {
                Some(listeners) => {
                    listeners.remove(&conn);
                    let empty = listeners.is_empty();
                    if empty {
                        rooms.remove(room);
                    }
                    empty
                }
                None => false,
            }
        };
        if now_empty {
            if let Err(err) = self.inner.subscriber.unsubscribe(self.inner.channels.room(room)).await {
                // Harmless: events for a room nobody listens to are dropped on arrival.
                tracing::warn!(%err, room, "redis unsubscribe failed");
            }
        }
    }

    /// Number of rooms this gateway is subscribed to.
    pub fn room_count(&self) -> usize {
        self.read_rooms().len()
    }

    /// Reads events from Redis and delivers them until `shutdown`.
    pub async fn run_dispatcher(self, shutdown: CancellationToken) {
        let mut rx = self.inner.subscriber.message_rx();
        loop {
            let msg = tokio::select! {
                msg = rx.recv() => msg,
                _ = shutdown.cancelled() => break,
            };
            match msg {
                Ok(msg) => self.dispatch(msg),
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(dropped = n, "fan-out fell behind Redis; events dropped");
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            }
        }
        if let Err(err) = self.inner.subscriber.quit().await {
            tracing::debug!(%err, "redis quit");
        }
    }

    fn dispatch(&self, msg: RedisMessage) {
        let Some(room) = self.inner.channels.room_of(&msg.channel) else {
            return;
        };
        let Some(payload) = msg.value.as_bytes() else {
            tracing::warn!(channel = %msg.channel, "non-binary payload on a room channel");
            return;
        };
        let envelope = match Envelope::decode(payload) {
            Ok(envelope) => envelope,
            Err(err) => {
                tracing::warn!(%err, channel = %msg.channel, "undecodable envelope");
                return;
            }
        };
        let frame = match envelope.event {
            Some(Event::MessageCreated(created)) => match created.message {
                Some(message) => protocol::message_event(&message),
                None => return,
            },
            _ => return,
        };
        self.deliver(room, Utf8Bytes::from(frame));
    }

    fn deliver(&self, room: &str, frame: Utf8Bytes) {
        let rooms = self.read_rooms();
        if let Some(listeners) = rooms.get(room) {
            for outbox in listeners.values() {
                outbox.push_event(WsMessage::Text(frame.clone()));
            }
        }
    }

    fn read_rooms(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Listeners>> {
        // A panic while holding the lock cannot leave the map half-updated (each write
        // is a single insert/remove), so a poisoned lock is still safe to use.
        self.inner.rooms.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_rooms(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Listeners>> {
        self.inner.rooms.write().unwrap_or_else(|e| e.into_inner())
    }
}
