//! One task per room with local listeners: it orders the room's messages by seq,
//! repairs gaps from the message service, replays backlogs on `join` with `since_seq`,
//! expires typing, and delivers every event to the room's local connections.
//!
//! Being the only writer of a room's deliveries is what makes "no gap, no duplicate"
//! simple: a join's backlog is queued, and the listener added, between two live events.

mod log;
mod recent;
mod task;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::Message as WsMessage;
use chat_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use crate::error::CommandError;
use crate::metrics::Metrics;
use crate::outbox::Outbox;

pub use self::log::RoomLog;
use self::task::RoomTask;

/// Typing without a refresh ends after this long.
pub const TYPING_TTL: Duration = Duration::from_secs(6);
/// Most backlog messages one `join` replays; beyond it the ack says `truncated`.
pub const MAX_BACKLOG: i64 = 1000;
/// Mail queued for one room before events are dropped (and later repaired).
const ROOM_QUEUE: usize = 4096;
/// Most message frames a room keeps for `since_seq` joins (see `Recent`).
const RECENT_FRAMES: usize = 256;
/// A room drops those frames once no join has used them for this long.
const RECENT_TTL: Duration = Duration::from_secs(30);

/// The span of one gateway's delivery of a fan-out event, a child of the publisher's span
/// (through the envelope's trace context); `Span::none()` for an untraced envelope.
pub fn delivery_span(trace_context: &HashMap<String, String>, room: Option<&str>, listeners: usize) -> tracing::Span {
    if trace_context.is_empty() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!("fanout.deliver", otel.kind = "consumer", room, listeners);
    chat_common::propagation::set_parent_from_map(&span, trace_context);
    span
}

/// A connection listening to a room.
#[derive(Clone)]
pub struct Listener {
    pub outbox: Outbox,
    pub user_id: Arc<str>,
}

/// What a join reports back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Joined {
    /// The newest seq the connection has been given (by backlog or earlier).
    pub last_seq: i64,
    /// More than `MAX_BACKLOG` messages were missed; only the newest were replayed.
    pub truncated: bool,
}

/// What a room task's mailbox carries: fan-out events and its handles' requests.
enum Mail {
    /// Boxed: envelopes are large and most mail is events; one allocation each.
    /// The dispatcher only forwards envelopes that carry an event.
    Event(Box<pb::Envelope>),
    Join {
        listener: Listener,
        since: Option<i64>,
        reply: oneshot::Sender<Result<Joined, CommandError>>,
    },
    Leave {
        conn: u64,
        /// Pushed to this outbox once the listener is gone (a `room_removed`), so the
        /// connection reads it after the room's last event for it and before nothing more.
        farewell: Option<(Outbox, WsMessage)>,
        reply: oneshot::Sender<usize>,
    },
    StopIfEmpty {
        reply: oneshot::Sender<bool>,
    },
    Resync,
}

/// The room task has stopped; the caller starts a new one.
#[derive(Debug)]
pub struct Gone;

/// Handle to a room task; cheap to clone.
#[derive(Clone)]
pub struct RoomHandle {
    tx: mpsc::Sender<Mail>,
}

impl RoomHandle {
    /// Starts the task for `room_id`, whose messages up to `last_seq` count as delivered,
    /// on `tracker`, so shutdown can wait for the room tasks.
    pub fn spawn(room_id: String, last_seq: i64, log: impl RoomLog, metrics: Metrics, tracker: &TaskTracker) -> Self {
        let (tx, rx) = mpsc::channel(ROOM_QUEUE);
        tracker.spawn(RoomTask::new(room_id, last_seq, log, metrics).run(rx));
        Self { tx }
    }

    /// True when both handles drive the same task.
    pub fn same(&self, other: &RoomHandle) -> bool {
        self.tx.same_channel(&other.tx)
    }

    /// Hands over an envelope from Redis without waiting. A full queue drops it: message
    /// events come back through gap repair; ephemeral ones are gone, as their kind allows.
    pub fn event(&self, envelope: pb::Envelope) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(Mail::Event(Box::new(envelope))) {
            tracing::warn!("room queue full; event dropped");
        }
    }

    /// Asks the task to catch up with the room's newest seq (after a Redis reconnect).
    pub fn resync(&self) {
        let _ = self.tx.try_send(Mail::Resync);
    }

    /// Adds a listener, first replaying what it missed after `since`.
    pub async fn join(&self, listener: Listener, since: Option<i64>) -> Result<Result<Joined, CommandError>, Gone> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Mail::Join { listener, since, reply }).await.map_err(|_| Gone)?;
        rx.await.map_err(|_| Gone)
    }

    /// Removes a listener; returns how many remain.
    pub async fn leave(&self, conn: u64) -> usize {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Mail::Leave { conn, farewell: None, reply }).await.is_err() {
            return 0;
        }
        rx.await.unwrap_or(0)
    }

    /// Removes a listener without waiting, behind the events already queued, then
    /// pushes `farewell` to `outbox`: the removal is ordered with the room's events, and
    /// its notice comes after the last of them. False when the queue is full (or the
    /// task is gone): the caller delivers `farewell` itself and falls back to `leave`.
    pub fn evict(&self, conn: u64, outbox: &Outbox, farewell: WsMessage) -> bool {
        let (reply, _) = oneshot::channel();
        self.tx.try_send(Mail::Leave { conn, farewell: Some((outbox.clone(), farewell)), reply }).is_ok()
    }

    /// Stops the task if nobody listens; true when it stopped (or was already gone).
    pub async fn stop_if_empty(&self) -> bool {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Mail::StopIfEmpty { reply }).await.is_err() {
            return true;
        }
        rx.await.unwrap_or(true)
    }
}
