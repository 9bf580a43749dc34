//! Clients that misbehave at the connection level cost only themselves: a burst is
//! refused for its excess, not disconnected; a flooder and an over-limit upload read
//! their close code or 413 instead of a reset; a client that stops reading is cut off
//! while its room keeps flowing to everyone else.

use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use chat_tests::{eventually, small_buffer_member, token, Cluster, Metrics, WAIT};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const CONNECTIONS: &str = "chat_gateway_connections";

/// A raw WebSocket request to gateway `gw` with `user`'s token in the header.
fn ws_request(
    cluster: &Cluster,
    gw: usize,
    user: &str,
) -> Result<tokio_tungstenite::tungstenite::handshake::client::Request> {
    let mut req = cluster.ws_url(gw).into_client_request()?;
    req.headers_mut().insert("Authorization", format!("Bearer {}", token(user)).parse()?);
    Ok(req)
}

#[tokio::test]
async fn a_burst_of_500_sends_is_refused_for_its_excess_and_the_connection_stays_open() -> Result<()> {
    // Limits low enough that a debug build's sends outrun them, and an abuse period
    // short enough to outlast here (yet longer than the burst takes to answer).
    let cluster = Cluster::builder()
        .env("RATE_CONN_PER_SEC", "20")
        .env("RATE_CONN_BURST", "50")
        .env("RATE_ABUSE_AFTER_SECS", "4")
        .start()
        .await?;
    let mut alice = cluster.client(0, "alice").await?;
    let room = alice.create_group(&[]).await?;

    // An SDK flushing its offline queue: every send written before any reply is read.
    let sends: Vec<Value> = (0..500)
        .map(|n| json!({"type": "send", "id": format!("s{n}"), "room": room, "text": format!("queued {n}")}))
        .collect();
    for send in &sends {
        alice.send(send).await?;
    }
    let mut refused = Vec::new();
    let mut acked = 0;
    for _ in 0..sends.len() {
        let reply = alice.recv().await.context("every send of the burst is answered, the connection stays open")?;
        match reply["type"].as_str() {
            Some("ack") => acked += 1,
            _ => {
                assert_eq!(reply["code"], "rate_limited", "{reply}");
                assert!(reply["retry_after_ms"].as_u64().is_some_and(|ms| ms > 0), "{reply}");
                let n: usize = reply["id"]
                    .as_str()
                    .and_then(|id| id.strip_prefix('s'))
                    .and_then(|n| n.parse().ok())
                    .ok_or_else(|| anyhow!("{reply}"))?;
                refused.push((n, reply["retry_after_ms"].as_u64().unwrap_or(1)));
            }
        }
    }
    assert!(acked >= 50, "the burst allowance is accepted: {acked}");
    assert!(refused.len() > 100, "the excess is refused: {} refusals", refused.len());

    // The client then resends what was refused, waiting as told after each refusal,
    // for two abuse periods: it goes on being refused now and then, and is never
    // closed for it.
    let resending = tokio::time::Instant::now();
    for (n, mut wait) in refused {
        if resending.elapsed() > Duration::from_secs(8) {
            break;
        }
        loop {
            tokio::time::sleep(Duration::from_millis(wait)).await;
            let reply = alice.request(json!({"type": "send", "room": room, "text": format!("queued {n}")})).await?;
            if reply["type"] == "ack" {
                break;
            }
            assert_eq!(reply["code"], "rate_limited", "{reply}");
            wait = reply["retry_after_ms"].as_u64().ok_or_else(|| anyhow!("{reply}"))?;
        }
    }
    let mut reply = alice.request(json!({"type": "ping"})).await?;
    while let Some(wait) = reply["retry_after_ms"].as_u64() {
        tokio::time::sleep(Duration::from_millis(wait)).await;
        reply = alice.request(json!({"type": "ping"})).await?;
    }
    assert_eq!(reply["type"], "pong", "{reply}");
    Ok(())
}

