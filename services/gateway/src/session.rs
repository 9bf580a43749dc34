//! One authenticated connection's commands: parse, authorize through the message
//! service, reply. Commands of one connection run one at a time, in order, so a
//! client's sends are stored in the order it sent them.

use std::sync::Arc;

use chat_proto::v1 as pb;
use tokio::time::Instant;
use tracing::Instrument;

use crate::auth::{self, Claims};
use crate::backend::caller;
use crate::error::{CommandError, ErrorCode};
use crate::outbox::Outbox;
use crate::protocol::{client, server, Close, Command, Id, Policy};
use crate::ratelimit::{ConnLimiter, Verdict};
use crate::room::Listener;
use crate::state::AppState;

/// The per-connection state behind the command loop.
pub struct Session {
    state: AppState,
    claims: Claims,
    listener: Listener,
    expires_at: Instant,
    limiter: ConnLimiter,
}

/// When a token with this `exp` stops being valid (with the verifier's leeway).
pub fn token_deadline(exp: i64) -> Instant {
    let left = exp + auth::LEEWAY_SECS as i64 - chrono::Utc::now().timestamp();
    Instant::now() + std::time::Duration::from_secs(left.max(0) as u64)
}

impl Session {
    /// A session for an authenticated user whose frames go to `outbox`.
    pub fn new(state: AppState, claims: Claims, outbox: Outbox) -> Self {
        let listener = Listener { outbox, user_id: Arc::from(claims.sub.as_str()) };
        let expires_at = token_deadline(claims.exp);
        let limiter = state.limits().connect(&claims.sub);
        Self { state, claims, listener, expires_at, limiter }
    }

    /// The verified claims.
    pub fn claims(&self) -> &Claims {
        &self.claims
    }

    /// When the current token expires; `refresh_token` moves it.
    pub fn expires_at(&self) -> Instant {
        self.expires_at
    }

    /// Handles one text frame and returns the reply frame.
    pub async fn handle_text(&mut self, text: &str) -> String {
        let limit = self.state.settings().max_frame_bytes;
        if text.len() > limit {
            let err =
                CommandError::new(ErrorCode::TooLarge, format!("frame is {} bytes; the limit is {limit}", text.len()));
            return server::error(client::peek_id(text).as_deref(), &err);
        }
        let metrics = self.state.metrics().clone();
        let frame = match client::parse(text) {
            Ok(frame) => frame,
            Err(bad) => {
                metrics.command("invalid", bad.error.code.as_str());
                return server::error(bad.id.as_deref(), &bad.error);
            }
        };
        let name = frame.command.name();
        let refusal = match self.limiter.check(std::time::Instant::now()) {
            Verdict::Allow => None,
            Verdict::Refuse(wait) => {
                Some(CommandError::rate_limited("too many commands; slow down", wait.as_millis().max(1) as u64))
            }
            Verdict::Abuse => {
                self.listener.outbox.close(Close::Policy(Policy::RateLimit));
                Some(CommandError::rate_limited("too many commands; closing", 1000))
            }
        };
        if let Some(err) = refusal {
            metrics.rate_limited.inc();
            metrics.command(name, err.code.as_str());
            return server::error(frame.id.as_deref(), &err);
        }
        let id = frame.id.as_deref();
        // The root of a command's trace: the gRPC call, the message service's work and every
        // gateway's delivery of the resulting event hang below it.
        let span = tracing::info_span!(
            "ws.command",
            otel.name = format!("ws {name}"),
            otel.kind = "server",
            command = name,
            user = %self.claims.sub,
            outcome = tracing::field::Empty,
        );
        let result = self.execute(id, frame.command).instrument(span.clone()).await;
        let outcome = match &result {
            Ok(_) => "ok",
            Err(err) => err.code.as_str(),
        };
        span.record("outcome", outcome);
        metrics.command(name, outcome);
        result.unwrap_or_else(|err| server::error(id, &err))
    }

