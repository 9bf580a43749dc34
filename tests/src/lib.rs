//! Test harness for end-to-end tests: a fresh Postgres database per cluster, the real
//! `chat-message` and `chat-gateway` binaries on free ports, and a WebSocket client
//! that speaks the protocol.
#![deny(rust_2018_idioms)]

pub mod otlp;

use std::collections::VecDeque;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use sqlx::{Connection, PgConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// How long any single expected thing may take before a test fails.
pub const WAIT: Duration = Duration::from_secs(15);

/// The secret every test cluster signs tokens with.
pub const SECRET: &str = "e2e-test-secret";

/// Path of a workspace binary built next to this test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --bins`; `make test` does)",
        path.display()
    );
    path
}

/// A port that was free a moment ago, for a server a test is about to start.
///
/// Port 0 would hand out ports from the kernel's ephemeral range, where the many
/// outgoing connections of parallel tests also land, so a port could be taken before the
/// server binds it. These come from below that range (32768+ on Linux), each at most once
/// per test process, starting at a pid-derived offset so concurrent test processes rarely
/// probe the same ones.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let start = (u64::from(std::process::id()) * 7919 % u64::from(SPAN)) as u32;
    let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN)
}

fn unique(prefix: &str) -> String {
    // Tests in one binary run in parallel threads and may read the same clock value: the
    // counter keeps their names apart, the clock keeps apart runs that reuse a pid.
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("{prefix}_{}_{n}_{}", std::process::id(), nanos % 1_000_000_000)
}

/// Base URL of the Postgres server tests use (no database name).
pub fn postgres_base() -> String {
    std::env::var("TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_owned())
}

/// The Redis tests use.
pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// A uniquely named database, dropped when this value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
    base: String,
}

impl TestDb {
    /// Names a fresh database; the message service creates and migrates it.
    pub fn new() -> Self {
        Self::on(&postgres_base())
    }

    /// A fresh database on the server at `base` (`postgres://user@host:port`).
    pub fn on(base: &str) -> Self {
        let name = unique("chat_test");
        Self { url: format!("{base}/{name}"), base: base.to_owned(), name }
    }

    /// A connection to the test database.
    pub async fn connect(&self) -> Result<PgConnection> {
        Ok(PgConnection::connect(&self.url).await?)
    }
}

impl Default for TestDb {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin = format!("{}/postgres", self.base);
        let sql = format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name);
        // Drop runs outside any async context we can rely on: use a private runtime.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                let mut conn = PgConnection::connect(&admin).await?;
                sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&mut conn).await?;
                Ok::<_, anyhow::Error>(())
            })
        })
        .join();
    }
}

/// A further message service of a cluster.
pub struct Replica {
    pub grpc_addr: String,
    /// `host:port` of its `/metrics`.
    pub metrics: String,
    child: Child,
}

impl Replica {
    /// Kills it with SIGKILL.
    pub async fn kill(&mut self) -> Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}

/// A message service and `n` gateways, on free ports, against a fresh database.
pub struct Cluster {
    /// `host:port` of the message service's `/metrics`.
    pub message_metrics: String,
    redis: String,
    prefix: String,
    pub grpc_addr: String,
    pub gateways: Vec<String>,
    /// Message services beyond the first (see `start_replicated`).
    pub replicas: Vec<Replica>,
    /// What the gateways' `MESSAGE_SERVICE_URL` is, for restarts.
    message_urls: String,
    // Fields drop in order: the processes die before their database is dropped.
    message: Child,
    gateway_procs: Vec<Child>,
    env: Vec<(String, String)>,
    pub db: TestDb,
}

async fn terminate(child: &mut Child) -> Result<Option<i32>> {
    let pid = child.id().ok_or_else(|| anyhow!("the process already exited"))?;
    let sent = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
    anyhow::ensure!(sent.success(), "kill -TERM {pid} failed");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await??;
    Ok(status.code())
}

/// The gRPC health status of `service` (`""`: overall) at `addr`.
async fn grpc_health(addr: &str, service: &str) -> Result<i32> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?.connect().await?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let request = tonic_health::pb::HealthCheckRequest { service: service.to_owned() };
    Ok(client.check(request).await?.into_inner().status)
}

