//! The HTTP API's limits (issue #16, item 5): per-user request rates, REST sends counted
//! with WebSocket sends, the upload quota, the collection of uploads never sent, and
//! attachments streamed through a bounded number of transfer slots.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use chat_tests::{eventually, http, http_json, token, Cluster, HttpReply, Metrics};
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// The `Retry-After` header of a reply, in seconds.
fn retry_after(reply: &HttpReply) -> Option<u64> {
    reply.headers.lines().find_map(|line| {
        let (name, value) = line.split_once(':')?;
        name.trim().eq_ignore_ascii_case("retry-after").then(|| value.trim().parse().ok())?
    })
}

/// Asserts the contract's answer past a limit: 429, `Retry-After` in whole seconds,
/// `rate_limited` with `retry_after_ms`.
fn assert_rate_limited(reply: &HttpReply) {
    assert_eq!(reply.status, 429, "{reply:?}");
    assert_eq!(reply.body["error"]["code"], "rate_limited", "{reply:?}");
    let secs = retry_after(reply).unwrap_or_else(|| panic!("no Retry-After: {reply:?}"));
    let ms = reply.body["error"]["retry_after_ms"].as_u64().unwrap_or_else(|| panic!("no retry_after_ms: {reply:?}"));
    assert!(secs >= 1 && secs * 1000 >= ms, "Retry-After {secs} s rounds {ms} ms up");
}

/// Bytes that do not repeat with any part-sized period, so a part out of order, lost or
/// doubled changes them.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x9E37_79B9;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

async fn create_group(gw: &str, owner: &str, members: &[&str]) -> Result<String> {
    let body = json!({"kind": "group", "name": "files", "members": members});
    let created = http_json(gw, "POST", "/v1/rooms", Some(&token(owner)), Some(body)).await?;
    ensure!(created.status == 201, "{created:?}");
    Ok(created.body["room"]["id"].as_str().context("room id")?.to_owned())
}

async fn upload(gw: &str, user: &str, data: &[u8]) -> Result<HttpReply> {
    http(gw, "POST", "/v1/attachments?name=f.bin", Some(&token(user)), "application/octet-stream", data).await
}

async fn uploaded_id(gw: &str, user: &str, data: &[u8]) -> Result<String> {
    let up = upload(gw, user, data).await?;
    ensure!(up.status == 201, "{up:?}");
    Ok(up.body["attachment"]["id"].as_str().context("attachment id")?.to_owned())
}

async fn download(gw: &str, user: &str, id: &str) -> Result<HttpReply> {
    http(gw, "GET", &format!("/v1/attachments/{id}"), Some(&token(user)), "", b"").await
}

/// An upload of 1 MB by `user` that sends its first 100 kB and then nothing: it holds a
/// transfer slot until the connection goes or the stall time passes.
async fn stalled_upload(gw: &str, user: &str) -> Result<TcpStream> {
    let mut stalled = TcpStream::connect(gw).await?;
    let head = format!(
        "POST /v1/attachments?name=slow.bin HTTP/1.1\r\nHost: {gw}\r\nContent-Length: 1000000\r\n\
         Authorization: Bearer {}\r\n\r\n",
        token(user)
    );
    stalled.write_all(head.as_bytes()).await?;
    stalled.write_all(&pattern(100_000)).await?;
    Ok(stalled)
}

#[tokio::test]
async fn rest_over_the_limit_gets_429_with_retry_after_while_another_user_is_served() -> Result<()> {
    let cluster = Cluster::builder().env("REST_RATE_PER_SEC", "1").env("REST_RATE_BURST", "3").start().await?;
    let gw = cluster.gateways[0].as_str();
    let alice = token("alice");
    let mut refused = None;
    // Three at once pass; a fourth within a second cannot (allow one refill on a slow machine).
    for _ in 0..5 {
        let reply = http_json(gw, "GET", "/v1/rooms", Some(&alice), None).await?;
        if reply.status != 200 {
            refused = Some(reply);
            break;
        }
    }
    let refused = refused.context("five requests at once all passed a burst of 3")?;
    assert_rate_limited(&refused);
    // Every /v1 route, attachments too, before anything else is looked at.
    assert_rate_limited(&download(gw, "alice", "424242").await?);
    assert_rate_limited(&upload(gw, "alice", b"bytes").await?);

    let bob = http_json(gw, "GET", "/v1/rooms", Some(&token("bob")), None).await?;
    assert_eq!(bob.status, 200, "another user is not slowed down: {bob:?}");
    Ok(())
}