    fn who(&self) -> Option<pb::Caller> {
        Some(caller(&self.claims))
    }

    async fn execute(&mut self, id: Option<&str>, command: Command) -> Result<String, CommandError> {
        let backend = self.state.backend().clone();
        match command {
            Command::Ping {} => Ok(server::pong(id)),
            Command::Auth { .. } => Err(CommandError::bad_request("already authenticated")),
            Command::CreateRoom { kind, name, members } => {
                let req =
                    pb::CreateRoomRequest { caller: self.who(), kind: pb::RoomKind::from(kind) as i32, name, members };
                Ok(server::room_ack(id, &backend.create_room(req).await?))
            }
            Command::Join { room, since_seq } => self.join(id, room, since_seq).await,
            Command::Leave { room } => {
                // Idempotent, like the contract's `leave`: a room never joined (or one a
                // removal already took away) is left already.
                self.state.fanout().leave(room.as_str(), self.conn()).await;
                Ok(server::ack(id))
            }
            Command::Send { room, text, kind, attachments, reply_to, client_msg_id } => {
                let req = pb::SendMessageRequest {
                    caller: self.who(),
                    room_id: room.into_string(),
                    text,
                    kind,
                    attachment_ids: attachments,
                    reply_to,
                    client_msg_id,
                };
                Ok(server::message_ack(id, &backend.send_message(req).await?))
            }
            Command::History { room, before_seq, after_seq, limit } => {
                let limit = client::page_limit(limit)?;
                let req = pb::HistoryRequest {
                    caller: self.who(),
                    room_id: room.into_string(),
                    before_seq,
                    after_seq,
                    limit,
                };
                Ok(server::page_ack(id, &backend.history(req).await?))
            }
            Command::Received { room, seq } => {
                if seq < 0 {
                    return Err(CommandError::bad_request("seq must not be negative"));
                }
                // A joined room was checked at `join`; another is checked now, as a join would.
                if !self.state.fanout().is_joined(self.conn(), room.as_str()) {
                    backend.join_room(caller(&self.claims), room.as_str().to_owned()).await?;
                }
                self.state.deliveries().record(room.as_str(), &self.claims.sub, seq);
                Ok(server::received_ack(id, room.as_str(), seq))
            }
            Command::Thread { room, root_seq, after_seq, limit } => {
                let req = pb::ThreadRequest {
                    caller: self.who(),
                    room_id: room.into_string(),
                    root_seq,
                    after_seq,
                    limit: client::page_limit(limit)?,
                };
                Ok(server::thread_ack(id, &backend.thread(req).await?))
            }
            Command::Receipts { room } => {
                let receipts = backend.receipts(caller(&self.claims), room.into_string()).await?;
                Ok(server::receipts_ack(id, &receipts))
            }
            Command::Search { q, room, before_id, limit } => {
                self.state.spend_search(&self.claims.sub)?;
                let req = client::search_request(caller(&self.claims), q, room, before_id, limit)?;
                Ok(server::search_ack(id, &backend.search(req).await?))
            }
            Command::AddMembers { room, members } => {
                let req = pb::AddMembersRequest { caller: self.who(), room_id: room.into_string(), members };
                let reply = backend.add_members(req).await?;
                Ok(server::members_added_ack(id, &reply.room.unwrap_or_default(), &reply.added))
            }
            Command::RemoveMember { room, user_id } => {
                let req = pb::RemoveMemberRequest { caller: self.who(), room_id: room.into_string(), user_id };
                backend.remove_member(req).await?;
                Ok(server::ack(id))
            }
            Command::Rooms { limit, after } => {
                let page = backend.list_rooms(caller(&self.claims), client::rooms_limit(limit)?, after).await?;
                Ok(server::rooms_ack(id, &page))
            }
            Command::Edit { message_id, text } => {
                let req = pb::EditMessageRequest { caller: self.who(), message_id: message_id.into_string(), text };
                Ok(server::message_ack(id, &backend.edit_message(req).await?))
            }
            Command::Delete { message_id } => {
                let req = pb::DeleteMessageRequest { caller: self.who(), message_id: message_id.into_string() };
                backend.delete_message(req).await?;
                Ok(server::ack(id))
            }
            Command::React { message_id, emoji } => {
                let message_id = message_id.into_string();
                backend.react(pb::ReactRequest { caller: self.who(), message_id, emoji, add: true }).await?;
                Ok(server::ack(id))
            }
            Command::Unreact { message_id, emoji } => {
                let message_id = message_id.into_string();
                backend.react(pb::ReactRequest { caller: self.who(), message_id, emoji, add: false }).await?;
                Ok(server::ack(id))
            }
            Command::Typing { room, active } => self.typing(id, room, active).await,
            Command::Read { room, seq } => {
                let req = pb::MarkReadRequest { caller: self.who(), room_id: room.into_string(), seq };
                Ok(server::read_ack(id, backend.mark_read(req).await?))
            }
            Command::Presence { room } => {
                let info = backend.join_room(caller(&self.claims), room.into_string()).await?;
                let (online, truncated) = self.state.presence().online_listed(&info.members).await;
                Ok(server::online_page_ack(id, &online, truncated))
            }
            Command::RefreshToken { token } => self.refresh(id, &token),
        }
    }

