//! The cluster behind HAProxy (deploy/lb/haproxy.sh), as it runs behind a cloud load
//! balancer: clients know one address; a gateway dies; they reconnect through the load
//! balancer, land on a survivor and recover what they missed with `since_seq`.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use chat_tests::{free_port, http_get, Cluster};
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
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !matches!(http_get(&listen, "/readyz").await, Ok((200, _))) {
        if tokio::time::Instant::now() > deadline {
            bail!("HAProxy on {listen} not ready; is haproxy installed (apt-get install haproxy)?");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((child, listen))
}

fn connections(metrics: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("chat_gateway_connections "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn clients_behind_the_load_balancer_recover_every_message_when_a_gateway_dies() -> Result<()> {
    let mut cluster = Cluster::start(2).await?;
    let (_lb, lb) = haproxy(&cluster.gateways).await?;
    let url = format!("ws://{lb}/ws");

    let mut owner = cluster.client(1, "owner").await?;
    let followers: Vec<String> = (0..6).map(|i| format!("user{i}")).collect();
    let members: Vec<&str> = followers.iter().map(String::as_str).chain(["alice"]).collect();
    let room = owner.create_group(&members).await?;

    const TOTAL: usize = 80;
    let mut tasks = Vec::new();
    for user in followers.clone() {
        let (url, room) = (url.clone(), room.clone());
        tasks.push(tokio::spawn(async move { chat_tests::follow_room(vec![url], &user, room, TOTAL).await }));
    }
    // leastconn spreads the followers over both gateways: some are on the one that dies.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (_, a) = http_get(&cluster.gateways[0], "/metrics").await?;
        let (_, b) = http_get(&cluster.gateways[1], "/metrics").await?;
        // The owner holds one of gateway B's connections.
        if connections(&a) + connections(&b) >= 7.0 {
            assert!(connections(&a) >= 1.0, "nobody landed on gateway A:\n{a}");
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("followers did not connect through the load balancer");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let texts = (1..=TOTAL).map(|i| format!("m{i}")).collect();
    let sender = tokio::spawn(chat_tests::send_reliably(vec![url.clone()], "alice", room.clone(), texts));
    tokio::time::sleep(Duration::from_millis(400)).await;
    cluster.kill_gateway(0).await?;

    sender.await??;
    let expected: Vec<i64> = (1..=TOTAL as i64).collect();
    for (user, task) in followers.iter().zip(tasks) {
        assert_eq!(task.await??, expected, "{user}: every seq once, in order, across the failover");
    }
    // And new clients still get in through the load balancer.
    let (_, hello) = chat_tests::WsClient::connect_bearer(&url, &chat_tests::token("late")).await?;
    assert_eq!(hello["type"], "welcome");
    Ok(())
}
