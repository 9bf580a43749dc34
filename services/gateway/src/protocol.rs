//! The client wire protocol (contract v1): parsing client frames and writing server frames.
//!
//! Client frames are parsed in two steps: first just `type` and `id`, so every error
//! reply can carry the request's id; then the command itself.

use chat_proto::v1 as pb;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Deserializer, Serialize};

use crate::error::{CommandError, ErrorCode};

/// Longest request `id`.
pub const MAX_ID_CHARS: usize = 64;

/// A parsed client frame: its optional request id and its command.
#[derive(Debug, PartialEq)]
pub struct ClientFrame {
    pub id: Option<String>,
    pub command: Command,
}

/// A client frame that could not be parsed: the id (when it could be read) and why.
#[derive(Debug, PartialEq)]
pub struct FrameError {
    pub id: Option<String>,
    pub error: CommandError,
}

/// The commands a client can send.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Command {
    Auth {
        token: String,
    },
    CreateRoom {
        kind: RoomKind,
        #[serde(default)]
        name: Option<String>,
        #[serde(default, deserialize_with = "id_list")]
        members: Vec<String>,
    },
    Join {
        #[serde(deserialize_with = "id_string")]
        room: String,
        #[serde(default)]
        since_seq: Option<i64>,
    },
    Leave {
        #[serde(deserialize_with = "id_string")]
        room: String,
    },
    Send {
        #[serde(deserialize_with = "id_string")]
        room: String,
        #[serde(default)]
        text: String,
        #[serde(default)]
        kind: Option<String>,
        #[serde(default, deserialize_with = "id_list")]
        attachments: Vec<String>,
        #[serde(default, deserialize_with = "opt_id_string")]
        reply_to: Option<String>,
        #[serde(default)]
        client_msg_id: Option<String>,
    },
    History {
        #[serde(deserialize_with = "id_string")]
        room: String,
        #[serde(default)]
        before_seq: Option<i64>,
        #[serde(default)]
        after_seq: Option<i64>,
        #[serde(default)]
        limit: Option<u32>,
    },
    Ping {},
    AddMembers {
        #[serde(deserialize_with = "id_string")]
        room: String,
        #[serde(deserialize_with = "id_list")]
        members: Vec<String>,
    },
    RemoveMember {
        #[serde(deserialize_with = "id_string")]
        room: String,
        #[serde(deserialize_with = "id_string")]
        user_id: String,
    },
    Rooms {},
    Edit {
        #[serde(deserialize_with = "id_string")]
        message_id: String,
        text: String,
    },
    Delete {
        #[serde(deserialize_with = "id_string")]
        message_id: String,
    },
    React {
        #[serde(deserialize_with = "id_string")]
        message_id: String,
        emoji: String,
    },
    Unreact {
        #[serde(deserialize_with = "id_string")]
        message_id: String,
        emoji: String,
    },
    Typing {
        #[serde(deserialize_with = "id_string")]
        room: String,
        active: bool,
    },
    Read {
        #[serde(deserialize_with = "id_string")]
        room: String,
        seq: i64,
    },
    Presence {
        #[serde(deserialize_with = "id_string")]
        room: String,
    },
    RefreshToken {
        token: String,
    },
}

impl Command {
    /// The command's `type`, for metrics and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Command::Auth { .. } => "auth",
            Command::CreateRoom { .. } => "create_room",
            Command::Join { .. } => "join",
            Command::Leave { .. } => "leave",
            Command::Send { .. } => "send",
            Command::History { .. } => "history",
            Command::Ping {} => "ping",
            Command::AddMembers { .. } => "add_members",
            Command::RemoveMember { .. } => "remove_member",
            Command::Rooms {} => "rooms",
            Command::Edit { .. } => "edit",
            Command::Delete { .. } => "delete",
            Command::React { .. } => "react",
            Command::Unreact { .. } => "unreact",
            Command::Typing { .. } => "typing",
            Command::Read { .. } => "read",
            Command::Presence { .. } => "presence",
            Command::RefreshToken { .. } => "refresh_token",
        }
    }
}

