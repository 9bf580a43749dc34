//! The REST API across two gateways: success paths and the 400/401/403/404/413 paths.

use anyhow::Result;
use chat_tests::{eventually, http, http_json, token, token_with, Cluster, Metrics, WsClient, WAIT};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};

fn admin() -> String {
    token_with(json!({"sub": "ops", "role": "admin", "exp": chrono::Utc::now().timestamp() + 3600}))
}

#[tokio::test]
async fn rooms_and_messages_over_rest_reach_websocket_clients_on_the_other_gateway() -> Result<()> {
    let cluster = Cluster::builder().gateways(2).start().await?;
    let (a, b) = (cluster.gateways[0].as_str(), cluster.gateways[1].as_str());
    let alice = token("alice");

    let created = http_json(
        a,
        "POST",
        "/v1/rooms",
        Some(&alice),
        Some(json!({"kind": "group", "name": "ops", "members": ["bob"]})),
    )
    .await?;
    assert_eq!(created.status, 201, "{:?}", created);
    let room = created.body["room"]["id"].as_str().unwrap().to_owned();

    let mut bob = cluster.client(1, "bob").await?;
    bob.ack(json!({"type": "join", "room": room})).await?;
    let sent = http_json(
        a,
        "POST",
        &format!("/v1/rooms/{room}/messages"),
        Some(&alice),
        Some(json!({"text": "from the backend", "client_msg_id": "h-1"})),
    )
    .await?;
    assert_eq!(sent.status, 201, "{:?}", sent);
    assert_eq!(sent.body["message"]["seq"], 1);
    let event = bob.event("message").await?;
    assert_eq!(event["message"], sent.body["message"], "delivered exactly as a WebSocket send");
    // A retry with the same client_msg_id is the same message.
    let again = http_json(
        a,
        "POST",
        &format!("/v1/rooms/{room}/messages"),
        Some(&alice),
        Some(json!({"text": "from the backend", "client_msg_id": "h-1"})),
    )
    .await?;
    assert_eq!(again.body["message"]["id"], sent.body["message"]["id"]);

    let page = http_json(b, "GET", &format!("/v1/rooms/{room}/messages?limit=10"), Some(&token("bob")), None).await?;
    assert_eq!(page.status, 200);
    assert_eq!(page.body["messages"].as_array().unwrap().len(), 1);
    assert_eq!(page.body["has_more"], false);
    let rooms = http_json(b, "GET", "/v1/rooms", Some(&token("bob")), None).await?;
    assert_eq!(rooms.status, 200);
    assert_eq!(rooms.body["rooms"][0]["unread"], 1);
    Ok(())
}

