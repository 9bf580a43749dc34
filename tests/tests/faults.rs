//! Faults of the fan-out path, each against a private redis-server so the machine's
//! shared instance stays untouched.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use chat_tests::{
    eventually, give_up, http_get, send_reliably, token, Cluster, Follower, PgServer, RedisServer, WsClient, WAIT,
};
use serde_json::json;

#[tokio::test]
async fn messages_published_while_redis_was_down_are_repaired_in_seq_order() -> Result<()> {
    let mut redis = RedisServer::start().await?;
    let cluster = Cluster::builder().gateways(2).redis(redis.url()).start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let mut bob = cluster.client(1, "bob").await?;
    let room = alice.create_group(&["bob"]).await?;
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
    // Each probe waits a little for its own echo before the next one is sent.
    const PROBE_ECHO_WITHIN: Duration = Duration::from_secs(2);
    let mut next = 7;
    eventually(PROBE_ECHO_WITHIN * 20, async || -> Result<()> {
        alice.ack(json!({"type": "send", "room": room, "text": format!("after {next}")})).await?;
        next += 1;
        let heard = tokio::time::timeout(PROBE_ECHO_WITHIN, async {
            loop {
                let seq = bob.event("message").await?["message"]["seq"].as_i64().unwrap();
                received.push(seq);
                if seq == next - 1 {
                    return anyhow::Ok(());
                }
            }
        });
        heard.await.with_context(|| format!("seq {} not heard live yet", next - 1))?
    })
    .await
    .context("bob never heard live traffic again after Redis came back")?;
    assert_eq!(received, (1..next).collect::<Vec<_>>(), "bob must see every seq once, in order");
    Ok(())
}

/// `/readyz` (the contract's) and `/readyz/local` (the load balancer's probe) of a gateway.
async fn readiness(gateway: &str) -> Result<((u16, String), (u16, String))> {
    Ok((http_get(gateway, "/readyz").await?, http_get(gateway, "/readyz/local").await?))
}

