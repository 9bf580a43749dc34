//! What the server sends over WebSocket: replies (acks, `pong`, errors), events,
//! `welcome` and `reconnect`, each a JSON text frame.

use std::time::Duration;

use chat_proto::v1 as pb;
use serde::Serialize;

use super::json::{self, MessageJson, NotificationJson, RoomJson};
use crate::error::{CommandError, ErrorCode};

/// `{"type":...,"id":...,<fields of T>}`.
#[derive(Serialize)]
struct Frame<'a, T: Serialize> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<&'a str>,
    #[serde(flatten)]
    body: T,
}

#[derive(Serialize)]
struct Empty {}

/// A server frame of type `kind` carrying `body`'s fields (events have no id).
fn frame<T: Serialize>(kind: &'static str, body: T) -> String {
    to_json(&Frame { kind, id: None, body })
}

/// An `ack` reply carrying `body`'s fields.
fn ack_with<T: Serialize>(id: Option<&str>, body: T) -> String {
    to_json(&Frame { kind: "ack", id, body })
}

fn to_json<T: Serialize>(value: &T) -> String {
    // Our frame types hold only strings, numbers and maps with string keys.
    serde_json::to_string(value).unwrap_or_else(|e| {
        tracing::error!(%e, "frame serialisation failed");
        r#"{"type":"error","code":"internal","message":"serialisation failed"}"#.to_owned()
    })
}

// ---------- replies ----------

/// An `ack` with nothing more to say.
pub fn ack(id: Option<&str>) -> String {
    ack_with(id, Empty {})
}

/// A `pong` reply.
pub fn pong(id: Option<&str>) -> String {
    to_json(&Frame { kind: "pong", id, body: Empty {} })
}

/// The create_room ack: `{room}`.
pub fn room_ack(id: Option<&str>, room: &pb::Room) -> String {
    ack_with(id, json::room_body(room))
}

/// The send and edit ack: `{message}`.
pub fn message_ack(id: Option<&str>, message: &pb::Message) -> String {
    ack_with(id, json::message_body(message))
}

/// The history ack: `{messages, has_more}`.
pub fn page_ack(id: Option<&str>, page: &pb::HistoryResponse) -> String {
    ack_with(id, json::page_body(page))
}

/// The received ack: `{room, seq}`.
pub fn received_ack(id: Option<&str>, room: &str, seq: i64) -> String {
    #[derive(Serialize)]
    struct Received<'a> {
        room: &'a str,
        seq: i64,
    }
    ack_with(id, Received { room, seq })
}

/// The thread ack: `{root, replies, has_more}`.
pub fn thread_ack(id: Option<&str>, thread: &crate::backend::Thread) -> String {
    ack_with(id, json::thread_body(thread))
}

/// The receipts ack: `{members: [{user_id, delivered_seq, read_seq}]}`.
pub fn receipts_ack(id: Option<&str>, receipts: &pb::ReceiptsResponse) -> String {
    ack_with(id, json::receipts_body(receipts))
}

/// The search ack: `{results: [{message, snippet}], has_more}`.
pub fn search_ack(id: Option<&str>, page: &pb::SearchResponse) -> String {
    ack_with(id, json::search_body(page))
}

/// The rooms ack: `{rooms, has_more, next?}`.
pub fn rooms_ack(id: Option<&str>, page: &pb::ListRoomsResponse) -> String {
    ack_with(id, json::rooms_body(page))
}

/// The add_members ack: `{room, added}`.
pub fn members_added_ack(id: Option<&str>, room: &pb::Room, added: &[String]) -> String {
    #[derive(Serialize)]
    struct Added<'a> {
        room: RoomJson<'a>,
        added: &'a [String],
    }
    ack_with(id, Added { room: RoomJson(room), added })
}

/// The join ack: `{room, last_seq, online, truncated}`.
pub fn joined_ack(id: Option<&str>, room: &str, last_seq: i64, online: &[String], truncated: bool) -> String {
    #[derive(Serialize)]
    struct Joined<'a> {
        room: &'a str,
        last_seq: i64,
        online: &'a [String],
        truncated: bool,
    }
    ack_with(id, Joined { room, last_seq, online, truncated })
}

/// The presence ack of a complete list: `{online}`.
pub fn online_ack(id: Option<&str>, online: &[String]) -> String {
    online_page_ack(id, online, false)
}

/// The presence ack: `{online}`, plus `online_truncated: true` when the room has more
/// online members than one answer lists.
pub fn online_page_ack(id: Option<&str>, online: &[String], truncated: bool) -> String {
    #[derive(Serialize)]
    struct Online<'a> {
        online: &'a [String],
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        online_truncated: bool,
    }
    ack_with(id, Online { online, online_truncated: truncated })
}

