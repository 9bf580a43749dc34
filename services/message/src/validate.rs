//! Input rules of the contract, checked here because the message service is the one
//! authority every path (WebSocket, REST) goes through.

use chat_common::ids;

use crate::error::ServiceError;

/// Default longest message text, in Unicode scalar values (`MAX_TEXT_CHARS`).
pub const MAX_TEXT_CHARS: usize = 4000;
/// Longest user id (JWT `sub`).
pub const MAX_USER_ID_CHARS: usize = 128;
/// Longest room name.
pub const MAX_ROOM_NAME_CHARS: usize = 200;
/// Most members one `create_room` may name.
pub const MAX_CREATE_MEMBERS: usize = 1000;
/// Longest `client_msg_id`.
pub const MAX_CLIENT_MSG_ID_CHARS: usize = 64;

fn invalid(msg: impl Into<String>) -> ServiceError {
    ServiceError::InvalidArgument(msg.into())
}

/// Every string this service stores passes here first. Postgres `text` (and `jsonb`)
/// cannot hold U+0000: let through, one such string fails its statement, and in a group
/// commit the whole batch with it. Other control characters are stored as given:
/// Postgres holds them and JSON escapes them on the way out.
pub fn storable(what: &str, value: &str) -> Result<(), ServiceError> {
    if value.contains('\0') {
        return Err(invalid(format!("{what} must not contain U+0000")));
    }
    Ok(())
}

/// JSON text to be stored as `jsonb`: no `\u0000` escape in any string or key (`jsonb`
/// refuses it as `text` refuses the raw character).
fn storable_json(what: &str, json: &str) -> Result<(), ServiceError> {
    storable(what, json)?;
    // Outside strings valid JSON has no backslash, so every backslash starts an escape;
    // stepping over each escaped character keeps `\\u0000` (a backslash, then `u0000`)
    // apart from a real `\u0000`.
    let mut rest = json;
    while let Some(at) = rest.find('\\') {
        let escape = &rest[at + 1..];
        if escape.starts_with("u0000") {
            return Err(invalid(format!("{what} must not contain U+0000")));
        }
        let mut escaped = escape.chars();
        escaped.next();
        rest = escaped.as_str();
    }
    Ok(())
}

/// Parses a room id. Ids are opaque strings to clients: only the exact spelling we
/// issued names a room (`chat_common::ids`), so `"042"` is no room, not room 42.
pub fn room_id(raw: &str) -> Result<i64, ServiceError> {
    ids::parse(raw).ok_or(ServiceError::NotFound("room"))
}

/// Parses a message id the same way.
pub fn message_id(raw: &str) -> Result<i64, ServiceError> {
    ids::parse(raw).ok_or(ServiceError::NotFound("message"))
}

/// Parses an attachment id the same way.
pub fn attachment_id(raw: &str) -> Result<i64, ServiceError> {
    ids::parse(raw).ok_or(ServiceError::NotFound("attachment"))
}

/// A user id must be 1..=128 characters.
pub fn user_id(id: &str) -> Result<(), ServiceError> {
    let n = id.chars().count();
    if n == 0 || n > MAX_USER_ID_CHARS {
        return Err(invalid(format!("user ids must be 1 to {MAX_USER_ID_CHARS} characters")));
    }
    storable("user ids", id)
}

/// The caller's display name (the token's `name`), stored with each message they send.
pub fn sender_name(name: Option<&str>) -> Result<(), ServiceError> {
    name.map_or(Ok(()), |name| storable("the token's name", name))
}

/// The members named at room creation, without duplicates and without the creator.
pub fn members(creator: &str, members: Vec<String>) -> Result<Vec<String>, ServiceError> {
    if members.len() > MAX_CREATE_MEMBERS {
        return Err(invalid(format!("at most {MAX_CREATE_MEMBERS} members per request")));
    }
    let mut out: Vec<String> = Vec::with_capacity(members.len());
    for m in members {
        user_id(&m)?;
        if m != creator && !out.contains(&m) {
            out.push(m);
        }
    }
    Ok(out)
}

/// An optional room name: trimmed, empty means none, at most 200 characters.
pub fn room_name(name: Option<String>) -> Result<Option<String>, ServiceError> {
    let Some(name) = name.map(|n| n.trim().to_owned()).filter(|n| !n.is_empty()) else {
        return Ok(None);
    };
    if name.chars().count() > MAX_ROOM_NAME_CHARS {
        return Err(invalid(format!("room names are at most {MAX_ROOM_NAME_CHARS} characters")));
    }
    storable("room names", &name)?;
    Ok(Some(name))
}

