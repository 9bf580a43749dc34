//! Redis fan-out: subscribes this gateway to the channels of the rooms and users it
//! has local connections for, and routes each event to its room task or to the
//! user's local connections. It also keeps removals binding: a removed user's
//! connections stop listening at once, a join racing a removal refuses, and after a
//! Redis outage (when `room_removed` events may have been lost) every joined room's
//! local listeners have their membership checked again.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use axum::extract::ws::{Message as WsMessage, Utf8Bytes};
use chat_common::channels::Channels;
use chat_common::redis::PubSub;
use chat_proto::v1::{self as pb, envelope::Event, Envelope};
use fred::clients::SubscriberClient;
use fred::prelude::{ClientLike, EventInterface};
use fred::types::Message as RedisMessage;
use futures_util::StreamExt;
use prost::Message as _;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::backend::Backend;
use crate::config::Config;
use crate::error::{CommandError, ErrorCode};
use crate::listening::{Abandoned, Listening};
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

/// Membership checks in flight at once after a Redis outage: one per (room, user) with a
/// local listener, so a gateway with many rooms spreads them instead of a burst of RPCs.
const MEMBERSHIP_CHECKS_IN_FLIGHT: usize = 8;

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
    /// Which rooms each local connection has joined or is joining.
    listening: Listening,
    /// Wakes the membership re-check (after a Redis reconnect, or events lost to lag).
    /// A `Notify` keeps one pending wake-up, so outages during a check coalesce into one more.
    recheck: Notify,
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

