//! `make run` (deploy/run-local.sh) supervises its cluster as Kubernetes does its pods: a
//! gateway killed to watch failover is reported and restarted while the rest keep
//! serving, its clients recover everything on the other gateway with `since_seq`, and
//! Ctrl-C still stops every process.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use chat_tests::{
    bin, eventually, free_port, give_up, http_get, redis_url, token, unique, TestDb, WsClient, SECRET, WAIT,
};
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// Start-up includes creating and migrating the database with debug binaries.
const START_WITHIN: Duration = Duration::from_secs(60);

/// A killed gateway's first restart waits 1 s; a debug gateway then needs a second or two.
const BACK_WITHIN: Duration = Duration::from_secs(10);

/// The script's own bound on stopping (25 s before SIGKILL) plus margin.
const STOP_WITHIN: Duration = Duration::from_secs(40);

/// deploy/run-local.sh as a user runs it (`make run`), on free ports and a database of
/// its own, with the binaries `cargo build` made for the tests.
struct LocalCluster {
    script: Child,
    /// Everything the script and its processes printed, line by line.
    output: Arc<Mutex<Vec<String>>>,
    gateways: [String; 2],
    message: String,
    metrics: String,
    prefix: String,
    _db: TestDb,
}

/// Two consecutive free ports (the script puts its gateways on a base port and the next),
/// both taken from `free_port` so it hands neither out again.
fn free_port_pair() -> u16 {
    let mut port = free_port();
    loop {
        let next = free_port();
        if next == port + 1 {
            return port;
        }
        port = next;
    }
}

fn collect(stream: impl AsyncRead + Unpin + Send + 'static, output: Arc<Mutex<Vec<String>>>) {
    // Read to the end, or the processes writing to the pipe would block once it is full.
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            output.lock().unwrap_or_else(|e| e.into_inner()).push(line);
        }
    });
}

impl LocalCluster {
    async fn start() -> Result<Self> {
        let db = TestDb::new();
        let base = free_port_pair();
        let gateways = [format!("127.0.0.1:{base}"), format!("127.0.0.1:{}", base + 1)];
        let message = format!("127.0.0.1:{}", free_port());
        let metrics = format!("127.0.0.1:{}", free_port());
        let prefix = unique("local");
        let bin_dir = bin("chat-gateway").parent().ok_or_else(|| anyhow!("no bin dir"))?.to_owned();
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/run-local.sh");
        let mut child = Command::new("bash")
            .arg(script)
            .env("BIN_DIR", &bin_dir)
            .env("GATEWAY_BASE_PORT", base.to_string())
            .env("MESSAGE_ADDR", &message)
            .env("METRICS_ADDR", &metrics)
            .env("DATABASE_URL", &db.url)
            .env("REDIS_URL", redis_url())
            .env("REDIS_CHANNEL_PREFIX", &prefix)
            .env("JWT_SECRET", SECRET)
            .env("RUST_LOG", "warn")
            // Certificates of its own, not the ones `make run` keeps in target/dev-tls.
            .env("TLS_DIR", std::env::temp_dir().join(unique("local-tls")))
            // Its own process group, so a failing test can stop whatever the script started.
            .process_group(0)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("starting deploy/run-local.sh")?;
        let output = Arc::new(Mutex::new(Vec::new()));
        collect(child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?, output.clone());
        collect(child.stderr.take().ok_or_else(|| anyhow!("no stderr"))?, output.clone());
        let mut cluster = Self { script: child, output, gateways, message, metrics, prefix, _db: db };
        for gw in cluster.gateways.clone() {
            cluster.wait_ready(&gw, START_WITHIN).await?;
        }
        // Until it says so the script is still starting, and a death then stops it all.
        let output = cluster.output.clone();
        let script = &mut cluster.script;
        eventually(START_WITHIN, async || -> Result<()> {
            if let Some(status) = script.try_wait().map_err(give_up)? {
                return Err(give_up(format!("run-local.sh exited ({status})")));
            }
            let up = output.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|l| l.trim() == "chat cluster is up");
            anyhow::ensure!(up, "not up yet");
            Ok(())
        })
        .await
        .with_context(|| format!("run-local.sh did not report the cluster up:\n{}", cluster.output()))?;
        Ok(cluster)
    }

    fn output(&self) -> String {
        self.output.lock().unwrap_or_else(|e| e.into_inner()).join("\n")
    }

    /// Waits (bounded) until the gateway at `addr` answers `/readyz` with 200; fails at
    /// once if the script has exited.
    async fn wait_ready(&mut self, addr: &str, within: Duration) -> Result<()> {
        let output = self.output.clone();
        let script = &mut self.script;
        eventually(within, async || -> Result<()> {
            if let Some(status) = script.try_wait().map_err(give_up)? {
                let log = output.lock().unwrap_or_else(|e| e.into_inner()).join("\n");
                return Err(give_up(format!("run-local.sh exited ({status}):\n{log}")));
            }
            match http_get(addr, "/readyz").await? {
                (200, _) => Ok(()),
                (status, body) => Err(anyhow!("/readyz answered {status}: {body}")),
            }
        })
        .await
        .with_context(|| format!("gateway {addr} not ready within {within:?}:\n{}", self.output()))
    }

    /// The pids the script reported starting `name` with, in order.
    fn pids(&self, name: &str) -> Vec<u32> {
        let prefix = format!("[run-local] started {name} (pid ");
        self.output
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(|line| line.strip_prefix(&prefix)?.strip_suffix(')')?.parse().ok())
            .collect()
    }

    fn all_pids(&self) -> Vec<u32> {
        ["message", "gateway-1", "gateway-2"].iter().flat_map(|name| self.pids(name)).collect()
    }

    /// The pid of the process listening on gateway `i`'s port, as a user finds it
    /// (`ss -ltnp`): what the test kills does not depend on the script's reports.
    fn gateway_pid(&self, i: usize) -> Result<u32> {
        let port = self.gateways[i].rsplit_once(':').map(|(_, p)| p).unwrap_or_default();
        let out = std::process::Command::new("ss").args(["-Hltnp", &format!("sport = :{port}")]).output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.split("pid=")
            .nth(1)
            .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
            .ok_or_else(|| anyhow!("no process listens on {}: {text}", self.gateways[i]))
    }

    fn ws_url(&self, i: usize) -> String {
        format!("ws://{}/ws", self.gateways[i])
    }

    async fn client(&self, i: usize, user: &str) -> Result<WsClient> {
        let (client, welcome) = WsClient::connect_bearer(&self.ws_url(i), &token(user)).await?;
        anyhow::ensure!(welcome["type"] == "welcome", "expected welcome, got {welcome}");
        Ok(client)
    }
}

