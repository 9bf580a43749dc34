//! The room task itself: the one writer of a room's deliveries, fed by its mailbox.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{Message as WsMessage, Utf8Bytes};
use chat_proto::v1 as pb;
use chat_proto::v1::envelope::Event;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

use super::recent::Recent;
use super::{delivery_span, Joined, Listener, Mail, RoomLog, MAX_BACKLOG, TYPING_TTL};
use crate::error::CommandError;
use crate::metrics::Metrics;
use crate::protocol::server;

pub(super) struct RoomTask<L> {
    room_id: String,
    log: L,
    metrics: Metrics,
    /// Every message up to this seq has been delivered (or predates every listener).
    seq: i64,
    listeners: HashMap<u64, Listener>,
    /// Who is typing, until when.
    typing: HashMap<Arc<str>, Instant>,
    /// The newest messages, kept after a `since_seq` join fetched them.
    recent: Option<Recent>,
}

impl<L: RoomLog> RoomTask<L> {
    /// A task for `room_id` whose messages up to `last_seq` count as delivered.
    pub(super) fn new(room_id: String, last_seq: i64, log: L, metrics: Metrics) -> Self {
        Self { room_id, log, metrics, seq: last_seq, listeners: HashMap::new(), typing: HashMap::new(), recent: None }
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
            };
            let Some(mail) = mail else { return };
            match mail {
                Mail::Event(envelope) => self.on_envelope(*envelope).await,
                Mail::Join { listener, since, reply } => {
                    let _ = reply.send(self.join(listener, since).await);
                }
                Mail::Leave { conn, reply } => {
                    self.listeners.remove(&conn);
                    let _ = reply.send(self.listeners.len());
                }
                Mail::StopIfEmpty { reply } => {
                    let empty = self.listeners.is_empty();
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
        let frame = Utf8Bytes::from(server::message_event(&message));
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

    /// Messages with `after < seq < before`, retried briefly: a repair that gives up
    /// leaves a visible gap.
    async fn fetch(&self, after: i64, before: i64) -> Result<Vec<pb::Message>, CommandError> {
        let mut attempt = 0;
        loop {
            match self.log.messages(self.room_id.clone(), after, before, MAX_BACKLOG as u32).await {
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
                            backlog.iter().map(|m| Utf8Bytes::from(server::message_event(m))).collect();
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
            self.deliver_except(&user, server::typing_event(&self.room_id, &user, false));
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
