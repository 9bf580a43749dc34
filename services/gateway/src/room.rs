//! One task per room with local listeners: it orders the room's messages by seq,
//! repairs gaps from the message service, replays backlogs on `join` with `since_seq`,
//! expires typing, and delivers every event to the room's local connections.
//!
//! Being the only writer of a room's deliveries is what makes "no gap, no duplicate"
//! simple: a join's backlog is queued, and the listener added, between two live events.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message as WsMessage, Utf8Bytes};
use chat_proto::v1 as pb;
use chat_proto::v1::envelope::Event;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use tracing::Instrument;

use crate::backend::Backend;
use crate::error::CommandError;
use crate::metrics::Metrics;
use crate::outbox::Outbox;
use crate::protocol;

/// Typing without a refresh ends after this long.
pub const TYPING_TTL: Duration = Duration::from_secs(6);
/// Most backlog messages one `join` replays; beyond it the ack says `truncated`.
pub const MAX_BACKLOG: i64 = 1000;
/// Commands queued for one room before events are dropped (and later repaired).
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

enum Command {
    /// Boxed: envelopes are large and most commands are events; one allocation each.
    /// The dispatcher only forwards envelopes that carry an event.
    Event(Box<pb::Envelope>),
    Join {
        listener: Listener,
        since: Option<i64>,
        reply: oneshot::Sender<Result<Joined, CommandError>>,
    },
    Leave {
        conn: u64,
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
    tx: mpsc::Sender<Command>,
}

impl RoomHandle {
    /// Starts the task for `room_id`, whose messages up to `last_seq` count as delivered.
    pub fn spawn(room_id: String, last_seq: i64, backend: Backend, metrics: Metrics) -> Self {
        let (tx, rx) = mpsc::channel(ROOM_QUEUE);
        let task = RoomTask {
            room_id,
            backend,
            metrics,
            seq: last_seq,
            listeners: HashMap::new(),
            typing: HashMap::new(),
            recent: None,
        };
        tokio::spawn(task.run(rx));
        Self { tx }
    }

    /// True when both handles drive the same task.
    pub fn same(&self, other: &RoomHandle) -> bool {
        self.tx.same_channel(&other.tx)
    }

    /// Hands over an envelope from Redis without waiting. A full queue drops it: message
    /// events come back through gap repair; ephemeral ones are gone, as their kind allows.
    pub fn event(&self, envelope: pb::Envelope) {
        if let Err(mpsc::error::TrySendError::Full(_)) = self.tx.try_send(Command::Event(Box::new(envelope))) {
            tracing::warn!("room queue full; event dropped");
        }
    }

    /// Asks the task to catch up with the room's newest seq (after a Redis reconnect).
    pub fn resync(&self) {
        let _ = self.tx.try_send(Command::Resync);
    }

    /// Adds a listener, first replaying what it missed after `since`.
    pub async fn join(&self, listener: Listener, since: Option<i64>) -> Result<Result<Joined, CommandError>, Gone> {
        let (reply, rx) = oneshot::channel();
        self.tx.send(Command::Join { listener, since, reply }).await.map_err(|_| Gone)?;
        rx.await.map_err(|_| Gone)
    }

    /// Removes a listener; returns how many remain.
    pub async fn leave(&self, conn: u64) -> usize {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::Leave { conn, reply }).await.is_err() {
            return 0;
        }
        rx.await.unwrap_or(0)
    }

    /// Stops the task if nobody listens; true when it stopped (or was already gone).
    pub async fn stop_if_empty(&self) -> bool {
        let (reply, rx) = oneshot::channel();
        if self.tx.send(Command::StopIfEmpty { reply }).await.is_err() {
            return true;
        }
        rx.await.unwrap_or(true)
    }
}

struct RoomTask {
    room_id: String,
    backend: Backend,
    metrics: Metrics,
    /// Every message up to this seq has been delivered (or predates every listener).
    seq: i64,
    listeners: HashMap<u64, Listener>,
    /// Who is typing, until when.
    typing: HashMap<Arc<str>, Instant>,
    /// The newest messages, kept after a `since_seq` join fetched them.
    recent: Option<Recent>,
}