/// Waits (bounded) until the message service at `addr` reports SERVING.
async fn wait_serving(addr: &str) -> Result<()> {
    const SERVING: i32 = 1;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !matches!(grpc_health(addr, "").await, Ok(SERVING)) {
        if tokio::time::Instant::now() > deadline {
            bail!("message service {addr} not serving within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

fn spawn_gateway(addr: &str, message_urls: &str, redis: &str, prefix: &str, env: &[(String, String)]) -> Result<Child> {
    Command::new(bin("chat-gateway"))
        .env("GATEWAY_ADDR", addr)
        .env("MESSAGE_SERVICE_URL", message_urls)
        .env("REDIS_URL", redis)
        .env("REDIS_CHANNEL_PREFIX", prefix)
        .env("JWT_SECRET", SECRET)
        .env("HEARTBEAT_MS", "5000")
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("spawning chat-gateway")
}

fn spawn_message(
    grpc_addr: &str,
    metrics_addr: &str,
    db_url: &str,
    redis: &str,
    prefix: &str,
    env: &[(String, String)],
) -> Result<Child> {
    Command::new(bin("chat-message"))
        .env("MESSAGE_ADDR", grpc_addr)
        .env("METRICS_ADDR", metrics_addr)
        .env("DATABASE_URL", db_url)
        .env("REDIS_URL", redis)
        .env("REDIS_CHANNEL_PREFIX", prefix)
        .env("RUST_LOG", "warn")
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("spawning chat-message")
}

impl Cluster {
    /// Starts the cluster and waits until every gateway reports ready.
    pub async fn start(gateways: usize) -> Result<Self> {
        Self::start_with(gateways, &redis_url(), &[]).await
    }

    /// Like `start`, against the Redis at `redis`, with extra environment for every process.
    pub async fn start_with(gateways: usize, redis: &str, env: &[(&str, &str)]) -> Result<Self> {
        Self::start_on(gateways, &postgres_base(), redis, env).await
    }

    /// Like `start_with`, with a fresh database on the Postgres server at `postgres`.
    pub async fn start_on(gateways: usize, postgres: &str, redis: &str, env: &[(&str, &str)]) -> Result<Self> {
        Self::start_full(gateways, 0, postgres, redis, env).await
    }

    /// Like `start`, with `replicas` more message services beside the first; the gateways
    /// balance their calls across all of them.
    pub async fn start_replicated(gateways: usize, replicas: usize) -> Result<Self> {
        Self::start_full(gateways, replicas, &postgres_base(), &redis_url(), &[]).await
    }

    async fn start_full(
        gateways: usize,
        replicas: usize,
        postgres: &str,
        redis: &str,
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let db = TestDb::on(postgres);
        // A private channel namespace: other clusters on the same Redis never cross-talk.
        let prefix = unique("e2e");
        let grpc_port = free_port();
        let grpc_addr = format!("127.0.0.1:{grpc_port}");
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let message_metrics = format!("127.0.0.1:{}", free_port());
        let message = spawn_message(&grpc_addr, &message_metrics, &db.url, redis, &prefix, &env)?;
        let mut extra = Vec::new();
        for _ in 0..replicas {
            let grpc_addr = format!("127.0.0.1:{}", free_port());
            let metrics = format!("127.0.0.1:{}", free_port());
            let child = spawn_message(&grpc_addr, &metrics, &db.url, redis, &prefix, &env)?;
            extra.push(Replica { grpc_addr, metrics, child });
        }
        let message_urls: Vec<String> = std::iter::once(&grpc_addr)
            .chain(extra.iter().map(|r| &r.grpc_addr))
            .map(|a| format!("http://{a}"))
            .collect();
        let message_urls = message_urls.join(",");
        let mut gateway_procs = Vec::new();
        let mut urls = Vec::new();
        for _ in 0..gateways {
            let addr = format!("127.0.0.1:{}", free_port());
            gateway_procs.push(spawn_gateway(&addr, &message_urls, redis, &prefix, &env)?);
            urls.push(addr);
        }
        let mut cluster = Self {
            message_urls,
            db,
            redis: redis.to_owned(),
            prefix,
            grpc_addr,
            message_metrics,
            gateways: urls,
            message,
            replicas: extra,
            gateway_procs,
            env,
        };
        for gw in cluster.gateways.clone() {
            cluster.wait_ready(&gw).await?;
        }
        // A gateway is ready once one message service answers; a test about several
        // needs every one of them up, or calls balanced to a late one fail `unavailable`.
        for replica in &cluster.replicas {
            wait_serving(&replica.grpc_addr).await?;
        }
        Ok(cluster)
    }

    async fn wait_ready(&mut self, gw: &str) -> Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = http_get(gw, "/readyz").await {
                return Ok(());
            }
            if let Some(status) = self.message.try_wait()? {
                bail!("chat-message exited early: {status}");
            }
            for p in &mut self.gateway_procs {
                if let Some(status) = p.try_wait()? {
                    bail!("chat-gateway exited early: {status}");
                }
            }
            if tokio::time::Instant::now() > deadline {
                bail!("gateway {gw} not ready within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Kills the message service (SIGKILL) and starts it again on the same port.
    pub async fn restart_message_service(&mut self) -> Result<()> {
        self.message.kill().await?;
        self.message =
            spawn_message(&self.grpc_addr, &self.message_metrics, &self.db.url, &self.redis, &self.prefix, &self.env)?;
        Ok(())
    }

    /// The message service's gRPC health status for `service` (`""`: overall).
    pub async fn message_health(&self, service: &str) -> Result<i32> {
        grpc_health(&self.grpc_addr, service).await
    }

    /// Process id of gateway `i`, while it runs.
    pub fn gateway_pid(&self, i: usize) -> Option<u32> {
        self.gateway_procs[i].id()
    }

    /// Kills gateway `i` with SIGKILL: no drain, no clean-up.
    pub async fn kill_gateway(&mut self, i: usize) -> Result<()> {
        self.gateway_procs[i].kill().await?;
        Ok(())
    }

    /// Sends SIGTERM to gateway `i` and waits (bounded) for it to exit; its exit code.
    pub async fn terminate_gateway(&mut self, i: usize) -> Result<Option<i32>> {
        terminate(&mut self.gateway_procs[i]).await
    }

    /// Stops gateway `i` with SIGTERM (its clients get `reconnect` and close 1012), starts
    /// it again on the same address and waits until it is ready.
    pub async fn restart_gateway(&mut self, i: usize) -> Result<()> {
        terminate(&mut self.gateway_procs[i]).await?;
        let addr = self.gateways[i].clone();
        self.gateway_procs[i] = spawn_gateway(&addr, &self.message_urls, &self.redis, &self.prefix, &self.env)?;
        self.wait_ready(&addr).await
    }

    /// Sends SIGTERM to the message service and waits (bounded) for it; its exit code.
    pub async fn terminate_message_service(&mut self) -> Result<Option<i32>> {
        terminate(&mut self.message).await
    }

    /// The `ws://` URL of gateway `i`.
    pub fn ws_url(&self, i: usize) -> String {
        format!("ws://{}/ws", self.gateways[i])
    }

    /// Connects `user` to gateway `i` with a header token and reads the welcome.
    pub async fn client(&self, i: usize, user: &str) -> Result<WsClient> {
        self.client_with(i, &token(user)).await
    }

    /// Connects to gateway `i` with this token and reads the welcome.
    pub async fn client_with(&self, i: usize, token: &str) -> Result<WsClient> {
        let (client, welcome) = WsClient::connect_bearer(&self.ws_url(i), token).await?;
        anyhow::ensure!(welcome["type"] == "welcome", "expected welcome, got {welcome}");
        Ok(client)
    }
}

impl Drop for Cluster {
    /// The processes die with their handles (SIGKILL), leaving presence keys behind in
    /// Redis: remove everything under this cluster's private prefix.
    fn drop(&mut self) {
        let script = format!(
            "redis-cli -u {url} --scan --pattern '{prefix}:*' | xargs -r redis-cli -u {url} del >/dev/null",
            url = self.redis,
            prefix = self.prefix
        );
        let _ = std::process::Command::new("sh").args(["-c", &script]).status();
    }
}

/// A private PostgreSQL server on a free port, in a temporary data directory, for tests
/// that stop or restart it. As root, it runs as the `postgres` user (initdb refuses root).
pub struct PgServer {
    pub port: u16,
    dir: PathBuf,
}

fn pg_bin(name: &str) -> Result<PathBuf> {
    let root = std::path::Path::new("/usr/lib/postgresql");
    let mut versions: Vec<PathBuf> = std::fs::read_dir(root)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    versions.sort();
    let bin = versions.last().ok_or_else(|| anyhow!("no PostgreSQL under {}", root.display()))?.join("bin").join(name);
    Ok(bin)
}

fn as_postgres(program: &std::path::Path) -> std::process::Command {
    let root = std::process::Command::new("id").arg("-u").output().map(|o| o.stdout == b"0\n").unwrap_or(false);
    if root {
        let mut cmd = std::process::Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        std::process::Command::new(program)
    }
}

impl PgServer {
    /// initdb and start; waits until it accepts connections.
    pub async fn start() -> Result<Self> {
        let dir = std::env::temp_dir().join(unique("chat_pg"));
        std::fs::create_dir_all(&dir)?;
        let _ = std::process::Command::new("chown").args(["postgres:postgres", &dir.display().to_string()]).status();
        let out = as_postgres(&pg_bin("initdb")?)
            .args(["-D", &dir.join("data").display().to_string(), "-A", "trust", "-U", "postgres", "--no-sync"])
            .output()?;
        anyhow::ensure!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let server = Self { port: free_port(), dir };
        server.up()?;
        Ok(server)
    }

    /// `postgres://postgres@127.0.0.1:<port>`.
    pub fn base_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}", self.port)
    }

    fn ctl(&self, args: &[&str]) -> Result<()> {
        let data = self.dir.join("data").display().to_string();
        let out = as_postgres(&pg_bin("pg_ctl")?).args(["-D", &data, "-w", "-t", "30"]).args(args).output()?;
        anyhow::ensure!(out.status.success(), "pg_ctl {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    }

    fn up(&self) -> Result<()> {
        let opts = format!("-p {} -c listen_addresses=127.0.0.1 -k {} -c fsync=off", self.port, self.dir.display());
        let log = self.dir.join("log").display().to_string();
        self.ctl(&["-o", &opts, "-l", &log, "start"])
    }

    /// Stops it (fast shutdown: open sessions are cut).
    pub fn stop(&self) -> Result<()> {
        self.ctl(&["-m", "fast", "stop"])
    }

    /// Starts it again on the same port.
    pub fn restart(&self) -> Result<()> {
        self.up()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self.ctl(&["-m", "immediate", "stop"]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A private redis-server on a free port, for tests that stop or restart it.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one and waits until it answers.
    pub async fn start() -> Result<Self> {
        let mut server = Self { port: free_port(), child: None };
        server.spawn().await?;
        Ok(server)
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) -> Result<()> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .context("spawning redis-server")?;
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + WAIT;
        while TcpStream::connect(("127.0.0.1", self.port)).await.is_err() {
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "redis-server did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    /// Kills it (SIGKILL: no goodbye to clients).
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill().await?;
        self.spawn().await
    }
}

/// A private Redis Cluster of `redis-server` processes on free ports (one primary per
/// node, no replicas), in a temporary directory; stops when dropped.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    dir: PathBuf,
    _nodes: Vec<Child>,
}

impl RedisCluster {
    /// Starts `n` nodes, joins them into a cluster and waits until it reports `ok`.
    pub async fn start(n: usize) -> Result<Self> {
        let dir = std::env::temp_dir().join(unique("redis-cluster"));
        std::fs::create_dir_all(&dir)?;
        let mut nodes = Vec::new();
        let mut ports = Vec::new();
        for _ in 0..n {
            let (port, bus) = (free_port(), free_port());
            let conf = dir.join(format!("nodes-{port}.conf"));
            let child = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--cluster-port", &bus.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "2000",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                ])
                .arg("--cluster-config-file")
                .arg(&conf)
                .arg("--dir")
                .arg(&dir)
                .stdout(Stdio::null())
                .kill_on_drop(true)
                .spawn()
                .context("spawning redis-server")?;
            nodes.push(child);
            ports.push(port);
        }
        let cluster = Self { ports, dir, _nodes: nodes };
        for port in &cluster.ports {
            let deadline = tokio::time::Instant::now() + WAIT;
            while TcpStream::connect(("127.0.0.1", *port)).await.is_err() {
                anyhow::ensure!(tokio::time::Instant::now() < deadline, "redis-server on {port} did not start");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        let addrs: Vec<String> = cluster.ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .await?;
        anyhow::ensure!(created.success(), "redis-cli --cluster create failed");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        for port in &cluster.ports {
            loop {
                if cluster.cli(*port, &["cluster", "info"]).await?.contains("cluster_state:ok") {
                    break;
                }
                anyhow::ensure!(tokio::time::Instant::now() < deadline, "cluster not ok on {port}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        Ok(cluster)
    }

    /// The URL of one node: enough for a cluster-aware client to find the rest.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.ports[0])
    }

    /// Runs `redis-cli` against the node on `port`; its output.
    pub async fn cli(&self, port: u16, args: &[&str]) -> Result<String> {
        let out = Command::new("redis-cli").args(["-p", &port.to_string()]).args(args).output().await?;
        anyhow::ensure!(out.status.success(), "redis-cli {args:?} failed");
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A token for `sub`, valid for an hour.
pub fn token(sub: &str) -> String {
    token_with(json!({"sub": sub, "exp": chrono::Utc::now().timestamp() + 3600}))
}

/// A token with exactly these claims, signed with the cluster secret.
pub fn token_with(claims: Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .expect("signing")
}

/// A minimal HTTP/1.1 GET: status code and body.
pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| anyhow!("bad response: {text}"))?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    Ok((status, body))
}

/// A response: status and body parsed as JSON (`Null` when empty or not JSON).
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub headers: String,
    pub body: Value,
    pub raw: Vec<u8>,
}

/// A minimal HTTP/1.1 request with an optional Bearer token and body.
pub async fn http(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: &str,
    body: &[u8],
) -> Result<HttpReply> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if !body.is_empty() {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    // A server may answer (413) before reading the whole body; that is not our failure.
    let _ = stream.write_all(body).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut buf)).await?;
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| anyhow!("no HTTP response"))?;
    let headers = String::from_utf8_lossy(&buf[..split]).into_owned();
    let status = headers.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| anyhow!("bad status line"))?;
    let raw = buf[split + 4..].to_vec();
    let body = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    Ok(HttpReply { status, headers, body, raw })
}

/// A JSON request.
pub async fn http_json(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Result<HttpReply> {
    let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    http(addr, method, path, token, "application/json", &bytes).await
}

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A protocol-speaking WebSocket client.
pub struct WsClient {
    ws: Ws,
    /// Frames read while waiting for something else, in arrival order.
    pending: VecDeque<Value>,
    next_id: u64,
}

impl WsClient {
    /// Connects with `Authorization: Bearer` and returns the client and its first frame.
    pub async fn connect_bearer(url: &str, token: &str) -> Result<(Self, Value)> {
        let mut req = url.into_client_request()?;
        req.headers_mut().insert("Authorization", format!("Bearer {token}").parse()?);
        Self::connect_request(req).await
    }

    /// Connects with a prepared request and returns the client and its first frame.
    pub async fn connect_request<R: IntoClientRequest + Unpin>(req: R) -> Result<(Self, Value)> {
        let (ws, _) = tokio_tungstenite::connect_async(req).await?;
        let mut client = Self::from_stream(ws);
        let first = client.recv().await?;
        Ok((client, first))
    }

    /// Wraps an already upgraded socket (nothing read yet).
    pub fn from_stream(ws: Ws) -> Self {
        Self { ws, pending: VecDeque::new(), next_id: 1 }
    }

    /// Sends one JSON frame as text.
    pub async fn send(&mut self, frame: &Value) -> Result<()> {
        self.send_text(frame.to_string()).await
    }

    /// Sends raw text.
    pub async fn send_text(&mut self, text: String) -> Result<()> {
        self.ws.send(Message::Text(text.into())).await?;
        Ok(())
    }

    /// The next frame off the socket (ignoring pings), or an error on close or timeout.
    async fn read_frame(&mut self) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| anyhow!("no frame within {WAIT:?}"))?
                .ok_or_else(|| anyhow!("connection ended"))??;
            match msg {
                Message::Text(text) => return Ok(serde_json::from_str(&text)?),
                Message::Close(frame) => bail!("closed: {frame:?}"),
                _ => continue,
            }
        }
    }

    /// The next frame: buffered first, then off the socket.
    pub async fn recv(&mut self) -> Result<Value> {
        match self.pending.pop_front() {
            Some(v) => Ok(v),
            None => self.read_frame().await,
        }
    }

    /// The close frame's code once the server closes (frames before it are skipped).
    pub async fn closed(&mut self) -> Result<Option<u16>> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let msg =
                tokio::time::timeout_at(deadline, self.ws.next()).await.map_err(|_| anyhow!("not closed in time"))?;
            match msg {
                None | Some(Err(_)) => return Ok(None),
                Some(Ok(Message::Close(frame))) => return Ok(frame.map(|f| u16::from(f.code))),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Sends `command` with a fresh id and returns the reply carrying that id; other
    /// frames that arrive meanwhile stay buffered for `recv`/`event`.
    pub async fn request(&mut self, mut command: Value) -> Result<Value> {
        let id = format!("r{}", self.next_id);
        self.next_id += 1;
        command["id"] = json!(id);
        self.send(&command).await?;
        loop {
            let frame = self.read_frame().await?;
            if frame["id"] == json!(id) {
                return Ok(frame);
            }
            self.pending.push_back(frame);
        }
    }

    /// Like `request`, but fails unless the reply is an `ack`.
    pub async fn ack(&mut self, command: Value) -> Result<Value> {
        let reply = self.request(command.clone()).await?;
        anyhow::ensure!(reply["type"] == "ack", "{command} → {reply}");
        Ok(reply)
    }

    /// Frames read while waiting for something else, not yet consumed.
    pub fn buffered(&self) -> impl Iterator<Item = &Value> {
        self.pending.iter()
    }

    /// Frames of `kind` buffered so far, removed from the buffer.
    pub fn take_buffered(&mut self, kind: &str) -> Vec<Value> {
        let (taken, kept): (Vec<Value>, Vec<Value>) = self.pending.drain(..).partition(|f| f["type"] == kind);
        self.pending = kept.into();
        taken
    }

    /// Creates a group room with `members` (besides this user); its id.
    pub async fn create_group(&mut self, members: &[&str]) -> Result<String> {
        let reply = self.ack(json!({"type": "create_room", "kind": "group", "members": members})).await?;
        reply["room"]["id"].as_str().map(str::to_owned).ok_or_else(|| anyhow!("no room id in {reply}"))
    }

    /// Closes the connection politely.
    pub async fn close(mut self) -> Result<()> {
        self.ws.close(None).await?;
        Ok(())
    }

    /// The next event of `kind`, from the buffer or the socket; other frames stay buffered.
    pub async fn event(&mut self, kind: &str) -> Result<Value> {
        if let Some(pos) = self.pending.iter().position(|f| f["type"] == kind) {
            return Ok(self.pending.remove(pos).unwrap_or_default());
        }
        loop {
            let frame = self.read_frame().await?;
            if frame["type"] == kind {
                return Ok(frame);
            }
            self.pending.push_back(frame);
        }
    }
}

/// Sends `texts` to `room` in order as `user`, the way a careful client does: each with a
/// `client_msg_id`, retried on `unavailable` or a dropped connection, reconnecting to the
/// next gateway in `urls`. Returns once every one is acknowledged.
pub async fn send_reliably(urls: Vec<String>, user: &str, room: String, texts: Vec<String>) -> Result<()> {
    let mut next = 0;
    let mut conn: Option<WsClient> = None;
    for (i, text) in texts.into_iter().enumerate() {
        let send = json!({"type": "send", "room": room, "text": text, "client_msg_id": format!("{user}-{i}")});
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            anyhow::ensure!(tokio::time::Instant::now() < deadline, "send {i} never acknowledged");
            if conn.is_none() {
                match WsClient::connect_bearer(&urls[next % urls.len()], &token(user)).await {
                    Ok((c, _)) => conn = Some(c),
                    Err(_) => {
                        next += 1;
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                }
            }
            let Some(c) = conn.as_mut() else { continue };
            match c.request(send.clone()).await {
                Ok(reply) if reply["type"] == "ack" => break,
                Ok(reply) if reply["code"] == "unavailable" => tokio::time::sleep(Duration::from_millis(100)).await,
                Ok(reply) => bail!("unexpected reply to send {i}: {reply}"),
                Err(_) => {
                    conn = None;
                    next += 1;
                }
            }
        }
    }
    Ok(())
}

/// Follows a room as `user` across gateway failures: on a dropped connection it
/// reconnects to the next gateway and joins with `since_seq`, as a client should.
/// Returns the seqs of every `message` event received, in arrival order, once `count`
/// have arrived.
pub async fn follow_room(urls: Vec<String>, user: &str, room: String, count: usize) -> Result<Vec<i64>> {
    let mut seqs: Vec<i64> = Vec::new();
    let mut next = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    'connect: while seqs.len() < count {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "got {} of {count}: {seqs:?}", seqs.len());
        let Ok((mut c, _)) = WsClient::connect_bearer(&urls[next % urls.len()], &token(user)).await else {
            next += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        let since = seqs.last().copied().unwrap_or(0);
        match c.request(json!({"type": "join", "room": room, "since_seq": since})).await {
            Ok(reply) if reply["type"] == "ack" => {}
            _ => {
                next += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        }
        while seqs.len() < count {
            match c.event("message").await {
                Ok(event) => seqs.push(event["message"]["seq"].as_i64().unwrap_or(-1)),
                Err(_) => {
                    next += 1;
                    continue 'connect;
                }
            }
        }
    }
    Ok(seqs)
}
