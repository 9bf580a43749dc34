//! The cluster end to end: two real gateways and a real message service against real
//! Postgres and Redis, driven by WebSocket clients as a chat app would.

use std::time::Duration;

use anyhow::Result;
use chat_tests::{eventually, http_get, token, token_with, Cluster, Metrics, Replica, WsClient, WAIT};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn messages_cross_gateways_in_gapless_seq_order_and_are_stored() -> Result<()> {
    let cluster = Cluster::builder().gateways(2).start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let mut bob = cluster.client(1, "bob").await?;

    let room = alice.create_group(&["bob"]).await?;
    let joined = bob.ack(json!({"type": "join", "room": room})).await?;
    assert_eq!(joined["room"], json!(room));
    assert_eq!(joined["last_seq"], 0);

    for i in 1..=100 {
        let ack = alice.ack(json!({"type": "send", "room": room, "text": format!("hello {i}")})).await?;
        assert_eq!(ack["message"]["seq"], i);
    }
    for i in 1..=100 {
        let event = bob.event("message").await?;
        assert_eq!(event["room"], json!(room));
        assert_eq!(event["message"]["seq"], i, "bob got {event}");
        assert_eq!(event["message"]["text"], format!("hello {i}"));
        assert_eq!(event["message"]["sender_id"], "alice");
    }

    let mut db = cluster.db.connect().await?;
    let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM messages WHERE room_id = $1::bigint ORDER BY seq")
        .bind(&room)
        .fetch_all(&mut db)
        .await?;
    assert_eq!(seqs, (1..=100).collect::<Vec<i64>>());
    let last_seq: i64 =
        sqlx::query_scalar("SELECT last_seq FROM rooms WHERE id = $1::bigint").bind(&room).fetch_one(&mut db).await?;
    assert_eq!(last_seq, 100);
    Ok(())
}

#[tokio::test]
async fn a_non_member_cannot_join_and_an_unknown_room_is_not_found() -> Result<()> {
    let cluster = Cluster::builder().gateways(2).start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let mut mallory = cluster.client(1, "mallory").await?;
    let room = alice.create_group(&["bob"]).await?;

    let reply = mallory.request(json!({"type": "join", "room": room})).await?;
    assert_eq!(reply["type"], "error");
    assert_eq!(reply["code"], "forbidden");
    let reply = mallory.request(json!({"type": "send", "room": room, "text": "let me in"})).await?;
    assert_eq!(reply["code"], "forbidden");
    let reply = mallory.request(json!({"type": "history", "room": room})).await?;
    assert_eq!(reply["code"], "forbidden");
    let reply = mallory.request(json!({"type": "join", "room": "999999"})).await?;
    assert_eq!(reply["code"], "not_found");
    Ok(())
}

#[tokio::test]
async fn invalid_tokens_get_http_401_with_a_json_error() -> Result<()> {
    let cluster = Cluster::builder().start().await?;
    let expired = token_with(json!({"sub": "alice", "exp": chrono::Utc::now().timestamp() - 3600}));
    for bad in ["garbage", expired.as_str()] {
        let err = WsClient::connect_bearer(&cluster.ws_url(0), bad).await.err().expect("refused");
        let tokio_tungstenite::tungstenite::Error::Http(resp) =
            err.downcast::<tokio_tungstenite::tungstenite::Error>()?
        else {
            panic!("expected an HTTP error");
        };
        assert_eq!(resp.status(), 401);
        let body: Value = serde_json::from_slice(resp.body().as_deref().unwrap_or_default())?;
        assert_eq!(body["error"]["code"], "unauthorized");
    }
    // The query-string form is checked the same way.
    let url = format!("{}?token=garbage", cluster.ws_url(0));
    assert!(WsClient::connect_request(url).await.is_err());
    Ok(())
}