#[tokio::test]
async fn rest_errors_use_the_contract_format_and_statuses() -> Result<()> {
    let cluster = Cluster::builder().start().await?;
    let a = cluster.gateways[0].as_str();
    let alice = token("alice");
    let room = http_json(a, "POST", "/v1/rooms", Some(&alice), Some(json!({"kind": "group", "members": []})))
        .await?
        .body["room"]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let check = |reply: chat_tests::HttpReply, status: u16, code: &str| {
        assert_eq!(reply.status, status, "{reply:?}");
        assert_eq!(reply.body["error"]["code"], code, "{reply:?}");
        assert!(reply.body["error"]["message"].is_string());
    };
    // Every /v1 route wants a valid token.
    for (method, path) in [
        ("GET", "/v1/rooms"),
        ("POST", "/v1/rooms"),
        ("GET", "/v1/rooms/1/messages"),
        ("POST", "/v1/rooms/1/messages"),
        ("POST", "/v1/attachments"),
        ("GET", "/v1/attachments/1"),
        ("GET", "/v1/me/status"),
        ("GET", "/v1/users/bob/status"),
        ("DELETE", "/v1/users/bob/connections"),
        ("GET", "/v1/connections"),
        ("POST", "/v1/push"),
        ("POST", "/v1/notifications"),
        ("GET", "/v1/notifications"),
        ("POST", "/v1/notifications/read"),
    ] {
        check(http_json(a, method, path, None, None).await?, 401, "unauthorized");
    }
    check(http_json(a, "GET", "/v1/notifications?limit=0", Some(&alice), None).await?, 400, "bad_request");
    check(http_json(a, "GET", "/v1/notifications?before=xyz", Some(&alice), None).await?, 400, "bad_request");
    check(http_json(a, "POST", "/v1/notifications/read", Some(&alice), Some(json!({}))).await?, 400, "bad_request");
    check(
        http_json(a, "POST", "/v1/rooms/424242/messages", Some(&alice), Some(json!({"text": "x"}))).await?,
        404,
        "not_found",
    );
    check(http_json(a, "GET", "/v1/rooms", None, None).await?, 401, "unauthorized");
    check(http_json(a, "GET", "/v1/rooms", Some("garbage"), None).await?, 401, "unauthorized");
    check(http_json(a, "POST", "/v1/rooms", Some(&alice), Some(json!({"kind": "nope"}))).await?, 400, "bad_request");
    check(
        chat_tests::http(a, "POST", "/v1/rooms", Some(&alice), "application/json", b"{oops").await?,
        400,
        "bad_request",
    );
    let path = format!("/v1/rooms/{room}/messages");
    check(http_json(a, "POST", &path, Some(&alice), Some(json!({"text": ""}))).await?, 400, "bad_request");
    check(http_json(a, "GET", &format!("{path}?limit=500"), Some(&alice), None).await?, 400, "bad_request");
    check(http_json(a, "GET", &format!("{path}?limit=abc"), Some(&alice), None).await?, 400, "bad_request");
    check(http_json(a, "GET", &path, Some(&token("mallory")), None).await?, 403, "forbidden");
    check(http_json(a, "POST", &path, Some(&token("mallory")), Some(json!({"text": "hi"}))).await?, 403, "forbidden");
    check(http_json(a, "GET", "/v1/rooms/424242/messages", Some(&alice), None).await?, 404, "not_found");
    check(http_json(a, "GET", "/v1/nothing-here", Some(&alice), None).await?, 404, "not_found");
    let huge = json!({"text": "x".repeat(100 * 1024)});
    check(http_json(a, "POST", &path, Some(&alice), Some(huge)).await?, 413, "too_large");
    // Admin routes refuse everyone else.
    check(http_json(a, "GET", "/v1/connections", Some(&alice), None).await?, 403, "forbidden");
    check(
        http_json(a, "POST", "/v1/push", Some(&alice), Some(json!({"all": true, "event": "x"}))).await?,
        403,
        "forbidden",
    );
    check(http_json(a, "DELETE", "/v1/users/bob/connections", Some(&alice), None).await?, 403, "forbidden");
    check(http_json(a, "GET", "/v1/users/bob/status", Some(&alice), None).await?, 403, "forbidden");
    check(
        http_json(a, "POST", "/v1/notifications", Some(&alice), Some(json!({"user_ids": ["bob"], "title": "t"})))
            .await?,
        403,
        "forbidden",
    );
    check(http_json(a, "POST", "/v1/push", Some(&admin()), Some(json!({"event": "x"}))).await?, 400, "bad_request");
    check(
        http_json(a, "POST", "/v1/notifications", Some(&admin()), Some(json!({"user_ids": [], "title": "t"}))).await?,
        400,
        "bad_request",
    );
    Ok(())
}

