//! Rooms and presence that one user cannot blow up: membership caps, bounded online
//! lists, paged room lists, and presence counts that heal. The presence tests use a
//! private redis-server, to corrupt and restart it.

use std::collections::HashSet;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use chat_tests::{eventually, http_json, token, Cluster, RedisServer, WsClient};
use serde_json::{json, Value};

/// The recount period the presence tests run with; they allow several of them.
const RECOUNT_MS: u64 = 500;
const HEALS_WITHIN: Duration = Duration::from_secs(10);

/// `redis-cli` against the private server; its output, trimmed.
async fn cli(redis: &RedisServer, args: &[&str]) -> Result<String> {
    let out =
        tokio::process::Command::new("redis-cli").args(["-p", &redis.port.to_string()]).args(args).output().await?;
    anyhow::ensure!(out.status.success(), "redis-cli {args:?} failed");
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// The presence hash of `user` (its name carries the cluster's private prefix).
async fn presence_key(redis: &RedisServer, user: &str) -> Result<String> {
    let pattern = format!("*:presence:{{{user}}}");
    let keys = cli(redis, &["--scan", "--pattern", &pattern]).await?;
    keys.lines().next().map(str::to_owned).ok_or_else(|| anyhow!("no presence key for {user}"))
}

/// `{online, connections}` of `user` as `GET /v1/me/status` reports it.
async fn status(cluster: &Cluster, user: &str) -> Result<(bool, i64)> {
    let reply = http_json(&cluster.gateways[0], "GET", "/v1/me/status", Some(&token(user)), None).await?;
    anyhow::ensure!(reply.status == 200, "status {}: {}", reply.status, reply.body);
    Ok((reply.body["online"].as_bool().unwrap_or(false), reply.body["connections"].as_i64().unwrap_or(-1)))
}

#[tokio::test]
async fn a_leaked_presence_count_heals_within_one_recount_period() -> Result<()> {
    let redis = RedisServer::start().await?;
    let cluster = Cluster::builder()
        .redis(redis.url())
        .env("PRESENCE_RECOUNT_MS", RECOUNT_MS.to_string())
        .env("MAX_CONNECTIONS_PER_USER", "3")
        .start()
        .await?;
    let _alice = cluster.client(0, "alice").await?;
    let key = presence_key(&redis, "alice").await?;
    let gateway = cli(&redis, &["HKEYS", &key]).await?;
    // Ten decrements that failed: the gateway's count says 11 while it holds one.
    cli(&redis, &["HINCRBY", &key, &gateway, "10"]).await?;

    let second = eventually(HEALS_WITHIN, async || cluster.client(0, "alice").await)
        .await
        .context("alice stayed refused: the leaked count never healed")?;
    assert_eq!(status(&cluster, "alice").await?, (true, 2), "counted from the connections held");
    drop(second);
    Ok(())
}

#[tokio::test]
async fn connections_are_counted_again_after_redis_comes_back_empty() -> Result<()> {
    let mut redis = RedisServer::start().await?;
    let cluster =
        Cluster::builder().redis(redis.url()).env("PRESENCE_RECOUNT_MS", RECOUNT_MS.to_string()).start().await?;
    let _alice = cluster.client(0, "alice").await?;
    let _alice2 = cluster.client(0, "alice").await?;
    assert_eq!(status(&cluster, "alice").await?, (true, 2));

    // A restart without persistence: every count is gone, the connections are not.
    redis.restart().await?;
    let counted = eventually(HEALS_WITHIN, async || -> Result<(bool, i64)> {
        let now = status(&cluster, "alice").await?;
        anyhow::ensure!(now == (true, 2), "alice counts as {now:?}");
        Ok(now)
    })
    .await
    .context("the connections held were never counted again")?;
    assert_eq!(counted, (true, 2));
    Ok(())
}

#[tokio::test]
async fn a_connection_admitted_while_redis_was_down_is_counted_once_it_is_back() -> Result<()> {
    let mut redis = RedisServer::start().await?;
    let cluster =
        Cluster::builder().redis(redis.url()).env("PRESENCE_RECOUNT_MS", RECOUNT_MS.to_string()).start().await?;
    // bob's first connection subscribes his per-user channel, so his second needs no Redis.
    let _bob = cluster.client(0, "bob").await?;
    redis.kill().await?;
    // Presence is best effort: the gateway admits without counting.
    let _bob2 = cluster.client(0, "bob").await.context("admitted while Redis is down")?;
    redis.restart().await?;
    eventually(HEALS_WITHIN, async || -> Result<()> {
        let now = status(&cluster, "bob").await?;
        anyhow::ensure!(now == (true, 2), "bob counts as {now:?}");
        Ok(())
    })
    .await
    .context("a connection admitted during the outage was never counted")
}

#[tokio::test]
async fn membership_past_the_caps_is_refused_with_conflict() -> Result<()> {
    let cluster = Cluster::builder().env("MAX_MEMBERS_PER_ROOM", "3").env("MAX_ROOMS_PER_USER", "2").start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let room = alice.create_group(&["bob", "carol"]).await?;

    let full = alice.request(json!({"type": "add_members", "room": room, "members": ["dave"]})).await?;
    assert_eq!(full["code"], "conflict", "{full}");
    let big = alice.request(json!({"type": "create_room", "kind": "group", "members": ["b", "c", "d"]})).await?;
    assert_eq!(big["code"], "conflict", "{big}");

    alice.create_group(&[]).await?;
    let third = alice.request(json!({"type": "create_room", "kind": "group", "members": []})).await?;
    assert_eq!(third["code"], "conflict", "alice is in 2 rooms: {third}");
    // bob is in one room: a second is fine, a third is not, whoever adds him.
    let mut erin = cluster.client(0, "erin").await?;
    erin.create_group(&["bob"]).await?;
    let mut frank = cluster.client(0, "frank").await?;
    let third = frank.create_group(&[]).await?;
    let over = frank.request(json!({"type": "add_members", "room": third, "members": ["bob"]})).await?;
    assert_eq!(over["code"], "conflict", "{over}");

    Ok(())
}

/// Every page of `rooms` over WebSocket with `limit`; the room ids in order.
async fn ws_pages(client: &mut WsClient, limit: u32) -> Result<Vec<String>> {
    let (mut ids, mut after) = (Vec::new(), Value::Null);
    loop {
        let mut command = json!({"type": "rooms", "limit": limit});
        if !after.is_null() {
            command["after"] = after.clone();
        }
        let page = client.ack(command).await?;
        let rooms = page["rooms"].as_array().ok_or_else(|| anyhow!("no rooms in {page}"))?;
        anyhow::ensure!(rooms.len() <= limit as usize, "a page over its limit: {page}");
        ids.extend(rooms.iter().filter_map(|r| r["id"].as_str().map(str::to_owned)));
        if page["has_more"] != true {
            return Ok(ids);
        }
        after = page["next"].clone();
        anyhow::ensure!(after.is_string(), "has_more without next: {page}");
    }
}

#[tokio::test]
async fn rooms_come_in_pages_and_the_default_page_holds_them_all() -> Result<()> {
    let cluster = Cluster::builder().start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    for _ in 0..5 {
        alice.create_group(&["bob"]).await?;
    }
    let everything = alice.ack(json!({"type": "rooms"})).await?;
    assert_eq!(everything["has_more"], false, "{everything}");
    let all: Vec<String> = everything["rooms"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["id"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(all.len(), 5);

    let paged = ws_pages(&mut alice, 2).await?;
    assert_eq!(paged, all, "pages list every room once, in the same order");

    let gw = &cluster.gateways[0];
    let first = http_json(gw, "GET", "/v1/rooms?limit=2", Some(&token("alice")), None).await?;
    assert_eq!((first.status, first.body["rooms"].as_array().map(Vec::len)), (200, Some(2)), "{}", first.body);
    assert_eq!(first.body["has_more"], true);
    let next = first.body["next"].as_str().ok_or_else(|| anyhow!("no next: {}", first.body))?;
    let second = http_json(gw, "GET", &format!("/v1/rooms?limit=2&after={next}"), Some(&token("alice")), None).await?;
    let ids: HashSet<&str> = [&first.body, &second.body]
        .iter()
        .flat_map(|b| b["rooms"].as_array().into_iter().flatten())
        .filter_map(|r| r["id"].as_str())
        .collect();
    assert_eq!(ids.len(), 4, "two pages, no room twice");

    let bad = alice.request(json!({"type": "rooms", "after": "not-a-cursor"})).await?;
    assert_eq!(bad["code"], "bad_request", "{bad}");
    Ok(())
}

#[tokio::test]
async fn join_and_presence_list_at_most_the_configured_online_members() -> Result<()> {
    let cluster = Cluster::builder().env("PRESENCE_MAX_ONLINE", "2").start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let room = alice.create_group(&["bob", "carol", "dave"]).await?;
    let mut others = Vec::new();
    for user in ["bob", "carol", "dave"] {
        others.push(cluster.client(0, user).await?);
    }
    let joined = alice.ack(json!({"type": "join", "room": room})).await?;
    assert_eq!(joined["online"].as_array().map(Vec::len), Some(2), "{joined}");
    let presence = alice.ack(json!({"type": "presence", "room": room})).await?;
    assert_eq!(presence["online"].as_array().map(Vec::len), Some(2), "{presence}");
    assert_eq!(presence["online_truncated"], true, "{presence}");

    drop(others);
    let listed = eventually(HEALS_WITHIN, async || -> Result<Value> {
        let presence = alice.ack(json!({"type": "presence", "room": room})).await?;
        anyhow::ensure!(presence["online"].as_array().map(Vec::len) == Some(1), "{presence}");
        Ok(presence)
    })
    .await?;
    assert!(listed.get("online_truncated").is_none(), "all listed: {listed}");
    Ok(())
}

#[tokio::test]
async fn a_presence_change_is_announced_in_at_most_the_configured_rooms_most_active_first() -> Result<()> {
    let cluster = Cluster::builder().env("PRESENCE_MAX_ROOMS", "1").start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let quiet = alice.create_group(&["bob"]).await?;
    let busy = alice.create_group(&["bob"]).await?;
    alice.ack(json!({"type": "send", "room": busy, "text": "activity"})).await?;
    for room in [&quiet, &busy] {
        alice.ack(json!({"type": "join", "room": room})).await?;
    }

    let _bob = cluster.client(0, "bob").await?;
    let online = alice.event("presence").await?;
    assert_eq!((&online["room"], &online["user_id"]), (&json!(busy), &json!("bob")), "{online}");
    // A round trip through the quiet room: any announcement there was published before.
    alice.ack(json!({"type": "send", "room": quiet, "text": "barrier"})).await?;
    loop {
        let message = alice.event("message").await?;
        if message["message"]["text"] == "barrier" {
            break;
        }
    }
    let more = alice.take_buffered("presence");
    assert!(more.is_empty(), "announced beyond PRESENCE_MAX_ROOMS: {more:?}");
    Ok(())
}