/// The frames of the room's newest messages, `first..=self.seq` without a gap.
///
/// When a gateway dies, its clients come back to the others all at once, each joining
/// with the `since_seq` it had, and in one room those are mostly the same. The first
/// join fetches the missed messages from the message service; the rest of the storm is
/// served from these frames instead of one Postgres query per client. Live messages
/// extend them, so they stay current. An edit, delete or reaction would make a frame
/// stale, so any of those drops them; so does a gap, or disuse for `RECENT_TTL`.
struct Recent {
    /// Seq of `frames[0]`.
    first: i64,
    frames: std::collections::VecDeque<Utf8Bytes>,
    used: Instant,
}

impl Recent {
    /// The fetched `backlog` (and its `frames`, one per message) when its messages are
    /// consecutive and end at the room's watermark; `None` otherwise (a deleted message
    /// keeps its seq, so history has no holes).
    fn from_backlog(backlog: &[pb::Message], frames: &[Utf8Bytes], watermark: i64) -> Option<Self> {
        let first = backlog.first()?.seq;
        let consecutive = backlog.iter().zip(first..).all(|(m, seq)| m.seq == seq);
        if !consecutive || backlog.last()?.seq != watermark || frames.len() != backlog.len() {
            return None;
        }
        let start = backlog.len().saturating_sub(RECENT_FRAMES);
        Some(Self {
            first: backlog[start].seq,
            frames: frames[start..].iter().cloned().collect(),
            used: Instant::now(),
        })
    }

    /// The frames of every message after `since` up to `watermark`, if these reach back
    /// that far and end there.
    fn after(&mut self, since: i64, watermark: i64) -> Option<Vec<WsMessage>> {
        if since + 1 < self.first || self.first + self.frames.len() as i64 - 1 != watermark {
            return None;
        }
        self.used = Instant::now();
        let skip = usize::try_from(since + 1 - self.first).ok()?;
        Some(self.frames.iter().skip(skip).map(|f| WsMessage::Text(f.clone())).collect())
    }

    /// Appends the next message; false when `seq` does not follow (the caller drops these).
    fn push(&mut self, seq: i64, frame: &Utf8Bytes) -> bool {
        if seq != self.first + self.frames.len() as i64 {
            return false;
        }
        self.frames.push_back(frame.clone());
        if self.frames.len() > RECENT_FRAMES {
            self.frames.pop_front();
            self.first += 1;
        }
        true
    }

    fn expired(&self) -> bool {
        self.used.elapsed() > RECENT_TTL
    }
}

impl RoomTask {
    async fn run(mut self, mut rx: mpsc::Receiver<Command>) {
        loop {
            let next_expiry = self.typing.values().min().copied();
            let command = tokio::select! {
                command = rx.recv() => command,
                _ = sleep_until(next_expiry) => {
                    self.expire_typing();
                    continue;
                }
            };
            let Some(command) = command else { return };
            match command {
                Command::Event(envelope) => self.on_envelope(*envelope).await,
                Command::Join { listener, since, reply } => {
                    let _ = reply.send(self.join(listener, since).await);
                }
                Command::Leave { conn, reply } => {
                    self.listeners.remove(&conn);
                    let _ = reply.send(self.listeners.len());
                }
                Command::StopIfEmpty { reply } => {
                    let empty = self.listeners.is_empty();
                    let _ = reply.send(empty);
                    if empty {
                        return;
                    }
                }
                Command::Resync => self.resync().await,
            }
        }
    }

    /// Delivers one envelope, inside a span continuing the publisher's trace when the
    /// envelope carries one (an untraced event costs no span).
    async fn on_envelope(&mut self, envelope: pb::Envelope) {
        let Some(event) = envelope.event else { return };
        let span = delivery_span(&envelope.trace_context, Some(&self.room_id), self.listeners.len());
        self.on_event(event, envelope.published_at_us).instrument(span).await
    }