#[tokio::test]
async fn status_and_connections_answer_for_the_whole_cluster() -> Result<()> {
    let cluster = Cluster::builder().gateways(2).start().await?;
    let (a, b) = (cluster.gateways[0].as_str(), cluster.gateways[1].as_str());
    let _bob1 = cluster.client(0, "bob").await?;
    let _bob2 = cluster.client(1, "bob").await?;
    let _carol = cluster.client(1, "carol").await?;

    let me = http_json(a, "GET", "/v1/me/status", Some(&token("bob")), None).await?;
    assert_eq!(me.body, json!({"user_id": "bob", "online": true, "connections": 2}));
    let dave = http_json(b, "GET", "/v1/me/status", Some(&token("dave")), None).await?;
    assert_eq!(dave.body, json!({"user_id": "dave", "online": false, "connections": 0}));
    let status = http_json(a, "GET", "/v1/users/carol/status", Some(&admin()), None).await?;
    assert_eq!(status.body, json!({"user_id": "carol", "online": true, "connections": 1}));
    let all = http_json(b, "GET", "/v1/connections", Some(&admin()), None).await?;
    assert_eq!(all.status, 200);
    assert_eq!(
        all.body,
        json!({"users": [{"user_id": "bob", "connections": 2}, {"user_id": "carol", "connections": 1}]})
    );
    Ok(())
}

#[tokio::test]
async fn push_and_disconnect_reach_sockets_on_the_other_gateway() -> Result<()> {
    let cluster = Cluster::builder().gateways(2).start().await?;
    let a = cluster.gateways[0].as_str();
    let mut bob = cluster.client(1, "bob").await?;
    let mut carol = cluster.client(1, "carol").await?;

    let pushed = http_json(
        a,
        "POST",
        "/v1/push",
        Some(&admin()),
        Some(json!({"user_ids": ["bob"], "event": "refresh", "data": {"n": 1}})),
    )
    .await?;
    assert_eq!(pushed.status, 202);
    assert_eq!(bob.event("push").await?, json!({"type": "push", "event": "refresh", "data": {"n": 1}}));

    let pushed = http_json(
        a,
        "POST",
        "/v1/push",
        Some(&admin()),
        Some(json!({"all": true, "event": "maintenance", "data": "soon"})),
    )
    .await?;
    assert_eq!(pushed.status, 202);
    for c in [&mut bob, &mut carol] {
        assert_eq!(c.event("push").await?["event"], "maintenance");
    }
    // Only one push reached carol: the first was for bob alone.
    assert!(carol.take_buffered("push").is_empty());

    let gone = http_json(a, "DELETE", "/v1/users/bob/connections", Some(&admin()), None).await?;
    assert_eq!(gone.status, 204);
    assert_eq!(bob.closed().await?, Some(1008));
    assert_eq!(carol.request(json!({"type": "ping"})).await?["type"], "pong");
    Ok(())
}

#[tokio::test]
async fn notifications_are_stored_delivered_live_listed_and_marked_read() -> Result<()> {
    let cluster = Cluster::builder().gateways(2).start().await?;
    let (a, b) = (cluster.gateways[0].as_str(), cluster.gateways[1].as_str());
    let mut bob = cluster.client(1, "bob").await?;

    let sent = http_json(
        a,
        "POST",
        "/v1/notifications",
        Some(&admin()),
        Some(json!({"user_ids": ["bob", "carol"], "title": "Welcome", "body": "hi", "data": {"url": "/x"}})),
    )
    .await?;
    assert_eq!(sent.status, 201, "{sent:?}");
    let live = bob.event("notification").await?;
    assert_eq!(live["notification"]["title"], "Welcome");
    assert_eq!(live["notification"]["data"], json!({"url": "/x"}));
    assert!(live["notification"]["id"].is_string());

    for i in 0..3 {
        http_json(
            a,
            "POST",
            "/v1/notifications",
            Some(&admin()),
            Some(json!({"user_ids": ["bob"], "title": format!("n{i}")})),
        )
        .await?;
    }
    let bobs = token("bob");
    let page = http_json(b, "GET", "/v1/notifications?limit=2", Some(&bobs), None).await?;
    assert_eq!(page.status, 200);
    let titles: Vec<&str> =
        page.body["notifications"].as_array().unwrap().iter().map(|n| n["title"].as_str().unwrap()).collect();
    assert_eq!(titles, vec!["n2", "n1"]);
    assert_eq!(page.body["has_more"], true);
    assert_eq!(page.body["unread"], 4);
    let last_id = page.body["notifications"][1]["id"].as_str().unwrap().to_owned();
    let older = http_json(b, "GET", &format!("/v1/notifications?before={last_id}"), Some(&bobs), None).await?;
    let titles: Vec<&str> =
        older.body["notifications"].as_array().unwrap().iter().map(|n| n["title"].as_str().unwrap()).collect();
    assert_eq!(titles, vec!["n0", "Welcome"]);

    let first: Value = page.body["notifications"][0]["id"].clone();
    let marked = http_json(b, "POST", "/v1/notifications/read", Some(&bobs), Some(json!({"ids": [first]}))).await?;
    assert_eq!(marked.body["updated"], 1);
    let unread = http_json(b, "GET", "/v1/notifications?unread=true", Some(&bobs), None).await?;
    assert_eq!(unread.body["unread"], 3);
    assert_eq!(unread.body["notifications"].as_array().unwrap().len(), 3);
    let all = http_json(b, "POST", "/v1/notifications/read", Some(&bobs), Some(json!({"all": true}))).await?;
    assert_eq!(all.body["updated"], 3);
    // Carol's copy is hers alone.
    let carols = http_json(a, "GET", "/v1/notifications", Some(&token("carol")), None).await?;
    assert_eq!(carols.body["notifications"].as_array().unwrap().len(), 1);
    assert_eq!(carols.body["unread"], 1);
    Ok(())
}