impl Drop for LocalCluster {
    /// Only a failing test gets here with processes left: kill the script's whole group,
    /// then remove this cluster's keys from the shared Redis.
    fn drop(&mut self) {
        if let Some(pid) = self.script.id() {
            let _ = std::process::Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).status();
        }
        let script = format!(
            "redis-cli -u {url} --scan --pattern '{prefix}:*' | xargs -r redis-cli -u {url} del >/dev/null",
            url = redis_url(),
            prefix = self.prefix
        );
        let _ = std::process::Command::new("sh").args(["-c", &script]).status();
    }
}

fn signal(sig: &str, pid: u32) -> Result<()> {
    let sent = std::process::Command::new("kill").args([&format!("-{sig}"), &pid.to_string()]).status()?;
    anyhow::ensure!(sent.success(), "kill -{sig} {pid} failed");
    Ok(())
}

/// Whether a process is running (a zombie has finished: only its parent has yet to reap it).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

fn seqs_and_texts(messages: &[Value]) -> Vec<(i64, String)> {
    messages
        .iter()
        .map(|m| (m["message"]["seq"].as_i64().unwrap_or(-1), m["message"]["text"].as_str().unwrap_or("").to_owned()))
        .collect()
}

fn expected(range: std::ops::RangeInclusive<i64>) -> Vec<(i64, String)> {
    range.map(|i| (i, format!("m{i}"))).collect()
}

#[tokio::test]
async fn a_killed_gateway_is_restarted_while_its_clients_fail_over_and_ctrl_c_stops_everything() -> Result<()> {
    let mut cluster = LocalCluster::start().await?;
    let outcome = failover_and_stop(&mut cluster).await;
    outcome.with_context(|| format!("run-local.sh printed:\n{}", cluster.output()))
}