#[tokio::test]
async fn rest_sends_spend_the_same_budget_as_websocket_sends() -> Result<()> {
    // A generous REST rate: what refuses here is the per-user send budget.
    let cluster = Cluster::builder()
        .env("REST_RATE_PER_SEC", "1000")
        .env("REST_RATE_BURST", "1000")
        .env("RATE_USER_PER_SEC", "1")
        .env("RATE_USER_BURST", "3")
        .start()
        .await?;
    let gw = cluster.gateways[0].as_str();
    let room = create_group(gw, "alice", &["bob"]).await?;
    // Alice is online: her WebSocket connection holds her command bucket on this gateway.
    let mut alice_ws = cluster.client(0, "alice").await?;
    let path = format!("/v1/rooms/{room}/messages");
    let mut sent = 0;
    let mut refused = None;
    for i in 0..10 {
        let reply = http_json(gw, "POST", &path, Some(&token("alice")), Some(json!({"text": format!("m{i}")}))).await?;
        match reply.status {
            201 => sent += 1,
            _ => {
                refused = Some(reply);
                break;
            }
        }
    }
    let refused = refused.context("ten REST sends passed a send burst of 3")?;
    assert_rate_limited(&refused);
    assert!(sent >= 3, "the burst itself passes ({sent} sent)");
    // The same budget: her WebSocket is refused too now, and keeps its connection.
    let reply = alice_ws.request(json!({"type": "send", "room": room, "text": "over ws"})).await?;
    assert_eq!(reply["code"], "rate_limited", "{reply}");
    // Reads are not sends: still within her (generous) request rate.
    assert_eq!(http_json(gw, "GET", &path, Some(&token("alice")), None).await?.status, 200);
    let bob = http_json(gw, "POST", &path, Some(&token("bob")), Some(json!({"text": "hi"}))).await?;
    assert_eq!(bob.status, 201, "another member still sends: {bob:?}");
    Ok(())
}

#[tokio::test]
async fn an_upload_past_the_quota_is_rate_limited_and_leaves_nothing_behind() -> Result<()> {
    let cluster = Cluster::builder().env("ATTACHMENT_QUOTA_BYTES", "200000").start().await?;
    let gw = cluster.gateways[0].as_str();
    uploaded_id(gw, "alice", &pattern(150_000)).await?;
    let over = upload(gw, "alice", &pattern(100_000)).await?;
    assert_rate_limited(&over);
    assert!(over.body["error"]["message"].as_str().unwrap_or_default().contains("quota"), "{over:?}");
    // The refused upload was dropped, not left half stored.
    let mut db = cluster.db.connect().await?;
    let alices: i64 =
        sqlx::query_scalar("SELECT count(*) FROM attachments WHERE uploader_id = 'alice'").fetch_one(&mut db).await?;
    assert_eq!(alices, 1);
    // Up to the quota exactly is allowed; then not one byte more.
    uploaded_id(gw, "alice", &pattern(50_000)).await?;
    assert_rate_limited(&upload(gw, "alice", b"x").await?);
    // Quotas are per user.
    uploaded_id(gw, "bob", &pattern(150_000)).await?;
    Ok(())
}

#[tokio::test]
async fn an_unattached_upload_is_collected_after_its_ttl_while_a_sent_one_stays() -> Result<()> {
    let cluster = Cluster::builder().env("ATTACHMENT_UNATTACHED_TTL_SECS", "2").start().await?;
    let gw = cluster.gateways[0].as_str();
    let room = create_group(gw, "alice", &["bob"]).await?;
    let kept_bytes = pattern(200_000);
    let kept = uploaded_id(gw, "alice", &kept_bytes).await?;
    let path = format!("/v1/rooms/{room}/messages");
    let sent =
        http_json(gw, "POST", &path, Some(&token("alice")), Some(json!({"text": "", "attachments": [kept]}))).await?;
    assert_eq!(sent.status, 201, "{sent:?}");
    let dropped = uploaded_id(gw, "alice", &pattern(200_000)).await?;

    eventually(Duration::from_secs(15), async || -> Result<()> {
        let reply = download(gw, "alice", &dropped).await?;
        ensure!(reply.status == 404, "still there: {}", reply.status);
        Ok(())
    })
    .await?;
    let mut db = cluster.db.connect().await?;
    let parts: i64 = sqlx::query_scalar("SELECT count(*) FROM attachment_chunks WHERE attachment_id = $1")
        .bind(dropped.parse::<i64>()?)
        .fetch_one(&mut db)
        .await?;
    assert_eq!(parts, 0, "its bytes went with it");
    let got = download(gw, "bob", &kept).await?;
    assert_eq!(got.status, 200);
    assert!(got.raw == kept_bytes, "the sent attachment is intact");
    Ok(())
}