/// Room kinds as clients name them.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RoomKind {
    Group,
    Direct,
    Support,
}

impl From<RoomKind> for pb::RoomKind {
    fn from(kind: RoomKind) -> Self {
        match kind {
            RoomKind::Group => pb::RoomKind::Group,
            RoomKind::Direct => pb::RoomKind::Direct,
            RoomKind::Support => pb::RoomKind::Support,
        }
    }
}

/// Ids are strings in the contract; a client that sends a number means the same id.
#[derive(Deserialize)]
#[serde(untagged)]
enum IdRepr {
    Str(String),
    Int(i64),
}

impl From<IdRepr> for String {
    fn from(id: IdRepr) -> Self {
        match id {
            IdRepr::Str(s) => s,
            IdRepr::Int(n) => n.to_string(),
        }
    }
}

fn id_string<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    IdRepr::deserialize(d).map(String::from)
}

fn opt_id_string<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(Option::<IdRepr>::deserialize(d)?.map(String::from))
}

fn id_list<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Vec::<IdRepr>::deserialize(d)?.into_iter().map(String::from).collect())
}

#[derive(Deserialize)]
struct Head {
    #[serde(default)]
    id: Option<serde_json::Value>,
}

/// The request id of a frame that will not be parsed further (too large), if it has
/// a valid one.
pub fn peek_id(text: &str) -> Option<String> {
    match serde_json::from_str::<Head>(text).ok()?.id? {
        serde_json::Value::String(id) if id.chars().count() <= MAX_ID_CHARS => Some(id),
        _ => None,
    }
}

/// Parses one client text frame.
pub fn parse(text: &str) -> Result<ClientFrame, FrameError> {
    let head: Head = serde_json::from_str(text)
        .map_err(|e| FrameError { id: None, error: CommandError::bad_request(format!("malformed frame: {e}")) })?;
    let id = match head.id {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(id)) if id.chars().count() <= MAX_ID_CHARS => Some(id),
        Some(serde_json::Value::String(id)) => {
            return Err(FrameError {
                id: Some(id),
                error: CommandError::bad_request(format!("id must be at most {MAX_ID_CHARS} characters")),
            })
        }
        Some(_) => return Err(FrameError { id: None, error: CommandError::bad_request("id must be a string") }),
    };
    match serde_json::from_str::<Command>(text) {
        Ok(command) => Ok(ClientFrame { id, command }),
        Err(e) => Err(FrameError { id, error: CommandError::bad_request(describe(e)) }),
    }
}

/// serde's messages name Rust things ("variant"); say it in protocol terms.
fn describe(err: serde_json::Error) -> String {
    let msg = err.to_string();
    let msg = msg.split(" at line ").next().unwrap_or(&msg);
    if msg.starts_with("unknown variant") {
        format!("unknown type: {}", msg.trim_start_matches("unknown variant "))
    } else if msg.starts_with("missing field `type`") {
        "missing field `type`".to_owned()
    } else {
        msg.to_owned()
    }
}

/// A page size given by a client: 1..=100, or absent for the default (sent as 0).
pub fn page_limit(limit: Option<u32>) -> Result<u32, CommandError> {
    match limit {
        None => Ok(0),
        Some(n @ 1..=100) => Ok(n),
        Some(_) => Err(CommandError::bad_request("limit must be between 1 and 100")),
    }
}

/// Milliseconds since the epoch as an RFC 3339 UTC timestamp with milliseconds.
pub fn timestamp(ms: i64) -> String {
    DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default().to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// The current time as the contract writes it.
pub fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

// ---------- server frames ----------

/// `{"type":"ack","id":...,<fields of T>}`.
#[derive(Serialize)]
struct Ack<'a, T: Serialize> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(flatten)]
    body: T,
}

