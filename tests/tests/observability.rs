//! Traces end to end: one `send` is one trace across gateway A, the message service and
//! every gateway that delivers it, received by an in-test OTLP collector. And a collector
//! that is down never holds up chat.

use std::time::Duration;

use anyhow::{bail, Result};
use chat_tests::otlp::{OtlpReceiver, ReceivedSpan};
use chat_tests::{eventually, Cluster, Metrics};
use serde_json::json;

const SERVER: i32 = 2;
const CLIENT: i32 = 3;
const PRODUCER: i32 = 4;
const CONSUMER: i32 = 5;

/// Waits until the trace holding a span named `root` has `want` spans, and returns them.
async fn trace_of(
    receiver: &OtlpReceiver,
    root: &str,
    want: impl Fn(&[ReceivedSpan]) -> bool,
) -> Result<Vec<ReceivedSpan>> {
    eventually(Duration::from_secs(20), async || {
        let spans = receiver.spans();
        let Some(root) = spans.iter().find(|s| s.name == root) else {
            bail!("no span named {root:?}; got {spans:#?}");
        };
        let trace: Vec<ReceivedSpan> = spans.iter().filter(|s| s.trace_id == root.trace_id).cloned().collect();
        if !want(&trace) {
            let others: Vec<_> = spans.iter().filter(|s| s.trace_id != root.trace_id).collect();
            bail!("trace incomplete: {trace:#?}\nother traces: {others:#?}");
        }
        Ok(trace)
    })
    .await
}

fn one<'a>(trace: &'a [ReceivedSpan], name: &str) -> &'a ReceivedSpan {
    let found: Vec<_> = trace.iter().filter(|s| s.name == name).collect();
    assert_eq!(found.len(), 1, "expected one {name:?} span in {trace:#?}");
    found[0]
}

/// True when `span` descends from `ancestor` within `trace`.
fn descends(trace: &[ReceivedSpan], span: &ReceivedSpan, ancestor: &ReceivedSpan) -> bool {
    let mut parent = span.parent_span_id.clone();
    while !parent.is_empty() {
        if parent == ancestor.span_id {
            return true;
        }
        parent = trace.iter().find(|s| s.span_id == parent).map(|s| s.parent_span_id.clone()).unwrap_or_default();
    }
    false
}

