//! Faults of the fan-out path, each against a private redis-server so the machine's
//! shared instance stays untouched.

use std::time::Duration;

use anyhow::Result;
use chat_tests::{Cluster, RedisServer};
use serde_json::json;

#[tokio::test]
async fn messages_published_while_redis_was_down_are_repaired_in_seq_order() -> Result<()> {
    let mut redis = RedisServer::start().await?;
    let cluster = Cluster::start_with(2, &redis.url(), &[]).await?;
    let mut alice = cluster.client(0, "alice").await?;
    let mut bob = cluster.client(1, "bob").await?;
    let reply = alice.ack(json!({"type": "create_room", "kind": "group", "members": ["bob"]})).await?;
    let room = reply["room"]["id"].as_str().unwrap().to_owned();
    bob.ack(json!({"type": "join", "room": room})).await?;

    let mut received = Vec::new();
    for i in 1..=3 {
        alice.ack(json!({"type": "send", "room": room, "text": format!("m{i}")})).await?;
        received.push(bob.event("message").await?["message"]["seq"].as_i64().unwrap());
    }

    // These are stored and acknowledged, but their fan-out is lost with Redis.
    redis.kill().await?;
    for i in 4..=6 {
        let ack = alice.ack(json!({"type": "send", "room": room, "text": format!("lost {i}")})).await?;
        assert_eq!(ack["message"]["seq"], i);
    }
    redis.restart().await?;

    // Keep talking until bob hears live traffic again; everything before must arrive too.
    let mut next = 7;
    'outer: for _ in 0..20 {
        alice.ack(json!({"type": "send", "room": room, "text": format!("after {next}")})).await?;
        next += 1;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        while tokio::time::Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_millis(200), bob.event("message")).await {
                Ok(event) => {
                    received.push(event?["message"]["seq"].as_i64().unwrap());
                    if received.last() == Some(&(next - 1)) {
                        break 'outer;
                    }
                }
                Err(_) => continue,
            }
        }
    }
    assert_eq!(received, (1..next).collect::<Vec<_>>(), "bob must see every seq once, in order");
    Ok(())
}

#[tokio::test]
async fn users_of_a_gateway_killed_without_cleanup_go_offline_within_the_stale_bound() -> Result<()> {
    let mut cluster = Cluster::start_with(2, &chat_tests::redis_url(), &[("PRESENCE_STALE_MS", "1500")]).await?;
    let mut alice = cluster.client(0, "alice").await?;
    let reply = alice.ack(json!({"type": "create_room", "kind": "group", "members": ["bob"]})).await?;
    let room = reply["room"]["id"].as_str().unwrap().to_owned();
    alice.ack(json!({"type": "join", "room": room})).await?;
    let _bob = cluster.client(1, "bob").await?;
    assert_eq!(alice.event("presence").await?["status"], "online");

    let killed_at = std::time::Instant::now();
    cluster.kill_gateway(1).await?;
    let offline = alice.event("presence").await?;
    assert_eq!(offline, json!({"type": "presence", "room": room, "user_id": "bob", "status": "offline"}));
    // Bound: stale period (1.5 s) plus one sweep interval (0.5 s), with slack for CI.
    assert!(killed_at.elapsed() < Duration::from_secs(6), "took {:?}", killed_at.elapsed());
    let online = alice.ack(json!({"type": "presence", "room": room})).await?;
    assert_eq!(online["online"], json!(["alice"]));
    Ok(())
}
