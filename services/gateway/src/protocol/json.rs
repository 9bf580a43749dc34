//! The JSON objects of contract v1 (message, room, attachment, notification) and the
//! bodies built from them, written the same way over WebSocket and REST.
//!
//! REST bodies that were first built with `json!` keep its sorted key order (serde_json
//! without `preserve_order`), so that their bytes do not change; the tests pin it.

use chat_proto::v1 as pb;
use chrono::{SecondsFormat, Utc};
use serde::ser::SerializeMap;
use serde::{Serialize, Serializer};
use serde_json::{json, Value};

pub use chat_common::message_json::{timestamp, AttachmentJson, MessageJson};

use crate::error::CommandError;
use crate::state::Readiness;

/// The current time as the contract writes it.
pub fn now() -> String {
    Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true)
}

// ---------- objects ----------

/// A room object as the contract shows it.
pub struct RoomJson<'a>(pub &'a pb::Room);

impl Serialize for RoomJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        #[derive(Serialize)]
        struct MemberJson<'a> {
            user_id: &'a str,
            role: &'static str,
        }
        let r = self.0;
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
        map.serialize_entry("kind", kind_name(r.kind))?;
        map.serialize_entry("members", &members)?;
        map.serialize_entry("created_at", &timestamp(r.created_at_ms))?;
        map.end()
    }
}

/// A room summary of the `rooms` reply.
pub struct RoomSummaryJson<'a>(pub &'a pb::RoomSummary);

impl Serialize for RoomSummaryJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
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

/// A notification object: `{id, title, body, data, created_at, read}`.
pub struct NotificationJson<'a>(pub &'a pb::Notification);

impl Serialize for NotificationJson<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let n = self.0;
        let data: Value = serde_json::from_str(&n.data_json).unwrap_or_default();
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

// ---------- bodies shared by acks and REST responses ----------

#[derive(Serialize)]
struct RoomBody<'a> {
    room: RoomJson<'a>,
}

/// `{room}`: the create_room ack and `POST /v1/rooms` response.
pub fn room_body(room: &pb::Room) -> impl Serialize + '_ {
    RoomBody { room: RoomJson(room) }
}

#[derive(Serialize)]
struct MessageBody<'a> {
    message: MessageJson<'a>,
}

/// `{message}`: the send/edit ack and `POST /v1/rooms/{id}/messages` response.
pub fn message_body(message: &pb::Message) -> impl Serialize + '_ {
    MessageBody { message: MessageJson(message) }
}

#[derive(Serialize)]
struct PageBody<'a> {
    messages: Vec<MessageJson<'a>>,
    has_more: bool,
}

/// `{messages, has_more}`: a history page.
pub fn page_body(page: &pb::HistoryResponse) -> impl Serialize + '_ {
    PageBody { messages: page.messages.iter().map(MessageJson).collect(), has_more: page.has_more }
}

#[derive(Serialize)]
struct ThreadBody<'a> {
    root: MessageJson<'a>,
    replies: Vec<MessageJson<'a>>,
    has_more: bool,
}

/// `{root, replies, has_more}`: the thread ack and `GET /v1/rooms/{id}/threads/{root_seq}`.
pub fn thread_body(thread: &crate::backend::Thread) -> impl Serialize + '_ {
    ThreadBody {
        root: MessageJson(&thread.root),
        replies: thread.replies.iter().map(MessageJson).collect(),
        has_more: thread.has_more,
    }
}

#[derive(Serialize)]
struct DeadWebhookJson<'a> {
    id: &'a str,
    user_id: &'a str,
    room: &'a str,
    seq: i64,
    attempts: i32,
    last_error: Option<&'a str>,
    created_at: String,
}

/// `{webhooks: [{id, user_id, room, seq, attempts, last_error, created_at}]}`.
pub fn dead_webhooks_body(webhooks: &[pb::DeadWebhook]) -> Value {
    let webhooks: Vec<DeadWebhookJson<'_>> = webhooks
        .iter()
        .map(|w| DeadWebhookJson {
            id: &w.id,
            user_id: &w.user_id,
            room: &w.room_id,
            seq: w.seq,
            attempts: w.attempts,
            last_error: w.last_error.as_deref(),
            created_at: timestamp(w.created_at_ms),
        })
        .collect();
    json!({ "webhooks": webhooks })
}

#[derive(Serialize)]
struct ReceiptsBody<'a> {
    members: Vec<ReceiptJson<'a>>,
}

#[derive(Serialize)]
struct ReceiptJson<'a> {
    user_id: &'a str,
    delivered_seq: i64,
    read_seq: i64,
}

/// `{members: [{user_id, delivered_seq, read_seq}]}`: the receipts ack and
/// `GET /v1/rooms/{id}/receipts`.
pub fn receipts_body(receipts: &pb::ReceiptsResponse) -> impl Serialize + '_ {
    let members = receipts
        .members
        .iter()
        .map(|m| ReceiptJson { user_id: &m.user_id, delivered_seq: m.delivered_seq, read_seq: m.read_seq })
        .collect();
    ReceiptsBody { members }
}

