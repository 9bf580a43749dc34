//! Room events reach an idle connection straight from the room's task, and a busy one
//! through its queue: a client that stops reading for a while, pings the gateway and
//! sends commands meanwhile, still reads every frame whole, every message once and in
//! seq order, a reply to each command and a pong to each ping.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Result};
use chat_tests::{small_buffer_member, Cluster};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

/// Alice's messages: enough to fill the gateway's send buffer towards Bob many times
/// over, so deliveries to him go direct, in part, and queued, in turn.
const FROM_ALICE: usize = 1_200;
/// Commands and pings Bob sends while he reads nothing.
const FROM_BOB: usize = 20;

#[tokio::test]
async fn a_client_that_pauses_reading_gets_every_frame_whole_and_in_order() -> Result<()> {
    let cluster = Cluster::builder()
        // Bob must not be cut off while he pauses: neither by the queue nor the stall timer.
        .env("OUTBOUND_QUEUE", "100000")
        .env("WRITE_STALL_TIMEOUT_MS", "60000")
        // Alice sends as fast as her acks come back: no limit may refuse her.
        .env("RATE_CONN_PER_SEC", "0")
        .env("RATE_USER_PER_SEC", "0")
        .env("HEARTBEAT_MS", "120000")
        .start()
        .await?;
    let mut alice = cluster.client(0, "alice").await?;
    let room = alice.create_group(&["bob"]).await?;

    // Bob's receive buffer is tiny: the gateway's writes to him block soon.
    let mut bob = small_buffer_member(&cluster, "bob", &room).await?;

    let filler = "x".repeat(3_900);
    let texts: Vec<String> = (0..FROM_ALICE).map(|n| format!("alice {n} {filler}")).collect();
    let sending = {
        let texts = texts.clone();
        let room = room.clone();
        tokio::spawn(async move {
            for text in texts {
                alice.ack(json!({"type": "send", "room": room, "text": text})).await?;
            }
            anyhow::Ok(alice)
        })
    };
    // Bob reads nothing while Alice sends; he pings and sends now and then.
    for n in 0..FROM_BOB {
        tokio::time::sleep(Duration::from_millis(50)).await;
        bob.send(Message::Ping(format!("p{n}").into_bytes().into())).await?;
        let send = json!({"type": "send", "id": format!("b{n}"), "room": room, "text": format!("bob {n}")});
        bob.send(Message::Text(send.to_string().into())).await?;
    }
    // Every send acknowledged: a refused one would leave Bob a message short, for ever.
    let _alice = tokio::time::timeout(Duration::from_secs(120), sending).await???;

    // Now Bob reads everything.
    let mut seqs = Vec::new();
    let mut from_alice = Vec::new();
    let mut from_bob = 0;
    let mut acks = HashMap::new();
    let mut pongs = Vec::new();
    let started = std::time::Instant::now();
    let mut last_frame = started;
    let all_read = tokio::time::timeout(Duration::from_secs(60), async {
        while seqs.len() < FROM_ALICE + FROM_BOB || acks.len() < FROM_BOB || pongs.len() < FROM_BOB {
            let next = bob.next().await.ok_or_else(|| anyhow!("connection ended"))??;
            last_frame = std::time::Instant::now();
            match next {
                Message::Text(text) => {
                    let frame: Value = serde_json::from_str(&text)?;
                    match frame["type"].as_str() {
                        Some("message") => {
                            seqs.push(frame["message"]["seq"].as_i64().ok_or_else(|| anyhow!("no seq: {frame}"))?);
                            let text = frame["message"]["text"].as_str().unwrap_or_default().to_owned();
                            if text.starts_with("alice ") {
                                from_alice.push(text);
                            } else {
                                from_bob += 1;
                            }
                        }
                        Some("ack") => {
                            acks.insert(frame["id"].as_str().unwrap_or_default().to_owned(), frame);
                        }
                        _ => {}
                    }
                }
                Message::Pong(payload) => pongs.push(String::from_utf8(payload.to_vec())?),
                Message::Close(frame) => bail!("closed: {frame:?}"),
                _ => {}
            }
        }
        anyhow::Ok(())
    })
    .await;
    all_read.map_err(|_| {
        anyhow!(
            "read {} messages, {} acks, {} pongs in time; the last frame came {:?} after reading began",
            seqs.len(),
            acks.len(),
            pongs.len(),
            last_frame - started
        )
    })??;

    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "every message once, in seq order");
    assert_eq!(from_alice, texts, "Alice's messages whole and in order");
    assert_eq!(from_bob, FROM_BOB);
    for n in 0..FROM_BOB {
        let ack = &acks[&format!("b{n}")];
        assert_eq!(ack["type"], "ack", "{ack}");
    }
    let expected: Vec<String> = (0..FROM_BOB).map(|n| format!("p{n}")).collect();
    assert_eq!(pongs, expected, "a pong to each ping, in order");
    Ok(())
}