/// Message text: 1..=`max` characters, or empty when attachments carry the content.
pub fn text(text: &str, has_attachments: bool, max: usize) -> Result<(), ServiceError> {
    let n = text.chars().count();
    if n > max {
        return Err(invalid(format!("text is {n} characters; the limit is {max}")));
    }
    if n == 0 && !has_attachments {
        return Err(invalid("text must not be empty"));
    }
    storable("text", text)
}

/// Message kind: `text` (the default), `image` or `file`.
pub fn message_kind(kind: Option<&str>) -> Result<&'static str, ServiceError> {
    match kind {
        None | Some("text") => Ok("text"),
        Some("image") => Ok("image"),
        Some("file") => Ok("file"),
        Some(other) => Err(invalid(format!("unknown message kind {other:?}; expected text, image or file"))),
    }
}

/// An optional `client_msg_id`: 1..=64 characters.
pub fn client_msg_id(id: Option<&str>) -> Result<(), ServiceError> {
    match id {
        Some(id) if id.is_empty() || id.chars().count() > MAX_CLIENT_MSG_ID_CHARS => {
            Err(invalid(format!("client_msg_id must be 1 to {MAX_CLIENT_MSG_ID_CHARS} characters")))
        }
        Some(id) => storable("client_msg_id", id),
        None => Ok(()),
    }
}

/// Longest reaction emoji, in characters (sequences with modifiers run long).
pub const MAX_EMOJI_CHARS: usize = 32;

/// A reaction: 1..=32 characters, no surrounding whitespace.
pub fn emoji(emoji: &str) -> Result<(), ServiceError> {
    let n = emoji.chars().count();
    if n == 0 || n > MAX_EMOJI_CHARS || emoji.trim() != emoji {
        return Err(invalid(format!("emoji must be 1 to {MAX_EMOJI_CHARS} characters without spaces around")));
    }
    storable("emoji", emoji)
}

/// Longest notification title.
pub const MAX_TITLE_CHARS: usize = 200;

/// A notification: 1..=1000 recipients, a title of 1..=200 characters, a body of at
/// most 4000, and its `data` as JSON text.
pub fn notification(user_ids: &[String], title: &str, body: &str, data_json: &str) -> Result<(), ServiceError> {
    if user_ids.is_empty() || user_ids.len() > MAX_CREATE_MEMBERS {
        return Err(invalid(format!("user_ids must name 1 to {MAX_CREATE_MEMBERS} users")));
    }
    user_ids.iter().try_for_each(|u| user_id(u))?;
    let n = title.chars().count();
    if n == 0 || n > MAX_TITLE_CHARS {
        return Err(invalid(format!("title must be 1 to {MAX_TITLE_CHARS} characters")));
    }
    if body.chars().count() > MAX_TEXT_CHARS {
        return Err(invalid(format!("body is at most {MAX_TEXT_CHARS} characters")));
    }
    storable("title", title)?;
    storable("body", body)?;
    storable_json("data", data_json)
}

/// Parses a notification id (`bad_request` when it is not one of ours, spelled as we
/// issued it).
pub fn notification_id(raw: &str) -> Result<i64, ServiceError> {
    ids::parse(raw).ok_or_else(|| invalid("not a notification id"))
}

/// Largest attachment.
pub const MAX_ATTACHMENT_BYTES: usize = 10 * 1024 * 1024;
/// Most attachments on one message.
pub const MAX_ATTACHMENTS: usize = 10;

/// Attachment ids of a message: at most 10, each one of ours.
pub fn attachment_ids(ids: &[String]) -> Result<Vec<i64>, ServiceError> {
    if ids.len() > MAX_ATTACHMENTS {
        return Err(invalid(format!("at most {MAX_ATTACHMENTS} attachments per message")));
    }
    let mut out: Vec<i64> = Vec::with_capacity(ids.len());
    for id in ids {
        let id = ids::parse(id).ok_or_else(|| invalid("unknown attachment id"))?;
        if !out.contains(&id) {
            out.push(id);
        }
    }
    Ok(out)
}

/// A file name safe to store and to echo in headers: no path, no control characters,
/// at most 255 characters; `file` when nothing is left. U+0000 is refused like in every
/// stored string, not dropped with the other control characters.
pub fn file_name(name: &str) -> Result<String, ServiceError> {
    storable("attachment names", name)?;
    let base = name.rsplit(['/', '\\']).next().unwrap_or_default();
    let clean: String = base.chars().filter(|c| !c.is_control()).take(255).collect();
    let clean = clean.trim().trim_start_matches('.').to_owned();
    Ok(if clean.is_empty() { "file".to_owned() } else { clean })
}