#[derive(Serialize)]
struct SearchBody<'a> {
    results: Vec<HitJson<'a>>,
    has_more: bool,
}

#[derive(Serialize)]
struct HitJson<'a> {
    message: MessageJson<'a>,
    snippet: &'a str,
}

/// `{results: [{message, snippet}], has_more}`: the search ack and `GET /v1/search`.
/// A hit without a message (a service that sent none) is left out.
pub fn search_body(page: &pb::SearchResponse) -> impl Serialize + '_ {
    let results = page
        .results
        .iter()
        .filter_map(|h| Some(HitJson { message: MessageJson(h.message.as_ref()?), snippet: &h.snippet }))
        .collect();
    SearchBody { results, has_more: page.has_more }
}

#[derive(Serialize)]
struct RoomsBody<'a> {
    rooms: Vec<RoomSummaryJson<'a>>,
    has_more: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    next: Option<&'a str>,
}

/// `{rooms, has_more, next?}`: the rooms ack and `GET /v1/rooms` response; `next` (the
/// cursor for the following page) only when `has_more`.
pub fn rooms_body(page: &pb::ListRoomsResponse) -> impl Serialize + '_ {
    RoomsBody {
        rooms: page.rooms.iter().map(RoomSummaryJson).collect(),
        has_more: page.has_more,
        next: page.next.as_deref().filter(|_| page.has_more),
    }
}

// ---------- REST-only bodies ----------

#[derive(Serialize)]
struct Uploaded<'a> {
    attachment: AttachmentJson<'a>,
}

/// `{attachment}`: the `POST /v1/attachments` response.
pub fn attachment_body(attachment: &pb::Attachment) -> impl Serialize + '_ {
    Uploaded { attachment: AttachmentJson(attachment) }
}

#[derive(Serialize)]
struct Status<'a> {
    user_id: &'a str,
    online: bool,
    connections: i64,
}

/// `{user_id, online, connections}`: a user's presence across the cluster.
pub fn status_body(user_id: &str, connections: i64) -> impl Serialize + '_ {
    Status { user_id, online: connections > 0, connections }
}

/// `{users:[{user_id, connections}]}`: every connected user across the cluster.
pub fn connections_body(users: impl IntoIterator<Item = (String, i64)>) -> Value {
    let users: Vec<Value> = users
        .into_iter()
        .map(|(user_id, connections)| json!({"user_id": user_id, "connections": connections}))
        .collect();
    json!({ "users": users })
}

/// `{}`: an accepted request with nothing to report.
pub fn empty_body() -> Value {
    json!({})
}

/// `{notifications}`: the notifications just stored.
pub fn notifications_body(stored: &[pb::Notification]) -> Value {
    let notifications: Vec<NotificationJson<'_>> = stored.iter().map(NotificationJson).collect();
    json!({ "notifications": notifications })
}

/// `{notifications, has_more, unread}`: a page of a user's notifications.
pub fn notifications_page_body(page: &pb::ListNotificationsResponse) -> Value {
    let notifications: Vec<NotificationJson<'_>> = page.notifications.iter().map(NotificationJson).collect();
    json!({
        "notifications": notifications,
        "has_more": page.has_more,
        "unread": page.unread,
    })
}

/// `{updated}`: how many notifications were marked read.
pub fn updated_body(updated: i64) -> Value {
    json!({ "updated": updated })
}

#[derive(Serialize)]
struct DevToken<'a> {
    token: &'a str,
    user_id: &'a str,
    expires_at: String,
}

/// `{token, user_id, expires_at}`: a signed development token expiring at `exp` (Unix s).
pub fn dev_token_body<'a>(token: &'a str, user_id: &'a str, exp: i64) -> impl Serialize + 'a {
    DevToken { token, user_id, expires_at: timestamp(exp * 1000) }
}

/// `{"error":{"code","message"}}`: every HTTP error response.
pub fn http_error_body(err: &CommandError) -> Value {
    match err.retry_after_ms {
        Some(ms) => json!({"error": {"code": err.code, "message": err.message, "retry_after_ms": ms}}),
        None => json!({"error": {"code": err.code, "message": err.message}}),
    }
}

/// `{status:"ok"}`: liveness.
pub fn health_body() -> Value {
    json!({"status": "ok"})
}