async fn failover_and_stop(cluster: &mut LocalCluster) -> Result<()> {
    // Like production, the gateways call the message service over mTLS: its port answers
    // no plaintext caller.
    let plaintext = async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", cluster.message))?.connect().await?;
        let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
        anyhow::Ok(tonic_health::pb::health_client::HealthClient::new(channel).check(request).await?)
    };
    let answered = tokio::time::timeout(Duration::from_secs(10), plaintext).await;
    assert!(!matches!(answered, Ok(Ok(_))), "the message service answered a plaintext caller");
    let mut alice = cluster.client(0, "alice").await?;
    let mut bob = cluster.client(1, "bob").await?;
    let room = alice.create_group(&["bob", "carol"]).await?;
    bob.ack(json!({"type": "join", "room": room})).await?;
    for i in 1..=5 {
        alice.ack(json!({"type": "send", "room": room, "text": format!("m{i}")})).await?;
    }
    let mut live = Vec::new();
    for _ in 1..=5 {
        live.push(bob.event("message").await?);
    }
    assert_eq!(seqs_and_texts(&live), expected(1..=5));

    let gateway_b = cluster.gateway_pid(1)?;
    signal("KILL", gateway_b)?;
    let killed_at = Instant::now();
    // bob's gateway is gone: its socket ends without a goodbye.
    bob.closed().await.context("bob's connection to the killed gateway did not end")?;

    // Gateway A never noticed: alice's same connection goes on sending while B is down.
    for i in 6..=10 {
        alice.ack(json!({"type": "send", "room": room, "text": format!("m{i}")})).await?;
    }
    // bob reconnects to the surviving gateway and replays what he missed before the ack.
    let mut bob = cluster.client(0, "bob").await?;
    let joined = bob.ack(json!({"type": "join", "room": room, "since_seq": 5})).await?;
    assert_eq!(joined["last_seq"], 10, "{joined}");
    assert_eq!(seqs_and_texts(&bob.take_buffered("message")), expected(6..=10), "replayed with since_seq");
    alice.ack(json!({"type": "send", "room": room, "text": "m11"})).await?;
    assert_eq!(seqs_and_texts(&[bob.event("message").await?]), expected(11..=11), "live after the replay");

    // The script reported the death and started gateway B again, on its own port.
    let report = format!("[run-local] gateway-2 (pid {gateway_b}) was killed by SIGKILL");
    eventually(WAIT, async || cluster.output().lines().any(|l| l.starts_with(&report)))
        .await
        .with_context(|| format!("no report of the kill:\n{}", cluster.output()))?;
    let b = cluster.gateways[1].clone();
    cluster.wait_ready(&b, BACK_WITHIN.saturating_sub(killed_at.elapsed())).await?;
    let restarted = cluster.gateway_pid(1)?;
    assert_ne!(restarted, gateway_b);
    assert_eq!(cluster.pids("gateway-2"), [gateway_b, restarted], "the script reports each start");
    // The restarted gateway serves: carol joins there and hears alice (on A) live.
    let mut carol = cluster.client(1, "carol").await?;
    carol.ack(json!({"type": "join", "room": room, "since_seq": 11})).await?;
    alice.ack(json!({"type": "send", "room": room, "text": "m12"})).await?;
    assert_eq!(seqs_and_texts(&[carol.event("message").await?]), expected(12..=12));
    assert_eq!(seqs_and_texts(&[bob.event("message").await?]), expected(12..=12));
    // gateway A and the message service were never restarted.
    assert_eq!(cluster.pids("gateway-1").len(), 1, "{}", cluster.output());
    assert_eq!(cluster.pids("message").len(), 1, "{}", cluster.output());

    // Ctrl-C: the script stops everything and exits 0; nothing is left running.
    let pids = cluster.all_pids();
    let script = cluster.script.id().ok_or_else(|| anyhow!("the script already exited"))?;
    signal("INT", script)?;
    let status = tokio::time::timeout(STOP_WITHIN, cluster.script.wait())
        .await
        .map_err(|_| anyhow!("run-local.sh still running {STOP_WITHIN:?} after SIGINT:\n{}", cluster.output()))??;
    assert!(status.success(), "run-local.sh exited with {status}:\n{}", cluster.output());
    assert!(cluster.output().contains("[run-local] cluster stopped"), "{}", cluster.output());
    let left: Vec<u32> = pids.into_iter().filter(|pid| running(*pid)).collect();
    assert!(left.is_empty(), "still running after the script exited: {left:?}");
    for addr in cluster.gateways.iter().chain([&cluster.message, &cluster.metrics]) {
        assert!(TcpStream::connect(addr).await.is_err(), "something still listens on {addr}");
    }
    Ok(())
}
