//! The room task itself: the one writer of a room's deliveries, fed by its mailbox.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message as WsMessage, Utf8Bytes};
use chat_proto::v1 as pb;
use chat_proto::v1::envelope::Event;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use super::recent::Recent;
use super::{delivery_span, Joined, Listener, Mail, RoomLog, MAX_BACKLOG, TYPING_TTL};
use crate::error::{CommandError, ErrorCode};
use crate::metrics::Metrics;
use crate::outbox::EventFrame;
use crate::protocol::server;

/// Frames one pending join may hold back before it is refused: the backlog plus this
/// much would overflow any reasonable outbound queue anyway.
const MAX_HELD: usize = MAX_BACKLOG as usize;

type JoinReply = oneshot::Sender<Result<Joined, CommandError>>;

/// A `since_seq` join whose backlog is being fetched off the task: the room's live
/// deliveries to it are held back, in order, until its backlog is queued first.
struct PendingJoin {
    listener: Listener,
    /// The watermark when the join arrived: the backlog ends here.
    upto: i64,
    truncated: bool,
    held: Vec<WsMessage>,
    /// More than `MAX_HELD` frames arrived meanwhile; the join is refused.
    overflowed: bool,
    /// `changes` when the fetch started: the backlog may be kept as `recent` only if no
    /// edit, delete, reaction or gap came in between.
    changes: u64,
    reply: JoinReply,
}

pub(super) struct RoomTask<L> {
    room_id: String,
    log: Arc<L>,
    metrics: Metrics,
    /// Every message up to this seq has been delivered (or predates every listener).
    seq: i64,
    listeners: HashMap<u64, Listener>,
    /// Who is typing, until when.
    typing: HashMap<Arc<str>, Instant>,
    /// The newest messages, kept after a `since_seq` join fetched them.
    recent: Option<Recent>,
    /// Joins waiting for their backlog, by connection.
    pending: HashMap<u64, PendingJoin>,
    /// The backlog fetches of `pending`: a fetch from Postgres takes as long as it takes,
    /// and the room's other listeners must not wait for it.
    fetches: JoinSet<(u64, Result<Vec<pb::Message>, CommandError>)>,
    /// Counts what makes fetched frames stale (edits, deletes, reactions, gaps).
    changes: u64,
}

impl<L: RoomLog> RoomTask<L> {
    /// A task for `room_id` whose messages up to `last_seq` count as delivered.
    pub(super) fn new(room_id: String, last_seq: i64, log: L, metrics: Metrics) -> Self {
        Self {
            room_id,
            log: Arc::new(log),
            metrics,
            seq: last_seq,
            listeners: HashMap::new(),
            typing: HashMap::new(),
            recent: None,
            pending: HashMap::new(),
            fetches: JoinSet::new(),
            changes: 0,
        }
    }

