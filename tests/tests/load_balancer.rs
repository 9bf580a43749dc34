//! The cluster behind HAProxy (deploy/lb/haproxy.sh), as it runs behind a cloud load
//! balancer: clients know one address; a gateway dies; they reconnect through the load
//! balancer, land on a survivor and recover what they missed with `since_seq`.

use std::time::Duration;

use anyhow::{Context, Result};
use chat_tests::{eventually, free_port, http_get, send_reliably, Cluster, Follower, Metrics, WAIT};
use tokio::process::{Child, Command};

/// HAProxy over `gateways`, started by the project's script; stops when dropped.
async fn haproxy(gateways: &[String]) -> Result<(Child, String)> {
    let listen = format!("127.0.0.1:{}", free_port());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/lb/haproxy.sh");
    let child = Command::new("bash")
        .arg(script)
        .arg("run")
        .arg(&listen)
        .args(gateways)
        .kill_on_drop(true)
        .spawn()
        .context("starting HAProxy (apt-get install haproxy)")?;
    eventually(Duration::from_secs(20), async || matches!(http_get(&listen, "/readyz").await, Ok((200, _))))
        .await
        .with_context(|| format!("HAProxy on {listen} not ready; is haproxy installed (apt-get install haproxy)?"))?;
    Ok((child, listen))
}

#[tokio::test]
async fn clients_behind_the_load_balancer_recover_every_message_when_a_gateway_dies() -> Result<()> {
    let mut cluster = Cluster::builder().gateways(2).start().await?;
    let (_lb, lb) = haproxy(&cluster.gateways).await?;
    let url = format!("ws://{lb}/ws");

    let mut owner = cluster.client(1, "owner").await?;
    let followers: Vec<String> = (0..6).map(|i| format!("user{i}")).collect();
    let members: Vec<&str> = followers.iter().map(String::as_str).chain(["alice"]).collect();
    let room = owner.create_group(&members).await?;

    const TOTAL: usize = 80;
    let tasks: Vec<Follower> =
        followers.iter().map(|user| Follower::spawn(vec![url.clone()], user, &room, TOTAL)).collect();
    // leastconn spreads the followers over both gateways: some are on the one that dies.
    const CONNECTIONS: &str = "chat_gateway_connections";
    let (a, _) = eventually(WAIT, async || -> Result<_> {
        let a = Metrics::scrape(&cluster.gateways[0]).await?;
        let b = Metrics::scrape(&cluster.gateways[1]).await?;
        // The owner holds one of gateway B's connections.
        let connected = a.value(CONNECTIONS) + b.value(CONNECTIONS);
        anyhow::ensure!(connected >= 7.0, "{connected} of 7 connected");
        Ok((a, b))
    })
    .await
    .context("followers did not connect through the load balancer")?;
    assert!(a.value(CONNECTIONS) >= 1.0, "nobody landed on gateway A:\n{a}");
    // Connected is not yet listening: the kill must find them joined.
    eventually(WAIT, async || tasks.iter().all(Follower::has_joined)).await?;

    let texts = (1..=TOTAL).map(|i| format!("m{i}")).collect();
    let sender = tokio::spawn(send_reliably(vec![url.clone()], "alice", room.clone(), texts));
    // The kill lands mid-traffic: every follower has had some of it.
    eventually(WAIT, async || tasks.iter().all(|f| f.received() >= 5)).await?;
    cluster.kill_gateway(0).await?;

    sender.await??;
    let expected: Vec<i64> = (1..=TOTAL as i64).collect();
    for (user, task) in followers.iter().zip(tasks) {
        assert_eq!(task.seqs().await?, expected, "{user}: every seq once, in order, across the failover");
    }
    // And new clients still get in through the load balancer.
    let (_, hello) = chat_tests::WsClient::connect_bearer(&url, &chat_tests::token("late")).await?;
    assert_eq!(hello["type"], "welcome");
    Ok(())
}