/// An attachment's content type (the gateway sends an allowlisted one).
pub fn content_type(content_type: &str) -> Result<(), ServiceError> {
    storable("content_type", content_type)
}

/// A history page size: 1..=100, 0 meaning the default 50.
pub fn history_limit(limit: u32) -> Result<i64, ServiceError> {
    match limit {
        0 => Ok(50),
        1..=100 => Ok(i64::from(limit)),
        _ => Err(invalid("limit must be between 1 and 100")),
    }
}

/// Most deliveries in one `MarkDelivered`: a gateway's second of coalesced `received`s.
pub const MAX_DELIVERIES: usize = 10_000;

/// A gateway's coalesced deliveries as (room, user, seq): ids that name no room are left
/// out (they would change nothing); a negative seq or an oversized batch is refused.
pub fn deliveries(deliveries: Vec<chat_proto::v1::Delivery>) -> Result<Vec<(i64, String, i64)>, ServiceError> {
    if deliveries.len() > MAX_DELIVERIES {
        return Err(invalid(format!("at most {MAX_DELIVERIES} deliveries at once")));
    }
    if deliveries.iter().any(|d| d.seq < 0) {
        return Err(invalid("seq must not be negative"));
    }
    Ok(deliveries.into_iter().filter_map(|d| Some((ids::parse(&d.room_id)?, d.user_id, d.seq))).collect())
}

/// Longest search query, in characters: a query is words, not a document.
pub const MAX_QUERY_CHARS: usize = 256;

/// A search query: not blank, at most [`MAX_QUERY_CHARS`], storable (no U+0000).
pub fn search_query(q: &str) -> Result<String, ServiceError> {
    storable("q", q)?;
    let q = q.trim();
    if q.is_empty() {
        return Err(invalid("q must not be blank"));
    }
    let n = q.chars().count();
    if n > MAX_QUERY_CHARS {
        return Err(invalid(format!("q is {n} characters; the limit is {MAX_QUERY_CHARS}")));
    }
    Ok(q.to_owned())
}

/// A search page size: 1..=50, 0 meaning the default 20.
pub fn search_limit(limit: u32) -> Result<i64, ServiceError> {
    match limit {
        0 => Ok(20),
        1..=50 => Ok(i64::from(limit)),
        _ => Err(invalid("limit must be between 1 and 50")),
    }
}

