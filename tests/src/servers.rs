//! Private servers for fault tests, which stop, kill or restart them: PostgreSQL, Redis
//! and a Redis Cluster, each on free ports so the machine's shared instances stay untouched.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::unique::{free_port, unique};
use crate::wait::{eventually, give_up, WAIT};

/// How long a new Redis Cluster may take to agree it is whole, every node included.
const CLUSTER_OK_WITHIN: Duration = Duration::from_secs(30);

/// Waits (bounded) until something accepts connections on `port`.
async fn accepting(port: u16) -> Result<()> {
    eventually(WAIT, async || TcpStream::connect(("127.0.0.1", port)).await).await?;
    Ok(())
}

/// A private PostgreSQL server on a free port, in a temporary data directory, for tests
/// that stop or restart it. As root, it runs as the `postgres` user (initdb refuses root).
pub struct PgServer {
    pub port: u16,
    dir: PathBuf,
}

fn pg_bin(name: &str) -> Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<PathBuf> = std::fs::read_dir(root)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    versions.sort();
    let bin = versions.last().ok_or_else(|| anyhow!("no PostgreSQL under {}", root.display()))?.join("bin").join(name);
    Ok(bin)
}

fn as_postgres(program: &Path) -> std::process::Command {
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
        accepting(self.port).await.context("redis-server did not start")
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
            accepting(*port).await.with_context(|| format!("redis-server on {port} did not start"))?;
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
        let deadline = Instant::now() + CLUSTER_OK_WITHIN;
        for port in &cluster.ports {
            let within = deadline.saturating_duration_since(Instant::now());
            eventually(within, async || -> Result<()> {
                let info = cluster.cli(*port, &["cluster", "info"]).await.map_err(give_up)?;
                anyhow::ensure!(info.contains("cluster_state:ok"), "{info}");
                Ok(())
            })
            .await
            .with_context(|| format!("cluster not ok on {port}"))?;
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
