//! The workspace binaries as child processes: where they are built, how a cluster
//! starts them, and how a test stops one politely.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use tokio::process::{Child, Command};

use crate::tokens::SECRET;

/// How long a process may take to exit after SIGTERM: its drain and grace periods.
const EXIT_WITHIN: Duration = Duration::from_secs(30);

/// The directory of the workspace binaries, next to this test executable.
pub(crate) fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> → target/<profile>
    exe.parent().and_then(|d| d.parent()).expect("target dir").to_owned()
}

/// Path of a workspace binary built next to this test executable.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (`cargo build --bins`; `make test` does)",
        path.display()
    );
    path
}

/// Where a cluster's processes meet: the Redis they share, the private channel prefix
/// that keeps them apart from other clusters on it, and the extra environment a test set.
#[derive(Clone)]
pub(crate) struct Wiring {
    pub redis: String,
    pub prefix: String,
    pub env: Vec<(String, String)>,
    /// The soft open-file limit each process starts with, as a container runtime sets it.
    pub fd_soft_limit: Option<u64>,
}

/// A command for the workspace binary `name`, started under `wiring`'s soft open-file
/// limit when it sets one (through `sh`, which `exec`s the binary: the child is the
/// service itself, for its pid and its signals).
fn command(name: &str, wiring: &Wiring) -> Command {
    match wiring.fd_soft_limit {
        None => Command::new(bin(name)),
        Some(limit) => {
            let mut command = Command::new("sh");
            command.arg("-c").arg(format!("ulimit -S -n {limit} && exec \"$0\"")).arg(bin(name));
            command
        }
    }
}

/// Starts a gateway on `addr` that calls the message services at `message_urls`.
pub(crate) fn spawn_gateway(addr: &str, message_urls: &str, wiring: &Wiring) -> Result<Child> {
    command("chat-gateway", wiring)
        .env("GATEWAY_ADDR", addr)
        .env("MESSAGE_SERVICE_URL", message_urls)
        .env("REDIS_URL", &wiring.redis)
        .env("REDIS_CHANNEL_PREFIX", &wiring.prefix)
        .env("JWT_SECRET", SECRET)
        // Tests sign tokens without iss/aud and connect without an Origin.
        .env("ALLOW_INSECURE_PRODUCTION", "true")
        .env("HEARTBEAT_MS", "5000")
        .env("RUST_LOG", "warn")
        .envs(wiring.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("spawning chat-gateway")
}

/// Starts a message service serving gRPC on `grpc_addr` against the database at `db_url`.
pub(crate) fn spawn_message(grpc_addr: &str, metrics_addr: &str, db_url: &str, wiring: &Wiring) -> Result<Child> {
    command("chat-message", wiring)
        .env("MESSAGE_ADDR", grpc_addr)
        .env("METRICS_ADDR", metrics_addr)
        .env("DATABASE_URL", db_url)
        .env("REDIS_URL", &wiring.redis)
        .env("REDIS_CHANNEL_PREFIX", &wiring.prefix)
        .env("RUST_LOG", "warn")
        .envs(wiring.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("spawning chat-message")
}

/// Sends SIGTERM and waits (bounded) for the exit; its exit code.
pub(crate) async fn terminate(child: &mut Child) -> Result<Option<i32>> {
    sigterm(child)?;
    exited(child).await
}

/// Sends SIGTERM, without waiting for the exit.
pub(crate) fn sigterm(child: &Child) -> Result<()> {
    let pid = child.id().ok_or_else(|| anyhow!("the process already exited"))?;
    let sent = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
    anyhow::ensure!(sent.success(), "kill -TERM {pid} failed");
    Ok(())
}

/// Waits (bounded) for the exit; its exit code.
pub(crate) async fn exited(child: &mut Child) -> Result<Option<i32>> {
    let status = tokio::time::timeout(EXIT_WITHIN, child.wait()).await??;
    Ok(status.code())
}