#[tokio::test]
async fn one_send_is_one_trace_from_the_senders_frame_to_every_delivering_gateway() -> Result<()> {
    let receiver = OtlpReceiver::start().await?;
    let cluster = Cluster::builder()
        .gateways(2)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("POD_NAMESPACE", "chat-test")
        .start()
        .await?;
    let (pid_a, pid_b) = (i64::from(cluster.gateway_pid(0).unwrap()), i64::from(cluster.gateway_pid(1).unwrap()));
    let mut alice = cluster.client(0, "alice").await?;
    let mut bob = cluster.client(1, "bob").await?;
    let room = alice.create_group(&["bob"]).await?;
    alice.ack(json!({"type": "join", "room": room})).await?;
    bob.ack(json!({"type": "join", "room": room})).await?;
    alice.ack(json!({"type": "send", "room": room, "text": "traced"})).await?;
    assert_eq!(bob.event("message").await?["message"]["text"], "traced");
    assert_eq!(alice.event("message").await?["message"]["text"], "traced");

    // Spans arrive in several export batches: wait for every one the assertions name.
    let trace = trace_of(&receiver, "ws send", |t| {
        let has = |name: &str| t.iter().any(|s| s.name == name);
        t.iter().filter(|s| s.name == "fanout.deliver").count() >= 2
            && ["ws send", "chat.v1.ChatService/send_message", "chat.v1.ChatService/SendMessage"].iter().all(|n| has(n))
            && ["db.insert_batch", "redis.publish"].iter().all(|n| has(n))
    })
    .await?;

    // Gateway A: the frame, then the gRPC call it makes.
    let frame = one(&trace, "ws send");
    assert_eq!((frame.service.as_str(), frame.pid, frame.kind), ("chat-gateway", pid_a, SERVER), "{frame:#?}");
    assert!(frame.parent_span_id.is_empty(), "the frame span is the root: {frame:#?}");
    assert_eq!(frame.attributes.get("outcome").map(String::as_str), Some("ok"));
    let call = one(&trace, "chat.v1.ChatService/send_message");
    assert_eq!((call.pid, call.kind, &call.parent_span_id), (pid_a, CLIENT, &frame.span_id), "{call:#?}");

    // The message service: its server span continues the call; storing and publishing below it.
    let rpc = one(&trace, "chat.v1.ChatService/SendMessage");
    assert_eq!((rpc.service.as_str(), rpc.kind), ("chat-message", SERVER), "{rpc:#?}");
    assert_eq!(rpc.parent_span_id, call.span_id, "the server span's parent is the gateway's client span");
    assert_eq!(rpc.attributes.get("k8s.namespace.name"), None, "resource attributes are not span attributes");
    let insert = one(&trace, "db.insert_batch");
    assert!(descends(&trace, insert, rpc), "{insert:#?}");
    let publish = trace
        .iter()
        .find(|s| s.name == "redis.publish" && s.service == "chat-message")
        .unwrap_or_else(|| panic!("no publish span in {trace:#?}"));
    assert_eq!(publish.kind, PRODUCER);
    assert!(descends(&trace, publish, rpc), "{publish:#?}");

    // Both gateways deliver it, each in a span whose parent is the publish.
    let deliveries: Vec<_> = trace.iter().filter(|s| s.name == "fanout.deliver").collect();
    let mut pids: Vec<i64> = deliveries.iter().map(|s| s.pid).collect();
    pids.sort();
    let mut want = vec![pid_a, pid_b];
    want.sort();
    assert_eq!(pids, want, "one delivery span per gateway: {deliveries:#?}");
    for delivery in deliveries {
        assert_eq!((delivery.kind, &delivery.parent_span_id), (CONSUMER, &publish.span_id), "{delivery:#?}");
        assert_eq!(delivery.service, "chat-gateway");
        assert_eq!(delivery.attributes.get("room"), Some(&room));
    }
    assert!(trace.iter().all(|s| s.trace_id == frame.trace_id));
    Ok(())
}

#[tokio::test]
async fn a_collector_that_never_answers_does_not_slow_chat_or_shutdown() -> Result<()> {
    // Accepts connections and never says a word: the worst collector there is.
    let blackhole = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", blackhole.local_addr()?);
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = blackhole.accept().await {
            held.push(conn);
        }
    });
    let mut cluster = Cluster::builder()
        .gateways(2)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "50")
        .start()
        .await?;
    let mut alice = cluster.client(0, "alice").await?;
    let mut bob = cluster.client(1, "bob").await?;
    let room = alice.create_group(&["bob"]).await?;
    bob.ack(json!({"type": "join", "room": room})).await?;
    for i in 1..=200 {
        // `ack` fails the test after its own bounded wait.
        alice.ack(json!({"type": "send", "room": room, "text": format!("m{i}")})).await?;
    }
    for i in 1..=200 {
        assert_eq!(bob.event("message").await?["message"]["seq"], i);
    }
    let started = tokio::time::Instant::now();
    assert_eq!(cluster.terminate_gateway(0).await?, Some(0));
    assert_eq!(cluster.terminate_message_service().await?, Some(0));
    assert!(started.elapsed() < Duration::from_secs(20), "shutdown took {:?}", started.elapsed());
    Ok(())
}

/// Metric names (without the `_bucket`/`_count`/`_sum` suffixes) used in `text`.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    let mut rest = text;
    while let Some(at) = rest.find("chat_") {
        let name: String =
            rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect::<String>();
        let base =
            ["_bucket", "_count", "_sum"].iter().fold(name.clone(), |n, s| n.strip_suffix(s).unwrap_or(&n).to_owned());
        names.insert(base);
        rest = &rest[at + name.len()..];
    }
    names
}

