//! Token attacks at the handshake, against a gateway pinned to RS256.

use anyhow::Result;
use chat_tests::{Cluster, WsClient};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::json;

const RSA_PRIVATE: &[u8] = include_bytes!("../../services/gateway/testdata/rsa_private.pem");
const RSA_PUBLIC: &[u8] = include_bytes!("../../services/gateway/testdata/rsa_public.pem");

fn public_key_path() -> String {
    format!("{}/../services/gateway/testdata/rsa_public.pem", env!("CARGO_MANIFEST_DIR"))
}

async fn status_of(cluster: &Cluster, token: &str) -> Result<u16> {
    match WsClient::connect_bearer(&cluster.ws_url(0), token).await {
        Ok((_, welcome)) => {
            anyhow::ensure!(welcome["type"] == "welcome", "{welcome}");
            Ok(101)
        }
        Err(err) => match err.downcast::<tokio_tungstenite::tungstenite::Error>()? {
            tokio_tungstenite::tungstenite::Error::Http(resp) => Ok(resp.status().as_u16()),
            other => Err(other.into()),
        },
    }
}

#[tokio::test]
async fn an_rs256_gateway_accepts_only_rs256_tokens() -> Result<()> {
    let cluster = Cluster::builder()
        .env("JWT_ALGORITHM", "RS256")
        .env("JWT_PUBLIC_KEY_FILE", public_key_path())
        .env("JWT_ISSUER", "https://issuer.test")
        .start()
        .await?;
    let exp = chrono::Utc::now().timestamp() + 600;
    let claims = json!({"sub": "alice", "exp": exp, "iss": "https://issuer.test"});

    let good = encode(&Header::new(Algorithm::RS256), &claims, &EncodingKey::from_rsa_pem(RSA_PRIVATE)?)?;
    assert_eq!(status_of(&cluster, &good).await?, 101);

    // HS256 signed with the public key as the secret: the algorithm-confusion forgery.
    let forged = encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(RSA_PUBLIC))?;
    assert_eq!(status_of(&cluster, &forged).await?, 401);

    let wrong_iss = json!({"sub": "alice", "exp": exp, "iss": "https://evil.test"});
    let wrong_iss = encode(&Header::new(Algorithm::RS256), &wrong_iss, &EncodingKey::from_rsa_pem(RSA_PRIVATE)?)?;
    assert_eq!(status_of(&cluster, &wrong_iss).await?, 401);

    let parts: Vec<&str> = good.split('.').collect();
    let unsigned = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.", parts[1]);
    assert_eq!(status_of(&cluster, &unsigned).await?, 401);
    Ok(())
}

#[tokio::test]
async fn browser_origins_outside_the_allowlist_are_refused() -> Result<()> {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let cluster = Cluster::builder().env("ALLOWED_ORIGINS", "https://app.test").start().await?;
    let with_origin = |origin: Option<&str>| -> Result<_> {
        let mut req = cluster.ws_url(0).into_client_request()?;
        req.headers_mut().insert("Authorization", format!("Bearer {}", chat_tests::token("alice")).parse()?);
        if let Some(origin) = origin {
            req.headers_mut().insert("Origin", origin.parse()?);
        }
        Ok(req)
    };
    let (_ok, welcome) = WsClient::connect_request(with_origin(Some("https://app.test"))?).await?;
    assert_eq!(welcome["type"], "welcome");
    // Non-browser clients send no Origin and are not subject to the check.
    let (_cli, welcome) = WsClient::connect_request(with_origin(None)?).await?;
    assert_eq!(welcome["type"], "welcome");
    let err = WsClient::connect_request(with_origin(Some("https://evil.test"))?).await.err().expect("refused");
    let tokio_tungstenite::tungstenite::Error::Http(resp) = err.downcast::<tokio_tungstenite::tungstenite::Error>()?
    else {
        panic!("expected an HTTP refusal");
    };
    assert_eq!(resp.status(), 403);
    Ok(())
}

#[tokio::test]
async fn over_the_rate_limit_commands_are_refused_and_sustained_abuse_is_disconnected() -> Result<()> {
    let cluster = Cluster::builder()
        .env("RATE_CONN_PER_SEC", "2")
        .env("RATE_CONN_BURST", "5")
        .env("RATE_ABUSE_AFTER_SECS", "1")
        .start()
        .await?;
    let mut alice = cluster.client(0, "alice").await?;
    for _ in 0..5 {
        assert_eq!(alice.request(json!({"type": "ping"})).await?["type"], "pong");
    }
    let refused = alice.request(json!({"type": "ping"})).await?;
    assert_eq!(refused["code"], "rate_limited", "{refused}");
    let wait = refused["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!(wait > 0 && wait <= 500, "{wait}");
    // The connection stays open and recovers once the bucket refills: waiting as long as
    // the server said (and a little) is what is tested.
    let as_told = std::time::Duration::from_millis(wait + 50);
    tokio::time::sleep(as_told).await;
    assert_eq!(alice.request(json!({"type": "ping"})).await?["type"], "pong");

    // Keep going without pause: refused for the whole abuse period, the connection is closed with 1008.
    // One request at a time, so the close frame is read rather than lost to a reset.
    for _ in 0..200_000 {
        match alice.request(json!({"type": "ping"})).await {
            Ok(reply) => assert!(reply["type"] == "pong" || reply["code"] == "rate_limited", "{reply}"),
            Err(closed) => {
                let closed = closed.to_string();
                assert!(closed.contains("Policy") && closed.contains("rate limit exceeded"), "{closed}");
                return Ok(());
            }
        }
    }
    anyhow::bail!("sustained abuse never closed the connection")
}

#[tokio::test]
async fn connection_room_and_header_limits_are_enforced() -> Result<()> {
    let cluster = Cluster::builder().env("MAX_ROOMS_PER_CONNECTION", "2").start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let mut rooms = Vec::new();
    for _ in 0..3 {
        rooms.push(alice.create_group(&[]).await?);
    }
    alice.ack(json!({"type": "join", "room": rooms[0]})).await?;
    alice.ack(json!({"type": "join", "room": rooms[1]})).await?;
    let third = alice.request(json!({"type": "join", "room": rooms[2]})).await?;
    assert_eq!(third["code"], "forbidden", "{third}");
    alice.ack(json!({"type": "join", "room": rooms[1]})).await?;
    alice.ack(json!({"type": "leave", "room": rooms[0]})).await?;
    alice.ack(json!({"type": "join", "room": rooms[2]})).await?;

    let long = format!("/healthz?pad={}", "x".repeat(20 * 1024));
    let reply = chat_tests::http_json(&cluster.gateways[0], "GET", &long, None, None).await?;
    assert_eq!(reply.status, 413);
    assert_eq!(reply.body["error"]["code"], "too_large");
    Ok(())
}
