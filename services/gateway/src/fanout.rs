//! Redis fan-out: subscribes this gateway to the channels of the rooms and users it
//! has local connections for, and routes each event to its room task or to the
//! user's local connections.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::ws::{Message as WsMessage, Utf8Bytes};
use chat_common::channels::Channels;
use chat_common::redis::PubSub;
use chat_proto::v1::{envelope::Event, Envelope};
use fred::clients::SubscriberClient;
use fred::prelude::{ClientLike, EventInterface};
use fred::types::Message as RedisMessage;
use prost::Message as _;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::Backend;
use crate::config::Config;
use crate::error::{CommandError, ErrorCode};
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::protocol::{server, Close, Policy};
use crate::room::{delivery_span, Joined, Listener, RoomHandle, RoomLog};
use crate::stripes::Stripes;
use crate::StartupError;

/// Events buffered between Redis and the dispatcher before the oldest are dropped
/// (and message events later repaired from Postgres).
const REDIS_BUFFER: usize = 16 * 1024;

/// Lock stripes for (un)subscribing channels.
const TRANSITION_STRIPES: usize = 256;

/// Delay of the second resync after a Redis reconnect.
const RESYNC_AGAIN_AFTER: Duration = Duration::from_secs(2);

/// Handle to this gateway's subscriptions; cheap to clone.
#[derive(Clone)]
pub struct Fanout {
    inner: Arc<Inner>,
}

struct Inner {
    subscriber: PubSub<SubscriberClient>,
    channels: Channels,
    backend: Backend,
    metrics: Metrics,
    /// Room id → its task. Read per event; never held across an await.
    rooms: RwLock<HashMap<String, RoomHandle>>,
    /// User id → that user's local connections, for per-user events.
    users: RwLock<HashMap<String, HashMap<u64, Outbox>>>,
    /// Serialises subscribe/unsubscribe per channel (striped), so a join never returns
    /// before its room's subscription is live and a leave never unsubscribes under a
    /// concurrent join, while different channels' (un)subscribes go out together: when a
    /// gateway dies, thousands of users arrive at once, each needing its user channel.
    transitions: Stripes,
    /// The gateway's background tasks: room tasks, and the resyncs and leaves the
    /// dispatcher starts; shutdown waits for them.
    tasks: TaskTracker,
}

impl Fanout {
    fn unavailable(&self, err: fred::error::Error) -> CommandError {
        self.inner.metrics.redis_errors.inc();
        unavailable(err)
    }
}

fn unavailable(err: fred::error::Error) -> CommandError {
    tracing::warn!(%err, "redis subscription change failed");
    CommandError::new(ErrorCode::Unavailable, "event bus unavailable; retry")
}

impl Fanout {
    /// Connects the subscriber, with bounded retries. After that, fred reconnects on its
    /// own and `manage_subscriptions` restores every subscription.
    pub async fn connect(
        config: &Config,
        backend: Backend,
        metrics: Metrics,
        tasks: TaskTracker,
    ) -> Result<Self, StartupError> {
        let (redis, channels) = (&config.backend.redis, config.backend.channels());
        let client = redis.builder(Duration::from_secs(2), REDIS_BUFFER)?.build_subscriber_client()?;
        config.backend.startup_retry().run("Redis", || client.init()).await?;
        let _resubscribe = client.manage_subscriptions();
        let subscriber = redis.subscriber(client);
        subscriber.subscribe(channels.broadcast()).await?;
        Ok(Self {
            inner: Arc::new(Inner {
                subscriber,
                channels,
                backend,
                metrics,
                rooms: RwLock::new(HashMap::new()),
                users: RwLock::new(HashMap::new()),
                transitions: Stripes::new(TRANSITION_STRIPES),
                tasks,
            }),
        })
    }

    /// True while the Redis subscriber connection is up.
    pub fn is_connected(&self) -> bool {
        self.inner.subscriber.client().is_connected()
    }

