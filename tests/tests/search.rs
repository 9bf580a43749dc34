//! `search` (contract v1.1) across both gateways, over WebSocket and REST: only rooms the
//! caller is in, current text only, newest first, with clear errors for bad input.

use anyhow::Result;
use chat_tests::{http_json, token, Cluster};
use serde_json::{json, Value};

/// The texts of a search reply's results, in order.
fn texts(reply: &Value) -> Vec<String> {
    reply["results"].as_array().map_or_else(Vec::new, |r| {
        r.iter().map(|hit| hit["message"]["text"].as_str().unwrap_or_default().to_owned()).collect()
    })
}

#[tokio::test]
async fn search_finds_current_text_in_the_callers_rooms_on_either_gateway() -> Result<()> {
    // More searches in a row than a person's burst: the rate has its own test below.
    let cluster = Cluster::builder().gateways(2).env("RATE_SEARCH_BURST", "100").start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let mut bob = cluster.client(1, "bob").await?;
    let mut carol = cluster.client(1, "carol").await?;
    let ours = alice.create_group(&["bob"]).await?;
    let theirs = carol.create_group(&[]).await?;
    carol.ack(json!({"type": "send", "room": theirs, "text": "the launch plan is secret"})).await?;
    for text in ["launch on friday", "lunch at noon", "the launch slipped", "launch typo"] {
        alice.ack(json!({"type": "send", "room": ours, "text": text})).await?;
    }
    let msg_id = |ack: &Value| ack["message"]["id"].as_str().unwrap_or_default().to_owned();
    let slipped = alice.ack(json!({"type": "history", "room": ours})).await?;
    let ids: Vec<String> =
        slipped["messages"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap().to_owned()).collect();
    alice.ack(json!({"type": "delete", "message_id": ids[2]})).await?;
    alice.ack(json!({"type": "edit", "message_id": ids[3], "text": "fixed wording"})).await?;

    // Bob, on the other gateway, sees his room's matches newest first: never carol's room,
    // the deleted one or the edited one's old text.
    let found = bob.ack(json!({"type": "search", "q": "LAUNCH"})).await?;
    assert_eq!(texts(&found), ["launch on friday"], "{found}");
    assert_eq!(found["has_more"], false);
    assert!(found["results"][0]["snippet"].as_str().unwrap_or_default().contains("launch"), "{found}");
    assert_eq!(texts(&bob.ack(json!({"type": "search", "q": "wording"})).await?), ["fixed wording"]);
    assert_eq!(texts(&carol.ack(json!({"type": "search", "q": "launch"})).await?), ["the launch plan is secret"]);
    // Phrases and exclusions, one room, and pages by before_id.
    assert_eq!(texts(&bob.ack(json!({"type": "search", "q": "\"at noon\""})).await?), ["lunch at noon"]);
    let page = bob.ack(json!({"type": "search", "q": "launch OR lunch OR wording", "room": ours, "limit": 1})).await?;
    assert_eq!((texts(&page), &page["has_more"]), (vec!["fixed wording".to_owned()], &json!(true)));
    let last = msg_id(&page["results"][0]);
    let next = bob.ack(json!({"type": "search", "q": "launch OR lunch OR wording", "before_id": last})).await?;
    assert_eq!(texts(&next), ["lunch at noon", "launch on friday"]);
    let excluded = bob.ack(json!({"type": "search", "q": "launch -friday"})).await?;
    assert_eq!(texts(&excluded), Vec::<String>::new(), "{excluded}");

    // Bad input gets the contract's codes, and the connection goes on.
    for (command, code) in [
        (json!({"type": "search", "q": "  "}), "bad_request"),
        (json!({"type": "search"}), "bad_request"),
        (json!({"type": "search", "q": "x", "limit": 51}), "bad_request"),
        (json!({"type": "search", "q": "x", "limit": 0}), "bad_request"),
        (json!({"type": "search", "q": "x".repeat(257)}), "bad_request"),
        (json!({"type": "search", "q": "launch", "room": theirs}), "forbidden"),
        (json!({"type": "search", "q": "launch", "room": "999999999"}), "not_found"),
    ] {
        let reply = bob.request(command.clone()).await?;
        assert_eq!(reply["code"], code, "{command} → {reply}");
    }
    assert_eq!(texts(&bob.ack(json!({"type": "search", "q": "noon"})).await?), ["lunch at noon"]);

    // The same over REST, on either gateway.
    let rest = http_json(&cluster.gateways[0], "GET", "/v1/search?q=launch&limit=5", Some(&token("bob")), None).await?;
    assert_eq!(rest.status, 200, "{rest:?}");
    assert_eq!(texts(&rest.body), ["launch on friday"]);
    let scoped = format!("/v1/search?q=%22at%20noon%22&room={ours}");
    let rest = http_json(&cluster.gateways[1], "GET", &scoped, Some(&token("alice")), None).await?;
    assert_eq!(texts(&rest.body), ["lunch at noon"], "{rest:?}");
    for (path, who, status) in [
        ("/v1/search?q=", Some("bob"), 400),
        ("/v1/search", Some("bob"), 400),
        ("/v1/search?q=x&limit=99", Some("bob"), 400),
        (&*format!("/v1/search?q=launch&room={theirs}"), Some("bob"), 403),
        ("/v1/search?q=launch", None, 401),
    ] {
        let token = who.map(token);
        let reply = http_json(&cluster.gateways[0], "GET", path, token.as_deref(), None).await?;
        assert_eq!(reply.status, status, "{path} → {reply:?}");
    }
    Ok(())
}

#[tokio::test]
async fn one_users_search_flood_is_refused_and_leaves_others_searching_and_sending() -> Result<()> {
    let cluster = Cluster::builder().start().await?;
    let mut mallory = cluster.client(0, "mallory").await?;
    let mut alice = cluster.client(0, "alice").await?;
    let room = alice.create_group(&["mallory"]).await?;
    alice.ack(json!({"type": "send", "room": room, "text": "needle in the haystack"})).await?;

    // Far past the burst (10): the excess is refused with the wait, the connection stays.
    let mut refused = 0;
    for _ in 0..40 {
        let reply = mallory.request(json!({"type": "search", "q": "needle"})).await?;
        if reply["code"] == "rate_limited" {
            assert!(reply["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{reply}");
            refused += 1;
        } else {
            assert_eq!(texts(&reply), ["needle in the haystack"], "{reply}");
        }
    }
    assert!(refused >= 25, "only {refused} of 40 refused");
    let rest = http_json(&cluster.gateways[0], "GET", "/v1/search?q=needle", Some(&token("mallory")), None).await?;
    assert_eq!(rest.status, 429, "REST shares the bucket: {rest:?}");

    // Everyone else is untouched: alice searches and sends, and mallory still chats.
    assert_eq!(texts(&alice.ack(json!({"type": "search", "q": "needle"})).await?), ["needle in the haystack"]);
    alice.ack(json!({"type": "send", "room": room, "text": "still here"})).await?;
    mallory.ack(json!({"type": "send", "room": room, "text": "me too"})).await?;
    Ok(())
}