fn removed_while_joining() -> CommandError {
    CommandError::new(ErrorCode::Forbidden, "removed from the room while joining")
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
                listening: Listening::default(),
                recheck: Notify::new(),
                transitions: Stripes::new(TRANSITION_STRIPES),
                tasks,
            }),
        })
    }

    /// True while the Redis subscriber connection is up.
    pub fn is_connected(&self) -> bool {
        self.inner.subscriber.client().is_connected()
    }

    /// Joins `listener`'s connection to `room` once `admit` (the membership check) says
    /// it may, then delivers the room to it, after replaying what it missed since `since`
    /// (if given). Subscribes the gateway to the room first if needed.
    ///
    /// The join is marked before `admit` runs, so a removal that lands while the check
    /// is in flight, or before the listener is registered, makes it refuse (`forbidden`)
    /// rather than leave the removed user listening. The user's channel is subscribed
    /// (`add_user_conn`) for the whole connection, so that removal is always heard here
    /// (or, when Redis loses it, made up by the membership re-check). One instant stays
    /// open: a removal landing while the room task registers the listener stops it right
    /// after, and a room event dispatched within that instant may still reach it.
    pub async fn join<T>(
        &self,
        room: &str,
        listener: Listener,
        caller: pb::Caller,
        since: Option<i64>,
        admit: impl Future<Output = Result<T, CommandError>>,
    ) -> Result<(Joined, T), CommandError> {
        let conn = listener.outbox.id();
        let listening = &self.inner.listening;
        let ticket = listening.begin(conn, room, caller);
        let admitted = match admit.await {
            Ok(admitted) if listening.still_joining(&ticket) => admitted,
            Ok(_) => return Err(removed_while_joining()),
            Err(err) => {
                let still_member = !matches!(err.code, ErrorCode::Forbidden | ErrorCode::NotFound);
                if listening.abandon(ticket, still_member) == Abandoned::StopListening {
                    self.unlisten(room, conn).await;
                }
                return Err(err);
            }
        };
        let joined = match self.listen(room, listener, since).await {
            Ok(joined) => joined,
            Err(err) => {
                if listening.abandon(ticket, true) == Abandoned::StopListening {
                    self.unlisten(room, conn).await;
                }
                return Err(err);
            }
        };
        if !listening.settle(&ticket) {
            // The removal came while the listener was being registered: its eviction may
            // have run before the registration, so stop it here.
            self.unlisten(room, conn).await;
            return Err(removed_while_joining());
        }
        Ok((joined, admitted))
    }

    /// True when connection `conn` has joined `room` (and no removal has evicted it).
    pub fn is_joined(&self, conn: u64, room: &str) -> bool {
        self.inner.listening.is_joined(conn, room)
    }

    /// How many rooms connection `conn` has joined (or is joining).
    pub fn joined_count(&self, conn: u64) -> usize {
        self.inner.listening.count(conn)
    }

    /// Stops delivering every room to connection `conn`; called once when it closes.
    pub async fn leave_all(&self, conn: u64) {
        for room in self.inner.listening.remove_conn(conn) {
            self.unlisten(&room, conn).await;
        }
    }

    /// Registers `listener` with the room's task (starting it if needed).
    async fn listen(&self, room: &str, listener: Listener, since: Option<i64>) -> Result<Joined, CommandError> {
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

    /// Stops delivering `room` to connection `conn`; false when it had not joined it.
    pub async fn leave(&self, room: &str, conn: u64) -> bool {
        let joined = self.inner.listening.leave(conn, room);
        if joined {
            self.unlisten(room, conn).await;
        }
        joined
    }

    /// Removes `conn`'s listener from the room's task; the last local listener's leave
    /// stops the room task and unsubscribes the gateway.
    async fn unlisten(&self, room: &str, conn: u64) {
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
        tasks.spawn(self.clone().run_membership_checks(shutdown.clone()));
        let mut rx = self.inner.subscriber.client().message_rx();
        let mut reconnects = self.inner.subscriber.client().reconnect_rx();
        loop {
            tokio::select! {
                msg = rx.recv() => match msg {
                    Ok(msg) => self.dispatch(msg),
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(dropped = n, "fan-out fell behind Redis; resyncing rooms");
                        self.resync_rooms();
                        // A dropped `room_removed` is as lost as one published during an outage.
                        self.inner.recheck.notify_one();
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
                            // `room_removed` events published while Redis was down, or before
                            // the users' channels were subscribed again, are lost: ask the
                            // message service, once those subscriptions are back.
                            fanout.inner.recheck.notify_one();
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

    /// Re-checks memberships each time `recheck` is notified, until `shutdown`.
    async fn run_membership_checks(self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                () = self.inner.recheck.notified() => {}
                () = shutdown.cancelled() => return,
            }
            tokio::select! {
                () = self.check_memberships() => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Asks the message service whether each user with a joined local connection may
    /// still read that room, and evicts those who may not, with `room_removed`, as if
    /// the lost event had arrived. A check that fails (backend down) keeps the listener:
    /// the next outage's check, or the user's next join, decides.
    async fn check_memberships(&self) {
        let pairs = self.inner.listening.joined_pairs();
        tracing::info!(checks = pairs.len(), "re-checking local listeners' room memberships");
        futures_util::stream::iter(pairs)
            .for_each_concurrent(MEMBERSHIP_CHECKS_IN_FLIGHT, |(room, caller)| async move {
                let user = caller.user_id.clone();
                match self.inner.backend.join_room(caller, room.clone()).await {
                    Ok(_) => {}
                    Err(err) if matches!(err.code, ErrorCode::Forbidden | ErrorCode::NotFound) => {
                        tracing::info!(%user, %room, "membership gone while Redis was away; evicting");
                        let removed = Event::RoomRemoved(pb::RoomRemoved { user_id: user.clone(), room_id: room });
                        self.deliver_to_user(&user, removed);
                    }
                    Err(err) => tracing::warn!(%user, %room, %err, "membership re-check failed; keeping the listener"),
                }
            })
            .await;
    }

    /// Tells `user`'s local connections they left `room` (`frame`, a `room_removed`)
    /// and stops those listening to it. A listening connection is told by the room's
    /// task, behind every event of the room already handed to it: it reads the room's
    /// last events, then the notice, then nothing more of the room, even while the
    /// removal races new messages.
    fn evict(&self, user: &str, room: &str, conns: &[Outbox], frame: &Utf8Bytes) {
        let ids: Vec<u64> = conns.iter().map(Outbox::id).collect();
        let evicted = self.inner.listening.strike(&ids, room);
        // No room task: a join in flight, whose mark is struck and which will refuse.
        let hub = if evicted.is_empty() { None } else { read(&self.inner.rooms).get(room).cloned() };
        for outbox in conns {
            let told_by_room = hub.as_ref().is_some_and(|hub| {
                evicted.contains(&outbox.id()) && hub.evict(outbox.id(), outbox, WsMessage::Text(frame.clone()))
            });
            if !told_by_room {
                if evicted.contains(&outbox.id()) && hub.is_some() {
                    tracing::warn!(%user, %room, conn = outbox.id(), "room queue full; the eviction waits its turn");
                }
                outbox.push_event(WsMessage::Text(frame.clone()));
            }
        }
        if evicted.is_empty() {
            return;
        }
        let fanout = self.clone();
        let room = room.to_owned();
        // Stops the room task (and unsubscribes) when nobody is left, and retries an
        // eviction the full queue refused.
        self.inner.tasks.spawn(async move {
            for conn in evicted {
                fanout.unlisten(&room, conn).await;
            }
        });
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
        if let Event::RoomRemoved(removed) = event {
            // The removed user's connections stop hearing the room at once, joins in
            // flight included.
            self.evict(user, &removed.room_id, &conns, &frame);
            return;
        }
        for outbox in &conns {
            outbox.push_event(WsMessage::Text(frame.clone()));
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