#[tokio::test]
async fn attachments_upload_attach_and_download_with_access_rules() -> Result<()> {
    use chat_tests::http;
    let cluster = Cluster::builder().gateways(2).start().await?;
    let (a, b) = (cluster.gateways[0].as_str(), cluster.gateways[1].as_str());
    let (alice, bob) = (token("alice"), token("bob"));
    let png: Vec<u8> = b"\x89PNG\r\n\x1a\n fake image bytes".to_vec();

    let up = http(a, "POST", "/v1/attachments?name=cat%20pic.png", Some(&alice), "image/png", &png).await?;
    assert_eq!(up.status, 201, "{up:?}");
    let att = up.body["attachment"].clone();
    let id = att["id"].as_str().unwrap().to_owned();
    assert_eq!(att["name"], "cat pic.png");
    assert_eq!(att["content_type"], "image/png");
    assert_eq!(att["size"], png.len());
    assert_eq!(att["url"], format!("/v1/attachments/{id}"));

    let html = http(a, "POST", "/v1/attachments?name=x.html", Some(&alice), "text/html", b"<script>1</script>").await?;
    assert_eq!(html.body["attachment"]["content_type"], "application/octet-stream");
    assert_eq!(http(a, "POST", "/v1/attachments", None, "image/png", &png).await?.status, 401);
    assert_eq!(http(a, "POST", "/v1/attachments", Some(&alice), "image/png", b"").await?.status, 400);
    let big = vec![0u8; 10 * 1024 * 1024 + 1];
    let too_big = http(a, "POST", "/v1/attachments", Some(&alice), "image/png", &big).await?;
    assert_eq!(too_big.status, 413);
    assert_eq!(too_big.body["error"]["code"], "too_large");

    // Not shared yet: only the uploader may read it.
    let path = format!("/v1/attachments/{id}");
    assert_eq!(http(b, "GET", &path, Some(&bob), "", b"").await?.status, 403);
    assert_eq!(http(b, "GET", "/v1/attachments/999999", Some(&bob), "", b"").await?.status, 404);
    assert_eq!(http(a, "GET", &path, Some(&alice), "", b"").await?.raw, png);

    let mut bob_ws = cluster.client(1, "bob").await?;
    let mut alice_ws = cluster.client(0, "alice").await?;
    let room = alice_ws.create_group(&["bob"]).await?;
    bob_ws.ack(json!({"type": "join", "room": room})).await?;
    let reply = bob_ws.request(json!({"type": "send", "room": room, "text": "", "attachments": [id]})).await?;
    assert_eq!(reply["code"], "bad_request", "only the uploader may attach a file");
    alice_ws.ack(json!({"type": "send", "room": room, "text": "", "kind": "image", "attachments": [id]})).await?;
    let event = bob_ws.event("message").await?;
    assert_eq!(event["message"]["attachments"], json!([att]));

    let got = http(b, "GET", &path, Some(&bob), "", b"").await?;
    assert_eq!(got.status, 200);
    assert_eq!(got.raw, png);
    let headers = got.headers.to_ascii_lowercase();
    assert!(headers.contains("content-type: image/png"), "{headers}");
    assert!(headers.contains("x-content-type-options: nosniff"), "{headers}");
    assert!(headers.contains("content-disposition: inline; filename=\"cat pic.png\""), "{headers}");
    assert_eq!(http(b, "GET", &path, Some(&token("mallory")), "", b"").await?.status, 403);
    Ok(())
}

