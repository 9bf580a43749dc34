//! What clients send: WebSocket command frames and REST request bodies.
//!
//! Client frames are parsed in two steps: first just `type` and `id`, so every error
//! reply can carry the request's id; then the command itself.

use chat_proto::v1 as pb;
use serde::{Deserialize, Deserializer};
use utoipa::ToSchema;

use super::id::{names_nothing, Id};
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
        room: Id,
        #[serde(default)]
        since_seq: Option<i64>,
    },
    Leave {
        room: Id,
    },
    Send {
        room: Id,
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
        room: Id,
        #[serde(default)]
        before_seq: Option<i64>,
        #[serde(default)]
        after_seq: Option<i64>,
        #[serde(default)]
        limit: Option<u32>,
    },
    Ping {},
    AddMembers {
        room: Id,
        #[serde(deserialize_with = "id_list")]
        members: Vec<String>,
    },
    RemoveMember {
        room: Id,
        #[serde(deserialize_with = "id_string")]
        user_id: String,
    },
    Rooms {
        /// Most rooms in the page (default and maximum: the service's rooms-per-user cap).
        #[serde(default)]
        limit: Option<u32>,
        /// The previous page's `next`.
        #[serde(default)]
        after: Option<String>,
    },
    Edit {
        message_id: Id,
        text: String,
    },
    Delete {
        message_id: Id,
    },
    React {
        message_id: Id,
        emoji: String,
    },
    Unreact {
        message_id: Id,
        emoji: String,
    },
    Typing {
        room: Id,
        active: bool,
    },
    Read {
        room: Id,
        seq: i64,
    },
    Presence {
        room: Id,
    },
    RefreshToken {
        token: String,
    },
    Received {
        room: Id,
        seq: i64,
    },
    Receipts {
        room: Id,
    },
    Thread {
        room: Id,
        root_seq: i64,
        #[serde(default)]
        after_seq: Option<i64>,
        #[serde(default)]
        limit: Option<u32>,
    },
    Search {
        q: String,
        #[serde(default)]
        room: Option<Id>,
        #[serde(default)]
        before_id: Option<Id>,
        #[serde(default)]
        limit: Option<u32>,
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
            Command::Rooms { .. } => "rooms",
            Command::Edit { .. } => "edit",
            Command::Delete { .. } => "delete",
            Command::React { .. } => "react",
            Command::Unreact { .. } => "unreact",
            Command::Typing { .. } => "typing",
            Command::Read { .. } => "read",
            Command::Presence { .. } => "presence",
            Command::RefreshToken { .. } => "refresh_token",
            Command::Search { .. } => "search",
            Command::Received { .. } => "received",
            Command::Receipts { .. } => "receipts",
            Command::Thread { .. } => "thread",
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
        Err(e) if names_nothing(&e) => {
            Err(FrameError { id, error: CommandError::new(ErrorCode::NotFound, describe(e)) })
        }
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

/// A search page size: absent means the default (20), 0 and above 50 are refused.
pub fn search_limit(limit: Option<u32>) -> Result<u32, CommandError> {
    match limit {
        None => Ok(0),
        Some(n @ 1..=50) => Ok(n),
        Some(_) => Err(CommandError::bad_request("limit must be between 1 and 50")),
    }
}

/// The search request of `caller`: the same for a WebSocket `search` and `GET /v1/search`.
pub fn search_request(
    caller: pb::Caller,
    q: String,
    room: Option<Id>,
    before_id: Option<Id>,
    limit: Option<u32>,
) -> Result<pb::SearchRequest, CommandError> {
    Ok(pb::SearchRequest {
        caller: Some(caller),
        q,
        room_id: room.map(Id::into_string),
        before_id: before_id.map(Id::into_string),
        limit: search_limit(limit)?,
    })
}

/// A `rooms` page size: absent means the service's default; 0 is refused here (the
/// service refuses sizes above its maximum).
pub fn rooms_limit(limit: Option<u32>) -> Result<u32, CommandError> {
    match limit {
        None => Ok(0),
        Some(0) => Err(CommandError::bad_request("limit must be at least 1")),
        Some(n) => Ok(n),
    }
}

// ---------- REST request bodies ----------
// Their type names and docs are the schema names and descriptions of `/openapi.json`.

#[derive(Deserialize, ToSchema)]
pub struct CreateRoom {
    pub kind: RoomKind,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub members: Vec<String>,
}

#[derive(Deserialize, ToSchema)]
pub struct SendReq {
    #[serde(default)]
    pub text: String,
    #[serde(default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub attachments: Vec<String>,
    #[serde(default)]
    pub reply_to: Option<String>,
    #[serde(default)]
    pub client_msg_id: Option<String>,
}

#[derive(Deserialize, ToSchema)]
pub struct PushReq {
    #[serde(default)]
    pub user_ids: Option<Vec<String>>,
    #[serde(default)]
    pub all: bool,
    pub event: String,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

#[derive(Deserialize, ToSchema)]
pub struct NotifyReq {
    pub user_ids: Vec<String>,
    pub title: String,
    #[serde(default)]
    pub body: String,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

#[derive(Deserialize, ToSchema)]
pub struct MarkRead {
    #[serde(default)]
    pub ids: Vec<String>,
    #[serde(default)]
    pub all: bool,
}

/// Who to sign in as.
#[derive(Deserialize, ToSchema)]
pub struct DevTokenRequest {
    /// The user id (`sub`), 1–128 characters.
    pub user_id: String,
    /// Display name (`name`).
    #[serde(default)]
    pub name: Option<String>,
    /// Role; `admin` grants admin rights.
    #[serde(default)]
    pub role: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    fn room_id(raw: &str) -> Id {
        Id::parse(raw).unwrap()
    }

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
                room: room_id("7"),
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
            Command::Join { room: room_id("3"), since_seq: Some(5) }
        );
    }

    #[test]
    fn numeric_ids_are_read_as_strings() {
        assert_eq!(parse_ok(r#"{"type":"leave","room":12}"#).command, Command::Leave { room: room_id("12") });
        let f = parse_ok(r#"{"type":"create_room","kind":"group","members":["bob",7]}"#);
        assert_eq!(
            f.command,
            Command::CreateRoom { kind: RoomKind::Group, name: None, members: vec!["bob".into(), "7".into()] }
        );
    }

    #[test]
    fn an_id_spelled_other_than_issued_is_not_found() {
        for room in [r#""042""#, r#""+42""#, r#"" 42""#, r#""4.2e1""#, "-42"] {
            let e = parse(&format!(r#"{{"type":"join","id":"j1","room":{room}}}"#)).unwrap_err();
            assert_eq!((e.id.as_deref(), e.error.code), (Some("j1"), ErrorCode::NotFound), "{room}");
        }
        let e = parse(r#"{"type":"edit","id":"e1","message_id":"007","text":"x"}"#).unwrap_err();
        assert_eq!(e.error.code, ErrorCode::NotFound);
        // Anything else wrong with the frame is still a bad request.
        let e = parse(r#"{"type":"join","id":"j2","room":true}"#).unwrap_err();
        assert_eq!(e.error.code, ErrorCode::BadRequest);
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
    fn page_limits_are_1_to_100_or_the_default() {
        assert_eq!(page_limit(None), Ok(0));
        assert_eq!(page_limit(Some(1)), Ok(1));
        assert_eq!(page_limit(Some(100)), Ok(100));
        assert_eq!(page_limit(Some(0)).unwrap_err().code, ErrorCode::BadRequest);
        assert_eq!(page_limit(Some(101)).unwrap_err().message, "limit must be between 1 and 100");
    }

    #[test]
    fn rest_bodies_fill_in_their_optional_fields() {
        let room: CreateRoom = serde_json::from_str(r#"{"kind":"direct"}"#).unwrap();
        assert_eq!((room.kind, room.name, room.members), (RoomKind::Direct, None, vec![]));
        let send: SendReq = serde_json::from_str("{}").unwrap();
        assert_eq!((send.text.as_str(), send.attachments.len(), send.client_msg_id), ("", 0, None));
        let push: PushReq = serde_json::from_str(r#"{"event":"e"}"#).unwrap();
        assert_eq!((push.user_ids, push.all, push.data), (None, false, serde_json::Value::Null));
        let read: MarkRead = serde_json::from_str(r#"{"all":true}"#).unwrap();
        assert!(read.all && read.ids.is_empty());
        assert!(serde_json::from_str::<NotifyReq>(r#"{"user_ids":["a"]}"#).is_err(), "title is required");
    }
}
