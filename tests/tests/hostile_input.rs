//! Hostile input: a string the database cannot store (U+0000) is the sender's
//! `bad_request`, on every path that stores strings, and never another user's failure.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use chat_tests::{http, http_json, token, token_with, Cluster, HttpReply, WsClient};
use serde_json::{json, Value};
use tokio::task::JoinSet;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;

const NUL_TEXT: &str = "a\u{0}b";

fn admin() -> String {
    token_with(json!({"sub": "ops", "role": "admin", "exp": chrono::Utc::now().timestamp() + 3600}))
}

/// A WebSocket reply that refuses the command for its U+0000.
fn assert_refused(reply: &Value, what: &str) {
    assert_eq!(reply["type"], "error", "{what}: {reply}");
    assert_eq!(reply["code"], "bad_request", "{what}: {reply}");
    let message = reply["message"].as_str().unwrap_or_default();
    assert!(message.contains("U+0000"), "{what}: the message says why: {reply}");
}

/// An HTTP reply that refuses the request for its U+0000.
fn assert_http_refused(reply: &HttpReply, what: &str) {
    assert_eq!(reply.status, 400, "{what}: {reply:?}");
    assert_eq!(reply.body["error"]["code"], "bad_request", "{what}: {reply:?}");
    let message = reply.body["error"]["message"].as_str().unwrap_or_default();
    assert!(message.contains("U+0000"), "{what}: the message says why: {reply:?}");
}

#[tokio::test]
async fn every_stored_string_holding_nul_is_bad_request_and_nothing_is_stored() -> Result<()> {
    let cluster = Cluster::builder().start().await?;
    let gw = cluster.gateways[0].as_str();
    let mut alice = cluster.client(0, "alice").await?;
    let room = alice.create_group(&["bob"]).await?;
    let sent = alice.ack(json!({"type": "send", "room": room, "text": "hello"})).await?;
    let message = sent["message"]["id"].clone();

    for (what, command) in [
        ("send text", json!({"type": "send", "room": room, "text": NUL_TEXT})),
        ("client_msg_id", json!({"type": "send", "room": room, "text": "ok", "client_msg_id": "c\u{0}1"})),
        ("edit text", json!({"type": "edit", "message_id": message, "text": NUL_TEXT})),
        ("room name", json!({"type": "create_room", "kind": "group", "name": NUL_TEXT, "members": ["bob"]})),
        ("member id", json!({"type": "add_members", "room": room, "members": ["b\u{0}ob"]})),
        ("react emoji", json!({"type": "react", "message_id": message, "emoji": "👍\u{0}"})),
        ("unreact emoji", json!({"type": "unreact", "message_id": message, "emoji": "👍\u{0}"})),
    ] {
        assert_refused(&alice.request(command).await?, what);
    }

    let alices = token("alice");
    let rest_send = json!({"text": NUL_TEXT});
    let path = format!("/v1/rooms/{room}/messages");
    assert_http_refused(&http_json(gw, "POST", &path, Some(&alices), Some(rest_send)).await?, "REST send");
    let rest_room = json!({"kind": "group", "name": NUL_TEXT, "members": []});
    assert_http_refused(&http_json(gw, "POST", "/v1/rooms", Some(&alices), Some(rest_room)).await?, "REST room");
    for (what, notification) in [
        ("title", json!({"user_ids": ["bob"], "title": NUL_TEXT, "body": "b"})),
        ("body", json!({"user_ids": ["bob"], "title": "t", "body": NUL_TEXT})),
        ("data", json!({"user_ids": ["bob"], "title": "t", "body": "b", "data": {"k": [NUL_TEXT]}})),
    ] {
        let reply = http_json(gw, "POST", "/v1/notifications", Some(&admin()), Some(notification)).await?;
        assert_http_refused(&reply, what);
    }
    let upload = http(gw, "POST", "/v1/attachments?name=a%00b.txt", Some(&alices), "text/plain", b"bytes").await?;
    assert_http_refused(&upload, "attachment name");

    // Nothing of it was stored, and the good message is as it was.
    let history = alice.ack(json!({"type": "history", "room": room})).await?;
    assert_eq!(history["messages"].as_array().map(Vec::len), Some(1), "{history}");
    assert_eq!(history["messages"][0]["text"], "hello");
    assert_eq!(history["messages"][0]["edited_at"], Value::Null);
    assert_eq!(history["messages"][0]["reactions"], json!({}));
    let rooms = alice.ack(json!({"type": "rooms"})).await?;
    assert_eq!(rooms["rooms"].as_array().map(Vec::len), Some(1), "no room was created: {rooms}");
    let bobs = http_json(gw, "GET", "/v1/notifications", Some(&token("bob")), None).await?;
    assert_eq!(bobs.body["notifications"], json!([]), "{bobs:?}");
    Ok(())
}

#[tokio::test]
async fn other_control_characters_are_stored_and_returned_as_given() -> Result<()> {
    let cluster = Cluster::builder().start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let controls = "tab\t nl\n cr\r bell\u{7} esc\u{1b} us\u{1f} del\u{7f}";
    let created =
        alice.ack(json!({"type": "create_room", "kind": "group", "name": controls, "members": ["bob"]})).await?;
    assert_eq!(created["room"]["name"], controls);
    let room = created["room"]["id"].clone();
    let sent = alice.ack(json!({"type": "send", "room": room, "text": controls, "client_msg_id": "c\u{1}"})).await?;
    assert_eq!(sent["message"]["text"], controls);
    assert_eq!(sent["message"]["client_msg_id"], "c\u{1}");
    let history = alice.ack(json!({"type": "history", "room": room})).await?;
    assert_eq!(history["messages"][0]["text"], controls);
    Ok(())
}

