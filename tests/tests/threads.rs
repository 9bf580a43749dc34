//! Threads (contract v1.1): `thread` lists a message's direct replies in seq order, the
//! message object carries `reply_count` and `last_reply_at`, and a reply's root is
//! announced with `message_edited` to members on every gateway.

use anyhow::Result;
use chat_tests::{http_json, token, Cluster};
use serde_json::{json, Value};

fn texts(messages: &Value) -> Vec<&str> {
    messages.as_array().map_or_else(Vec::new, |m| m.iter().map(|m| m["text"].as_str().unwrap_or_default()).collect())
}

#[tokio::test]
async fn replies_form_a_thread_and_update_the_roots_count_on_every_gateway() -> Result<()> {
    let cluster = Cluster::builder().gateways(2).start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let mut bob = cluster.client(1, "bob").await?;
    let room = alice.create_group(&["bob"]).await?;
    bob.ack(json!({"type": "join", "room": room})).await?;
    let root = alice.ack(json!({"type": "send", "room": room, "text": "lunch?"})).await?["message"].clone();
    assert_eq!((&root["reply_count"], &root["last_reply_at"]), (&json!(0), &Value::Null), "{root}");
    assert_eq!(bob.event("message").await?["message"]["seq"], 1);

    // Three replies, one of them to a reply (a second level the root's thread leaves out).
    let first = alice.ack(json!({"type": "send", "room": room, "text": "yes", "reply_to": root["id"]})).await?;
    let first = &first["message"];
    for (reply_to, text) in [(&root["id"], "noon"), (&first["id"], "nested"), (&root["id"], "ok")] {
        alice.ack(json!({"type": "send", "room": room, "text": text, "reply_to": reply_to})).await?;
    }

    // Bob, on the other gateway, hears each reply and then the root's new count.
    let mut counts = Vec::new();
    while counts.last() != Some(&3) {
        let frame = bob.recv().await?;
        if frame["type"] == "message_edited" && frame["message"]["id"] == root["id"] {
            assert!(frame["message"]["last_reply_at"].is_string(), "{frame}");
            counts.push(frame["message"]["reply_count"].as_i64().unwrap_or(-1));
        }
    }
    assert_eq!(counts, [1, 2, 3], "the root's count after each direct reply");

    let thread = bob.ack(json!({"type": "thread", "room": room, "root_seq": 1})).await?;
    assert_eq!(thread["root"]["text"], "lunch?");
    assert_eq!(thread["root"]["reply_count"], 3);
    assert_eq!(texts(&thread["replies"]), ["yes", "noon", "ok"], "{thread}");
    assert_eq!(thread["has_more"], false);
    // Pages, and the second level's own thread.
    let page = bob.ack(json!({"type": "thread", "room": room, "root_seq": 1, "limit": 2})).await?;
    assert_eq!((texts(&page["replies"]), &page["has_more"]), (vec!["yes", "noon"], &json!(true)));
    let last = page["replies"][1]["seq"].clone();
    let rest = bob.ack(json!({"type": "thread", "room": room, "root_seq": 1, "after_seq": last})).await?;
    assert_eq!(texts(&rest["replies"]), ["ok"]);
    let nested = bob.ack(json!({"type": "thread", "room": room, "root_seq": first["seq"]})).await?;
    assert_eq!(texts(&nested["replies"]), ["nested"]);
    // History carries the counts too.
    let history = bob.ack(json!({"type": "history", "room": room})).await?;
    assert_eq!(history["messages"][0]["reply_count"], 3);

    // Bad input: the contract's codes.
    let mut carol = cluster.client(0, "carol").await?;
    for (command, code, by_carol) in [
        (json!({"type": "thread", "room": room, "root_seq": 99}), "not_found", false),
        (json!({"type": "thread", "room": room}), "bad_request", false),
        (json!({"type": "thread", "room": room, "root_seq": 1, "limit": 101}), "bad_request", false),
        (json!({"type": "thread", "room": "999999999", "root_seq": 1}), "not_found", false),
        (json!({"type": "thread", "room": room, "root_seq": 1}), "forbidden", true),
    ] {
        let reply = if by_carol { carol.request(command.clone()).await? } else { bob.request(command.clone()).await? };
        assert_eq!(reply["code"], code, "{command} → {reply}");
    }

    // REST, on either gateway.
    let path = format!("/v1/rooms/{room}/threads/1?limit=2");
    let rest = http_json(&cluster.gateways[0], "GET", &path, Some(&token("bob")), None).await?;
    assert_eq!(rest.status, 200, "{rest:?}");
    assert_eq!(texts(&rest.body["replies"]), ["yes", "noon"]);
    let missing =
        http_json(&cluster.gateways[1], "GET", &format!("/v1/rooms/{room}/threads/99"), Some(&token("bob")), None)
            .await?;
    assert_eq!(missing.status, 404, "{missing:?}");
    let refused = http_json(&cluster.gateways[1], "GET", &path, Some(&token("carol")), None).await?;
    assert_eq!(refused.status, 403, "{refused:?}");
    Ok(())
}
