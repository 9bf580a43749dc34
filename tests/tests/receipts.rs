//! Delivery ticks (contract v1.1): `received` moves a member's delivered seq forward
//! only, coalesced into at most about one `delivered` event per member and room a
//! second, on every gateway; `receipts` lists delivered and read seqs, read implying
//! delivered.

use std::time::Duration;

use anyhow::Result;
use chat_tests::{http_json, token, Cluster, WsClient};
use serde_json::{json, Value};

/// `(user_id, delivered_seq, read_seq)` of each member, from a receipts reply.
fn receipts(reply: &Value) -> Vec<(String, i64, i64)> {
    reply["members"].as_array().map_or_else(Vec::new, |members| {
        members
            .iter()
            .map(|m| {
                let seq = |k: &str| m[k].as_i64().unwrap_or(-1);
                (m["user_id"].as_str().unwrap_or_default().to_owned(), seq("delivered_seq"), seq("read_seq"))
            })
            .collect()
    })
}

/// Every `delivered` event `client` receives within `within`.
async fn delivered_events(client: &mut WsClient, within: Duration) -> Vec<Value> {
    let mut events = Vec::new();
    let until = tokio::time::Instant::now() + within;
    while let Ok(Ok(frame)) = tokio::time::timeout_at(until, client.recv()).await {
        if frame["type"] == "delivered" {
            events.push(frame);
        }
    }
    events.extend(client.take_buffered("delivered"));
    events
}

#[tokio::test]
async fn delivered_seqs_move_forward_only_coalesced_across_gateways() -> Result<()> {
    let cluster = Cluster::builder().gateways(2).start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let mut bob = cluster.client(1, "bob").await?;
    let room = alice.create_group(&["bob", "carol"]).await?;
    alice.ack(json!({"type": "join", "room": room})).await?;
    bob.ack(json!({"type": "join", "room": room})).await?;
    for i in 1..=3 {
        alice.ack(json!({"type": "send", "room": room, "text": format!("m{i}")})).await?;
    }
    alice.take_buffered("message");

    // Bob's device has seqs 1 and 2: a burst of frames, one event on alice's gateway.
    for seq in [1, 2, 1, 2, 2, 1] {
        let ack = bob.ack(json!({"type": "received", "room": room, "seq": seq})).await?;
        assert_eq!((ack["room"].as_str(), ack["seq"].as_i64()), (Some(room.as_str()), Some(seq)), "{ack}");
    }
    let events = delivered_events(&mut alice, Duration::from_millis(2500)).await;
    assert_eq!(events.len(), 1, "one event for the burst, coalesced: {events:?}");
    assert_eq!(events[0], json!({"type": "delivered", "room": room, "user_id": "bob", "seq": 2}));
    let state = alice.ack(json!({"type": "receipts", "room": room})).await?;
    assert_eq!(receipts(&state), [("alice".into(), 0, 0), ("bob".into(), 2, 0), ("carol".into(), 0, 0)], "{state}");

    // A lower seq acks and changes nothing; a seq past the newest is stored as the newest.
    bob.ack(json!({"type": "received", "room": room, "seq": 1})).await?;
    bob.ack(json!({"type": "received", "room": room, "seq": 99})).await?;
    let events = delivered_events(&mut alice, Duration::from_millis(2500)).await;
    assert_eq!(events, [json!({"type": "delivered", "room": room, "user_id": "bob", "seq": 3})]);

    // Carol never joined: still a member, so her `received` counts. Reading implies
    // delivered.
    let mut carol = cluster.client(0, "carol").await?;
    carol.ack(json!({"type": "received", "room": room, "seq": 1})).await?;
    carol.ack(json!({"type": "read", "room": room, "seq": 2})).await?;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let state = bob.ack(json!({"type": "receipts", "room": room})).await?;
    assert_eq!(receipts(&state), [("alice".into(), 0, 0), ("bob".into(), 3, 0), ("carol".into(), 2, 2)], "{state}");

    // Bad input: the contract's codes, and nothing stored.
    let mut dave = cluster.client(1, "dave").await?;
    for (is_dave, command, code) in [
        (true, json!({"type": "received", "room": room, "seq": 3}), "forbidden"),
        (true, json!({"type": "receipts", "room": room}), "forbidden"),
        (false, json!({"type": "received", "room": room, "seq": -1}), "bad_request"),
        (false, json!({"type": "received", "room": room}), "bad_request"),
        (false, json!({"type": "received", "room": "999999999", "seq": 1}), "not_found"),
        (false, json!({"type": "receipts", "room": "999999999"}), "not_found"),
    ] {
        let who = if is_dave { &mut dave } else { &mut bob };
        let reply = who.request(command.clone()).await?;
        assert_eq!(reply["code"], code, "{command} → {reply}");
    }

    // The same over REST, on either gateway.
    let path = format!("/v1/rooms/{room}/receipts");
    let rest = http_json(&cluster.gateways[1], "GET", &path, Some(&token("alice")), None).await?;
    assert_eq!(rest.status, 200, "{rest:?}");
    assert_eq!(receipts(&rest.body), receipts(&state));
    let refused = http_json(&cluster.gateways[0], "GET", &path, Some(&token("dave")), None).await?;
    assert_eq!(refused.status, 403, "{refused:?}");
    Ok(())
}
