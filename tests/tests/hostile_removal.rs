//! Removal holds (issue #16, item 7): once a member is removed, none of their
//! connections hears the room again, however the removal is spelled, timed or lost.

use std::time::Duration;

use anyhow::{Context, Result};
use chat_tests::{eventually, http_json, token, Cluster, HoldingProxy, RedisServer, WsClient, WAIT};
use serde_json::{json, Value};

/// How long a removed connection is watched for a message it must not get, after the
/// one its room's remaining members got (room tasks of one gateway deliver in parallel).
const QUIET: Duration = Duration::from_millis(700);

/// Fails if `client` gets a `message` of `room` within `QUIET`.
async fn hears_nothing_of(client: &mut WsClient, room: &str) -> Result<()> {
    let deadline = tokio::time::Instant::now() + QUIET;
    loop {
        match tokio::time::timeout_at(deadline, client.event("message")).await {
            Err(_elapsed) => return Ok(()),
            Ok(event) => {
                let event = event?;
                anyhow::ensure!(event["room"] != json!(room), "a removed member got {event}");
            }
        }
    }
}

/// `room` spelled in ways that are not the id the server issued.
fn other_spellings(room: &str) -> Vec<String> {
    vec![format!("0{room}"), format!("00{room}"), format!("+{room}"), format!(" {room}"), format!("{room}e0")]
}

#[tokio::test]
async fn an_id_spelled_otherwise_names_nothing_and_only_the_issued_one_removes() -> Result<()> {
    let cluster = Cluster::builder().gateways(2).start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let mut bob = cluster.client(1, "bob").await?;
    let room = alice.create_group(&["bob"]).await?;
    let sent = alice.ack(json!({"type": "send", "room": room, "text": "first"})).await?;
    let message_id = sent["message"]["id"].as_str().context("message id")?.to_owned();

    for spelled in other_spellings(&room) {
        let join = bob.request(json!({"type": "join", "room": spelled})).await?;
        assert_eq!(join["code"], "not_found", "join {spelled:?}: {join}");
        let removal = alice.request(json!({"type": "remove_member", "room": spelled, "user_id": "bob"})).await?;
        assert_eq!(removal["code"], "not_found", "remove_member {spelled:?}: {removal}");
        let history = alice.request(json!({"type": "history", "room": spelled})).await?;
        assert_eq!(history["code"], "not_found", "history {spelled:?}: {history}");
        // REST alike (the path is percent-encoded where the spelling needs it).
        let path = spelled.replace(' ', "%20").replace('+', "%2B");
        let get =
            http_json(&cluster.gateways[0], "GET", &format!("/v1/rooms/{path}/messages"), Some(&token("alice")), None)
                .await?;
        assert_eq!((get.status, &get.body["error"]["code"]), (404, &json!("not_found")), "GET {spelled:?}");
        let post = http_json(
            &cluster.gateways[0],
            "POST",
            &format!("/v1/rooms/{path}/messages"),
            Some(&token("alice")),
            Some(json!({"text": "x"})),
        )
        .await?;
        assert_eq!((post.status, &post.body["error"]["code"]), (404, &json!("not_found")), "POST {spelled:?}");
    }
    let edit = alice.request(json!({"type": "edit", "message_id": format!("0{message_id}"), "text": "x"})).await?;
    assert_eq!(edit["code"], "not_found", "{edit}");

    // None of those removed bob: joined by the issued id, he still hears the room.
    bob.ack(json!({"type": "join", "room": room})).await?;
    alice.ack(json!({"type": "send", "room": room, "text": "still here"})).await?;
    assert_eq!(bob.event("message").await?["message"]["text"], "still here");

    // The issued spelling removes him, and his listener with him.
    alice.ack(json!({"type": "remove_member", "room": room, "user_id": "bob"})).await?;
    assert_eq!(bob.event("room_removed").await?["room"], json!(room));
    alice.ack(json!({"type": "send", "room": room, "text": "after"})).await?;
    hears_nothing_of(&mut bob, &room).await?;
    Ok(())
}

#[tokio::test]
async fn a_removed_users_connection_is_refused_typing_and_hears_nothing_more() -> Result<()> {
    let cluster = Cluster::builder().gateways(2).start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let mut carol = cluster.client(1, "carol").await?;
    let mut bob = cluster.client(1, "bob").await?;
    let room = alice.create_group(&["bob", "carol"]).await?;
    for client in [&mut alice, &mut bob, &mut carol] {
        client.ack(json!({"type": "join", "room": room})).await?;
    }
    bob.ack(json!({"type": "typing", "room": room, "active": true})).await?;
    assert_eq!(carol.event("typing").await?["user_id"], "bob");

    alice.ack(json!({"type": "remove_member", "room": room, "user_id": "bob"})).await?;
    assert_eq!(bob.event("room_removed").await?["room"], json!(room));
    let typing = bob.request(json!({"type": "typing", "room": room, "active": true})).await?;
    assert_eq!(typing["code"], "forbidden", "{typing}");
    let leave = bob.request(json!({"type": "leave", "room": room})).await?;
    assert_eq!(leave["type"], "ack", "leave stays idempotent: {leave}");

    alice.ack(json!({"type": "send", "room": room, "text": "members only"})).await?;
    assert_eq!(carol.event("message").await?["message"]["text"], "members only");
    let typed: Vec<Value> = carol.take_buffered("typing");
    assert!(typed.iter().all(|t| t["active"] == false), "carol saw bob type after his removal: {typed:?}");
    hears_nothing_of(&mut bob, &room).await?;
    Ok(())
}

