//! Readable, one-line-per-thing rendering of server frames.
//!
//! Every function takes the frame as JSON and never fails: a field that is missing or of
//! an unexpected type shows as `?`, so a newer server still prints something useful.

use std::io::Write;

use anyhow::Context;
use serde_json::{json, Value};

/// Writes one line to stdout. Unlike `println!`, a closed stdout (`chatctl … | head -1`)
/// is an error to return rather than a panic.
pub fn out(line: impl std::fmt::Display) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{line}").and_then(|()| stdout.flush()).context("writing to stdout")
}

/// What a command asked, so its `ack` can be shown in context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Asked {
    /// `join`.
    Join { room: String },
    /// `leave`.
    Leave { room: String },
    /// `send`.
    Send,
    /// `history`.
    History { room: String },
    /// `rooms`.
    Rooms,
    /// `search`, with what it asked: the "more…" line spells out the next page's command.
    Search { q: String, room: Option<String> },
    /// `thread`, with the room and root: the "more…" line spells out the next page's command.
    Thread { room: String, root_seq: u64 },
    /// `receipts`.
    Receipts { room: String },
    /// `create_room`.
    Create,
    /// `typing`.
    Typing,
    /// `refresh_token`, sent by chatctl itself.
    Refresh,
    /// A frame typed with `/raw`.
    Raw,
}

/// A scalar as text: ids may be strings or numbers; anything absent is `?`.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "?".into(),
        other => other.to_string(),
    }
}

fn names(list: &Value) -> String {
    match list.as_array() {
        Some(items) if !items.is_empty() => items.iter().map(text).collect::<Vec<_>>().join(", "),
        Some(_) => "nobody".into(),
        None => "?".into(),
    }
}

/// `connected as alice (session 9f0c…, heartbeat 25000 ms, server time …)`.
pub fn welcome(frame: &Value) -> String {
    format!(
        "connected as {} (session {}, heartbeat {} ms, server time {})",
        text(&frame["user_id"]),
        text(&frame["session_id"]),
        text(&frame["heartbeat_ms"]),
        text(&frame["server_time"]),
    )
}

/// `alice`, or `alice (Alice)` when the token carried another name.
fn sender(m: &Value) -> String {
    let mut sender = text(&m["sender_id"]);
    if let Some(name) = m["sender_name"].as_str().filter(|n| !n.is_empty() && *n != sender) {
        sender.push_str(&format!(" ({name})"));
    }
    sender
}

/// `[room 12 #3] alice: hello`, with markers for what the text alone does not show.
pub fn message(m: &Value) -> String {
    let sender = sender(m);
    let body = if m["deleted"] == true { "(deleted)".to_owned() } else { m["text"].as_str().unwrap_or("").to_owned() };
    let mut line = format!("[room {} #{}] {sender}: {body}", text(&m["room"]), text(&m["seq"]));
    if let Some(kind) = m["kind"].as_str().filter(|k| *k != "text") {
        line.push_str(&format!(" [{kind}]"));
    }
    if let Some(n) = m["attachments"].as_array().map(Vec::len).filter(|n| *n > 0) {
        line.push_str(&format!(" [+{n} attachment{}]", if n == 1 { "" } else { "s" }));
    }
    if !m["reply_to"].is_null() {
        line.push_str(&format!(" (reply to {})", text(&m["reply_to"])));
    }
    if !m["edited_at"].is_null() {
        line.push_str(" (edited)");
    }
    if let Some(n) = m["reply_count"].as_u64().filter(|n| *n > 0) {
        line.push_str(&format!(" [{}]", replies(n)));
    }
    if let Some(reactions) = m["reactions"].as_object().filter(|r| !r.is_empty()) {
        let shown: Vec<String> =
            reactions.iter().map(|(emoji, users)| format!("{emoji}{}", users.as_array().map_or(0, Vec::len))).collect();
        line.push_str(&format!(" {{{}}}", shown.join(" ")));
    }
    line
}