/// Floods pings from one task while another reads; returns the close code read, or
/// fails if the connection ended without a close frame (a reset: 1006).
async fn flood_until_closed(cluster: &Cluster, user: &str) -> Result<u16> {
    let (ws, _) = tokio_tungstenite::connect_async(ws_request(cluster, 0, user)?).await?;
    let (mut sink, mut stream) = ws.split();
    let writer = tokio::spawn(async move {
        let ping = json!({"type": "ping"}).to_string();
        // Until the connection is closed under it; bounded in case it never is.
        for _ in 0..2_000_000 {
            if sink.send(Message::Text(ping.clone().into())).await.is_err() {
                break;
            }
        }
    });
    let read = tokio::time::timeout(WAIT, async {
        loop {
            match stream.next().await {
                Some(Ok(Message::Close(Some(frame)))) => return Ok(u16::from(frame.code)),
                Some(Ok(Message::Close(None))) => bail!("a close frame without a code"),
                Some(Ok(_)) => continue,
                Some(Err(err)) => bail!("the connection broke without a close frame: {err}"),
                None => bail!("the connection ended without a close frame"),
            }
        }
    })
    .await;
    writer.abort();
    read.map_err(|_| anyhow!("not closed within {WAIT:?}"))?
}

#[tokio::test]
async fn a_flooder_is_closed_with_1008_and_reads_it_while_still_writing() -> Result<()> {
    let cluster = Cluster::builder()
        .env("RATE_CONN_PER_SEC", "5")
        .env("RATE_CONN_BURST", "5")
        .env("RATE_ABUSE_AFTER_SECS", "1")
        .start()
        .await?;
    // The reset was intermittent: every try must read the close frame.
    for n in 0..3 {
        let code = flood_until_closed(&cluster, &format!("flooder{n}")).await.with_context(|| format!("try {n}"))?;
        assert_eq!(code, 1008, "try {n}");
    }
    Ok(())
}

/// Sends a POST /v1/attachments of `len` bytes as a browser does (no `Expect:
/// 100-continue`: the whole body follows the headers, and a reset while sending it is
/// a failed request), then reads the response until the gateway closes the
/// connection; the response text.
async fn upload_without_expect(addr: &str, len: usize) -> Result<String> {
    let mut tcp = TcpStream::connect(addr).await?;
    let head = format!(
        "POST /v1/attachments?name=big.png HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: image/png\r\nContent-Length: {len}\r\n\r\n",
        token("uploader")
    );
    tcp.write_all(head.as_bytes()).await?;
    let chunk = vec![0x42u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(chunk.len());
        // A browser (like curl) gives up on a request whose upload is reset and shows
        // the reset, not the response that may already have arrived.
        tcp.write_all(&chunk[..n])
            .await
            .map_err(|err| anyhow!("the upload was cut with {} bytes left: {err}", left))?;
        left -= n;
    }
    let mut response = Vec::new();
    // To EOF: the client never closes, so this also shows the gateway lets it go.
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut response))
        .await
        .map_err(|_| anyhow!("the gateway held the connection for {WAIT:?}"))?
        .map_err(|err| anyhow!("reading the response failed ({} bytes read): {err}", response.len()))?;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

#[tokio::test]
async fn an_upload_over_the_limit_sent_without_expect_reads_413_not_a_reset() -> Result<()> {
    let cluster = Cluster::builder().start().await?;
    for n in 0..5 {
        let response = upload_without_expect(&cluster.gateways[0], 11 * 1024 * 1024).await?;
        assert!(response.starts_with("HTTP/1.1 413"), "try {n}: {response:.200}");
        assert!(response.contains("too_large"), "try {n}: {response:.400}");
    }
    Ok(())
}