#[tokio::test]
async fn the_openapi_document_lists_every_route() -> Result<()> {
    let cluster = Cluster::builder().start().await?;
    let doc = http_json(&cluster.gateways[0], "GET", "/openapi.json", None, None).await?;
    assert_eq!(doc.status, 200);
    assert!(doc.body["openapi"].as_str().unwrap_or_default().starts_with("3."));
    let routes = [
        ("get", "/ws"),
        ("get", "/healthz"),
        ("get", "/readyz"),
        ("get", "/readyz/local"),
        ("get", "/openapi.json"),
        ("get", "/metrics"),
        ("post", "/v1/rooms"),
        ("get", "/v1/rooms"),
        ("get", "/v1/rooms/{id}/messages"),
        ("post", "/v1/rooms/{id}/messages"),
        ("get", "/v1/search"),
        ("get", "/v1/rooms/{id}/receipts"),
        ("get", "/v1/rooms/{id}/threads/{root_seq}"),
        ("get", "/v1/admin/webhooks/dead"),
        ("post", "/v1/admin/webhooks/dead/{id}/replay"),
        ("post", "/v1/admin/webhooks/dead/replay"),
        ("post", "/v1/attachments"),
        ("get", "/v1/attachments/{id}"),
        ("get", "/v1/me/status"),
        ("get", "/v1/users/{id}/status"),
        ("delete", "/v1/users/{id}/connections"),
        ("get", "/v1/connections"),
        ("post", "/v1/push"),
        ("post", "/v1/notifications"),
        ("get", "/v1/notifications"),
        ("post", "/v1/notifications/read"),
    ];
    let paths = doc.body["paths"].as_object().expect("paths");
    for (method, path) in routes {
        assert!(paths.get(path).and_then(|p| p.get(method)).is_some(), "{method} {path} missing from /openapi.json");
    }
    let documented: usize = paths.values().map(|p| p.as_object().map_or(0, |m| m.len())).sum();
    assert_eq!(documented, routes.len(), "a route is documented that this test does not know: {paths:?}");
    Ok(())
}