/// The read ack: `{seq}`, the read position now stored.
pub fn read_ack(id: Option<&str>, seq: i64) -> String {
    #[derive(Serialize)]
    struct Read {
        seq: i64,
    }
    ack_with(id, Read { seq })
}

/// The refresh_token ack: `{expires_at}` of the new token, whose `exp` is `exp` (Unix s).
pub fn refreshed_ack(id: Option<&str>, exp: i64) -> String {
    #[derive(Serialize)]
    struct Refreshed {
        expires_at: String,
    }
    ack_with(id, Refreshed { expires_at: json::timestamp(exp * 1000) })
}

/// An `error` reply.
pub fn error(id: Option<&str>, err: &CommandError) -> String {
    #[derive(Serialize)]
    struct Error<'a> {
        code: ErrorCode,
        message: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    }
    let body = Error { code: err.code, message: &err.message, retry_after_ms: err.retry_after_ms };
    to_json(&Frame { kind: "error", id, body })
}

// ---------- connection frames ----------

/// The `welcome` frame sent once a connection is authenticated; `id` is the auth
/// frame's, when the client authenticated by frame.
pub fn welcome(id: Option<&str>, user_id: &str, session_id: &str, heartbeat: Duration) -> String {
    #[derive(Serialize)]
    struct Welcome<'a> {
        user_id: &'a str,
        session_id: &'a str,
        heartbeat_ms: u64,
        server_time: String,
    }
    let body = Welcome { user_id, session_id, heartbeat_ms: heartbeat.as_millis() as u64, server_time: json::now() };
    to_json(&Frame { kind: "welcome", id, body })
}

/// The `reconnect` event of a gateway that is restarting: reconnect after `after_ms`.
pub fn reconnect(after_ms: u64) -> String {
    #[derive(Serialize)]
    struct Reconnect {
        after_ms: u64,
    }
    frame("reconnect", Reconnect { after_ms })
}

// ---------- events ----------

/// `message` event: `{"type":"message","room":...,"message":{...}}`.
pub fn message_event(message: &pb::Message) -> String {
    frame("message", RoomMessage { room: &message.room_id, message: MessageJson(message) })
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

#[derive(Serialize)]
struct RoomMessage<'a> {
    room: &'a str,
    message: MessageJson<'a>,
}