    /// Starts delivering `room` to `listener`, after replaying what it missed since
    /// `since` (if given). Subscribes the gateway to the room first if needed.
    pub async fn join(&self, room: &str, listener: Listener, since: Option<i64>) -> Result<Joined, CommandError> {
        loop {
            let hub = self.room_hub(room).await?;
            match hub.join(listener.clone(), since).await {
                Ok(joined) => return joined,
                // The task stopped between lookup and join (its last listener left): start anew.
                Err(_gone) => continue,
            }
        }
    }

    async fn room_hub(&self, room: &str) -> Result<RoomHandle, CommandError> {
        if let Some(hub) = read(&self.inner.rooms).get(room) {
            return Ok(hub.clone());
        }
        let channel = self.inner.channels.room(room);
        let _guard = self.inner.transitions.lock(&channel).await;
        if let Some(hub) = read(&self.inner.rooms).get(room) {
            return Ok(hub.clone());
        }
        self.inner.subscriber.subscribe(&channel).await.map_err(|e| self.unavailable(e))?;
        // Read the room's position only once the subscription is live: every later
        // message then arrives on the channel, every earlier one is in Postgres.
        let last_seq = match self.inner.backend.last_seq(room.to_owned()).await {
            Ok(seq) => seq,
            Err(err) => {
                let _ = self.inner.subscriber.unsubscribe(&channel).await;
                return Err(err);
            }
        };
        let (backend, metrics) = (self.inner.backend.clone(), self.inner.metrics.clone());
        let hub = RoomHandle::spawn(room.to_owned(), last_seq, backend, metrics, &self.inner.tasks);
        write(&self.inner.rooms).insert(room.to_owned(), hub.clone());
        Ok(hub)
    }

    /// Stops delivering `room` to connection `conn`; the last local listener's leave
    /// stops the room task and unsubscribes the gateway.
    pub async fn leave(&self, room: &str, conn: u64) {
        let Some(hub) = read(&self.inner.rooms).get(room).cloned() else { return };
        if hub.leave(conn).await > 0 {
            return;
        }
        let channel = self.inner.channels.room(room);
        let _guard = self.inner.transitions.lock(&channel).await;
        let current = read(&self.inner.rooms).get(room).cloned();
        if let Some(current) = current.filter(|c| c.same(&hub)) {
            if current.stop_if_empty().await {
                write(&self.inner.rooms).remove(room);
                if let Err(err) = self.inner.subscriber.unsubscribe(&channel).await {
                    // Harmless: events for a room without a task are dropped on arrival.
                    tracing::warn!(%err, room, "redis unsubscribe failed");
                }
            }
        }
    }

    /// Registers a connection of `user` for per-user events (subscribing the user's
    /// channel for their first local connection).
    pub async fn add_user_conn(&self, user: &str, outbox: &Outbox) -> Result<(), CommandError> {
        let channel = self.inner.channels.user(user);
        let _guard = self.inner.transitions.lock(&channel).await;
        if !read(&self.inner.users).contains_key(user) {
            self.inner.subscriber.subscribe(&channel).await.map_err(|e| self.unavailable(e))?;
        }
        write(&self.inner.users).entry(user.to_owned()).or_default().insert(outbox.id(), outbox.clone());
        Ok(())
    }

    /// Unregisters a connection of `user`; the last one unsubscribes the user's channel.
    pub async fn remove_user_conn(&self, user: &str, conn: u64) {
        let channel = self.inner.channels.user(user);
        let _guard = self.inner.transitions.lock(&channel).await;
        let now_empty = {
            let mut users = write(&self.inner.users);
            let empty = users.get_mut(user).map(|conns| {
                conns.remove(&conn);
                conns.is_empty()
            });
            if empty == Some(true) {
                users.remove(user);
            }
            empty == Some(true)
        };
        if now_empty {
            if let Err(err) = self.inner.subscriber.unsubscribe(&channel).await {
                tracing::warn!(%err, user, "redis unsubscribe failed");
            }
        }
    }

    /// Number of this gateway's local connections of `user`.
    pub fn local_connections(&self, user: &str) -> usize {
        read(&self.inner.users).get(user).map_or(0, HashMap::len)
    }

