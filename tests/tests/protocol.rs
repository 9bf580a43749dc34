//! Every command and event of contract v1 across two gateways: valid and invalid uses.
//! Users sit on different gateways wherever the behaviour crosses the cluster.

use std::time::Duration;

use anyhow::Result;
use chat_tests::{token_with, Cluster, WsClient};
use serde_json::{json, Value};

fn seqs(frames: &[Value]) -> Vec<i64> {
    frames.iter().map(|f| f["message"]["seq"].as_i64().unwrap_or(-1)).collect()
}

fn claims(sub: &str, role: Option<&str>, exp_in: i64) -> Value {
    let mut c = json!({"sub": sub, "exp": chrono::Utc::now().timestamp() + exp_in});
    if let Some(role) = role {
        c["role"] = json!(role);
    }
    c
}

#[tokio::test]
async fn membership_changes_reach_the_affected_user_on_every_gateway() -> Result<()> {
    let cluster = Cluster::builder().gateways(2).start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let mut bob = cluster.client(1, "bob").await?;
    let mut bob2 = cluster.client(0, "bob").await?;
    let mut carol = cluster.client(1, "carol").await?;
    let room = alice.create_group(&["carol"]).await?;

    // Only the owner (or an admin) adds members.
    let reply = carol.request(json!({"type": "add_members", "room": room, "members": ["bob"]})).await?;
    assert_eq!(reply["code"], "forbidden");
    let reply = alice.request(json!({"type": "add_members", "room": room})).await?;
    assert_eq!(reply["code"], "bad_request");

    alice.ack(json!({"type": "add_members", "room": room, "members": ["bob"]})).await?;
    for conn in [&mut bob, &mut bob2] {
        let added = conn.event("room_added").await?;
        assert_eq!(added["room"]["id"], json!(room));
        assert!(added["room"]["members"].as_array().unwrap().iter().any(|m| m["user_id"] == "bob"));
    }

    bob.ack(json!({"type": "join", "room": room})).await?;
    // Members cannot remove others; the owner can.
    let reply = carol.request(json!({"type": "remove_member", "room": room, "user_id": "bob"})).await?;
    assert_eq!(reply["code"], "forbidden");
    alice.ack(json!({"type": "remove_member", "room": room, "user_id": "bob"})).await?;
    for conn in [&mut bob, &mut bob2] {
        let removed = conn.event("room_removed").await?;
        assert_eq!(removed["room"], json!(room));
    }
    // Bob no longer hears the room, and may not rejoin it.
    let reply = bob.request(json!({"type": "join", "room": room})).await?;
    assert_eq!(reply["code"], "forbidden");
    let marker_room = alice.create_group(&["bob"]).await?;
    bob.ack(json!({"type": "join", "room": marker_room})).await?;
    alice.ack(json!({"type": "send", "room": room, "text": "bob is gone"})).await?;
    alice.ack(json!({"type": "send", "room": marker_room, "text": "marker"})).await?;
    let marker = bob.event("message").await?;
    assert_eq!(marker["message"]["text"], "marker");
    assert!(bob.take_buffered("message").is_empty());

    // A member may remove themself.
    carol.ack(json!({"type": "remove_member", "room": room, "user_id": "carol"})).await?;
    Ok(())
}

#[tokio::test]
async fn direct_and_support_rooms_follow_their_rules() -> Result<()> {
    let cluster = Cluster::builder().gateways(2).start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let mut bob = cluster.client(1, "bob").await?;
    let d1 = alice.create_room("direct", &["bob"]).await?;
    let d2 = alice.create_room("direct", &["bob"]).await?;
    let d3 = bob.create_room("direct", &["alice"]).await?;
    assert_eq!(d1, d2);
    assert_eq!(d1, d3);
    let reply = alice.request(json!({"type": "create_room", "kind": "direct", "members": ["bob", "carol"]})).await?;
    assert_eq!(reply["code"], "bad_request");
    let reply = alice.request(json!({"type": "create_room", "kind": "channel", "members": []})).await?;
    assert_eq!(reply["code"], "bad_request");

    let support = alice.create_room("support", &[]).await?;
    let mut admin = cluster.client_with(1, &token_with(claims("agent", Some("admin"), 3600))).await?;
    admin.ack(json!({"type": "join", "room": support})).await?;
    admin.ack(json!({"type": "send", "room": support, "text": "how can I help?"})).await?;
    let reply = bob.request(json!({"type": "join", "room": support})).await?;
    assert_eq!(reply["code"], "forbidden");
    // Admins also see support rooms in their room list.
    let rooms = admin.ack(json!({"type": "rooms"})).await?;
    assert!(rooms["rooms"].as_array().unwrap().iter().any(|r| r["id"] == json!(support)));
    Ok(())
}

