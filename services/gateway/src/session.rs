//! One authenticated connection's commands: parse, authorize through the message
//! service, reply. Commands of one connection run one at a time, in order, so a
//! client's sends are stored in the order it sent them.

use std::collections::HashSet;

use chat_proto::v1 as pb;
use serde::Serialize;

use crate::auth::Claims;
use crate::backend::caller;
use crate::error::{CommandError, ErrorCode};
use crate::outbox::Outbox;
use crate::protocol::{self, Command, MessageJson, RoomJson};
use crate::state::AppState;

/// The per-connection state behind the command loop.
pub struct Session {
    state: AppState,
    claims: Claims,
    caller: pb::Caller,
    outbox: Outbox,
    joined: HashSet<String>,
}

impl Session {
    /// A session for an authenticated user whose frames go to `outbox`.
    pub fn new(state: AppState, claims: Claims, outbox: Outbox) -> Self {
        let caller = caller(&claims);
        Self { state, claims, caller, outbox, joined: HashSet::new() }
    }

    /// The verified claims.
    pub fn claims(&self) -> &Claims {
        &self.claims
    }

    /// Handles one text frame and returns the reply frame.
    pub async fn handle_text(&mut self, text: &str) -> String {
        if text.len() > self.state.settings().max_frame_bytes {
            let err = CommandError::new(
                ErrorCode::TooLarge,
                format!("frame is {} bytes; the limit is {}", text.len(), self.state.settings().max_frame_bytes),
            );
            return protocol::error(protocol::peek_id(text).as_deref(), &err);
        }
        let frame = match protocol::parse(text) {
            Ok(frame) => frame,
            Err(bad) => return protocol::error(bad.id.as_deref(), &bad.error),
        };
        let id = frame.id.as_deref();
        match self.execute(id, frame.command).await {
            Ok(reply) => reply,
            Err(err) => protocol::error(id, &err),
        }
    }

    async fn execute(&mut self, id: Option<&str>, command: Command) -> Result<String, CommandError> {
        let backend = self.state.backend();
        match command {
            Command::Ping {} => Ok(protocol::pong(id)),
            Command::Auth { .. } => Err(CommandError::bad_request("already authenticated")),
            Command::CreateRoom { kind, name, members } => {
                let room = backend
                    .create_room(pb::CreateRoomRequest {
                        caller: Some(self.caller.clone()),
                        kind: pb::RoomKind::from(kind) as i32,
                        name,
                        members,
                    })
                    .await?;
                #[derive(Serialize)]
                struct Created<'a> {
                    room: RoomJson<'a>,
                }
                Ok(protocol::ack(id, Created { room: RoomJson(&room) }))
            }
            Command::Join { room, since_seq: _ } => {
                let last_seq = backend.join_room(self.caller.clone(), room.clone()).await?;
                self.state.fanout().join(&room, &self.outbox).await?;
                self.joined.insert(room.clone());
                #[derive(Serialize)]
                struct Joined<'a> {
                    room: &'a str,
                    last_seq: i64,
                    online: [&'a str; 0],
                }
                Ok(protocol::ack(id, Joined { room: &room, last_seq, online: [] }))
            }
            Command::Leave { room } => {
                if self.joined.remove(&room) {
                    self.state.fanout().leave(&room, self.outbox.id()).await;
                }
                Ok(protocol::ack(id, protocol::Empty {}))
            }
            Command::Send { room, text, kind, attachments, reply_to, client_msg_id } => {
                let message = backend
                    .send_message(pb::SendMessageRequest {
                        caller: Some(self.caller.clone()),
                        room_id: room,
                        text,
                        kind,
                        attachment_ids: attachments,
                        reply_to,
                        client_msg_id,
                    })
                    .await?;
                #[derive(Serialize)]
                struct Sent<'a> {
                    message: MessageJson<'a>,
                }
                Ok(protocol::ack(id, Sent { message: MessageJson(&message) }))
            }
            Command::History { room, before_seq, after_seq, limit } => {
                let limit = match limit {
                    None => 0,
                    Some(n @ 1..=100) => n,
                    Some(_) => return Err(CommandError::bad_request("limit must be between 1 and 100")),
                };
                let page = backend
                    .history(pb::HistoryRequest {
                        caller: Some(self.caller.clone()),
                        room_id: room,
                        before_seq,
                        after_seq,
                        limit,
                    })
                    .await?;
                #[derive(Serialize)]
                struct Page<'a> {
                    messages: Vec<MessageJson<'a>>,
                    has_more: bool,
                }
                let messages = page.messages.iter().map(MessageJson).collect();
                Ok(protocol::ack(id, Page { messages, has_more: page.has_more }))
            }
        }
    }

    /// Leaves every joined room; called once when the connection ends.
    pub async fn end(self) {
        for room in &self.joined {
            self.state.fanout().leave(room, self.outbox.id()).await;
        }
    }
}