/// A server frame of type `kind` carrying `body`'s fields (events have no id).
pub fn frame<T: Serialize>(kind: &'static str, body: T) -> String {
    to_json(&Ack { kind, id: None, body })
}

/// The client frame for an event heard on Redis; `None` for events clients never see.
pub fn event_frame(event: &pb::envelope::Event) -> Option<String> {
    use pb::envelope::Event as E;
    #[derive(Serialize)]
    struct RoomMessage<'a> {
        room: &'a str,
        message: MessageJson<'a>,
    }
    #[derive(Serialize)]
    struct Deleted<'a> {
        room: &'a str,
        message_id: &'a str,
        seq: i64,
    }
    #[derive(Serialize)]
    struct Reaction<'a> {
        room: &'a str,
        message_id: &'a str,
        user_id: &'a str,
        emoji: &'a str,
        added: bool,
    }
    #[derive(Serialize)]
    struct Read<'a> {
        room: &'a str,
        user_id: &'a str,
        seq: i64,
    }
    #[derive(Serialize)]
    struct Presence<'a> {
        room: &'a str,
        user_id: &'a str,
        status: &'static str,
    }
    #[derive(Serialize)]
    struct Added<'a> {
        room: RoomJson<'a>,
    }
    #[derive(Serialize)]
    struct Removed<'a> {
        room: &'a str,
    }
    Some(match event {
        E::MessageCreated(e) => message_event(e.message.as_ref()?),
        E::MessageEdited(e) => {
            let m = e.message.as_ref()?;
            frame("message_edited", RoomMessage { room: &m.room_id, message: MessageJson(m) })
        }
        E::MessageDeleted(e) => {
            frame("message_deleted", Deleted { room: &e.room_id, message_id: &e.message_id, seq: e.seq })
        }
        E::Reaction(e) => frame(
            "reaction",
            Reaction {
                room: &e.room_id,
                message_id: &e.message_id,
                user_id: &e.user_id,
                emoji: &e.emoji,
                added: e.added,
            },
        ),
        E::Typing(e) => typing_event(&e.room_id, &e.user_id, e.active),
        E::Read(e) => frame("read", Read { room: &e.room_id, user_id: &e.user_id, seq: e.seq }),
        E::Presence(e) => frame(
            "presence",
            Presence { room: &e.room_id, user_id: &e.user_id, status: if e.online { "online" } else { "offline" } },
        ),
        E::RoomAdded(e) => frame("room_added", Added { room: RoomJson(e.room.as_ref()?) }),
        E::RoomRemoved(e) => frame("room_removed", Removed { room: &e.room_id }),
        E::Notification(e) => {
            #[derive(Serialize)]
            struct Notification<'a> {
                notification: NotificationJson<'a>,
            }
            frame("notification", Notification { notification: NotificationJson(e.notification.as_ref()?) })
        }
        E::Push(e) => {
            #[derive(Serialize)]
            struct Push<'a> {
                event: &'a str,
                data: serde_json::Value,
            }
            frame("push", Push { event: &e.event, data: serde_json::from_str(&e.data_json).unwrap_or_default() })
        }
        E::Disconnect(_) => return None,
    })
}

/// A notification object: `{id, title, body, data, created_at, read}`.
pub struct NotificationJson<'a>(pub &'a pb::Notification);

impl Serialize for NotificationJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let n = self.0;
        let data: serde_json::Value = serde_json::from_str(&n.data_json).unwrap_or_default();
        let mut map = s.serialize_map(Some(6))?;
        map.serialize_entry("id", &n.id)?;
        map.serialize_entry("title", &n.title)?;
        map.serialize_entry("body", &n.body)?;
        map.serialize_entry("data", &data)?;
        map.serialize_entry("created_at", &timestamp(n.created_at_ms))?;
        map.serialize_entry("read", &n.read)?;
        map.end()
    }
}