#[tokio::test]
async fn attachments_stream_whole_through_a_bounded_number_of_transfer_slots() -> Result<()> {
    let cluster = Cluster::builder()
        .env("ATTACHMENT_TRANSFERS", "1")
        .env("ATTACHMENT_TRANSFER_WAIT_MS", "200")
        .env("REST_RATE_PER_SEC", "1000")
        .env("REST_RATE_BURST", "1000")
        .start()
        .await?;
    let gw = cluster.gateways[0].as_str();
    // Many parts, the last one short.
    let bytes = pattern(10 * 1024 * 1024 - 12_345);
    let id = uploaded_id(gw, "alice", &bytes).await?;
    let got = download(gw, "alice", &id).await?;
    assert_eq!(got.status, 200);
    assert!(got.headers.to_ascii_lowercase().contains(&format!("content-length: {}", bytes.len())), "{}", got.headers);
    assert_eq!(got.raw.len(), bytes.len());
    assert!(got.raw == bytes, "the bytes downloaded are the bytes uploaded, in order");

    // An upload that stalls half way holds the one slot...
    let stalled = stalled_upload(gw, "mallory").await?;
    eventually(Duration::from_secs(10), async || -> Result<()> {
        let m = Metrics::scrape(gw).await?;
        ensure!(m.value("chat_gateway_attachment_transfers") == 1.0, "transfers in flight: {m}");
        Ok(())
    })
    .await?;
    // ... so another transfer waits briefly, then is told to come back.
    let busy = download(gw, "alice", &id).await?;
    assert_eq!(busy.status, 503, "{busy:?}");
    assert_eq!(busy.body["error"]["code"], "unavailable");
    assert_eq!(retry_after(&busy), Some(1));

    // The stalled client goes: its slot frees, and its half upload is dropped.
    drop(stalled);
    eventually(Duration::from_secs(10), async || -> Result<()> {
        let got = download(gw, "alice", &id).await?;
        ensure!(got.status == 200 && got.raw == bytes, "status {}", got.status);
        Ok(())
    })
    .await?;
    let mut db = cluster.db.connect().await?;
    let unfinished: i64 =
        sqlx::query_scalar("SELECT count(*) FROM attachments WHERE NOT complete").fetch_one(&mut db).await?;
    assert_eq!(unfinished, 0);
    Ok(())
}

#[tokio::test]
async fn a_download_whose_client_stops_reading_is_cut_off_and_frees_its_slot() -> Result<()> {
    let cluster = Cluster::builder()
        .env("ATTACHMENT_TRANSFERS", "1")
        .env("ATTACHMENT_STALL_SECS", "1")
        .env("REST_RATE_PER_SEC", "1000")
        .env("REST_RATE_BURST", "1000")
        .start()
        .await?;
    let gw = cluster.gateways[0].as_str();
    // Larger than every socket buffer between the gateway and a tiny receive window.
    let bytes = pattern(10 * 1024 * 1024);
    let id = uploaded_id(gw, "alice", &bytes).await?;

    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut never_reads = socket.connect(gw.parse()?).await?;
    let head =
        format!("GET /v1/attachments/{id} HTTP/1.1\r\nHost: {gw}\r\nAuthorization: Bearer {}\r\n\r\n", token("alice"));
    never_reads.write_all(head.as_bytes()).await?;
    let transfers = async |want: f64| -> Result<()> {
        let m = Metrics::scrape(gw).await?;
        ensure!(m.value("chat_gateway_attachment_transfers") == want, "transfers in flight: {m}");
        Ok(())
    };
    eventually(Duration::from_secs(10), async || transfers(1.0).await).await.context("the download started")?;
    eventually(Duration::from_secs(10), async || transfers(0.0).await)
        .await
        .context("the stalled reader lost its slot")?;
    let got = download(gw, "alice", &id).await?;
    assert_eq!(got.status, 200);
    assert!(got.raw == bytes);
    drop(never_reads);
    Ok(())
}

#[tokio::test]
async fn one_user_cannot_hold_every_transfer_slot() -> Result<()> {
    let cluster = Cluster::builder()
        .env("ATTACHMENT_TRANSFERS", "4")
        .env("ATTACHMENT_TRANSFERS_PER_USER", "2")
        .env("ATTACHMENT_TRANSFER_WAIT_MS", "200")
        .env("REST_RATE_PER_SEC", "1000")
        .env("REST_RATE_BURST", "1000")
        .start()
        .await?;
    let gw = cluster.gateways[0].as_str();
    // Mallory starts uploads that trickle, to hold slots for as long as the stall time
    // allows: only her share of them.
    let mut trickles = Vec::new();
    for _ in 0..4 {
        trickles.push(stalled_upload(gw, "mallory").await?);
    }
    eventually(Duration::from_secs(10), async || -> Result<()> {
        let m = Metrics::scrape(gw).await?;
        ensure!(m.value("chat_gateway_attachment_transfers") == 2.0, "transfers in flight: {m}");
        Ok(())
    })
    .await?;
    let refused = upload(gw, "mallory", b"one more").await?;
    assert_rate_limited(&refused);

    // Everyone else still finds free slots.
    let bytes = pattern(300_000);
    let id = uploaded_id(gw, "alice", &bytes).await?;
    let got = download(gw, "alice", &id).await?;
    assert_eq!(got.status, 200, "{got:?}");
    assert!(got.raw == bytes);
    drop(trickles);
    Ok(())
}
