//! The cluster on a Redis Cluster (`REDIS_CLUSTER=true`): sharded pub/sub
//! (`SSUBSCRIBE`/`SPUBLISH`) keeps each room's traffic on the shard that owns its hash
//! slot, and everything a client sees works as on a single Redis.

use std::collections::BTreeMap;

use anyhow::Result;
use chat_tests::{http_json, token_with, Cluster, RedisCluster};
use serde_json::json;

#[tokio::test]
async fn chat_runs_on_a_three_node_redis_cluster_with_sharded_pubsub() -> Result<()> {
    let redis = RedisCluster::start(3).await?;
    let cluster = Cluster::builder().gateways(2).redis(redis.url()).env("REDIS_CLUSTER", "true").start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let mut bob = cluster.client(1, "bob").await?;

    // Several rooms, so their channels land on different shards.
    let mut rooms = Vec::new();
    for _ in 0..8 {
        let room = alice.create_group(&["bob"]).await?;
        assert_eq!(bob.event("room_added").await?["room"]["id"], json!(room), "user channels work");
        alice.ack(json!({"type": "join", "room": room})).await?;
        bob.ack(json!({"type": "join", "room": room})).await?;
        rooms.push(room);
    }
    for (r, room) in rooms.iter().enumerate() {
        for i in 1..=5 {
            alice.ack(json!({"type": "send", "room": room, "text": format!("r{r} m{i}")})).await?;
        }
    }
    for room in &rooms {
        for i in 1..=5 {
            let event = bob.event("message").await?;
            assert_eq!((&event["room"], &event["message"]["seq"]), (&json!(room), &json!(i)), "{event}");
        }
    }
    alice.ack(json!({"type": "typing", "room": rooms[0], "active": true})).await?;
    assert_eq!(bob.event("typing").await?["user_id"], "alice");

    // Cluster-wide presence and connection listing (a scan over every node).
    let reply = bob.ack(json!({"type": "presence", "room": rooms[0]})).await?;
    assert_eq!(reply["online"], json!(["alice", "bob"]), "{reply}");
    let admin = token_with(json!({"sub": "ops", "role": "admin", "exp": chrono::Utc::now().timestamp() + 3600}));
    let all = http_json(&cluster.gateways[0], "GET", "/v1/connections", Some(&admin), None).await?;
    assert_eq!(
        all.body,
        json!({"users": [{"user_id": "alice", "connections": 1}, {"user_id": "bob", "connections": 1}]})
    );

    // Each room channel is a shard channel on exactly one node, and the rooms are spread.
    let mut owners: BTreeMap<u16, usize> = BTreeMap::new();
    for room in &rooms {
        let mut holders = Vec::new();
        for port in &redis.ports {
            let channels = redis.cli(*port, &["pubsub", "shardchannels", &format!("*:room:{{{room}}}")]).await?;
            if !channels.trim().is_empty() {
                holders.push(*port);
            }
        }
        assert_eq!(holders.len(), 1, "room {room} subscribed on {holders:?}");
        *owners.entry(holders[0]).or_default() += 1;
    }
    assert!(owners.len() >= 2, "8 rooms all on one shard: {owners:?}");
    for port in &redis.ports {
        let plain = redis.cli(*port, &["pubsub", "channels", "*:room:*"]).await?;
        assert!(plain.trim().is_empty(), "no plain (broadcast) room channels: {plain}");
    }
    Ok(())
}