#[tokio::test]
async fn the_grafana_dashboard_charts_the_metrics_the_services_really_expose() -> Result<()> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/observability/grafana-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let panels = dashboard["panels"].as_array().expect("panels");
    let mut ids = std::collections::HashSet::new();
    let mut exprs = String::new();
    for panel in panels {
        assert!(ids.insert(panel["id"].as_i64().expect("numeric panel id")), "duplicate id in {panel}");
        assert!(panel["gridPos"]["w"].as_i64().is_some(), "{panel}");
        if panel["type"] == "row" {
            continue;
        }
        assert_eq!(panel["datasource"]["uid"], "${datasource}", "{panel}");
        for target in panel["targets"].as_array().expect("targets") {
            exprs.push_str(target["expr"].as_str().expect("expr"));
            exprs.push('\n');
        }
    }
    let charted = metric_names(&exprs);
    for wanted in [
        "chat_gateway_connections",
        "chat_gateway_commands_total",
        "chat_gateway_fanout_latency_seconds",
        "chat_gateway_grpc_latency_seconds",
        "chat_gateway_redis_errors_total",
        "chat_message_redis_errors_total",
        "chat_message_postgres_errors_total",
        "chat_gateway_outbound_drops_total",
        "chat_gateway_rate_limited_total",
        "chat_message_sends_persisted_total",
    ] {
        assert!(charted.contains(wanted), "the dashboard does not chart {wanted}");
    }

    // Every charted series exists: exercise each labelled family, then read both /metrics.
    let cluster = Cluster::builder().start().await?;
    let mut alice = cluster.client(0, "alice").await?;
    let room = alice.create_group(&["bob"]).await?;
    alice.ack(json!({"type": "send", "room": room, "text": "hi"})).await?;
    // A disconnect and a refused token, whose families appear once counted.
    cluster.client(0, "bob").await?.close().await?;
    assert!(chat_tests::WsClient::connect_bearer(&cluster.ws_url(0), "not-a-token").await.is_err());
    // The disconnect is counted as the gateway finishes the socket: read until it is.
    chat_tests::eventually(chat_tests::WAIT, async || -> Result<()> {
        let mut exposed = String::new();
        for addr in [cluster.gateways[0].as_str(), cluster.message_metrics.as_str()] {
            // `scrape` fails unless /metrics answers 200.
            exposed.push_str(Metrics::scrape(addr).await?.text());
        }
        let exposed = metric_names(&exposed);
        let missing: Vec<_> = charted.difference(&exposed).collect();
        anyhow::ensure!(missing.is_empty(), "charted but not exposed: {missing:?}");
        Ok(())
    })
    .await
}

#[tokio::test]
async fn parent_based_ratio_sampling_keeps_or_drops_a_trace_whole() -> Result<()> {
    let receiver = OtlpReceiver::start().await?;
    // The prod overlay's sampler, at ratio 0: no trace starts here ...
    let mut cluster = Cluster::builder()
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
        .env("OTEL_TRACES_SAMPLER_ARG", "0")
        .start()
        .await?;
    // ... but a gateway that samples every trace it starts ...
    let keeps = cluster.add_gateway_with(&[("OTEL_TRACES_SAMPLER", "always_on".to_owned())]).await?;
    let mut alice = cluster.client(0, "alice").await?;
    let room = alice.create_group(&["bob"]).await?;
    alice.ack(json!({"type": "send", "room": room, "text": "dropped"})).await?;
    let mut bob = cluster.client(keeps, "bob").await?;
    bob.ack(json!({"type": "send", "room": room, "text": "kept"})).await?;

    // ... has the message service follow it: its span joins the kept trace.
    let trace =
        trace_of(&receiver, "ws send", |t| t.iter().any(|s| s.name == "chat.v1.ChatService/SendMessage")).await?;
    assert_eq!(one(&trace, "ws send").service, "chat-gateway");
    // Alice's trace was dropped whole, on the gateway and on the message service: the
    // message service's batch that carried bob's span would have carried hers, and her
    // gateway exports every 100 ms.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let spans = receiver.spans();
    for name in ["ws send", "chat.v1.ChatService/SendMessage"] {
        let named: Vec<_> = spans.iter().filter(|s| s.name == name).collect();
        assert_eq!(named.len(), 1, "{name}: only the kept trace's span, got {named:#?}");
    }
    Ok(())
}
