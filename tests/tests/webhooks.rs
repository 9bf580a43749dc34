//! Webhooks for offline members (contract v1.1): signed as Standard Webhooks says, retried
//! with the same id until a 2xx, at least once, in seq order per member and room, never
//! to a member who was online, and surviving a message service killed between the
//! commit and the POST.

use std::time::Duration;

use anyhow::Result;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use chat_tests::webhook_receiver::{Received, WebhookReceiver};
use chat_tests::{eventually, Cluster, ClusterBuilder, Metrics};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const WITHIN: Duration = Duration::from_secs(30);

/// Webhooks to `receiver`, retried quickly.
fn webhooks(builder: ClusterBuilder, receiver: &WebhookReceiver) -> ClusterBuilder {
    builder
        .env("WEBHOOK_URL", &receiver.url)
        .env("WEBHOOK_SECRET", SECRET)
        .env("WEBHOOK_RETRY_BASE_MS", "100")
        .env("WEBHOOK_POLL_MS", "50")
}

/// Checks the signature as a receiver following the Standard Webhooks scheme does.
fn verify(r: &Received) -> bool {
    let key = STANDARD.decode(SECRET.trim_start_matches("whsec_")).unwrap_or_default();
    let Ok(mut mac) = <Hmac<Sha256>>::new_from_slice(&key) else { return false };
    let (id, ts) = (&r.headers["webhook-id"], &r.headers["webhook-timestamp"]);
    mac.update(format!("{id}.{ts}.{}", r.body).as_bytes());
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    r.headers["webhook-signature"].split(' ').any(|s| s == expected)
}

fn body(r: &Received) -> Value {
    serde_json::from_str(&r.body).unwrap_or_default()
}

#[tokio::test]
async fn offline_members_get_signed_webhooks_retried_with_one_id_and_in_seq_order() -> Result<()> {
    // The first three attempts fail, whatever they carry.
    let receiver = WebhookReceiver::start(Box::new(|n| if n < 3 { 500 } else { 204 })).await?;
    let cluster = webhooks(Cluster::builder().gateways(2), &receiver).start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let room = alice.create_group(&["bob", "carol"]).await?;
    // Bob is online (on the other gateway); carol is not.
    let _bob = cluster.client(1, "bob").await?;
    for i in 1..=3 {
        alice.ack(json!({"type": "send", "room": room, "text": format!("m{i}")})).await?;
    }

    let delivered = |r: &&Received| (200..300).contains(&r.status);
    eventually(WITHIN, async || receiver.received().iter().filter(delivered).count() >= 3).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = receiver.received();
    assert!(all.iter().all(verify), "every attempt carries a valid signature: {all:#?}");
    for r in &all {
        let b = body(r);
        assert_eq!(
            (b["type"].as_str(), b["user_id"].as_str(), b["room"].as_str()),
            (Some("message.offline"), Some("carol"), Some(room.as_str())),
            "{b}"
        );
        let age = chrono::Utc::now().timestamp() - r.headers["webhook-timestamp"].parse::<i64>()?;
        assert!((0..60).contains(&age), "webhook-timestamp is the attempt's time");
    }
    // Each message reached carol exactly once as a success, in seq order; every attempt
    // of one message carried one webhook-id.
    let ok: Vec<&Received> = all.iter().filter(delivered).collect();
    let seqs: Vec<i64> = ok.iter().map(|r| body(r)["message"]["seq"].as_i64().unwrap_or(-1)).collect();
    assert_eq!(seqs, [1, 2, 3], "{ok:#?}");
    assert_eq!(
        ok.iter().map(|r| body(r)["message"]["text"].clone()).collect::<Vec<_>>(),
        [json!("m1"), json!("m2"), json!("m3")]
    );
    for r in &all {
        let seq = &body(r)["message"]["seq"];
        let same = ok.iter().find(|o| &body(o)["message"]["seq"] == seq).map(|o| &o.headers["webhook-id"]);
        assert_eq!(same, Some(&r.headers["webhook-id"]), "one id for every attempt of message {seq}");
    }
    let metrics = Metrics::scrape(&cluster.message_metrics).await?;
    assert_eq!(metrics.value("chat_message_webhooks_sent_total"), 3.0);
    assert_eq!(metrics.value("chat_message_webhook_retries_total"), 3.0);
    Ok(())
}