/// A Redis outage is every gateway's at once: if it made them all unready, the load
/// balancer would have nowhere to send anyone. The probe stays up, what needs Redis is
/// refused `unavailable`, what does not goes on, and nothing acknowledged is lost.
#[tokio::test]
async fn a_redis_outage_leaves_gateways_taking_clients_and_loses_nothing_acknowledged() -> Result<()> {
    let mut redis = RedisServer::start().await?;
    let cluster = Cluster::builder().redis(redis.url()).start().await?;
    let gateway = &cluster.gateways[0];
    let mut alice = cluster.client(0, "alice").await?;
    let room = alice.create_group(&["bob"]).await?;
    alice.ack(json!({"type": "send", "room": room, "text": "before"})).await?;

    redis.kill().await?;
    eventually(WAIT, async || -> Result<()> {
        let ((status, body), _) = readiness(gateway).await?;
        anyhow::ensure!(status == 503 && body.contains(r#""redis":false"#), "{status} {body}");
        Ok(())
    })
    .await
    .context("/readyz never reported Redis down")?;
    let (_, (status, body)) = readiness(gateway).await?;
    assert_eq!(status, 200, "the load balancer's probe stays up: {body}");
    assert!(body.contains(r#""status":"ready""#) && body.contains(r#""redis":false"#), "{body}");

    // A new connection needs its user's Redis channel: refused, to be retried.
    let (_, first) = WsClient::connect_bearer(&cluster.ws_url(0), &token("bob")).await?;
    assert_eq!((&first["type"], &first["code"]), (&json!("error"), &json!("unavailable")), "{first}");
    // A send needs only Postgres: stored and acknowledged.
    let during = alice.ack(json!({"type": "send", "room": room, "text": "during"})).await?;
    assert_eq!(during["message"]["seq"], 2, "{during}");

    redis.restart().await?;
    eventually(WAIT, async || -> Result<()> {
        let ((status, body), _) = readiness(gateway).await?;
        anyhow::ensure!(status == 200, "{status} {body}");
        Ok(())
    })
    .await
    .context("/readyz never recovered")?;
    let mut bob = cluster.client(0, "bob").await?;
    let page = bob.ack(json!({"type": "history", "room": room})).await?;
    let texts: Vec<&str> =
        page["messages"].as_array().into_iter().flatten().filter_map(|m| m["text"].as_str()).collect();
    assert_eq!(texts, ["before", "during"], "every acknowledged message: {page}");
    Ok(())
}

#[tokio::test]
async fn users_of_a_gateway_killed_without_cleanup_go_offline_within_the_stale_bound() -> Result<()> {
    let mut cluster = Cluster::builder().gateways(2).env("PRESENCE_STALE_MS", "1500").start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let room = alice.create_group(&["bob"]).await?;
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

#[tokio::test]
async fn sigterm_drains_a_gateway_under_traffic_without_losing_a_message() -> Result<()> {
    let mut cluster = Cluster::builder().gateways(2).env("DRAIN_DELAY_MS", "300").start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let mut bob = cluster.client(1, "bob").await?;
    let mut carol = cluster.client(0, "carol").await?;
    let room = alice.create_group(&["bob"]).await?;
    bob.ack(json!({"type": "join", "room": room})).await?;

    // A client that retries every unacknowledged send with the same client_msg_id,
    // moving to the other gateway when its connection goes away.
    const TOTAL: usize = 60;
    // The sender's pace: slow enough that the drain lands while it is still sending.
    const BETWEEN_SENDS: Duration = Duration::from_millis(10);
    let acked = Arc::new(AtomicUsize::new(0));
    let fallback = cluster.ws_url(1);
    let (sender_room, sender_acked) = (room.clone(), acked.clone());
    let sender = tokio::spawn(async move {
        let mut conn = Some(alice);
        for i in 1..=TOTAL {
            let send =
                json!({"type": "send", "room": sender_room, "text": format!("m{i}"), "client_msg_id": format!("c{i}")});
            // The check owns the connection and returns it with the ack, so the task stays `Send`.
            let fallback = fallback.clone();
            let mut conn_in = conn.take();
            conn = eventually(WAIT, async move || -> Result<_> {
                if conn_in.is_none() {
                    let (c, _) =
                        WsClient::connect_bearer(&fallback, &chat_tests::token("alice")).await.map_err(give_up)?;
                    conn_in = Some(c);
                }
                let c = conn_in.as_mut().context("not connected")?;
                match c.request(send.clone()).await {
                    Ok(reply) if reply["type"] == "ack" => Ok(conn_in.take()),
                    Ok(reply) if reply["code"] == "unavailable" => anyhow::bail!("refused: {reply}"),
                    Ok(reply) => Err(give_up(format!("unexpected reply {reply}"))),
                    Err(err) => {
                        conn_in = None;
                        Err(err)
                    }
                }
            })
            .await
            .with_context(|| format!("send {i} never acknowledged"))?;
            sender_acked.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(BETWEEN_SENDS).await;
        }
        anyhow::Ok(())
    });

    // The drain lands mid-traffic, not before the first send.
    eventually(WAIT, async || acked.load(Ordering::Relaxed) >= TOTAL / 6).await?;
    let code = cluster.terminate_gateway(0).await?;
    assert_eq!(code, Some(0), "a drained gateway exits 0");
    // An idle client of the drained gateway was told to reconnect, then closed with 1012.
    let notice = carol.event("reconnect").await?;
    assert!(notice["after_ms"].as_u64().is_some());
    assert_eq!(carol.closed().await?, Some(1012));

    sender.await??;
    let mut texts = Vec::new();
    let mut seqs = Vec::new();
    while seqs.len() < TOTAL {
        let event = bob.event("message").await?;
        seqs.push(event["message"]["seq"].as_i64().unwrap());
        texts.push(event["message"]["text"].as_str().unwrap().to_owned());
    }
    assert_eq!(seqs, (1..=TOTAL as i64).collect::<Vec<_>>());
    assert_eq!(texts, (1..=TOTAL).map(|i| format!("m{i}")).collect::<Vec<_>>(), "every message exactly once, in order");
    Ok(())
}

#[tokio::test]
async fn a_gateway_killed_mid_traffic_loses_no_acknowledged_message() -> Result<()> {
    let mut cluster = Cluster::builder().gateways(2).start().await?;
    let room = cluster.client(0, "alice").await?.create_group(&["bob", "carol"]).await?;
    const TOTAL: usize = 80;
    let urls = vec![cluster.ws_url(0), cluster.ws_url(1)];
    // bob starts on the gateway that dies, carol on the one that survives.
    let bob = Follower::spawn(urls.clone(), "bob", &room, TOTAL);
    let carol = Follower::spawn(vec![cluster.ws_url(1)], "carol", &room, TOTAL);
    eventually(WAIT, async || bob.has_joined() && carol.has_joined()).await?;
    let texts = (1..=TOTAL).map(|i| format!("m{i}")).collect();
    let alice = tokio::spawn(send_reliably(urls, "alice", room.clone(), texts));

    // The kill lands mid-traffic: bob has had messages through the gateway that dies.
    eventually(WAIT, async || bob.received() >= TOTAL / 8).await?;
    cluster.kill_gateway(0).await?;
    alice.await??;
    let expected: Vec<i64> = (1..=TOTAL as i64).collect();
    assert_eq!(bob.seqs().await?, expected, "bob: every seq exactly once, in order, across the failover");
    assert_eq!(carol.seqs().await?, expected);
    Ok(())
}

#[tokio::test]
async fn a_restarted_message_service_costs_clients_at_most_unavailable() -> Result<()> {
    let mut cluster = Cluster::builder().gateways(2).start().await?;
    let room = cluster.client(0, "alice").await?.create_group(&["bob"]).await?;
    const TOTAL: usize = 60;
    let bob = Follower::spawn(vec![cluster.ws_url(1)], "bob", &room, TOTAL);
    eventually(WAIT, async || bob.has_joined()).await?;
    let texts = (1..=TOTAL).map(|i| format!("m{i}")).collect();
    let alice = tokio::spawn(send_reliably(vec![cluster.ws_url(0)], "alice", room.clone(), texts));

    // The restart lands mid-traffic, not before the first send.
    eventually(WAIT, async || bob.received() >= TOTAL / 8).await?;
    cluster.restart_message_service().await?;
    alice.await??;
    assert_eq!(bob.seqs().await?, (1..=TOTAL as i64).collect::<Vec<_>>());
    let mut db = cluster.db.connect().await?;
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM messages").fetch_one(&mut db).await?;
    assert_eq!(stored, TOTAL as i64, "retries stored nothing twice");
    Ok(())
}

#[tokio::test]
async fn with_postgres_down_sends_are_unavailable_and_retries_land_exactly_once() -> Result<()> {
    let pg = PgServer::start().await?;
    let cluster = Cluster::builder().gateways(2).postgres(pg.base_url()).start().await?;
    let room = cluster.client(0, "alice").await?.create_group(&["bob"]).await?;
    const TOTAL: usize = 40;
    let bob = Follower::spawn(vec![cluster.ws_url(1)], "bob", &room, TOTAL);

    // While Postgres is down a send is refused with `unavailable` and nothing is stored.
    // The outage starts once bob listens, so what he gets comes live, not as a backlog.
    let mut alice = cluster.client(0, "alice").await?;
    eventually(WAIT, async || bob.has_joined()).await?;
    pg.stop()?;
    let refused =
        alice.request(json!({"type": "send", "room": room, "text": "m1", "client_msg_id": "alice-0"})).await?;
    assert_eq!(refused["code"], "unavailable", "{refused}");
    // Out of rotation (readiness) but alive (liveness): nothing restarts it meanwhile.
    const SERVING: i32 = 1;
    const NOT_SERVING: i32 = 2;
    eventually(Duration::from_secs(10), async || -> Result<()> {
        let status = cluster.message_health("").await?;
        anyhow::ensure!(status == NOT_SERVING, "health status {status}");
        Ok(())
    })
    .await
    .context("still SERVING with Postgres down")?;
    assert_eq!(cluster.message_health("liveness").await?, SERVING);

    // The outage lasts this long while alice keeps retrying: what is tested, not a guess.
    const OUTAGE: Duration = Duration::from_millis(1500);
    let texts: Vec<String> = (1..=TOTAL).map(|i| format!("m{i}")).collect();
    let sender = tokio::spawn(send_reliably(vec![cluster.ws_url(0)], "alice", room.clone(), texts));
    tokio::time::sleep(OUTAGE).await;
    pg.restart()?;
    sender.await??;

    assert_eq!(bob.seqs().await?, (1..=TOTAL as i64).collect::<Vec<_>>());
    let mut db = cluster.db.connect().await?;
    let rows: Vec<(i64, String)> =
        sqlx::query_as("SELECT seq, body FROM messages ORDER BY seq").fetch_all(&mut db).await?;
    let expected: Vec<(i64, String)> = (1..=TOTAL).map(|i| (i as i64, format!("m{i}"))).collect();
    assert_eq!(rows, expected, "every retry landed exactly once; nothing half-written");
    let last_seq: i64 = sqlx::query_scalar("SELECT last_seq FROM rooms").fetch_one(&mut db).await?;
    assert_eq!(last_seq, TOTAL as i64);
    Ok(())
}

#[tokio::test]
async fn the_message_service_exits_0_on_sigterm_after_finishing_in_flight_calls() -> Result<()> {
    let mut cluster = Cluster::builder().env("SHUTDOWN_GRACE_SECS", "5").start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let room = alice.create_group(&[]).await?;
    alice.send(&json!({"type": "send", "id": "last", "room": room, "text": "in flight"})).await?;
    let started = std::time::Instant::now();
    assert_eq!(cluster.terminate_message_service().await?, Some(0));
    assert!(started.elapsed() < Duration::from_secs(6), "took {:?}", started.elapsed());
    // The call sent before the signal was answered, one way or the other.
    let reply = alice.recv().await?;
    assert_eq!(reply["id"], "last", "{reply}");
    assert!(reply["type"] == "ack" || reply["code"] == "unavailable", "{reply}");
    Ok(())
}