/// `1 reply`, `2 replies`.
fn replies(n: u64) -> String {
    format!("{n} repl{}", if n == 1 { "y" } else { "ies" })
}

/// One line for a server event (a frame without an `id`).
pub fn event(frame: &Value) -> String {
    let room = text(&frame["room"]);
    let user = text(&frame["user_id"]);
    match frame["type"].as_str().unwrap_or("") {
        "message" => message(&frame["message"]),
        "message_edited" => format!("{} (edit of {})", message(&frame["message"]), text(&frame["message"]["id"])),
        "message_deleted" => {
            format!("* message {} (#{}) deleted in {room}", text(&frame["message_id"]), text(&frame["seq"]))
        }
        "reaction" => {
            let verb = if frame["added"] == false { "removed" } else { "reacted" };
            format!("* {user} {verb} {} on message {} in {room}", text(&frame["emoji"]), text(&frame["message_id"]))
        }
        "typing" if frame["active"] == false => format!("* {user} stopped typing in {room}"),
        "typing" => format!("* {user} is typing in {room}"),
        "read" => format!("* {user} read {room} up to #{}", text(&frame["seq"])),
        "delivered" => format!("* {user} received {room} up to #{}", text(&frame["seq"])),
        "presence" => format!("* {user} {} in {room}", text(&frame["status"])),
        "room_added" => format!("* added to {}", room_summary(&frame["room"])),
        "room_removed" => format!("* removed from room {room}"),
        "notification" => {
            let n = &frame["notification"];
            let mut line = format!("* notification {}: {}", text(&n["id"]), text(&n["title"]));
            if let Some(body) = n["body"].as_str().filter(|b| !b.is_empty()) {
                line.push_str(&format!(" — {body}"));
            }
            if !n["data"].is_null() {
                line.push_str(&format!(" {}", n["data"]));
            }
            line
        }
        "push" => format!("* push {}: {}", text(&frame["event"]), frame["data"]),
        "reconnect" => format!("* the gateway is shutting down: reconnect after {} ms", text(&frame["after_ms"])),
        "welcome" => welcome(frame),
        _ => format!("? {frame}"),
    }
}

/// `[room 12 #3] alice: …the launch plan…`: one search hit, its snippet for the text.
pub fn hit(h: &Value) -> String {
    let m = &h["message"];
    // A snippet may span lines of a multi-line message; a hit must stay one line.
    let snippet = h["snippet"].as_str().unwrap_or("?").split_whitespace().collect::<Vec<_>>().join(" ");
    format!("[room {} #{}] {}: {snippet}", text(&m["room"]), text(&m["seq"]), sender(m))
}

/// `room 12 "general" (group): alice (owner), bob`.
fn room_summary(room: &Value) -> String {
    let mut line = format!("room {}", text(&room["id"]));
    if let Some(name) = room["name"].as_str().filter(|n| !n.is_empty()) {
        line.push_str(&format!(" {name:?}"));
    }
    line.push_str(&format!(" ({})", text(&room["kind"])));
    if let Some(members) = room["members"].as_array() {
        let shown: Vec<String> = members
            .iter()
            .map(|m| match m["role"].as_str() {
                Some(role) if role != "member" => format!("{} ({role})", text(&m["user_id"])),
                _ => text(&m["user_id"]),
            })
            .collect();
        line.push_str(&format!(": {}", shown.join(", ")));
    }
    line
}

/// The lines for a reply (`ack`, `error`, `pong`) to a command; `asked` is what that
/// command was, when chatctl sent it.
pub fn reply(asked: Option<&Asked>, frame: &Value) -> Vec<String> {
    let id = frame["id"].as_str().map(|id| format!(" {id}")).unwrap_or_default();
    match frame["type"].as_str().unwrap_or("") {
        "error" => {
            let mut line = format!("error{id} {}: {}", text(&frame["code"]), text(&frame["message"]));
            if let Some(ms) = frame["retry_after_ms"].as_u64() {
                line.push_str(&format!(" (retry after {ms} ms)"));
            }
            vec![line]
        }
        "pong" => vec![format!("pong{id}")],
        "ack" => ack(&id, asked, frame),
        _ => vec![format!("?{id} {frame}")],
    }
}