#[tokio::test]
async fn metrics_expose_the_named_series_and_move_under_traffic() -> Result<()> {
    let cluster = Cluster::builder().gateways(2).start().await?;
    let (a, b) = (cluster.gateways[0].as_str(), cluster.gateways[1].as_str());
    // `scrape` fails unless /metrics answers 200.
    let before = Metrics::scrape(b).await?;
    for name in [
        "chat_gateway_connections",
        "chat_gateway_fanout_latency_seconds",
        "chat_gateway_redis_errors_total",
        "chat_gateway_outbound_drops_total",
        "chat_gateway_rate_limited_total",
    ] {
        assert!(before.mentions(name), "{name} missing from /metrics:\n{before}");
    }

    let mut alice = cluster.client(0, "alice").await?;
    let mut bob = cluster.client(1, "bob").await?;
    let room = alice.create_group(&["bob"]).await?;
    bob.ack(json!({"type": "join", "room": room})).await?;
    for i in 0..3 {
        alice.ack(json!({"type": "send", "room": room, "text": format!("m{i}")})).await?;
        bob.event("message").await?;
    }
    let after_a = Metrics::scrape(a).await?;
    let after_b = Metrics::scrape(b).await?;
    assert_eq!(after_a.value(r#"chat_gateway_commands_total{command="send",outcome="ok"}"#), 3.0, "{after_a}");
    assert_eq!(after_b.value("chat_gateway_connections"), 1.0, "{after_b}");
    assert!(after_b.value("chat_gateway_fanout_latency_seconds_count") >= 3.0, "{after_b}");
    assert!(after_a.value(r#"chat_gateway_grpc_latency_seconds_count{method="send_message"}"#) >= 3.0, "{after_a}");

    // REST by method, route template and status: two rooms listed, one refused token.
    let alice_token = token("alice");
    for _ in 0..2 {
        assert_eq!(http(a, "GET", "/v1/rooms", Some(&alice_token), "", b"").await?.status, 200);
    }
    let path = format!("/v1/rooms/{room}/messages");
    assert_eq!(http(a, "GET", &path, Some("not-a-token"), "", b"").await?.status, 401);
    let rest = Metrics::scrape(a).await?;
    let count = |labels: &str| rest.value(&format!("chat_gateway_http_request_duration_seconds_count{{{labels}}}"));
    assert_eq!(count(r#"method="GET",route="/v1/rooms",status="200""#), 2.0, "{rest}");
    assert_eq!(count(r#"method="GET",route="/v1/rooms/{id}/messages",status="401""#), 1.0, "{rest}");

    let message = Metrics::scrape(&cluster.message_metrics).await?;
    assert_eq!(message.value("chat_message_sends_persisted_total"), 3.0, "{message}");
    assert!(message.mentions("chat_message_postgres_errors_total"), "{message}");
    assert!(message.mentions("chat_message_redis_errors_total"), "{message}");
    Ok(())
}

/// What an on-call asks first: who got in, who left and why, whose token was refused.
#[tokio::test]
async fn connects_disconnects_and_refused_tokens_are_counted_by_code_and_reason() -> Result<()> {
    let cluster = Cluster::builder().start().await?;
    let gateway = cluster.gateways[0].as_str();
    let url = cluster.ws_url(0);

    let alice = cluster.client(0, "alice").await?;
    alice.close().await?;
    // A token that is not one, at the handshake and over REST.
    assert!(WsClient::connect_bearer(&url, "not-a-token").await.is_err(), "a bad token was let in");
    assert_eq!(http(gateway, "GET", "/v1/rooms", Some("not-a-token"), "", b"").await?.status, 401);
    // An expired one.
    let exp = chrono::Utc::now().timestamp() - 3600;
    let expired = token_with(json!({"sub": "bob", "exp": exp}));
    assert!(WsClient::connect_bearer(&url, &expired).await.is_err(), "an expired token was let in");
    // No token at the handshake, and a first frame that is not `auth`.
    let (mut anonymous, _) = tokio_tungstenite::connect_async(url.as_str()).await?;
    anonymous.send(tokio_tungstenite::tungstenite::Message::Text(r#"{"type":"ping"}"#.into())).await?;
    while anonymous.next().await.is_some_and(|frame| frame.is_ok()) {}

    eventually(WAIT, async || -> Result<()> {
        let metrics = Metrics::scrape(gateway).await?;
        let counted = [
            ("chat_gateway_connects_total", 1.0),
            (r#"chat_gateway_disconnects_total{code="1000"}"#, 1.0),
            (r#"chat_gateway_auth_failures_total{reason="invalid"}"#, 2.0),
            (r#"chat_gateway_auth_failures_total{reason="expired"}"#, 1.0),
            (r#"chat_gateway_auth_failures_total{reason="no_auth_frame"}"#, 1.0),
        ];
        for (series, expected) in counted {
            anyhow::ensure!(metrics.value(series) == expected, "{series} is not {expected}:\n{metrics}");
        }
        Ok(())
    })
    .await
}