/// `typing {room, user_id, active}`.
pub fn typing_event(room: &str, user_id: &str, active: bool) -> String {
    #[derive(Serialize)]
    struct Typing<'a> {
        room: &'a str,
        user_id: &'a str,
        active: bool,
    }
    frame("typing", Typing { room, user_id, active })
}

/// `{room}`: the create_room ack and `POST /v1/rooms` response.
#[derive(Serialize)]
pub struct RoomBody<'a> {
    pub room: RoomJson<'a>,
}

/// `{message}`: the send/edit ack and `POST /v1/rooms/{id}/messages` response.
#[derive(Serialize)]
pub struct MessageBody<'a> {
    pub message: MessageJson<'a>,
}

/// `{messages, has_more}`: a history page.
#[derive(Serialize)]
pub struct PageBody<'a> {
    pub messages: Vec<MessageJson<'a>>,
    pub has_more: bool,
}

impl<'a> From<&'a pb::HistoryResponse> for PageBody<'a> {
    fn from(page: &'a pb::HistoryResponse) -> Self {
        Self { messages: page.messages.iter().map(MessageJson).collect(), has_more: page.has_more }
    }
}

/// `{rooms}`: the rooms ack and `GET /v1/rooms` response.
#[derive(Serialize)]
pub struct RoomsBody<'a> {
    pub rooms: Vec<RoomSummaryJson<'a>>,
}

impl<'a> From<&'a [pb::RoomSummary]> for RoomsBody<'a> {
    fn from(rooms: &'a [pb::RoomSummary]) -> Self {
        Self { rooms: rooms.iter().map(RoomSummaryJson).collect() }
    }
}

/// A room summary of the `rooms` reply.
pub struct RoomSummaryJson<'a>(pub &'a pb::RoomSummary);

impl Serialize for RoomSummaryJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let r = self.0;
        let mut map = s.serialize_map(Some(6))?;
        map.serialize_entry("id", &r.id)?;
        map.serialize_entry("name", &r.name)?;
        map.serialize_entry("kind", kind_name(r.kind))?;
        map.serialize_entry("last_seq", &r.last_seq)?;
        map.serialize_entry("unread", &r.unread)?;
        map.serialize_entry("last_message", &r.last_message.as_ref().map(MessageJson))?;
        map.end()
    }
}

fn kind_name(kind: i32) -> &'static str {
    match pb::RoomKind::try_from(kind) {
        Ok(pb::RoomKind::Direct) => "direct",
        Ok(pb::RoomKind::Support) => "support",
        _ => "group",
    }
}

/// An `ack` reply carrying `body`'s fields.
pub fn ack<T: Serialize>(id: Option<&str>, body: T) -> String {
    to_json(&Ack { kind: "ack", id, body })
}

/// A `pong` reply.
pub fn pong(id: Option<&str>) -> String {
    to_json(&Ack { kind: "pong", id, body: Empty {} })
}

/// An empty ack body.
#[derive(Serialize)]
pub struct Empty {}

#[derive(Serialize)]
struct ErrorFrame<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    code: ErrorCode,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

/// An `error` reply.
pub fn error(id: Option<&str>, err: &CommandError) -> String {
    to_json(&ErrorFrame {
        kind: "error",
        id,
        code: err.code,
        message: &err.message,
        retry_after_ms: err.retry_after_ms,
    })
}

/// The `welcome` frame sent once a connection is authenticated.
#[derive(Serialize)]
pub struct Welcome<'a> {
    #[serde(rename = "type")]
    pub kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<&'a str>,
    pub user_id: &'a str,
    pub session_id: &'a str,
    pub heartbeat_ms: u64,
    pub server_time: String,
}

/// `message` event: `{"type":"message","room":...,"message":{...}}`.
pub fn message_event(message: &pb::Message) -> String {
    #[derive(Serialize)]
    struct Event<'a> {
        room: &'a str,
        message: MessageJson<'a>,
    }
    frame("message", Event { room: &message.room_id, message: MessageJson(message) })
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Our frame types hold only strings, numbers and maps with string keys.
    serde_json::to_string(value).unwrap_or_else(|e| {
        tracing::error!(%e, "frame serialisation failed");
        r#"{"type":"error","code":"internal","message":"serialisation failed"}"#.to_owned()
    })
}