fn ack(id: &str, asked: Option<&Asked>, frame: &Value) -> Vec<String> {
    match asked {
        Some(Asked::Join { room }) => {
            let mut line = format!(
                "ack{id} joined {room} (last seq {}; online: {})",
                text(&frame["last_seq"]),
                names(&frame["online"])
            );
            if frame["truncated"] == true {
                line.push_str("; older missed messages were left out: page them with /history");
            }
            vec![line]
        }
        Some(Asked::Leave { room }) => vec![format!("ack{id} left {room}")],
        Some(Asked::Send) => {
            let m = &frame["message"];
            vec![format!("ack{id} sent message {} (room {} #{})", text(&m["id"]), text(&m["room"]), text(&m["seq"]))]
        }
        Some(Asked::History { room }) => {
            let messages = frame["messages"].as_array().map(Vec::as_slice).unwrap_or_default();
            let more = if frame["has_more"] == true { ", more before them" } else { "" };
            let mut lines = vec![format!("ack{id} history of {room}: {} message(s){more}", messages.len())];
            lines.extend(messages.iter().map(|m| format!("  {}", message(m))));
            lines
        }
        Some(Asked::Rooms) => {
            let rooms = frame["rooms"].as_array().map(Vec::as_slice).unwrap_or_default();
            let mut lines = vec![format!("ack{id} {} room(s)", rooms.len())];
            lines.extend(rooms.iter().map(|r| {
                let mut line = format!("  {}", text(&r["id"]));
                if let Some(name) = r["name"].as_str().filter(|n| !n.is_empty()) {
                    line.push_str(&format!(" {name:?}"));
                }
                line.push_str(&format!(
                    " ({}) last #{}, {} unread",
                    text(&r["kind"]),
                    text(&r["last_seq"]),
                    text(&r["unread"])
                ));
                if r["last_message"].is_object() {
                    line.push_str(&format!(" — {}", message(&r["last_message"])));
                }
                line
            }));
            lines
        }
        Some(Asked::Search { q, room }) => {
            let hits = frame["results"].as_array().map(Vec::as_slice).unwrap_or_default();
            let scope = room.as_ref().map(|r| format!(" in {r}")).unwrap_or_default();
            let mut lines = vec![format!("ack{id} search {q:?}{scope}: {} result(s)", hits.len())];
            lines.extend(hits.iter().map(|h| format!("  {}", hit(h))));
            if frame["has_more"] == true {
                // No slash command pages on; the exact frame of the next page can be pasted.
                let mut next = json!({"type": "search", "q": q});
                if let Some(room) = room {
                    next["room"] = json!(room);
                }
                if let Some(last) = hits.last() {
                    next["before_id"] = last["message"]["id"].clone();
                }
                lines.push(format!("  more… (next page: /raw {next})"));
            }
            lines
        }
        Some(Asked::Thread { room, root_seq }) => {
            let replies_shown = frame["replies"].as_array().map(Vec::as_slice).unwrap_or_default();
            let mut lines = vec![format!(
                "ack{id} thread of {room} #{root_seq}: {}",
                replies(u64::try_from(replies_shown.len()).unwrap_or(u64::MAX))
            )];
            lines.push(format!("  {}", message(&frame["root"])));
            lines.extend(replies_shown.iter().map(|m| format!("    {}", message(m))));
            if frame["has_more"] == true {
                let mut next = json!({"type": "thread", "room": room, "root_seq": root_seq});
                if let Some(last) = replies_shown.last() {
                    next["after_seq"] = last["seq"].clone();
                }
                lines.push(format!("  more… (next page: /raw {next})"));
            }
            lines
        }
        Some(Asked::Receipts { room }) => {
            let members = frame["members"].as_array().map(Vec::as_slice).unwrap_or_default();
            let mut lines = vec![format!("ack{id} receipts of {room}: {} member(s)", members.len())];
            lines.extend(members.iter().map(|m| {
                format!(
                    "  {}: delivered #{}, read #{}",
                    text(&m["user_id"]),
                    text(&m["delivered_seq"]),
                    text(&m["read_seq"])
                )
            }));
            lines
        }
        Some(Asked::Create) => vec![format!("ack{id} created {}", room_summary(&frame["room"]))],
        Some(Asked::Typing) => vec![format!("ack{id} typing")],
        Some(Asked::Refresh) => vec![format!("ack{id} token refreshed, expires {}", text(&frame["expires_at"]))],
        Some(Asked::Raw) | None => {
            // Show whatever result fields came back, without the envelope.
            let mut rest = frame.clone();
            if let Some(obj) = rest.as_object_mut() {
                obj.remove("type");
                obj.remove("id");
            }
            let rest = if rest.as_object().is_some_and(|o| o.is_empty()) { String::new() } else { format!(" {rest}") };
            vec![format!("ack{id}{rest}")]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn msg(seq: i64, text: &str) -> Value {
        json!({"id":"41","room":"12","seq":seq,"sender_id":"alice","kind":"text","text":text,
               "attachments":[],"reply_to":null,"edited_at":null,"deleted":false,"reactions":{}})
    }

    #[test]
    fn events_render_as_in_the_readme() {
        assert_eq!(event(&json!({"type":"message","room":"12","message":msg(3,"hello")})), "[room 12 #3] alice: hello");
        assert_eq!(event(&json!({"type":"typing","room":"12","user_id":"bob","active":true})), "* bob is typing in 12");
        assert_eq!(
            event(&json!({"type":"presence","room":"12","user_id":"bob","status":"online"})),
            "* bob online in 12"
        );
        assert_eq!(event(&json!({"type":"push","event":"deploy","data":{"v":2}})), r#"* push deploy: {"v":2}"#);
        assert!(event(&json!({"type":"brand_new"})).starts_with("? "));
    }

    #[test]
    fn messages_show_names_deletions_and_extras() {
        let mut m = msg(4, "hi");
        m["sender_name"] = json!("Alice");
        m["attachments"] = json!([{"id":"1"}]);
        m["reply_to"] = json!("40");
        assert_eq!(message(&m), "[room 12 #4] alice (Alice): hi [+1 attachment] (reply to 40)");
        let mut d = msg(5, "");
        d["deleted"] = json!(true);
        d["text"] = Value::Null;
        assert_eq!(message(&d), "[room 12 #5] alice: (deleted)");
    }

    #[test]
    fn search_hits_show_room_seq_sender_and_snippet_one_line_each_then_how_to_page_on() {
        let mut named = msg(7, "the whole launch plan, which is long");
        named["sender_name"] = json!("Alice");
        let mut older = msg(2, "launch\nday");
        older["id"] = json!("40");
        older["room"] = json!("9");
        let page = json!({"type":"ack","id":"r3","has_more":true,"results":[
            {"message": named, "snippet": "whole launch plan"},
            {"message": older, "snippet": "launch\nday"},
        ]});
        let asked = Asked::Search { q: "launch".into(), room: None };
        assert_eq!(
            reply(Some(&asked), &page),
            vec![
                r#"ack r3 search "launch": 2 result(s)"#,
                "  [room 12 #7] alice (Alice): whole launch plan",
                "  [room 9 #2] alice: launch day",
                r#"  more… (next page: /raw {"before_id":"40","q":"launch","type":"search"})"#,
            ]
        );
        let scoped = Asked::Search { q: "launch".into(), room: Some("9".into()) };
        let last = reply(Some(&scoped), &page).pop().unwrap_or_default();
        let next: Value =
            serde_json::from_str(last.trim_start_matches("  more… (next page: /raw ").trim_end_matches(')'))
                .unwrap_or_default();
        assert_eq!(next, json!({"type":"search","q":"launch","room":"9","before_id":"40"}));
        let mut last_page = page.clone();
        last_page["has_more"] = json!(false);
        assert!(!reply(Some(&asked), &last_page).iter().any(|l| l.contains("more…")));
    }

    #[test]
    fn a_thread_shows_its_root_then_each_reply_one_per_line_then_how_to_page_on() {
        let mut root = msg(3, "lunch?");
        root["reply_count"] = json!(3);
        let answer = |seq: i64, text: &str| {
            let mut m = msg(seq, text);
            m["sender_id"] = json!("bob");
            m["reply_to"] = json!("41");
            m
        };
        let page =
            json!({"type":"ack","id":"r2","root":root,"replies":[answer(4,"yes"), answer(6,"noon")],"has_more":true});
        let asked = Asked::Thread { room: "12".into(), root_seq: 3 };
        assert_eq!(
            reply(Some(&asked), &page),
            vec![
                "ack r2 thread of 12 #3: 2 replies",
                "  [room 12 #3] alice: lunch? [3 replies]",
                "    [room 12 #4] bob: yes (reply to 41)",
                "    [room 12 #6] bob: noon (reply to 41)",
                r#"  more… (next page: /raw {"after_seq":6,"room":"12","root_seq":3,"type":"thread"})"#,
            ]
        );
        let mut single = msg(3, "lunch?");
        single["reply_count"] = json!(1);
        let last = json!({"type":"ack","id":"r3","root":single,"replies":[answer(9,"ok")],"has_more":false});
        assert_eq!(
            reply(Some(&asked), &last),
            vec![
                "ack r3 thread of 12 #3: 1 reply",
                "  [room 12 #3] alice: lunch? [1 reply]",
                "    [room 12 #9] bob: ok (reply to 41)"
            ]
        );
    }

    #[test]
    fn receipts_show_one_member_per_line_and_delivered_events_one_line() {
        let ack = json!({"type":"ack","id":"r4","members":[
            {"user_id":"alice","delivered_seq":7,"read_seq":7},
            {"user_id":"bob","delivered_seq":5,"read_seq":2},
        ]});
        assert_eq!(
            reply(Some(&Asked::Receipts { room: "12".into() }), &ack),
            vec![
                "ack r4 receipts of 12: 2 member(s)",
                "  alice: delivered #7, read #7",
                "  bob: delivered #5, read #2"
            ]
        );
        assert_eq!(
            event(&json!({"type":"delivered","room":"12","user_id":"bob","seq":5})),
            "* bob received 12 up to #5"
        );
    }

    #[test]
    fn replies_render_in_context() {
        let err = json!({"type":"error","id":"r4","code":"forbidden","message":"not a member of this room"});
        assert_eq!(reply(None, &err), vec!["error r4 forbidden: not a member of this room"]);
        let join = json!({"type":"ack","id":"r1","room":"12","last_seq":3,"online":["alice","bob"]});
        assert_eq!(
            reply(Some(&Asked::Join { room: "12".into() }), &join),
            vec!["ack r1 joined 12 (last seq 3; online: alice, bob)"]
        );
        let history = json!({"type":"ack","id":"r2","messages":[msg(1,"a"), msg(2,"b")],"has_more":false});
        assert_eq!(
            reply(Some(&Asked::History { room: "12".into() }), &history),
            vec!["ack r2 history of 12: 2 message(s)", "  [room 12 #1] alice: a", "  [room 12 #2] alice: b"]
        );
        assert_eq!(reply(Some(&Asked::Raw), &json!({"type":"ack","id":"x"})), vec!["ack x"]);
        let none = json!({"type":"ack","id":"r5","results":[],"has_more":false});
        assert_eq!(
            reply(Some(&Asked::Search { q: "launch".into(), room: Some("12".into()) }), &none),
            vec![r#"ack r5 search "launch" in 12: 0 result(s)"#]
        );
        assert_eq!(reply(None, &json!({"type":"pong","id":"r9"})), vec!["pong r9"]);
    }
}