#[tokio::test]
async fn a_token_whose_name_or_sub_holds_nul_is_refused() -> Result<()> {
    let cluster = Cluster::builder().start().await?;
    let gw = cluster.gateways[0].as_str();
    let exp = chrono::Utc::now().timestamp() + 3600;
    let named = token_with(json!({"sub": "alice", "name": "Al\u{0}ice", "exp": exp}));
    let subject = token_with(json!({"sub": "al\u{0}ice", "exp": exp}));
    for (bad, says) in [(&named, "token name must not contain U+0000"), (&subject, "U+0000")] {
        let reply = http_json(gw, "GET", "/v1/rooms", Some(bad), None).await?;
        assert_eq!(reply.status, 401, "{reply:?}");
        assert_eq!(reply.body["error"]["code"], "unauthorized", "{reply:?}");
        let message = reply.body["error"]["message"].as_str().unwrap_or_default();
        assert!(message.contains(says), "{reply:?}");

        assert!(WsClient::connect_bearer(&cluster.ws_url(0), bad).await.is_err(), "the upgrade is refused");

        let (ws, _) = tokio_tungstenite::connect_async(cluster.ws_url(0).into_client_request()?).await?;
        let mut client = WsClient::from_stream(ws);
        client.send(&json!({"type": "auth", "id": "a1", "token": bad})).await?;
        let error = client.recv().await?;
        assert_eq!(error["code"], "unauthorized", "{error}");
        assert!(error["message"].as_str().unwrap_or_default().contains(says), "{error}");
        assert_eq!(client.closed().await?, Some(1008));
    }
    Ok(())
}

/// One user sends U+0000 texts as fast as the rate limit allows, on several connections,
/// while four others send in their own rooms. With one commit worker every room's sends
/// share batches, so before the fix the poisoned sends failed whole batches of others.
#[tokio::test]
async fn one_users_nul_sends_never_fail_other_users_sends() -> Result<()> {
    const SENDERS: usize = 4;
    const PER_SENDER: i64 = 60;
    const HOSTILE_CONNECTIONS: usize = 3;
    let cluster = Cluster::builder().env("COMMIT_WORKERS", "1").start().await?;

    let mut mallory = Vec::new();
    for _ in 0..HOSTILE_CONNECTIONS {
        mallory.push(cluster.client(0, "mallory").await?);
    }
    let poisoned_room = mallory[0].create_group(&[]).await?;
    let done = Arc::new(AtomicBool::new(false));
    let mut hostile = JoinSet::new();
    for mut client in mallory {
        let (room, done) = (poisoned_room.clone(), done.clone());
        hostile.spawn(async move {
            let mut codes: BTreeMap<String, u64> = BTreeMap::new();
            while !done.load(Ordering::Relaxed) {
                let reply = client.request(json!({"type": "send", "room": room, "text": NUL_TEXT})).await?;
                let code = reply["code"].as_str().unwrap_or("ack").to_owned();
                if code == "rate_limited" {
                    // As fast as allowed: exactly as long as the gateway says.
                    let wait = reply["retry_after_ms"].as_u64().context("retry_after_ms")?;
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                *codes.entry(code).or_default() += 1;
            }
            Ok::<_, anyhow::Error>(codes)
        });
    }

    let mut senders = JoinSet::new();
    for n in 0..SENDERS {
        let mut client = cluster.client(0, &format!("user{n}")).await?;
        let room = client.create_group(&[]).await?;
        senders.spawn(async move {
            let mut replies = Vec::new();
            for i in 0..PER_SENDER {
                let reply = client.request(json!({"type": "send", "room": room, "text": format!("{n}.{i}")})).await?;
                replies.push(reply);
            }
            Ok::<_, anyhow::Error>(replies)
        });
    }
    let mut failed: BTreeMap<String, u64> = BTreeMap::new();
    let mut acked = 0;
    while let Some(replies) = senders.join_next().await {
        let replies = replies??;
        let seqs: Vec<i64> = replies.iter().filter_map(|r| r["message"]["seq"].as_i64()).collect();
        for reply in &replies {
            match reply["type"].as_str() {
                Some("ack") => acked += 1,
                _ => *failed.entry(reply["code"].as_str().unwrap_or("?").to_owned()).or_default() += 1,
            }
        }
        if seqs.len() == replies.len() {
            assert_eq!(seqs, (1..=PER_SENDER).collect::<Vec<_>>(), "each room's seqs are gapless");
        }
    }
    done.store(true, Ordering::Relaxed);
    let mut hostile_codes: BTreeMap<String, u64> = BTreeMap::new();
    while let Some(codes) = hostile.join_next().await {
        for (code, n) in codes?? {
            *hostile_codes.entry(code).or_default() += n;
        }
    }

    assert!(
        failed.is_empty(),
        "{acked} acked; the others' failed sends by code: {failed:?} (hostile: {hostile_codes:?})"
    );
    assert!(hostile_codes.get("bad_request").is_some_and(|n| *n > 0), "the poison was sent: {hostile_codes:?}");
    let unexpected: Vec<&String> =
        hostile_codes.keys().filter(|c| *c != "bad_request" && *c != "rate_limited").collect();
    assert!(unexpected.is_empty(), "the poisoned sends are bad_request (or over the rate): {hostile_codes:?}");
    Ok(())
}