#[tokio::test]
async fn edits_deletes_and_reactions_are_authorized_and_broadcast() -> Result<()> {
    let cluster = Cluster::builder().gateways(2).start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let mut bob = cluster.client(1, "bob").await?;
    let room = alice.create_group(&["bob"]).await?;
    alice.ack(json!({"type": "join", "room": room})).await?;
    bob.ack(json!({"type": "join", "room": room})).await?;
    let sent = alice.ack(json!({"type": "send", "room": room, "text": "helo"})).await?;
    let mid = sent["message"]["id"].as_str().unwrap().to_owned();
    bob.event("message").await?;

    let reply = bob.request(json!({"type": "edit", "message_id": mid, "text": "hacked"})).await?;
    assert_eq!(reply["code"], "forbidden");
    let reply = alice.request(json!({"type": "edit", "message_id": mid})).await?;
    assert_eq!(reply["code"], "bad_request");
    let reply = alice.request(json!({"type": "edit", "message_id": "999999", "text": "x"})).await?;
    assert_eq!(reply["code"], "not_found");
    let edited = alice.ack(json!({"type": "edit", "message_id": mid, "text": "hello"})).await?;
    assert_eq!(edited["message"]["text"], "hello");
    assert!(edited["message"]["edited_at"].is_string());
    let event = bob.event("message_edited").await?;
    assert_eq!(event["room"], json!(room));
    assert_eq!(event["message"]["text"], "hello");

    bob.ack(json!({"type": "react", "message_id": mid, "emoji": "👍"})).await?;
    let reaction = alice.event("reaction").await?;
    assert_eq!(
        reaction,
        json!({"type": "reaction", "room": room, "message_id": mid, "user_id": "bob", "emoji": "👍", "added": true})
    );
    let page = alice.ack(json!({"type": "history", "room": room})).await?;
    assert_eq!(page["messages"][0]["reactions"], json!({"👍": ["bob"]}));
    bob.ack(json!({"type": "unreact", "message_id": mid, "emoji": "👍"})).await?;
    assert_eq!(alice.event("reaction").await?["added"], false);
    let reply = bob.request(json!({"type": "react", "message_id": mid})).await?;
    assert_eq!(reply["code"], "bad_request");

    let mut mallory = cluster.client(1, "mallory").await?;
    let reply = mallory.request(json!({"type": "react", "message_id": mid, "emoji": "👎"})).await?;
    assert_eq!(reply["code"], "forbidden");
    let reply = bob.request(json!({"type": "delete", "message_id": mid})).await?;
    assert_eq!(reply["code"], "forbidden");
    // An admin may delete anyone's message.
    let mut admin = cluster.client_with(0, &token_with(claims("mod", Some("admin"), 3600))).await?;
    admin.ack(json!({"type": "delete", "message_id": mid})).await?;
    let deleted = bob.event("message_deleted").await?;
    assert_eq!(deleted, json!({"type": "message_deleted", "room": room, "message_id": mid, "seq": 1}));
    let page = bob.ack(json!({"type": "history", "room": room})).await?;
    assert_eq!(page["messages"][0]["seq"], 1);
    assert_eq!(page["messages"][0]["deleted"], true);
    assert_eq!(page["messages"][0]["text"], Value::Null);
    let reply = alice.request(json!({"type": "edit", "message_id": mid, "text": "again"})).await?;
    assert_eq!(reply["code"], "conflict");
    Ok(())
}

#[tokio::test]
async fn typing_reaches_others_but_not_the_senders_own_connections() -> Result<()> {
    // Expiry after TYPING_TTL (6 s) is the room task's job and is tested there with paused
    // time (`room::tests::typing_expires_*`); this test proves the wiring across gateways.
    let cluster = Cluster::builder().gateways(2).start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let mut alice2 = cluster.client(1, "alice").await?;
    let mut bob = cluster.client(1, "bob").await?;
    let room = alice.create_group(&["bob"]).await?;
    for c in [&mut alice, &mut alice2, &mut bob] {
        c.ack(json!({"type": "join", "room": room})).await?;
    }
    let reply = alice.request(json!({"type": "typing", "room": room})).await?;
    assert_eq!(reply["code"], "bad_request");

    alice.ack(json!({"type": "typing", "room": room, "active": true})).await?;
    let typing = bob.event("typing").await?;
    assert_eq!(typing, json!({"type": "typing", "room": room, "user_id": "alice", "active": true}));
    alice.ack(json!({"type": "typing", "room": room, "active": false})).await?;
    let stopped = bob.event("typing").await?;
    assert_eq!(stopped, json!({"type": "typing", "room": room, "user_id": "alice", "active": false}));

    bob.ack(json!({"type": "send", "room": room, "text": "marker"})).await?;
    alice2.event("message").await?;
    assert!(alice2.take_buffered("typing").is_empty(), "typing was echoed to the sender's other connection");
    Ok(())
}