#[tokio::test]
async fn tokens_work_in_the_query_string_and_in_a_first_auth_frame() -> Result<()> {
    let cluster = Cluster::builder().start().await?;
    let (_c, welcome) = WsClient::connect_request(format!("{}?token={}", cluster.ws_url(0), token("alice"))).await?;
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["user_id"], "alice");
    assert!(welcome["session_id"].is_string());
    assert!(welcome["heartbeat_ms"].as_u64().unwrap_or(0) > 0);
    assert!(welcome["server_time"].is_string());

    let (ws, _) = tokio_tungstenite::connect_async(cluster.ws_url(0).into_client_request()?).await?;
    let mut client = WsClient::from_stream(ws);
    client.send(&json!({"type": "auth", "token": token("bob")})).await?;
    let welcome = client.recv().await?;
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["user_id"], "bob");
    let pong = client.request(json!({"type": "ping"})).await?;
    assert_eq!(pong["type"], "pong");
    Ok(())
}

#[tokio::test]
async fn a_bad_first_frame_gets_unauthorized_then_close_1008() -> Result<()> {
    let cluster = Cluster::builder().start().await?;
    let (ws, _) = tokio_tungstenite::connect_async(cluster.ws_url(0).into_client_request()?).await?;
    let mut client = WsClient::from_stream(ws);
    client.send(&json!({"type": "auth", "id": "a1", "token": "garbage"})).await?;
    let error = client.recv().await?;
    assert_eq!(error["type"], "error");
    assert_eq!(error["code"], "unauthorized");
    assert_eq!(error["id"], "a1");
    assert_eq!(client.closed().await?, Some(1008));
    Ok(())
}

#[tokio::test]
async fn a_retried_send_returns_the_stored_message_without_a_duplicate() -> Result<()> {
    let cluster = Cluster::builder().start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let room = alice.create_group(&[]).await?;
    let send = json!({"type": "send", "room": room, "text": "once", "client_msg_id": "c-1"});
    let first = alice.ack(send.clone()).await?;
    let again = alice.ack(send).await?;
    assert_eq!(first["message"], again["message"]);
    assert_eq!(first["message"]["client_msg_id"], "c-1");

    let mut db = cluster.db.connect().await?;
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM messages").fetch_one(&mut db).await?;
    assert_eq!(count, 1);
    let next = alice.ack(json!({"type": "send", "room": room, "text": "next"})).await?;
    assert_eq!(next["message"]["seq"], 2, "a retry does not consume a seq");
    Ok(())
}

