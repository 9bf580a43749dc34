//! The browser client's page and the development sign-in, over plain HTTP.

use anyhow::Result;
use chat_tests::{http, http_json, Cluster, WsClient};
use serde_json::json;

#[tokio::test]
async fn the_gateway_serves_the_browser_client_with_a_strict_content_security_policy() -> Result<()> {
    let cluster = Cluster::builder().start().await?;
    let gw = &cluster.gateways[0];
    let page = http(gw, "GET", "/", None, "", b"").await?;
    assert_eq!(page.status, 200);
    let headers = page.headers.to_ascii_lowercase();
    assert!(headers.contains("content-type: text/html"), "{headers}");
    assert!(headers.contains("content-security-policy: default-src 'self'; script-src 'self'"), "{headers}");
    let html = String::from_utf8(page.raw)?;
    assert!(html.contains(r#"<script type="module" src="/app/app.js">"#), "{html}");
    for module in ["/app/app.js", "/app/view.js", "/app/sdk/index.js", "/app/sdk/client.js"] {
        let reply = http(gw, "GET", module, None, "", b"").await?;
        assert_eq!(reply.status, 200, "{module}");
        assert!(reply.headers.to_ascii_lowercase().contains("content-type: text/javascript"), "{module}");
        assert!(!reply.raw.is_empty(), "{module}");
    }
    let missing = http(gw, "GET", "/app/../Cargo.toml", None, "", b"").await?;
    assert_eq!(missing.status, 404);
    Ok(())
}

#[tokio::test]
async fn dev_tokens_are_off_unless_enabled() -> Result<()> {
    let cluster = Cluster::builder().start().await?;
    let reply =
        http_json(&cluster.gateways[0], "POST", "/v1/dev/token", None, Some(json!({"user_id": "mallory"}))).await?;
    assert_eq!(reply.status, 404, "{:?}", reply.body);
    assert_eq!(reply.body["error"]["code"], "not_found");
    Ok(())
}

#[tokio::test]
async fn a_dev_token_signs_a_user_in_over_websocket() -> Result<()> {
    let cluster = Cluster::builder().env("ENVIRONMENT", "development").env("DEV_TOKENS", "true").start().await?;
    let gw = &cluster.gateways[0];
    let reply =
        http_json(gw, "POST", "/v1/dev/token", None, Some(json!({"user_id": "devuser", "name": "Dev User"}))).await?;
    assert_eq!(reply.status, 201, "{:?}", reply.body);
    assert_eq!(reply.body["user_id"], "devuser");
    assert!(reply.body["expires_at"].as_str().is_some_and(|t| t.ends_with('Z')));
    let token = reply.body["token"].as_str().expect("token").to_owned();
    let (_client, welcome) = WsClient::connect_bearer(&cluster.ws_url(0), &token).await?;
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["user_id"], "devuser");

    let empty = http_json(gw, "POST", "/v1/dev/token", None, Some(json!({"user_id": "  "}))).await?;
    assert_eq!(empty.status, 400);
    assert_eq!(empty.body["error"]["code"], "bad_request");
    let missing = http_json(gw, "POST", "/v1/dev/token", None, Some(json!({}))).await?;
    assert_eq!(missing.status, 400);
    Ok(())
}