#[tokio::test]
async fn read_receipts_move_unread_counts_and_are_broadcast() -> Result<()> {
    let cluster = Cluster::builder().gateways(2).start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let mut bob = cluster.client(1, "bob").await?;
    let room = alice.create_group(&["bob"]).await?;
    alice.ack(json!({"type": "join", "room": room})).await?;
    for i in 1..=3 {
        alice.ack(json!({"type": "send", "room": room, "text": format!("m{i}")})).await?;
    }
    let rooms = bob.ack(json!({"type": "rooms"})).await?;
    let summary = &rooms["rooms"][0];
    assert_eq!(summary["id"], json!(room));
    assert_eq!(summary["kind"], "group");
    assert_eq!(summary["last_seq"], 3);
    assert_eq!(summary["unread"], 3);
    assert_eq!(summary["last_message"]["text"], "m3");
    // The sender's own messages are never unread for them.
    assert_eq!(alice.ack(json!({"type": "rooms"})).await?["rooms"][0]["unread"], 0);

    bob.ack(json!({"type": "read", "room": room, "seq": 2})).await?;
    let read = alice.event("read").await?;
    assert_eq!(read, json!({"type": "read", "room": room, "user_id": "bob", "seq": 2}));
    assert_eq!(bob.ack(json!({"type": "rooms"})).await?["rooms"][0]["unread"], 1);
    // Positions never move backwards and never pass the newest message.
    assert_eq!(bob.ack(json!({"type": "read", "room": room, "seq": 1})).await?["seq"], 2);
    assert_eq!(bob.ack(json!({"type": "read", "room": room, "seq": 99})).await?["seq"], 3);
    let reply = bob.request(json!({"type": "read", "room": room})).await?;
    assert_eq!(reply["code"], "bad_request");
    let mut mallory = cluster.client(0, "mallory").await?;
    let reply = mallory.request(json!({"type": "read", "room": room, "seq": 1})).await?;
    assert_eq!(reply["code"], "forbidden");
    Ok(())
}

#[tokio::test]
async fn presence_follows_the_first_and_last_connection_anywhere() -> Result<()> {
    let cluster = Cluster::builder().gateways(2).start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let room = alice.create_group(&["bob"]).await?;
    let joined = alice.ack(json!({"type": "join", "room": room})).await?;
    assert_eq!(joined["online"], json!(["alice"]));

    let bob1 = cluster.client(1, "bob").await?;
    let online = alice.event("presence").await?;
    assert_eq!(online, json!({"type": "presence", "room": room, "user_id": "bob", "status": "online"}));
    let bob2 = cluster.client(0, "bob").await?;
    let mut list = alice.ack(json!({"type": "presence", "room": room})).await?["online"].clone();
    list.as_array_mut().unwrap().sort_by_key(|v| v.to_string());
    assert_eq!(list, json!(["alice", "bob"]));

    bob1.close().await?;
    // Bob still has a connection on the other gateway: he stays online.
    let still = alice.ack(json!({"type": "presence", "room": room})).await?;
    assert!(still["online"].as_array().unwrap().contains(&json!("bob")));
    bob2.close().await?;
    let offline = alice.event("presence").await?;
    assert_eq!(offline["status"], "offline");
    assert!(alice.take_buffered("presence").is_empty(), "one online and one offline event, not one per connection");

    let mut mallory = cluster.client(1, "mallory").await?;
    let reply = mallory.request(json!({"type": "presence", "room": room})).await?;
    assert_eq!(reply["code"], "forbidden");
    Ok(())
}

