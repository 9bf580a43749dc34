//! Isolation: a user who is not a member of a room never receives anything from it —
//! messages, edits, deletes, reactions, typing, receipts, presence, membership events —
//! whatever the members do, in a pseudo-random order, across both gateways.

use anyhow::Result;
use chat_tests::Cluster;
use serde_json::{json, Value};

/// A small deterministic generator, so a failure replays with the same seed.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (self.0 >> 33) % n
    }
}

fn mentions(frame: &Value, room: &str) -> bool {
    frame["room"] == json!(room) || frame["room"]["id"] == json!(room) || frame["message"]["room"] == json!(room)
}

#[tokio::test]
async fn a_non_member_never_hears_a_rooms_events() -> Result<()> {
    let cluster = Cluster::builder().gateways(2).start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let mut bob = cluster.client(1, "bob").await?;
    let mut mallory = [cluster.client(0, "mallory").await?, cluster.client(1, "mallory").await?];

    let secret = alice.create_group(&["bob"]).await?;
    let public = alice.create_group(&["mallory"]).await?;
    for c in [&mut alice, &mut bob] {
        c.ack(json!({"type": "join", "room": secret})).await?;
    }
    for m in mallory.iter_mut() {
        m.ack(json!({"type": "join", "room": public})).await?;
    }

    let seed = std::env::var("ISOLATION_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_u64);
    let mut rng = Lcg(seed);
    let mut messages: Vec<String> = Vec::new();
    for step in 0..80 {
        let actor = if rng.next(2) == 0 { &mut alice } else { &mut bob };
        let op = rng.next(9);
        let target = (!messages.is_empty()).then(|| messages[rng.next(messages.len() as u64) as usize].clone());
        let command = match (op, target) {
            (0 | 1, _) | (_, None) => json!({"type": "send", "room": secret, "text": format!("secret {step}")}),
            (2, Some(m)) => json!({"type": "react", "message_id": m, "emoji": "👀"}),
            (3, Some(m)) => json!({"type": "unreact", "message_id": m, "emoji": "👀"}),
            (4, _) => json!({"type": "typing", "room": secret, "active": rng.next(2) == 0}),
            (5, _) => json!({"type": "read", "room": secret, "seq": rng.next(20) as i64}),
            (6, Some(m)) => json!({"type": "edit", "message_id": m, "text": format!("edited {step}")}),
            (7, Some(m)) => json!({"type": "delete", "message_id": m}),
            (_, _) => json!({"type": "add_members", "room": secret, "members": [format!("guest{step}")]}),
        };
        let reply = actor.request(command).await?;
        if let Some(id) = reply["message"]["id"].as_str() {
            messages.push(id.to_owned());
        }
        if step % 20 == 10 {
            // Presence: bob leaves and comes back, a first/last connection each time.
            drop(std::mem::replace(&mut bob, cluster.client(1, "bob").await?));
            bob.ack(json!({"type": "join", "room": secret})).await?;
        }
    }
    // Mallory's own attempts to get in are refused.
    for attempt in [
        json!({"type": "join", "room": secret}),
        json!({"type": "typing", "room": secret, "active": true}),
        json!({"type": "history", "room": secret}),
        json!({"type": "presence", "room": secret}),
        json!({"type": "read", "room": secret, "seq": 1}),
    ] {
        assert_eq!(mallory[0].request(attempt.clone()).await?["code"], "forbidden", "{attempt}");
    }

    // Everything published before this marker reached mallory's gateways before it.
    alice.ack(json!({"type": "send", "room": public, "text": "marker"})).await?;
    for m in mallory.iter_mut() {
        let marker: Value = loop {
            let f = m.recv().await?;
            assert!(!mentions(&f, &secret), "mallory heard the secret room: {f}");
            if f["type"] == "message" && f["message"]["text"] == "marker" {
                break f;
            }
        };
        assert_eq!(marker["room"], json!(public));
        assert!(m.buffered().all(|f| !mentions(f, &secret)));
    }
    Ok(())
}