/// The client frame for an event heard on Redis; `None` for events clients never see.
pub fn event_frame(event: &pb::envelope::Event) -> Option<String> {
    use pb::envelope::Event as E;
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
    #[derive(Serialize)]
    struct Notification<'a> {
        notification: NotificationJson<'a>,
    }
    #[derive(Serialize)]
    struct Push<'a> {
        event: &'a str,
        data: serde_json::Value,
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
        E::Delivered(e) => frame("delivered", Read { room: &e.room_id, user_id: &e.user_id, seq: e.seq }),
        E::Presence(e) => frame(
            "presence",
            Presence { room: &e.room_id, user_id: &e.user_id, status: if e.online { "online" } else { "offline" } },
        ),
        E::RoomAdded(e) => frame("room_added", Added { room: RoomJson(e.room.as_ref()?) }),
        E::RoomRemoved(e) => frame("room_removed", Removed { room: &e.room_id }),
        E::Notification(e) => {
            frame("notification", Notification { notification: NotificationJson(e.notification.as_ref()?) })
        }
        E::Push(e) => {
            frame("push", Push { event: &e.event, data: serde_json::from_str(&e.data_json).unwrap_or_default() })
        }
        E::Disconnect(_) => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    #[test]
    fn replies_carry_the_id_and_fields() {
        let v: Value = serde_json::from_str(&ack_with(Some("a1"), json!({"last_seq": 3}))).unwrap();
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
            reply_count: 2,
            last_reply_at_ms: Some(1_700_000_001_000),
        };
        let v: Value = serde_json::from_str(&message_event(&m)).unwrap();
        assert_eq!(
            v,
            json!({"type": "message", "room": "2", "message": {
                "id": "9", "room": "2", "seq": 4, "sender_id": "alice", "sender_name": "Alice",
                "kind": "text", "text": "hello", "attachments": [], "reply_to": null,
                "client_msg_id": "c", "created_at": "2023-11-14T22:13:20.123Z", "edited_at": null,
                "deleted": false, "reactions": {"👍": ["bob"]},
                "reply_count": 2, "last_reply_at": "2023-11-14T22:13:21.000Z"
            }})
        );
    }

    fn room() -> pb::Room {
        pb::Room { id: "r".into(), kind: pb::RoomKind::Group as i32, ..Default::default() }
    }

    const ROOM: &str = r#"{"id":"r","name":null,"kind":"group","members":[],"created_at":"1970-01-01T00:00:00.000Z"}"#;

    #[test]
    fn acks_without_an_id_leave_it_out() {
        assert_eq!(ack(None), r#"{"type":"ack"}"#);
        assert_eq!(ack(Some("a")), r#"{"type":"ack","id":"a"}"#);
        assert_eq!(pong(None), r#"{"type":"pong"}"#);
    }

    #[test]
    fn each_ack_has_its_fields_in_contract_order() {
        let online = ["bob".to_owned()];
        assert_eq!(room_ack(Some("1"), &room()), format!(r#"{{"type":"ack","id":"1","room":{ROOM}}}"#));
        assert_eq!(
            members_added_ack(Some("2"), &room(), &["bob".to_owned()]),
            format!(r#"{{"type":"ack","id":"2","room":{ROOM},"added":["bob"]}}"#)
        );
        assert_eq!(
            joined_ack(Some("3"), "r", 7, &online, false),
            r#"{"type":"ack","id":"3","room":"r","last_seq":7,"online":["bob"],"truncated":false}"#
        );
        assert_eq!(read_ack(Some("4"), 9), r#"{"type":"ack","id":"4","seq":9}"#);
        assert_eq!(online_ack(Some("5"), &online), r#"{"type":"ack","id":"5","online":["bob"]}"#);
        assert_eq!(
            online_page_ack(Some("5"), &online, true),
            r#"{"type":"ack","id":"5","online":["bob"],"online_truncated":true}"#
        );
        assert_eq!(refreshed_ack(Some("6"), 1), r#"{"type":"ack","id":"6","expires_at":"1970-01-01T00:00:01.000Z"}"#);
        let page = pb::HistoryResponse { messages: vec![], has_more: false };
        assert_eq!(page_ack(Some("7"), &page), r#"{"type":"ack","id":"7","messages":[],"has_more":false}"#);
        assert_eq!(
            rooms_ack(Some("8"), &pb::ListRoomsResponse::default()),
            r#"{"type":"ack","id":"8","rooms":[],"has_more":false}"#
        );
        let message = pb::Message { id: "m".into(), room_id: "r".into(), ..Default::default() };
        assert!(
            message_ack(Some("9"), &message).starts_with(r#"{"type":"ack","id":"9","message":{"id":"m","room":"r","#)
        );
    }

    #[test]
    fn errors_carry_retry_after_only_when_rate_limited() {
        assert_eq!(
            error(Some("e"), &CommandError::rate_limited("slow down", 250)),
            r#"{"type":"error","id":"e","code":"rate_limited","message":"slow down","retry_after_ms":250}"#
        );
        assert_eq!(
            error(None, &CommandError::new(ErrorCode::Unauthorized, "bad token")),
            r#"{"type":"error","code":"unauthorized","message":"bad token"}"#
        );
    }

    #[test]
    fn welcome_names_the_user_session_and_heartbeat() {
        let frame = welcome(Some("a1"), "alice", "s1", Duration::from_secs(30));
        let head =
            r#"{"type":"welcome","id":"a1","user_id":"alice","session_id":"s1","heartbeat_ms":30000,"server_time":""#;
        assert!(frame.starts_with(head), "{frame}");
        let v: Value = serde_json::from_str(&frame).unwrap();
        assert!(chrono::DateTime::parse_from_rfc3339(v["server_time"].as_str().unwrap()).is_ok());
        assert!(!welcome(None, "alice", "s1", Duration::from_secs(30)).contains(r#""id""#));
    }

    #[test]
    fn reconnect_says_when() {
        assert_eq!(reconnect(1234), r#"{"type":"reconnect","after_ms":1234}"#);
    }

    #[test]
    fn events_have_no_id_and_disconnects_are_not_sent() {
        use pb::envelope::Event as E;
        assert_eq!(typing_event("r", "alice", true), r#"{"type":"typing","room":"r","user_id":"alice","active":true}"#);
        let presence = E::Presence(pb::Presence { room_id: "r".into(), user_id: "bob".into(), online: false });
        assert_eq!(
            event_frame(&presence).unwrap(),
            r#"{"type":"presence","room":"r","user_id":"bob","status":"offline"}"#
        );
        let deleted = E::MessageDeleted(pb::MessageDeleted { room_id: "r".into(), message_id: "m".into(), seq: 3 });
        assert_eq!(event_frame(&deleted).unwrap(), r#"{"type":"message_deleted","room":"r","message_id":"m","seq":3}"#);
        let push = E::Push(pb::Push { event: "e".into(), data_json: r#"{"b":1,"a":2}"#.into() });
        assert_eq!(event_frame(&push).unwrap(), r#"{"type":"push","event":"e","data":{"a":2,"b":1}}"#);
        assert_eq!(
            event_frame(&E::RoomRemoved(pb::RoomRemoved { room_id: "r".into(), ..Default::default() })).unwrap(),
            r#"{"type":"room_removed","room":"r"}"#
        );
        assert_eq!(event_frame(&E::Disconnect(pb::Disconnect { user_id: "bob".into() })), None);
    }
}