#[tokio::test]
async fn each_connection_of_a_user_gets_events_up_to_the_connection_cap() -> Result<()> {
    let cluster = Cluster::builder().gateways(2).env("MAX_CONNECTIONS_PER_USER", "3").start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let room = alice.create_group(&["bob"]).await?;
    let mut devices = Vec::new();
    for i in 0..3 {
        let mut c = cluster.client(i % 2, "bob").await?;
        c.ack(json!({"type": "join", "room": room})).await?;
        devices.push(c);
    }
    let (mut fourth, first) = WsClient::connect_bearer(&cluster.ws_url(1), &chat_tests::token("bob")).await?;
    assert_eq!(first["type"], "error");
    assert_eq!(first["code"], "rate_limited");
    assert_eq!(fourth.closed().await?, Some(1008));

    alice.ack(json!({"type": "send", "room": room, "text": "to every device"})).await?;
    for d in &mut devices {
        assert_eq!(d.event("message").await?["message"]["text"], "to every device");
    }
    Ok(())
}

#[tokio::test]
async fn an_expired_token_closes_with_4001_unless_refreshed() -> Result<()> {
    let cluster = Cluster::builder().start().await?;
    // Expired 28 s ago: still inside the 30 s leeway, so it closes in about 2 s.
    let mut short = cluster.client_with(0, &token_with(claims("alice", None, -28))).await?;
    assert_eq!(short.closed().await?, Some(4001));

    let mut refreshed = cluster.client_with(0, &token_with(claims("alice", None, -28))).await?;
    let reply = refreshed.request(json!({"type": "refresh_token", "token": "garbage"})).await?;
    assert_eq!(reply["code"], "unauthorized");
    let reply =
        refreshed.request(json!({"type": "refresh_token", "token": token_with(claims("bob", None, 3600))})).await?;
    assert_eq!(reply["code"], "forbidden");
    let ack = refreshed.ack(json!({"type": "refresh_token", "token": token_with(claims("alice", None, 3600))})).await?;
    assert!(ack["expires_at"].is_string());
    // Past the moment the old token would have closed the connection (about 2 s from now).
    let past_the_old_expiry = Duration::from_secs(4);
    tokio::time::sleep(past_the_old_expiry).await;
    assert_eq!(refreshed.request(json!({"type": "ping"})).await?["type"], "pong");
    Ok(())
}

#[tokio::test]
async fn a_frame_over_the_socket_limit_closes_with_1009() -> Result<()> {
    let cluster = Cluster::builder().start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    // Over the 1 MiB the socket layer reads at all (frames between 64 KiB and that get
    // a `too_large` error instead).
    alice.send_text("x".repeat(1024 * 1024 + 1)).await?;
    assert_eq!(alice.closed().await?, Some(1009));
    Ok(())
}

#[tokio::test]
async fn a_client_silent_for_two_heartbeats_is_dropped_with_1001() -> Result<()> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;

    let cluster = Cluster::builder().env("HEARTBEAT_MS", "200").start().await?;
    // A raw socket that reads nothing, so it answers none of the server's pings.
    let url = format!("{}?token={}", cluster.ws_url(0), chat_tests::token("alice"));
    let (mut silent, _) = tokio_tungstenite::connect_async(url).await?;
    // A client that keeps talking stays: a ping every 100 ms for 1.2 s, six heartbeats.
    let mut talking = cluster.client(0, "bob").await?;
    let between_pings = Duration::from_millis(100);
    for _ in 0..12 {
        assert_eq!(talking.request(json!({"type": "ping"})).await?["type"], "pong");
        tokio::time::sleep(between_pings).await;
    }
    let close = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(frame) = silent.next().await {
            if let Message::Close(frame) = frame? {
                return Ok::<_, anyhow::Error>(frame.map(|f| u16::from(f.code)));
            }
        }
        Ok(None)
    })
    .await??;
    assert_eq!(close, Some(1001));
    Ok(())
}

#[tokio::test]
async fn join_with_since_seq_replays_the_missed_messages_before_the_ack() -> Result<()> {
    let cluster = Cluster::builder().gateways(2).start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let mut bob = cluster.client(1, "bob").await?;
    let room = alice.create_group(&["bob"]).await?;
    for i in 1..=10 {
        alice.ack(json!({"type": "send", "room": room, "text": format!("m{i}")})).await?;
    }
    let ack = bob.ack(json!({"type": "join", "room": room, "since_seq": 4})).await?;
    assert_eq!(ack["last_seq"], 10);
    assert_eq!(ack["truncated"], false);
    // `ack` buffered every frame that came before it: the backlog, in order.
    assert_eq!(seqs(&bob.take_buffered("message")), (5..=10).collect::<Vec<_>>());
    alice.ack(json!({"type": "send", "room": room, "text": "live"})).await?;
    assert_eq!(bob.event("message").await?["message"]["seq"], 11);
    Ok(())
}