/// A `before_id` cursor: a message id, or the page would be wrong.
pub fn before_id(raw: &str) -> Result<i64, ServiceError> {
    ids::parse(raw).ok_or_else(|| invalid("before_id must be a message id"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn search_queries_are_trimmed_and_bounded_and_blank_ones_refused() {
        assert_eq!(search_query("  hello world ").unwrap(), "hello world");
        for bad in ["", "   ", "a\0b"] {
            assert!(search_query(bad).is_err(), "{bad:?}");
        }
        assert!(search_query(&"é".repeat(MAX_QUERY_CHARS)).is_ok());
        assert!(search_query(&"é".repeat(MAX_QUERY_CHARS + 1)).is_err());
        assert_eq!(search_limit(0).unwrap(), 20);
        assert!(search_limit(51).is_err());
        assert!(before_id("nope").is_err());
    }

    #[test]
    fn text_is_limited_to_4000_characters_not_bytes() {
        assert!(text(&"é".repeat(4000), false, MAX_TEXT_CHARS).is_ok());
        assert!(text(&"a".repeat(4001), false, MAX_TEXT_CHARS).is_err());
        assert!(text("", false, MAX_TEXT_CHARS).is_err());
        assert!(text("", true, MAX_TEXT_CHARS).is_ok());
        assert!(text("abc", false, 2).is_err());
    }

    #[test]
    fn members_are_deduplicated_and_exclude_the_creator() {
        let got = members("alice", vec!["bob".into(), "alice".into(), "bob".into(), "carol".into()]).unwrap();
        assert_eq!(got, vec!["bob".to_owned(), "carol".to_owned()]);
        assert!(members("alice", vec![String::new()]).is_err());
        assert!(members("alice", vec!["x".repeat(129)]).is_err());
    }

    #[test]
    fn ids_that_are_not_ours_name_nothing() {
        assert_eq!(room_id("42").unwrap(), 42);
        assert!(matches!(room_id("abc"), Err(ServiceError::NotFound("room"))));
        assert!(matches!(room_id("0"), Err(ServiceError::NotFound("room"))));
        assert!(matches!(message_id("-3"), Err(ServiceError::NotFound("message"))));
        for other in ["042", "+42", " 42", "4.2e1"] {
            assert!(matches!(room_id(other), Err(ServiceError::NotFound("room"))), "{other:?}");
            assert!(matches!(message_id(other), Err(ServiceError::NotFound("message"))), "{other:?}");
            assert!(matches!(attachment_id(other), Err(ServiceError::NotFound("attachment"))), "{other:?}");
            assert!(notification_id(other).is_err(), "{other:?}");
            assert!(attachment_ids(&[other.to_owned()]).is_err(), "{other:?}");
        }
    }

    #[test]
    fn file_names_lose_paths_and_control_characters() {
        let name = |n: &str| file_name(n).unwrap();
        assert_eq!(name("../../etc/passwd"), "passwd");
        assert_eq!(name("C:\\Users\\x\\report.pdf"), "report.pdf");
        assert_eq!(name("a\nb\r.txt"), "ab.txt");
        assert_eq!(name(""), "file");
        assert_eq!(name(".."), "file");
        assert_eq!(name(&"n".repeat(300)).len(), 255);
        assert!(file_name("a\0b.txt").is_err());
    }

    #[test]
    fn attachment_ids_are_bounded_and_deduplicated() {
        assert_eq!(attachment_ids(&["3".into(), "3".into(), "4".into()]).unwrap(), vec![3, 4]);
        assert!(attachment_ids(&["x".into()]).is_err());
        assert!(attachment_ids(&vec!["1".to_owned(); 11]).is_err());
    }

    #[test]
    fn history_limit_defaults_to_50_and_stops_at_100() {
        assert_eq!(history_limit(0).unwrap(), 50);
        assert_eq!(history_limit(100).unwrap(), 100);
        assert!(history_limit(101).is_err());
    }

    #[test]
    fn room_names_are_trimmed_and_bounded() {
        assert_eq!(room_name(Some("  general ".into())).unwrap().as_deref(), Some("general"));
        assert_eq!(room_name(Some("   ".into())).unwrap(), None);
        assert!(room_name(Some("n".repeat(201))).is_err());
    }

    #[test]
    fn kinds_and_client_msg_ids_follow_the_contract() {
        assert_eq!(message_kind(None).unwrap(), "text");
        assert_eq!(message_kind(Some("image")).unwrap(), "image");
        assert!(message_kind(Some("video")).is_err());
        assert!(client_msg_id(Some("")).is_err());
        assert!(client_msg_id(Some(&"c".repeat(65))).is_err());
        assert!(client_msg_id(Some("c-1")).is_ok());
        assert!(client_msg_id(None).is_ok());
    }

    #[test]
    fn every_stored_string_refuses_nul() {
        let nul = "a\0b";
        let refused =
            |r: Result<(), ServiceError>| matches!(r, Err(ServiceError::InvalidArgument(m)) if m.contains("U+0000"));
        assert!(refused(text(nul, false, MAX_TEXT_CHARS)));
        assert!(refused(room_name(Some(nul.into())).map(drop)));
        assert!(refused(client_msg_id(Some(nul))));
        assert!(refused(emoji(nul)));
        assert!(refused(user_id(nul)));
        assert!(refused(members("alice", vec![nul.into()]).map(drop)));
        assert!(refused(sender_name(Some(nul))));
        assert!(refused(notification(&["bob".into()], nul, "", "null")));
        assert!(refused(notification(&["bob".into()], "t", nul, "null")));
        assert!(refused(file_name(nul).map(drop)));
        assert!(refused(content_type(nul)));
    }

    #[test]
    fn notification_data_refuses_an_escaped_nul_anywhere() {
        let data = |json: &str| notification(&["bob".into()], "t", "b", json);
        assert!(data(r#"{"k":"a\u0000b"}"#).is_err());
        assert!(data(r#"{"a\u0000":1}"#).is_err());
        assert!(data(r#"["x", {"deep": ["\u0000"]}]"#).is_err());
        // An escaped backslash followed by `u0000` is six ordinary characters.
        assert!(data(r#"{"k":"\\u0000"}"#).is_ok());
        assert!(data(r#"{"k":"\\\u0000"}"#).is_err());
        assert!(data(r#"{"k":"\u0001 \"quoted\" \n"}"#).is_ok());
        assert!(data("null").is_ok());
    }

    #[test]
    fn other_control_characters_are_stored_as_given() {
        let controls = "tab\t nl\n cr\r bell\u{7} esc\u{1b} us\u{1f} del\u{7f} c1\u{85} end";
        assert!(text(controls, false, MAX_TEXT_CHARS).is_ok());
        assert_eq!(room_name(Some(controls.into())).unwrap().as_deref(), Some(controls));
        assert!(client_msg_id(Some("c\u{1}")).is_ok());
        assert!(emoji("\u{1}").is_ok());
        assert!(notification(&["bob".into()], controls, controls, r#""\u001f""#).is_ok());
    }
}