    /// Reads events from Redis and routes them until `shutdown`. After a Redis
    /// reconnect every room catches up from Postgres, since events published while
    /// the connection was down are lost. Work it starts runs on the gateway's tracker.
    pub async fn run_dispatcher(self, shutdown: CancellationToken) {
        let tasks = &self.inner.tasks;
        let mut rx = self.inner.subscriber.client().message_rx();
        let mut reconnects = self.inner.subscriber.client().reconnect_rx();
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Ok(msg) => self.dispatch(msg),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(dropped = n, "fan-out fell behind Redis; resyncing rooms");
                        self.resync_rooms();
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
                reconnect = reconnects.recv() => {
                    if reconnect.is_ok() {
                        tracing::info!("redis reconnected; resyncing rooms");
                        self.resync_rooms();
                        // Subscriptions are restored asynchronously after the reconnect; a
                        // second pass covers messages published before they were live.
                        let fanout = self.clone();
                        tasks.spawn(async move {
                            tokio::time::sleep(RESYNC_AGAIN_AFTER).await;
                            fanout.resync_rooms();
                        });
                    }
                }
                _ = shutdown.cancelled() => break,
            }
        }
        if let Err(err) = self.inner.subscriber.client().quit().await {
            tracing::debug!(%err, "redis quit");
        }
    }

    fn resync_rooms(&self) {
        for hub in read(&self.inner.rooms).values() {
            hub.resync();
        }
    }

    fn dispatch(&self, msg: RedisMessage) {
        let Some(payload) = msg.value.as_bytes() else {
            tracing::warn!(channel = %msg.channel, "non-binary payload");
            return;
        };
        let envelope = match Envelope::decode(payload) {
            Ok(envelope) if envelope.event.is_some() => envelope,
            Ok(_) => return,
            Err(err) => {
                tracing::warn!(%err, channel = %msg.channel, "undecodable envelope");
                return;
            }
        };
        if let Some(room) = self.inner.channels.room_of(&msg.channel) {
            if let Some(hub) = read(&self.inner.rooms).get(room) {
                hub.event(envelope);
            }
            return;
        }
        let Envelope { trace_context, event: Some(event), .. } = envelope else { return };
        if let Some(user) = self.inner.channels.user_of(&msg.channel) {
            let _span = delivery_span(&trace_context, None, self.local_connections(user)).entered();
            self.deliver_to_user(user, event);
        } else if msg.channel == self.inner.channels.broadcast() {
            let _span = delivery_span(&trace_context, None, 0).entered();
            self.deliver_to_everyone(event);
        }
    }

    fn deliver_to_everyone(&self, event: Event) {
        let Some(frame) = server::event_frame(&event) else { return };
        let frame = Utf8Bytes::from(frame);
        for conns in read(&self.inner.users).values() {
            for outbox in conns.values() {
                outbox.push_event(WsMessage::Text(frame.clone()));
            }
        }
    }

    fn deliver_to_user(&self, user: &str, event: Event) {
        let conns: Vec<Outbox> =
            read(&self.inner.users).get(user).map(|c| c.values().cloned().collect()).unwrap_or_default();
        if let Event::Disconnect(_) = event {
            for outbox in &conns {
                outbox.close(Close::Policy(Policy::AdminDisconnect));
            }
            return;
        }
        let Some(frame) = server::event_frame(&event) else { return };
        let frame = Utf8Bytes::from(frame);
        for outbox in &conns {
            outbox.push_event(WsMessage::Text(frame.clone()));
        }
        if let Event::RoomRemoved(removed) = event {
            // The removed user's connections stop hearing the room at once.
            let fanout = self.clone();
            self.inner.tasks.spawn(async move {
                for outbox in conns {
                    fanout.leave(&removed.room_id, outbox.id()).await;
                }
            });
        }
    }
}

// A panic while holding one of these locks cannot leave a map half-updated (each write
// is a single insert or remove), so a poisoned lock is still safe to use.
fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(|e| e.into_inner())
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(|e| e.into_inner())
}