#[tokio::test]
async fn keep_alive_still_serves_several_requests_on_one_connection() -> Result<()> {
    let cluster = Cluster::builder().start().await?;
    let addr = &cluster.gateways[0];
    let mut tcp = TcpStream::connect(addr).await?;
    let mut buf = vec![0u8; 16 * 1024];
    for n in 0..3 {
        tcp.write_all(format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
        let read = tokio::time::timeout(WAIT, tcp.read(&mut buf)).await??;
        let response = String::from_utf8_lossy(&buf[..read]);
        assert!(response.starts_with("HTTP/1.1 200"), "request {n} on the same connection: {response}");
    }
    Ok(())
}

/// Alice floods a room that Bob reads and Carol (a staller) has joined, until the
/// gateway has cut Carol off. Bob receives every message, in order, throughout.
async fn a_staller_is_cut_off_while_its_room_keeps_flowing(cluster: Cluster) -> Result<Cluster> {
    let gw = cluster.gateways[0].clone();
    let mut alice = cluster.client(0, "alice").await?;
    let room = alice.create_group(&["bob", "carol"]).await?;
    let mut bob = cluster.client(0, "bob").await?;
    bob.ack(json!({"type": "join", "room": room})).await?;
    let mut carol = small_buffer_member(&cluster, "carol", &room).await?;
    assert_eq!(Metrics::scrape(&gw).await?.value(CONNECTIONS), 3.0);

    let filler = "x".repeat(3_900);
    let mut sent = 0;
    let mut sent_while_carol_connected = 0;
    loop {
        anyhow::ensure!(sent < 3_000, "the staller was never cut off");
        let text = format!("{sent} {filler}");
        alice.ack(json!({"type": "send", "room": room, "text": text})).await?;
        let got = bob.event("message").await?;
        assert_eq!(got["message"]["text"], text, "the reader gets every message, in order");
        sent += 1;
        if sent % 10 == 0 {
            if Metrics::scrape(&gw).await?.value(CONNECTIONS) < 3.0 {
                break;
            }
            sent_while_carol_connected = sent;
        }
    }
    // Carol's buffers hold a few dozen of these at most: most went to Bob while Carol's
    // connection was stuck, and none waited for it.
    assert!(sent_while_carol_connected >= 50, "{sent_while_carol_connected}");
    for n in 0..5 {
        alice.ack(json!({"type": "send", "room": room, "text": format!("after {n}")})).await?;
        assert_eq!(bob.event("message").await?["message"]["text"], format!("after {n}"));
    }

    // When Carol reads at last, her connection has ended: whatever was in her buffer,
    // then the end (a close frame if it fit, else EOF or a reset), never more traffic.
    let ended = tokio::time::timeout(WAIT, async {
        while let Some(Ok(frame)) = carol.next().await {
            if let Message::Close(_) = frame {
                break;
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the staller's connection is still open");
    Ok(cluster)
}

/// A cluster for the stalled-reader tests, with this stall timeout and queue length.
async fn staller_cluster(write_stall_timeout_ms: &str, outbound_queue: &str) -> Result<Cluster> {
    Cluster::builder()
        .env("WRITE_STALL_TIMEOUT_MS", write_stall_timeout_ms)
        .env("OUTBOUND_QUEUE", outbound_queue)
        .env("RATE_CONN_PER_SEC", "10000")
        .env("RATE_CONN_BURST", "10000")
        // Filling the kernel's buffers towards Carol takes a thousand sends and more.
        .env("RATE_USER_PER_SEC", "10000")
        .env("RATE_USER_BURST", "10000")
        // The staller answers no ping: keep the heartbeat out of the way.
        .env("HEARTBEAT_MS", "120000")
        .start()
        .await
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_when_its_writes_stall() -> Result<()> {
    // A queue too long to fill: only the stall timer can cut Carol off.
    let cluster = staller_cluster("1000", "100000").await?;
    a_staller_is_cut_off_while_its_room_keeps_flowing(cluster).await?;
    Ok(())
}

#[tokio::test]
async fn a_full_queue_cuts_off_a_client_even_while_a_write_to_it_is_blocked() -> Result<()> {
    // A stall timeout too long to matter: only the full queue can cut Carol off, while
    // her connection's task is stuck writing to her.
    let cluster = staller_cluster("600000", "16").await?;
    let cluster = a_staller_is_cut_off_while_its_room_keeps_flowing(cluster).await?;
    let drops = eventually(WAIT, async || -> Result<f64> {
        let drops = Metrics::scrape(&cluster.gateways[0]).await?.value("chat_gateway_outbound_drops_total");
        anyhow::ensure!(drops >= 1.0, "no slow-consumer drop counted");
        Ok(drops)
    })
    .await?;
    assert_eq!(drops, 1.0);
    Ok(())
}
