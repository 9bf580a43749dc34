//! Wires the gateway: config, telemetry, signals, then run.

use anyhow::Context;
use chat_gateway::config::Config;
use chat_gateway::Application;
use clap::Parser;

/// A gateway holds tens of thousands of mostly idle connections whose small buffers
/// come and go with traffic: mimalloc keeps that heap compact where glibc's per-thread
/// arenas let freed memory pile up (measured with `chat-bench idle`, docs/benchmarks.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    config.validate().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    let config = &config;
    chat_common::service::run(&config.telemetry, "chat-gateway", |shutdown| async move {
        let app = Application::build(config).await.context("gateway failed to start")?;
        tracing::info!(addr = %app.local_addr()?, "gateway listening (HTTP + WebSocket on /ws)");
        Ok(app.run_until_stopped(shutdown).await?)
    })
    .await
}
