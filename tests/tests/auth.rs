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
    let path = public_key_path();
    let env =
        [("JWT_ALGORITHM", "RS256"), ("JWT_PUBLIC_KEY_FILE", path.as_str()), ("JWT_ISSUER", "https://issuer.test")];
    let cluster = Cluster::start_with(1, &chat_tests::redis_url(), &env).await?;
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