/// A message object as the contract shows it.
pub struct MessageJson<'a>(pub &'a pb::Message);

impl Serialize for MessageJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let m = self.0;
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("id", &m.id)?;
        map.serialize_entry("room", &m.room_id)?;
        map.serialize_entry("seq", &m.seq)?;
        map.serialize_entry("sender_id", &m.sender_id)?;
        if let Some(name) = &m.sender_name {
            map.serialize_entry("sender_name", name)?;
        }
        map.serialize_entry("kind", &m.kind)?;
        map.serialize_entry("text", &m.text)?;
        let attachments: Vec<AttachmentJson<'_>> = m.attachments.iter().map(AttachmentJson).collect();
        map.serialize_entry("attachments", &attachments)?;
        map.serialize_entry("reply_to", &m.reply_to)?;
        map.serialize_entry("client_msg_id", &m.client_msg_id)?;
        map.serialize_entry("created_at", &timestamp(m.created_at_ms))?;
        map.serialize_entry("edited_at", &m.edited_at_ms.map(timestamp))?;
        map.serialize_entry("deleted", &m.deleted)?;
        let reactions: std::collections::BTreeMap<&str, &Vec<String>> =
            m.reactions.iter().map(|r| (r.emoji.as_str(), &r.user_ids)).collect();
        map.serialize_entry("reactions", &reactions)?;
        map.end()
    }
}

/// An attachment object: `{id, name, content_type, size, url}`.
pub struct AttachmentJson<'a>(pub &'a pb::Attachment);

impl Serialize for AttachmentJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let a = self.0;
        let mut map = s.serialize_map(Some(5))?;
        map.serialize_entry("id", &a.id)?;
        map.serialize_entry("name", &a.name)?;
        map.serialize_entry("content_type", &a.content_type)?;
        map.serialize_entry("size", &a.size)?;
        map.serialize_entry("url", &format!("/v1/attachments/{}", a.id))?;
        map.end()
    }
}

/// A room object as the contract shows it.
pub struct RoomJson<'a>(pub &'a pb::Room);