#[tokio::test]
async fn replays_after_an_edit_a_reaction_or_a_delete_show_each_message_as_it_is_now() -> Result<()> {
    // The gateway keeps a room's newest frames for `since_seq` joins; none may go stale.
    let cluster = Cluster::builder().start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let room = alice.create_group(&["bob"]).await?;
    // Alice stays joined, so the room's task (and what it keeps) lives throughout, and
    // her copy of each event shows the task has handled it.
    alice.ack(json!({"type": "join", "room": room})).await?;
    let mut ids = Vec::new();
    for i in 1..=4 {
        let ack = alice.ack(json!({"type": "send", "room": room, "text": format!("m{i}")})).await?;
        ids.push(ack["message"]["id"].clone());
    }
    let replay = |since: i64| {
        let (cluster, room) = (&cluster, room.clone());
        async move {
            let mut bob = cluster.client(0, "bob").await?;
            bob.ack(json!({"type": "join", "room": room, "since_seq": since})).await?;
            let messages: Vec<Value> = bob.take_buffered("message").into_iter().map(|e| e["message"].clone()).collect();
            bob.close().await?;
            anyhow::Ok(messages)
        }
    };
    let texts = |messages: &[Value]| messages.iter().map(|m| m["text"].clone()).collect::<Vec<_>>();
    assert_eq!(texts(&replay(0).await?), [json!("m1"), json!("m2"), json!("m3"), json!("m4")]);
    assert_eq!(texts(&replay(1).await?), [json!("m2"), json!("m3"), json!("m4")]);

    alice.ack(json!({"type": "edit", "message_id": ids[1], "text": "m2 edited"})).await?;
    alice.event("message_edited").await?;
    assert_eq!(texts(&replay(1).await?), [json!("m2 edited"), json!("m3"), json!("m4")]);

    alice.ack(json!({"type": "react", "message_id": ids[2], "emoji": "👍"})).await?;
    alice.event("reaction").await?;
    let replayed = replay(2).await?;
    assert_eq!(replayed[0]["reactions"], json!({"👍": ["alice"]}), "{replayed:?}");

    alice.ack(json!({"type": "delete", "message_id": ids[3]})).await?;
    alice.event("message_deleted").await?;
    let replayed = replay(3).await?;
    assert_eq!((replayed[0]["deleted"].clone(), replayed[0]["text"].clone()), (json!(true), Value::Null));

    // A message sent after all that is replayed with the rest.
    alice.ack(json!({"type": "send", "room": room, "text": "m5"})).await?;
    let mut seen = alice.take_buffered("message").iter().any(|e| e["message"]["seq"] == 5);
    while !seen {
        seen = alice.event("message").await?["message"]["seq"] == 5;
    }
    assert_eq!(texts(&replay(0).await?).len(), 5);
    Ok(())
}

#[tokio::test]
async fn rejoining_with_since_seq_under_concurrent_sends_has_no_gap_and_no_duplicate() -> Result<()> {
    let cluster = Cluster::builder().gateways(2).start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let mut bob = cluster.client(1, "bob").await?;
    let room = alice.create_group(&["bob"]).await?;
    const TOTAL: i64 = 300;
    let sender_room = room.clone();
    let sender = tokio::spawn(async move {
        for i in 1..=TOTAL {
            alice.ack(json!({"type": "send", "room": sender_room, "text": format!("m{i}")})).await?;
        }
        anyhow::Ok(())
    });

    let mut received: Vec<i64> = Vec::new();
    let mut rounds = 0;
    loop {
        let since = received.last().copied().unwrap_or(0);
        let ack = bob.ack(json!({"type": "join", "room": room, "since_seq": since})).await?;
        received.extend(seqs(&bob.take_buffered("message")));
        let last_seq = ack["last_seq"].as_i64().unwrap();
        // Live for a moment, then leave; whatever arrived before the leave ack counts.
        let live_for = Duration::from_millis(5 * (rounds % 7));
        tokio::time::sleep(live_for).await;
        bob.ack(json!({"type": "leave", "room": room})).await?;
        received.extend(seqs(&bob.take_buffered("message")));
        rounds += 1;
        if sender.is_finished() && last_seq == TOTAL && received.last() == Some(&TOTAL) {
            break;
        }
        anyhow::ensure!(rounds < 2000, "never caught up: {:?}", received.last());
    }
    sender.await??;
    assert!(rounds > 5, "only {rounds} rounds");
    assert_eq!(received, (1..=TOTAL).collect::<Vec<_>>(), "after {rounds} rounds");
    Ok(())
}