/// `{status, checks}`: readiness and what it is made of.
pub fn readiness_body(readiness: &Readiness, ready: bool) -> Value {
    json!({
        "status": if ready { "ready" } else { "not_ready" },
        "checks": {
            "draining": readiness.draining,
            "full": readiness.full,
            "message_service": readiness.message_service,
            "redis": readiness.redis,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorCode;

    fn to_string(body: impl Serialize) -> String {
        serde_json::to_string(&body).unwrap()
    }

    fn notification() -> pb::Notification {
        pb::Notification {
            id: "n1".into(),
            title: "Hi".into(),
            body: "there".into(),
            data_json: r#"{"k":1}"#.into(),
            created_at_ms: 0,
            read: false,
            ..Default::default()
        }
    }

    #[test]
    fn timestamps_are_utc_with_milliseconds() {
        assert_eq!(timestamp(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(timestamp(0), "1970-01-01T00:00:00.000Z");
        assert!(chrono::DateTime::parse_from_rfc3339(&now()).is_ok());
    }

    #[test]
    fn rooms_show_their_kind_and_member_roles() {
        let room = pb::Room {
            id: "r".into(),
            name: Some("Ops".into()),
            kind: pb::RoomKind::Support as i32,
            members: vec![
                pb::Member { user_id: "alice".into(), role: pb::MemberRole::Owner as i32 },
                pb::Member { user_id: "bob".into(), role: pb::MemberRole::Member as i32 },
            ],
            ..Default::default()
        };
        assert_eq!(
            to_string(room_body(&room)),
            r#"{"room":{"id":"r","name":"Ops","kind":"support","members":[{"user_id":"alice","role":"owner"},{"user_id":"bob","role":"member"}],"created_at":"1970-01-01T00:00:00.000Z"}}"#
        );
    }

    #[test]
    fn attachments_link_to_their_download() {
        let a = pb::Attachment { id: "7".into(), name: "a.png".into(), content_type: "image/png".into(), size: 3 };
        assert_eq!(
            to_string(attachment_body(&a)),
            r#"{"attachment":{"id":"7","name":"a.png","content_type":"image/png","size":3,"url":"/v1/attachments/7"}}"#
        );
    }

    #[test]
    fn summaries_and_pages_wrap_their_objects() {
        let summary = pb::RoomSummary {
            id: "1".into(),
            name: Some("g".into()),
            kind: pb::RoomKind::Group as i32,
            last_seq: 2,
            unread: 1,
            last_message: None,
        };
        assert_eq!(
            to_string(rooms_body(&pb::ListRoomsResponse {
                rooms: vec![summary],
                has_more: true,
                next: Some("2.1".into())
            })),
            r#"{"rooms":[{"id":"1","name":"g","kind":"group","last_seq":2,"unread":1,"last_message":null}],"has_more":true,"next":"2.1"}"#
        );
        let page = pb::HistoryResponse { messages: vec![], has_more: true };
        assert_eq!(to_string(page_body(&page)), r#"{"messages":[],"has_more":true}"#);
    }

    #[test]
    fn rest_notifications_keep_their_sorted_keys() {
        let websocket_order = r#"{"id":"n1","title":"Hi","body":"there","data":{"k":1},"created_at":"1970-01-01T00:00:00.000Z","read":false}"#;
        assert_eq!(to_string(NotificationJson(&notification())), websocket_order);
        let sorted = r#"{"body":"there","created_at":"1970-01-01T00:00:00.000Z","data":{"k":1},"id":"n1","read":false,"title":"Hi"}"#;
        assert_eq!(to_string(notifications_body(&[notification()])), format!(r#"{{"notifications":[{sorted}]}}"#));
        let page = pb::ListNotificationsResponse { notifications: vec![notification()], has_more: false, unread: 4 };
        assert_eq!(
            to_string(notifications_page_body(&page)),
            format!(r#"{{"has_more":false,"notifications":[{sorted}],"unread":4}}"#)
        );
    }

    #[test]
    fn presence_and_admin_bodies_are_exact() {
        assert_eq!(to_string(status_body("alice", 2)), r#"{"user_id":"alice","online":true,"connections":2}"#);
        assert_eq!(to_string(status_body("bob", 0)), r#"{"user_id":"bob","online":false,"connections":0}"#);
        assert_eq!(
            to_string(connections_body([("alice".to_owned(), 2)])),
            r#"{"users":[{"connections":2,"user_id":"alice"}]}"#
        );
        assert_eq!(to_string(empty_body()), "{}");
        assert_eq!(to_string(updated_body(3)), r#"{"updated":3}"#);
    }

    #[test]
    fn dev_tokens_errors_and_health_are_exact() {
        assert_eq!(
            to_string(dev_token_body("t", "alice", 1)),
            r#"{"token":"t","user_id":"alice","expires_at":"1970-01-01T00:00:01.000Z"}"#
        );
        let err = CommandError::new(ErrorCode::NotFound, "no such endpoint");
        assert_eq!(to_string(http_error_body(&err)), r#"{"error":{"code":"not_found","message":"no such endpoint"}}"#);
        assert_eq!(to_string(health_body()), r#"{"status":"ok"}"#);
        let ready = Readiness { draining: false, full: false, message_service: true, redis: true };
        assert_eq!(
            to_string(readiness_body(&ready, ready.is_ready())),
            r#"{"checks":{"draining":false,"full":false,"message_service":true,"redis":true},"status":"ready"}"#
        );
        let draining = Readiness { draining: true, ..ready };
        assert!(to_string(readiness_body(&draining, draining.is_ready())).ends_with(r#""status":"not_ready"}"#));
        let full = Readiness { full: true, ..ready };
        assert!(to_string(readiness_body(&full, full.is_ready())).ends_with(r#""status":"not_ready"}"#));
    }
}