impl Serialize for RoomJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        #[derive(Serialize)]
        struct MemberJson<'a> {
            user_id: &'a str,
            role: &'static str,
        }
        let r = self.0;
        let kind = kind_name(r.kind);
        let members: Vec<MemberJson<'_>> = r
            .members
            .iter()
            .map(|m| MemberJson {
                user_id: &m.user_id,
                role: if m.role == pb::MemberRole::Owner as i32 { "owner" } else { "member" },
            })
            .collect();
        let mut map = s.serialize_map(Some(5))?;
        map.serialize_entry("id", &r.id)?;
        map.serialize_entry("name", &r.name)?;
        map.serialize_entry("kind", kind)?;
        map.serialize_entry("members", &members)?;
        map.serialize_entry("created_at", &timestamp(r.created_at_ms))?;
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn parse_ok(text: &str) -> ClientFrame {
        parse(text).unwrap_or_else(|e| panic!("{text}: {e:?}"))
    }

    #[test]
    fn commands_parse_with_their_ids() {
        let f = parse_ok(r#"{"type":"send","id":"r1","room":"7","text":"hi","client_msg_id":"c1"}"#);
        assert_eq!(f.id.as_deref(), Some("r1"));
        assert_eq!(
            f.command,
            Command::Send {
                room: "7".into(),
                text: "hi".into(),
                kind: None,
                attachments: vec![],
                reply_to: None,
                client_msg_id: Some("c1".into())
            }
        );
        assert_eq!(parse_ok(r#"{"type":"ping"}"#).command, Command::Ping {});
        assert_eq!(
            parse_ok(r#"{"type":"join","room":"3","since_seq":5}"#).command,
            Command::Join { room: "3".into(), since_seq: Some(5) }
        );
    }

    #[test]
    fn numeric_ids_are_read_as_strings() {
        assert_eq!(parse_ok(r#"{"type":"leave","room":12}"#).command, Command::Leave { room: "12".into() });
        let f = parse_ok(r#"{"type":"create_room","kind":"group","members":["bob",7]}"#);
        assert_eq!(
            f.command,
            Command::CreateRoom { kind: RoomKind::Group, name: None, members: vec!["bob".into(), "7".into()] }
        );
    }

    #[test]
    fn malformed_json_is_a_bad_request_without_id() {
        let e = parse("{not json").unwrap_err();
        assert_eq!(e.id, None);
        assert_eq!(e.error.code, ErrorCode::BadRequest);
    }

    #[test]
    fn unknown_types_and_missing_fields_keep_the_request_id() {
        let e = parse(r#"{"type":"fly","id":"x1"}"#).unwrap_err();
        assert_eq!(e.id.as_deref(), Some("x1"));
        assert!(e.error.message.starts_with("unknown type"), "{}", e.error.message);

        let e = parse(r#"{"type":"join","id":"x2"}"#).unwrap_err();
        assert_eq!(e.id.as_deref(), Some("x2"));
        assert!(e.error.message.contains("room"), "{}", e.error.message);

        let e = parse(r#"{"id":"x3"}"#).unwrap_err();
        assert_eq!(e.error.message, "missing field `type`");
    }

    #[test]
    fn ids_must_be_short_strings() {
        let long = format!(r#"{{"type":"ping","id":"{}"}}"#, "i".repeat(65));
        assert_eq!(parse(&long).unwrap_err().error.code, ErrorCode::BadRequest);
        assert_eq!(parse(r#"{"type":"ping","id":5}"#).unwrap_err().error.code, ErrorCode::BadRequest);
        assert!(parse(&format!(r#"{{"type":"ping","id":"{}"}}"#, "i".repeat(64))).is_ok());
    }

    #[test]
    fn replies_carry_the_id_and_fields() {
        let v: Value = serde_json::from_str(&ack(Some("a1"), json!({"last_seq": 3}))).unwrap();
        assert_eq!(v, json!({"type": "ack", "id": "a1", "last_seq": 3}));
        let v: Value = serde_json::from_str(&pong(Some("p"))).unwrap();
        assert_eq!(v, json!({"type": "pong", "id": "p"}));
        let v: Value = serde_json::from_str(&error(None, &CommandError::bad_request("nope"))).unwrap();
        assert_eq!(v, json!({"type": "error", "code": "bad_request", "message": "nope"}));
    }

    #[test]
    fn message_objects_have_every_contract_field() {
        let m = pb::Message {
            id: "9".into(),
            room_id: "2".into(),
            seq: 4,
            sender_id: "alice".into(),
            sender_name: Some("Alice".into()),
            kind: "text".into(),
            text: Some("hello".into()),
            attachments: vec![],
            reply_to: None,
            client_msg_id: Some("c".into()),
            created_at_ms: 1_700_000_000_123,
            edited_at_ms: None,
            deleted: false,
            reactions: vec![pb::Reaction { emoji: "👍".into(), user_ids: vec!["bob".into()] }],
        };
        let v: Value = serde_json::from_str(&message_event(&m)).unwrap();
        assert_eq!(
            v,
            json!({"type": "message", "room": "2", "message": {
                "id": "9", "room": "2", "seq": 4, "sender_id": "alice", "sender_name": "Alice",
                "kind": "text", "text": "hello", "attachments": [], "reply_to": null,
                "client_msg_id": "c", "created_at": "2023-11-14T22:13:20.123Z", "edited_at": null,
                "deleted": false, "reactions": {"👍": ["bob"]}
            }})
        );
    }
}