    pub(super) async fn run(mut self, mut rx: mpsc::Receiver<Mail>) {
        loop {
            let next_expiry = self.typing.values().min().copied();
            let mail = tokio::select! {
                mail = rx.recv() => mail,
                _ = sleep_until(next_expiry) => {
                    self.expire_typing();
                    continue;
                }
                Some(done) = self.fetches.join_next(), if !self.fetches.is_empty() => {
                    match done {
                        Ok((conn, backlog)) => self.backlog_fetched(conn, backlog),
                        Err(err) => tracing::error!(room = %self.room_id, %err, "a backlog fetch failed"),
                    }
                    continue;
                }
            };
            let Some(mail) = mail else { return };
            match mail {
                Mail::Event(envelope) => self.on_envelope(*envelope).await,
                Mail::Join { listener, since, reply } => self.join(listener, since, reply),
                Mail::Leave { conn, farewell, reply } => {
                    self.listeners.remove(&conn);
                    if let Some(pending) = self.pending.remove(&conn) {
                        // Answered, not dropped: a dropped reply reads as a stopped task,
                        // and the join would be retried on a new one.
                        let left = CommandError::new(ErrorCode::Forbidden, "removed from the room while joining");
                        let _ = pending.reply.send(Err(left));
                    }
                    if let Some((outbox, frame)) = farewell {
                        outbox.push_event(frame);
                    }
                    let _ = reply.send(self.listeners.len() + self.pending.len());
                }
                Mail::StopIfEmpty { reply } => {
                    let empty = self.listeners.is_empty() && self.pending.is_empty();
                    let _ = reply.send(empty);
                    if empty {
                        return;
                    }
                }
                Mail::Resync => self.resync().await,
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
                self.deliver_except(&user, server::typing_event(&self.room_id, &user, typing.active));
            }
            other => {
                if matches!(other, Event::MessageEdited(_) | Event::MessageDeleted(_) | Event::Reaction(_)) {
                    self.recent = None;
                    self.changes += 1;
                }
                if let Some(frame) = server::event_frame(&other) {
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
        let frame = EventFrame::new(Utf8Bytes::from(server::message_event(&message)));
        if self.recent.as_mut().is_some_and(|r| r.expired() || !r.push(message.seq, frame.text())) {
            self.recent = None;
        }
        let written = self.listeners.values().filter(|l| l.outbox.push_frame(&frame, Some(published_us))).count();
        if written > 0 {
            // Frames written directly are delivered now; queued ones are timed when written.
            let latency = (chrono::Utc::now().timestamp_micros() - published_us).max(0) as f64 / 1e6;
            for _ in 0..written {
                self.metrics.fanout_latency.observe(latency);
            }
        }
        self.hold(|_| true, frame.text());
    }

    /// Keeps a frame for every pending join that `to` accepts, behind its backlog.
    fn hold(&mut self, to: impl Fn(&Listener) -> bool, frame: &Utf8Bytes) {
        for p in self.pending.values_mut().filter(|p| to(&p.listener)) {
            if p.held.len() < MAX_HELD {
                p.held.push(WsMessage::Text(frame.clone()));
            } else {
                p.overflowed = true;
            }
        }
    }

    /// Delivers every stored message between the watermark and `upto` (exclusive).
    async fn repair(&mut self, upto: i64) {
        tracing::info!(room = %self.room_id, from = self.seq + 1, upto, "repairing a gap in the room's messages");
        self.recent = None;
        self.changes += 1;
        while self.seq + 1 < upto {
            let fetched = self.fetch(self.seq, upto).await;
            match fetched {
                Ok(messages) if !messages.is_empty() => {
                    self.metrics.gap_repairs.inc_by(messages.len() as u64);
                    for m in &messages {
                        self.deliver(server::message_event(m));
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
        match self.log.last_seq(self.room_id.clone()).await {
            Ok(last) if last > self.seq => self.repair(last + 1).await,
            Ok(_) => {}
            Err(err) => tracing::warn!(room = %self.room_id, %err, "resync failed"),
        }
    }

    async fn fetch(&self, after: i64, before: i64) -> Result<Vec<pb::Message>, CommandError> {
        fetch(&*self.log, self.room_id.clone(), after, before).await
    }

    /// Adds a listener, first queueing what it missed after `since`. Kept frames serve
    /// it at once; otherwise its backlog is fetched beside the task, which goes on
    /// delivering to everyone else and holds this listener's live frames back until
    /// `backlog_fetched`.
    fn join(&mut self, listener: Listener, since: Option<i64>, reply: JoinReply) {
        let conn = listener.outbox.id();
        let since = since.map(|s| s.max(0)).filter(|s| *s < self.seq);
        let Some(since) = since else {
            self.listeners.insert(conn, listener);
            let _ = reply.send(Ok(Joined { last_seq: self.seq, truncated: false }));
            return;
        };
        let truncated = self.seq - since > MAX_BACKLOG;
        let after = since.max(self.seq - MAX_BACKLOG);
        if let Some(frames) = self.recent.as_mut().and_then(|r| r.after(after, self.seq)) {
            listener.outbox.push_batch(frames);
            self.listeners.insert(conn, listener);
            let _ = reply.send(Ok(Joined { last_seq: self.seq, truncated }));
            return;
        }
        self.listeners.remove(&conn);
        let (log, room, upto) = (self.log.clone(), self.room_id.clone(), self.seq);
        self.fetches.spawn(async move { (conn, fetch(&*log, room, after, upto + 1).await) }.in_current_span());
        let pending = PendingJoin {
            listener,
            upto,
            truncated,
            held: Vec::new(),
            overflowed: false,
            changes: self.changes,
            reply,
        };
        if let Some(replaced) = self.pending.insert(conn, pending) {
            let _ = replaced.reply.send(Err(CommandError::new(ErrorCode::Conflict, "joined again")));
        }
    }

    /// Queues a pending join's backlog, then what was held back for it, and makes it a
    /// live listener: no gap, no duplicate.
    fn backlog_fetched(&mut self, conn: u64, backlog: Result<Vec<pb::Message>, CommandError>) {
        let Some(pending) = self.pending.remove(&conn) else { return };
        let backlog = match backlog {
            Ok(backlog) if !pending.overflowed => backlog,
            Ok(_) => {
                let busy = CommandError::new(ErrorCode::Unavailable, "the room is too busy to replay; join again");
                let _ = pending.reply.send(Err(busy));
                return;
            }
            Err(err) => {
                let _ = pending.reply.send(Err(err));
                return;
            }
        };
        let frames: Vec<Utf8Bytes> = backlog.iter().map(|m| Utf8Bytes::from(server::message_event(m))).collect();
        if self.seq == pending.upto && self.changes == pending.changes {
            self.recent = Recent::from_backlog(&backlog, &frames, self.seq);
        }
        let mut queued: Vec<WsMessage> = frames.into_iter().map(WsMessage::Text).collect();
        queued.extend(pending.held);
        pending.listener.outbox.push_batch(queued);
        self.listeners.insert(conn, pending.listener);
        let _ = pending.reply.send(Ok(Joined { last_seq: pending.upto, truncated: pending.truncated }));
    }

    fn expire_typing(&mut self) {
        let now = Instant::now();
        let expired: Vec<Arc<str>> =
            self.typing.iter().filter(|(_, until)| **until <= now).map(|(u, _)| u.clone()).collect();
        for user in expired {
            self.typing.remove(&user);
            self.deliver_except(&user, server::typing_event(&self.room_id, &user, false));
        }
    }

    fn deliver(&mut self, frame: String) {
        let frame = EventFrame::new(Utf8Bytes::from(frame));
        for l in self.listeners.values() {
            l.outbox.push_frame(&frame, None);
        }
        self.hold(|_| true, frame.text());
    }

    /// Delivers to everyone but `user`'s own connections (typing is not echoed).
    fn deliver_except(&mut self, user: &str, frame: String) {
        let frame = EventFrame::new(Utf8Bytes::from(frame));
        for l in self.listeners.values().filter(|l| &*l.user_id != user) {
            l.outbox.push_frame(&frame, None);
        }
        self.hold(|l| &*l.user_id != user, frame.text());
    }
}

/// Messages with `after < seq < before`, retried briefly: a repair that gives up
/// leaves a visible gap.
async fn fetch<L: RoomLog>(
    log: &L,
    room_id: String,
    after: i64,
    before: i64,
) -> Result<Vec<pb::Message>, CommandError> {
    let mut attempt = 0;
    loop {
        match log.messages(room_id.clone(), after, before, MAX_BACKLOG as u32).await {
            Ok(messages) => return Ok(messages),
            Err(err) if attempt >= 3 => return Err(err),
            Err(_) => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
