//! A pod's sockets. A container runtime starts every process with a soft open-file limit
//! of 1024 (a pod spec has no ulimit field, and containerd 2.x no longer raises it), and
//! each connection is a descriptor: a gateway must lift its own limit or stop at about
//! a thousand connections, whatever its memory.

use anyhow::{bail, Context, Result};
use chat_common::fdlimit::{self, FdLimits};
use chat_tests::{eventually, http_get, token, Cluster, Metrics, WsClient, WAIT};
use futures_util::{stream, StreamExt, TryStreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite;

const CONNECTIONS: usize = 5_000;
/// Where a container runtime leaves the soft limit.
const CONTAINER_SOFT_LIMIT: u64 = 1024;

/// A limit as its gauge shows it.
fn gauge(limit: Option<u64>) -> f64 {
    limit.map_or(f64::INFINITY, |n| n as f64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_started_at_1024_open_files_holds_5000_connections() -> Result<()> {
    // This process holds the other end of every socket: it lifts its own limit too.
    let here = fdlimit::raise().1?;
    anyhow::ensure!(
        here.soft.is_none_or(|n| n > 2 * CONNECTIONS as u64),
        "this test needs more than {} descriptors; the hard limit is {:?}",
        2 * CONNECTIONS,
        here.hard
    );
    // The services inherit this process's hard limit, and start at the container's soft one.
    let cluster = Cluster::builder()
        .fd_soft_limit(CONTAINER_SOFT_LIMIT)
        // The clients are read only at the end: a ping unanswered for two heartbeats
        // would drop the first ones while the last are still connecting on a busy machine.
        .env("HEARTBEAT_MS", "600000")
        .env("MAX_CONNECTIONS_PER_USER", "0")
        .env("RATE_CONN_PER_SEC", "0")
        .env("RATE_USER_PER_SEC", "0")
        .start()
        .await?;

    let mut clients: Vec<WsClient> = stream::iter(0..CONNECTIONS)
        .map(|i| {
            let cluster = &cluster;
            async move { cluster.client(0, &format!("fd-{i}")).await }
        })
        .buffer_unordered(64)
        .try_collect()
        .await
        .context("opening the connections")?;

    let gateway = Metrics::scrape(&cluster.gateways[0]).await?;
    assert_eq!(gateway.value("chat_gateway_connections"), CONNECTIONS as f64);
    assert!(gateway.value("chat_gateway_open_fds") > CONNECTIONS as f64, "{}", gateway.text());
    // Raised to the hard limit, which it inherited from here.
    let FdLimits { hard, .. } = FdLimits::current();
    assert_eq!(gateway.value("chat_gateway_max_fds"), gauge(hard.or(Some(1 << 20))));
    assert_eq!(gateway.value("chat_gateway_max_fds_hard"), gauge(hard));
    let message = Metrics::scrape(&cluster.message_metrics).await?;
    assert!(message.value("chat_message_max_fds") > CONTAINER_SOFT_LIMIT as f64, "{}", message.text());
    assert!(message.value("chat_message_open_fds") > 0.0, "{}", message.text());

    // Held, not just opened: the first and the last still answer.
    for i in [0, CONNECTIONS - 1] {
        let reply = clients[i].request(json!({"type": "ping"})).await?;
        assert_eq!(reply["type"], "pong", "connection {i}: {reply}");
    }
    Ok(())
}

#[tokio::test]
async fn past_max_connections_new_upgrades_get_503_and_readyz_reports_the_gateway_full() -> Result<()> {
    let cluster = Cluster::builder().env("MAX_CONNECTIONS", "3").start().await?;
    let gateway = &cluster.gateways[0];
    let mut held = Vec::new();
    for i in 0..3 {
        held.push(cluster.client(0, &format!("cap-{i}")).await?);
    }

    // The fourth is refused before the upgrade, with the contract's error body.
    let Err(refused) = WsClient::connect_bearer(&cluster.ws_url(0), &token("cap-3")).await else {
        bail!("a fourth connection was let in past MAX_CONNECTIONS=3");
    };
    let tungstenite::Error::Http(response) = refused.downcast::<tungstenite::Error>()? else {
        bail!("the fourth connection failed otherwise than by an HTTP answer");
    };
    assert_eq!(response.status().as_u16(), 503);
    let body: Value = serde_json::from_slice(response.body().as_deref().unwrap_or_default())?;
    assert_eq!(body["error"]["code"], "unavailable", "{body}");
    let (status, readiness) = http_get(gateway, "/readyz").await?;
    assert_eq!(status, 503, "{readiness}");
    assert!(readiness.contains(r#""full":true"#), "{readiness}");
    assert_eq!(Metrics::scrape(gateway).await?.value("chat_gateway_max_connections"), 3.0);

    // The connections already open are untouched.
    for (i, client) in held.iter_mut().enumerate() {
        let reply = client.request(json!({"type": "ping"})).await?;
        assert_eq!(reply["type"], "pong", "connection {i}: {reply}");
    }

    // One leaves, and the gateway takes a new one again.
    held.pop().context("three held")?.close().await?;
    eventually(WAIT, async || -> Result<()> {
        let (status, body) = http_get(gateway, "/readyz").await?;
        anyhow::ensure!(status == 200, "{body}");
        Ok(())
    })
    .await?;
    cluster.client(0, "cap-3").await?;
    Ok(())
}