    async fn on_event(&mut self, event: Event, published_us: i64) {
        match event {
            Event::MessageCreated(pb::MessageCreated { message: Some(message) }) => {
                self.on_message(message, published_us).await
            }
            Event::Typing(typing) => {
                let user: Arc<str> = Arc::from(typing.user_id.as_str());
                if typing.active {
                    self.typing.insert(user.clone(), Instant::now() + TYPING_TTL);
                } else {
                    self.typing.remove(&user);
                }
                self.deliver_except(&user, protocol::typing_event(&self.room_id, &user, typing.active));
            }
            other => {
                if matches!(other, Event::MessageEdited(_) | Event::MessageDeleted(_) | Event::Reaction(_)) {
                    self.recent = None;
                }
                if let Some(frame) = protocol::event_frame(&other) {
                    self.deliver(frame);
                }
            }
        }
    }

    /// Delivers messages strictly in seq order: duplicates are dropped, and a jump
    /// first fetches the missing range from the message service.
    async fn on_message(&mut self, message: pb::Message, published_us: i64) {
        if message.seq <= self.seq {
            return;
        }
        if message.seq > self.seq + 1 {
            self.repair(message.seq).await;
        }
        self.seq = message.seq;
        let frame = Utf8Bytes::from(protocol::message_event(&message));
        if self.recent.as_mut().is_some_and(|r| r.expired() || !r.push(message.seq, &frame)) {
            self.recent = None;
        }
        for l in self.listeners.values() {
            l.outbox.push_timed(WsMessage::Text(frame.clone()), published_us);
        }
    }

    /// Delivers every stored message between the watermark and `upto` (exclusive).
    async fn repair(&mut self, upto: i64) {
        tracing::info!(room = %self.room_id, from = self.seq + 1, upto, "repairing a gap in the room's messages");
        self.recent = None;
        while self.seq + 1 < upto {
            let fetched = self.fetch(self.seq, upto).await;
            match fetched {
                Ok(messages) if !messages.is_empty() => {
                    self.metrics.gap_repairs.inc_by(messages.len() as u64);
                    for m in &messages {
                        self.deliver(protocol::message_event(m));
                    }
                    self.seq = messages.last().map_or(self.seq, |m| m.seq);
                }
                Ok(_) => return,
                Err(err) => {
                    tracing::warn!(room = %self.room_id, %err, "gap repair failed; delivering what arrived");
                    return;
                }
            }
        }
    }

    /// Catches up with the room's newest seq: after a Redis outage the last messages may
    /// have been lost with no later message to reveal the gap.
    async fn resync(&mut self) {
        match self.backend.room_seq(self.room_id.clone()).await {
            Ok(last) if last > self.seq => self.repair(last + 1).await,
            Ok(_) => {}
            Err(err) => tracing::warn!(room = %self.room_id, %err, "resync failed"),
        }
    }