#[tokio::test]
async fn a_webhook_committed_before_the_service_was_killed_still_arrives() -> Result<()> {
    let receiver = WebhookReceiver::start(Box::new(|_| 200)).await?;
    // A dispatcher that never gets to look: the service dies between commit and POST.
    let mut cluster = webhooks(Cluster::builder(), &receiver).env("WEBHOOK_POLL_MS", "600000").start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let room = alice.create_group(&["carol"]).await?;
    alice.ack(json!({"type": "send", "room": room, "text": "while you were away"})).await?;
    cluster.restart_message_service_with(&[("WEBHOOK_POLL_MS", "50")]).await?;

    eventually(WITHIN, async || !receiver.received().is_empty()).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let all = receiver.received();
    assert_eq!(all.len(), 1, "exactly one webhook: {all:#?}");
    assert!(verify(&all[0]));
    assert_eq!(body(&all[0])["message"]["text"], "while you were away");
    assert_eq!(body(&all[0])["user_id"], "carol");
    Ok(())
}

#[tokio::test]
async fn a_webhook_out_of_retries_is_dead_listed_for_admins_and_replayed_with_its_id() -> Result<()> {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    let up = Arc::new(AtomicBool::new(false));
    let receiver_up = up.clone();
    let receiver =
        WebhookReceiver::start(Box::new(move |_| if receiver_up.load(Ordering::Relaxed) { 200 } else { 503 })).await?;
    let cluster = webhooks(Cluster::builder(), &receiver).env("WEBHOOK_RETRY_FOR_SECS", "1").start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let room = alice.create_group(&["carol", "dave"]).await?;
    alice.ack(json!({"type": "send", "room": room, "text": "nobody home"})).await?;

    let gateway = &cluster.gateways[0];
    let admin =
        chat_tests::token_with(json!({"sub": "ops", "role": "admin", "exp": chrono::Utc::now().timestamp() + 3600}));
    let dead = async || -> Result<Value> {
        Ok(chat_tests::http_json(gateway, "GET", "/v1/admin/webhooks/dead", Some(&admin), None).await?.body)
    };
    eventually(WITHIN, async || dead().await.is_ok_and(|d| d["webhooks"].as_array().is_some_and(|w| w.len() == 2)))
        .await?;
    let listed = dead().await?;
    let first = &listed["webhooks"][0];
    assert_eq!((first["room"].as_str(), first["seq"].as_i64()), (Some(room.as_str()), Some(1)), "{listed}");
    assert!(
        first["attempts"].as_i64().unwrap_or(0) >= 1 && first["last_error"].as_str().unwrap_or("").contains("503"),
        "{listed}"
    );
    let metrics = Metrics::scrape(&cluster.message_metrics).await?;
    assert_eq!(metrics.value("chat_message_webhooks_dead_total"), 2.0);
    // Not for everyone.
    let refused =
        chat_tests::http_json(gateway, "GET", "/v1/admin/webhooks/dead", Some(&chat_tests::token("carol")), None)
            .await?;
    assert_eq!(refused.status, 403);

    // The receiver is back: one replayed by id, then the rest, each with its own id.
    up.store(true, Ordering::Relaxed);
    let id = first["id"].as_str().unwrap_or_default().to_owned();
    let one =
        chat_tests::http_json(gateway, "POST", &format!("/v1/admin/webhooks/dead/{id}/replay"), Some(&admin), None)
            .await?;
    assert_eq!((one.status, &one.body["replayed"]), (200, &json!(1)), "{one:?}");
    eventually(WITHIN, async || receiver.received().iter().any(|r| r.status == 200 && r.headers["webhook-id"] == id))
        .await?;
    let again =
        chat_tests::http_json(gateway, "POST", &format!("/v1/admin/webhooks/dead/{id}/replay"), Some(&admin), None)
            .await?;
    assert_eq!(again.status, 404, "no longer dead: {again:?}");
    let rest = chat_tests::http_json(gateway, "POST", "/v1/admin/webhooks/dead/replay", Some(&admin), None).await?;
    assert_eq!(rest.body["replayed"], 1, "{rest:?}");
    eventually(WITHIN, async || receiver.received().iter().filter(|r| r.status == 200).count() == 2).await?;
    assert_eq!(dead().await?["webhooks"], json!([]));
    Ok(())
}