#[tokio::test]
async fn a_join_whose_membership_check_races_a_removal_refuses() -> Result<()> {
    let mut cluster = Cluster::builder().start().await?;
    // bob's gateway reaches the message service through a proxy that can hold a reply.
    let proxy = HoldingProxy::start(&cluster.grpc_addr).await?;
    let held_gateway = cluster.add_gateway(&format!("http://{}", proxy.addr)).await?;
    let mut alice = cluster.client(0, "alice").await?;
    let room = alice.create_group(&["racer-bob"]).await?;
    let mut bob = cluster.client(held_gateway, "racer-bob").await?;
    // Let bob's connect-time calls (presence) finish before holding replies.
    bob.ack(json!({"type": "rooms"})).await?;

    // bob's membership check is answered (he is a member) but the answer is held back...
    proxy.hold_replies();
    bob.send(&json!({"type": "join", "id": "racing", "room": room})).await?;
    eventually(WAIT, async || proxy.held_contains(b"racer-bob")).await.context("the check never answered")?;
    // ...while he is removed, which his gateway hears at once over Redis.
    alice.ack(json!({"type": "remove_member", "room": room, "user_id": "racer-bob"})).await?;
    assert_eq!(bob.event("room_removed").await?["room"], json!(room));
    proxy.release();

    let reply = loop {
        let frame = bob.recv().await?;
        if frame["id"] == "racing" {
            break frame;
        }
    };
    assert_eq!((&reply["type"], &reply["code"]), (&json!("error"), &json!("forbidden")), "{reply}");
    alice.ack(json!({"type": "join", "room": room})).await?;
    alice.ack(json!({"type": "send", "room": room, "text": "after the removal"})).await?;
    assert_eq!(alice.event("message").await?["message"]["text"], "after the removal");
    hears_nothing_of(&mut bob, &room).await?;
    let typing = bob.request(json!({"type": "typing", "room": room, "active": true})).await?;
    assert_eq!(typing["code"], "forbidden", "{typing}");
    Ok(())
}

#[tokio::test]
async fn a_connection_whose_user_channel_cannot_be_subscribed_is_refused_with_a_retryable_close() -> Result<()> {
    let mut redis = RedisServer::start().await?;
    let cluster = Cluster::builder().redis(redis.url()).start().await?;
    redis.kill().await?;

    let (mut bob, first) = WsClient::connect_bearer(&cluster.ws_url(0), &token("bob")).await?;
    assert_eq!((&first["type"], &first["code"]), (&json!("error"), &json!("unavailable")), "{first}");
    assert_eq!(bob.closed().await?, Some(1013), "a close the client retries");

    // Once Redis is back, the same client gets in.
    redis.restart().await?;
    eventually(WAIT * 2, async || -> Result<()> {
        let (_bob, first) = WsClient::connect_bearer(&cluster.ws_url(0), &token("bob")).await?;
        anyhow::ensure!(first["type"] == "welcome", "{first}");
        Ok(())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn a_removal_lost_while_redis_was_down_still_evicts_once_it_is_back() -> Result<()> {
    let mut redis = RedisServer::start().await?;
    let cluster = Cluster::builder().redis(redis.url()).start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let mut bob = cluster.client(0, "bob").await?;
    let mut carol = cluster.client(0, "carol").await?;
    let room = alice.create_group(&["bob", "carol"]).await?;
    bob.ack(json!({"type": "join", "room": room})).await?;
    carol.ack(json!({"type": "join", "room": room})).await?;

    // The removal is stored; its `room_removed` is published into the outage and lost.
    redis.kill().await?;
    alice.ack(json!({"type": "remove_member", "room": room, "user_id": "bob"})).await?;
    redis.restart().await?;

    // The gateway asks the message service again once Redis is back, and tells bob.
    let removed = tokio::time::timeout(WAIT * 2, bob.event("room_removed")).await.context("no room_removed")??;
    assert_eq!(removed["room"], json!(room));
    // Live traffic flows again (carol hears it), and bob is no longer among the listeners.
    eventually(WAIT, async || -> Result<()> {
        alice.ack(json!({"type": "send", "room": room, "text": "after the outage"})).await?;
        tokio::time::timeout(Duration::from_secs(2), carol.event("message")).await??;
        Ok(())
    })
    .await?;
    hears_nothing_of(&mut bob, &room).await?;
    Ok(())
}