    fn conn(&self) -> u64 {
        self.listener.outbox.id()
    }

    async fn join(&mut self, id: Option<&str>, room: Id, since_seq: Option<i64>) -> Result<String, CommandError> {
        let (fanout, conn, max) = (self.state.fanout(), self.conn(), self.state.settings().max_rooms);
        if !fanout.is_joined(conn, room.as_str()) && fanout.joined_count(conn) >= max {
            return Err(CommandError::new(
                ErrorCode::Forbidden,
                format!("a connection may join at most {max} rooms; leave one first"),
            ));
        }
        // The membership check runs inside the fan-out's join, which is what lets a
        // removal landing during the check refuse the join instead of being missed.
        let check = self.state.backend().join_room(caller(&self.claims), room.to_string());
        let (joined, info) =
            fanout.join(room.as_str(), self.listener.clone(), caller(&self.claims), since_seq, check).await?;
        let online = self.state.presence().online(&info.members).await;
        Ok(server::joined_ack(id, room.as_str(), joined.last_seq, &online, joined.truncated))
    }

    async fn typing(&mut self, id: Option<&str>, room: Id, active: bool) -> Result<String, CommandError> {
        if !self.state.fanout().is_joined(self.conn(), room.as_str()) {
            // Typing needs membership, not a join: check it like a join would. A removal
            // unjoins the connection at once, so a removed user lands here and is refused.
            self.state.backend().join_room(caller(&self.claims), room.to_string()).await?;
        }
        let room = room.into_string();
        let event =
            pb::envelope::Event::Typing(pb::Typing { room_id: room.clone(), user_id: self.claims.sub.clone(), active });
        self.state.events().room(&room, event).await?;
        Ok(server::ack(id))
    }

    fn refresh(&mut self, id: Option<&str>, token: &str) -> Result<String, CommandError> {
        let claims =
            self.state.authenticate(token).map_err(|e| CommandError::new(ErrorCode::Unauthorized, e.to_string()))?;
        if claims.sub != self.claims.sub {
            return Err(CommandError::new(ErrorCode::Forbidden, "the new token is for another user"));
        }
        self.expires_at = token_deadline(claims.exp);
        self.claims = claims;
        Ok(server::refreshed_ack(id, self.claims.exp))
    }

    /// Leaves every joined room; called once when the connection ends.
    pub async fn end(self) {
        self.state.fanout().leave_all(self.conn()).await;
        self.state.limits().disconnect(&self.claims.sub, self.limiter);
    }
}