#[tokio::test]
async fn history_pages_in_ascending_order_and_leave_stops_events() -> Result<()> {
    let cluster = Cluster::builder().gateways(2).start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let mut bob = cluster.client(1, "bob").await?;
    let room = alice.create_group(&["bob"]).await?;
    for i in 1..=5 {
        alice.ack(json!({"type": "send", "room": room, "text": format!("m{i}")})).await?;
    }
    let page = bob.ack(json!({"type": "history", "room": room, "limit": 2})).await?;
    let seqs: Vec<i64> = page["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, vec![4, 5]);
    assert_eq!(page["has_more"], true);
    let page = bob.ack(json!({"type": "history", "room": room, "before_seq": 4, "limit": 10})).await?;
    let seqs: Vec<i64> = page["messages"].as_array().unwrap().iter().map(|m| m["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, vec![1, 2, 3]);
    assert_eq!(page["has_more"], false);
    let page = bob.ack(json!({"type": "history", "room": room, "after_seq": 3})).await?;
    assert_eq!(page["messages"].as_array().unwrap().len(), 2);

    bob.ack(json!({"type": "join", "room": room})).await?;
    bob.ack(json!({"type": "leave", "room": room})).await?;
    let other = alice.create_group(&["bob"]).await?;
    bob.ack(json!({"type": "join", "room": other})).await?;
    alice.ack(json!({"type": "send", "room": room, "text": "after leave"})).await?;
    alice.ack(json!({"type": "send", "room": other, "text": "marker"})).await?;
    // Redis delivers in publish order: had the left room's event reached bob, it
    // would have arrived before the marker.
    let marker = bob.event("message").await?;
    assert_eq!(marker["message"]["text"], "marker", "got {marker}");
    assert!(bob.buffered().all(|f| f["type"] != "message"));
    Ok(())
}

#[tokio::test]
async fn bad_frames_get_bad_request_and_the_connection_stays_open() -> Result<()> {
    let cluster = Cluster::builder().start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    alice.send_text("{not json".into()).await?;
    let reply = alice.recv().await?;
    assert_eq!(reply["code"], "bad_request");
    let reply = alice.request(json!({"type": "teleport"})).await?;
    assert_eq!(reply["code"], "bad_request");
    let reply = alice.request(json!({"type": "send", "text": "no room"})).await?;
    assert_eq!(reply["code"], "bad_request");
    let room = alice.create_group(&[]).await?;
    let reply = alice.request(json!({"type": "send", "room": room, "text": "x".repeat(4001)})).await?;
    assert_eq!(reply["code"], "bad_request");
    let reply = alice.request(json!({"type": "send", "room": room, "text": "y".repeat(70_000)})).await?;
    assert_eq!(reply["code"], "too_large");
    for bad in [
        json!({"type": "history", "room": room, "limit": 0}),
        json!({"type": "history", "room": room, "limit": 101}),
        json!({"type": "join"}),
        json!({"type": "leave"}),
        json!({"type": "send", "room": room, "text": ""}),
        json!({"type": "send", "room": room, "text": "x", "kind": "video"}),
        json!({"type": "send", "room": room, "text": "x", "client_msg_id": "c".repeat(65)}),
        json!({"type": "create_room", "kind": "group", "members": [""]}),
        json!({"type": "typing", "room": room, "active": "yes"}),
    ] {
        let reply = alice.request(bad.clone()).await?;
        assert_eq!(reply["code"], "bad_request", "{bad} → {reply}");
    }
    let pong = alice.request(json!({"type": "ping"})).await?;
    assert_eq!(pong["type"], "pong");
    Ok(())
}

#[tokio::test]
async fn health_endpoints_answer_without_a_token() -> Result<()> {
    let cluster = Cluster::builder().start().await?;
    let (status, _) = http_get(&cluster.gateways[0], "/healthz").await?;
    assert_eq!(status, 200);
    let (status, body) = http_get(&cluster.gateways[0], "/readyz").await?;
    assert_eq!(status, 200, "{body}");
    Ok(())
}

#[tokio::test]
async fn gateways_balance_calls_across_every_message_service_and_survive_losing_one() -> Result<()> {
    let mut cluster = Cluster::builder().replicas(1).start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let mut bob = cluster.client(0, "bob").await?;
    let room = alice.create_group(&["bob"]).await?;
    bob.ack(json!({"type": "join", "room": room})).await?;
    for i in 1..=40 {
        alice.ack(json!({"type": "send", "room": room, "text": format!("m{i}")})).await?;
    }
    const PERSISTED: &str = "chat_message_sends_persisted_total";
    let first = Metrics::scrape(&cluster.message_metrics).await?.value(PERSISTED);
    let second = Metrics::scrape(&cluster.replicas[0].metrics).await?.value(PERSISTED);
    assert_eq!(first + second, 40.0);
    assert!(first > 0.0 && second > 0.0, "one gateway's calls reach both services: {first} + {second}");

    // With one service gone, retried sends (same client_msg_id) land on the other.
    cluster.replicas[0].kill().await?;
    let texts = (41..=60).map(|i| format!("m{i}")).collect();
    chat_tests::send_reliably(vec![cluster.ws_url(0)], "alice", room.clone(), texts).await?;
    for i in 1..=60 {
        assert_eq!(bob.event("message").await?["message"]["seq"], i);
    }
    Ok(())
}

#[tokio::test]
async fn concurrent_sends_and_retries_to_two_rooms_store_each_message_once_under_gapless_seqs() -> Result<()> {
    // Many connections at once: the message service commits them in batches.
    let cluster = Cluster::builder().gateways(2).start().await?;
    let users: Vec<String> = (0..8).map(|u| format!("user{u}")).collect();
    let mut owner = cluster.client(0, &users[0]).await?;
    let others: Vec<&str> = users[1..].iter().map(String::as_str).collect();
    let rooms = [owner.create_group(&others).await?, owner.create_group(&others).await?];
    const EACH: usize = 30;
    let mut tasks = Vec::new();
    // Every user sends from two connections (one per gateway) the same client_msg_ids,
    // as a client retrying on a second connection would.
    for user in &users {
        for gateway in 0..2 {
            let mut client = cluster.client(gateway, user).await?;
            let (rooms, user) = (rooms.clone(), user.clone());
            tasks.push(tokio::spawn(async move {
                let mut acks = Vec::new();
                for i in 0..EACH {
                    // Alternating rooms: batches hold both, each numbered on its own.
                    let room = &rooms[i % 2];
                    let send = json!({"type": "send", "room": room, "text": format!("{user} {i}"), "client_msg_id": format!("{user}-{i}")});
                    let ack = client.ack(send).await?;
                    acks.push((format!("{user}-{i}"), ack["message"]["id"].clone(), ack["message"]["seq"].clone()));
                }
                anyhow::Ok(acks)
            }));
        }
    }
    let mut outsider = cluster.client(1, "outsider").await?;
    let refused = outsider.request(json!({"type": "send", "room": rooms[0], "text": "let me in"})).await?;
    assert_eq!(refused["code"], "forbidden");

    let mut by_cid: std::collections::HashMap<String, (Value, Value)> = std::collections::HashMap::new();
    for task in tasks {
        for (cid, id, seq) in task.await?? {
            let first = by_cid.entry(cid.clone()).or_insert((id.clone(), seq.clone()));
            assert_eq!(first, &(id, seq), "both connections of {cid} got the same message");
        }
    }
    assert_eq!(by_cid.len(), users.len() * EACH);

    let mut db = cluster.db.connect().await?;
    for room in &rooms {
        let seqs: Vec<i64> = sqlx::query_scalar("SELECT seq FROM messages WHERE room_id = $1::bigint ORDER BY seq")
            .bind(room)
            .fetch_all(&mut db)
            .await?;
        let per_room = (users.len() * EACH / 2) as i64;
        assert_eq!(seqs, (1..=per_room).collect::<Vec<_>>(), "room {room}: each message once, no gap");
        let last: i64 = sqlx::query_scalar("SELECT last_seq FROM rooms WHERE id = $1::bigint")
            .bind(room)
            .fetch_one(&mut db)
            .await?;
        assert_eq!(last, per_room);
    }
    Ok(())
}

/// Message services that come up after the gateway first tried to reach them (pods
/// starting, or restarted): the gateway's first call routed to each meets its stale
/// "connection refused". Nothing was sent, so the gateway makes the call again instead
/// of answering `unavailable`. (Three of them: a background call, the readiness check or
/// presence, may meet one of those errors first and hide it from the test.)
#[tokio::test]
async fn message_services_that_start_late_cost_clients_no_unavailable() -> Result<()> {
    const LATE: usize = 3;
    let mut cluster = Cluster::builder().gateways(0).start().await?;
    let late: Vec<String> = (0..LATE).map(|_| format!("127.0.0.1:{}", chat_tests::free_port())).collect();
    let urls: Vec<String> = std::iter::once(&cluster.grpc_addr).chain(&late).map(|a| format!("http://{a}")).collect();
    let gateway = cluster.add_gateway(&urls.join(",")).await?;
    for addr in &late {
        cluster.add_replica(addr).await?;
    }

    let mut alice = cluster.client(gateway, "alice").await?;
    let room = alice.create_group(&[]).await?;
    for i in 1..=40 {
        let ack = alice.request(json!({"type": "send", "room": room, "text": format!("m{i}")})).await?;
        assert_eq!(ack["type"], "ack", "send {i}: {ack}");
    }
    let mut stored_late = 0.0;
    for replica in &cluster.replicas {
        stored_late += Metrics::scrape(&replica.metrics).await?.value("chat_message_sends_persisted_total");
    }
    assert!(stored_late > 0.0, "no call reached a late message service: the test proved nothing");
    Ok(())
}

/// Sends into `room` one message at a time until `stop`, at the pace the rate limit
/// allows; the acknowledged seqs, and every other reply but `rate_limited`.
async fn send_until(mut client: WsClient, room: String, stop: CancellationToken) -> Result<(Vec<i64>, Vec<Value>)> {
    let (mut seqs, mut refused) = (Vec::new(), Vec::new());
    while !stop.is_cancelled() {
        let reply = client.request(json!({"type": "send", "room": room, "text": "rolling"})).await?;
        match reply["message"]["seq"].as_i64() {
            Some(seq) if reply["type"] == "ack" => seqs.push(seq),
            _ if reply["code"] == "rate_limited" => {
                let pause = reply["retry_after_ms"].as_u64().unwrap_or(10);
                tokio::time::sleep(Duration::from_millis(pause)).await;
            }
            _ => refused.push(reply),
        }
        // Deliveries of both senders' messages pile up unread otherwise.
        client.take_buffered("message");
    }
    Ok((seqs, refused))
}

#[tokio::test]
async fn a_message_service_rolled_under_traffic_costs_clients_no_unavailable() -> Result<()> {
    const NOT_SERVING: i32 = 2;
    const SENDS: &str = r#"chat_message_grpc_request_duration_seconds_count{method="SendMessage",code="OK"}"#;
    let drain = Duration::from_secs(3);
    let mut cluster =
        Cluster::builder().gateways(2).replicas(1).env("DRAIN_DELAY_MS", drain.as_millis().to_string()).start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let room = alice.create_group(&["bob"]).await?;
    let bob = cluster.client(1, "bob").await?;
    let stop = CancellationToken::new();
    let senders = [alice, bob].map(|c| tokio::spawn(send_until(c, room.clone(), stop.clone())));
    let sends_on =
        async |replica: &Replica| -> Result<f64> { Ok(Metrics::scrape(&replica.metrics).await?.value(SENDS)) };
    eventually(WAIT, async || sends_on(&cluster.replicas[0]).await.is_ok_and(|n| n >= 20.0)).await?;

    // The HTTP probes on the metrics port (the kubelet's, under mTLS) agree with gRPC health.
    let metrics = cluster.replicas[0].metrics.clone();
    assert_eq!(http_get(&metrics, "/readyz").await?.0, 200);
    // Kubernetes replaces the replica: SIGTERM, and it drains.
    cluster.replicas[0].sigterm()?;
    eventually(WAIT, async || cluster.replicas[0].health("").await.is_ok_and(|s| s == NOT_SERVING)).await?;
    assert_eq!(http_get(&metrics, "/readyz").await?.0, 503, "draining, yet ready for new calls");
    assert_eq!(http_get(&metrics, "/livez").await?.0, 200, "draining, and not alive");
    // Still taking calls (it answered that), but the gateways have moved theirs away.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let settled = sends_on(&cluster.replicas[0]).await?;
    tokio::time::sleep(drain / 2).await;
    assert_eq!(sends_on(&cluster.replicas[0]).await?, settled, "a draining replica was still sent new calls");
    assert_eq!(cluster.replicas[0].exited().await?, Some(0), "a drained message service exits 0");

    // Its successor at the same address gets calls again.
    cluster.respawn_replica(0).await?;
    eventually(WAIT, async || sends_on(&cluster.replicas[0]).await.is_ok_and(|n| n >= 10.0)).await?;
    stop.cancel();
    let mut acked = Vec::new();
    for sender in senders {
        let (seqs, refused) = sender.await??;
        assert!(
            refused.is_empty(),
            "clients saw {} errors during the roll, first {:?}",
            refused.len(),
            refused.first()
        );
        acked.extend(seqs);
    }
    acked.sort_unstable();
    assert_eq!(acked, (1..=acked.len() as i64).collect::<Vec<_>>(), "every acknowledged send stored once, no gap");
    Ok(())
}