    /// Messages with `after < seq < before`, retried briefly: a repair that gives up
    /// leaves a visible gap.
    async fn fetch(&self, after: i64, before: i64) -> Result<Vec<pb::Message>, CommandError> {
        let mut attempt = 0;
        loop {
            match self.backend.room_messages(self.room_id.clone(), after, before, MAX_BACKLOG as u32).await {
                Ok(messages) => return Ok(messages),
                Err(err) if attempt >= 3 => return Err(err),
                Err(_) => {
                    attempt += 1;
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
            }
        }
    }

    async fn join(&mut self, listener: Listener, since: Option<i64>) -> Result<Joined, CommandError> {
        let mut truncated = false;
        if let Some(since) = since {
            let since = since.max(0);
            if since < self.seq {
                truncated = self.seq - since > MAX_BACKLOG;
                let after = since.max(self.seq - MAX_BACKLOG);
                let frames = match self.recent.as_mut().and_then(|r| r.after(after, self.seq)) {
                    Some(frames) => frames,
                    None => {
                        let backlog = self.fetch(after, self.seq + 1).await?;
                        let frames: Vec<Utf8Bytes> =
                            backlog.iter().map(|m| Utf8Bytes::from(protocol::message_event(m))).collect();
                        self.recent = Recent::from_backlog(&backlog, &frames, self.seq);
                        frames.into_iter().map(WsMessage::Text).collect()
                    }
                };
                listener.outbox.push_batch(frames);
            }
        }
        self.listeners.insert(listener.outbox.id(), listener);
        Ok(Joined { last_seq: self.seq, truncated })
    }

    fn expire_typing(&mut self) {
        let now = Instant::now();
        let expired: Vec<Arc<str>> =
            self.typing.iter().filter(|(_, until)| **until <= now).map(|(u, _)| u.clone()).collect();
        for user in expired {
            self.typing.remove(&user);
            self.deliver_except(&user, protocol::typing_event(&self.room_id, &user, false));
        }
    }

    fn deliver(&self, frame: String) {
        let frame = Utf8Bytes::from(frame);
        for l in self.listeners.values() {
            l.outbox.push_event(WsMessage::Text(frame.clone()));
        }
    }

    /// Delivers to everyone but `user`'s own connections (typing is not echoed).
    fn deliver_except(&self, user: &str, frame: String) {
        let frame = Utf8Bytes::from(frame);
        for l in self.listeners.values().filter(|l| &*l.user_id != user) {
            l.outbox.push_event(WsMessage::Text(frame.clone()));
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn messages(seqs: impl IntoIterator<Item = i64>) -> Vec<pb::Message> {
        seqs.into_iter().map(|seq| pb::Message { seq, text: Some(format!("m{seq}")), ..Default::default() }).collect()
    }

    fn recent(seqs: impl IntoIterator<Item = i64>, watermark: i64) -> Option<Recent> {
        let backlog = messages(seqs);
        let frames: Vec<Utf8Bytes> = backlog.iter().map(|m| Utf8Bytes::from(protocol::message_event(m))).collect();
        Recent::from_backlog(&backlog, &frames, watermark)
    }

    fn seqs(frames: &[WsMessage]) -> Vec<i64> {
        frames
            .iter()
            .map(|f| match f {
                WsMessage::Text(t) => {
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).expect("json");
                    v["message"]["seq"].as_i64().expect("seq")
                }
                other => panic!("not text: {other:?}"),
            })
            .collect()
    }

    #[test]
    fn recent_frames_serve_every_since_they_reach_and_follow_live_messages() {
        let mut recent = recent(5..=8, 8).expect("consecutive, up to the watermark");
        assert_eq!(seqs(&recent.after(4, 8).expect("covered")), [5, 6, 7, 8]);
        assert_eq!(seqs(&recent.after(6, 8).expect("covered")), [7, 8]);
        assert!(recent.after(3, 8).is_none(), "seq 4 was never fetched");
        assert!(recent.after(6, 9).is_none(), "seq 9 is not in the frames");
        let next = Utf8Bytes::from(protocol::message_event(&messages([9])[0]));
        assert!(recent.push(9, &next));
        assert_eq!(seqs(&recent.after(7, 9).expect("covered")), [8, 9]);
        assert!(!recent.push(11, &next), "a gap is refused");
    }

    #[test]
    fn only_gapless_backlogs_ending_at_the_watermark_are_kept() {
        assert!(recent([5, 6, 8], 8).is_none());
        assert!(recent(5..=7, 8).is_none());
        assert!(recent([], 8).is_none());
    }

    #[test]
    fn recent_frames_keep_only_the_newest() {
        let n = RECENT_FRAMES as i64;
        let mut recent = recent(1..=n + 10, n + 10).expect("kept");
        assert_eq!(recent.first, 11);
        assert!(recent.after(5, n + 10).is_none());
        let next = Utf8Bytes::from(protocol::message_event(&messages([n + 11])[0]));
        assert!(recent.push(n + 11, &next));
        assert_eq!(recent.first, 12);
        assert_eq!(recent.frames.len(), RECENT_FRAMES);
    }
}
