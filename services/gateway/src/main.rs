//! Wires the gateway: config, logging, signals, then run.

use anyhow::Context;
use chat_gateway::config::Config;
use chat_gateway::Application;
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    chat_common::telemetry::init_logging(config.log_format == "json");
    config.validate().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;

    let shutdown = CancellationToken::new();
    tokio::spawn(chat_common::shutdown::cancel_on_signal(shutdown.clone()));

    let app = Application::build(&config, shutdown).await.context("gateway failed to start")?;
    tracing::info!(addr = %app.local_addr()?, "gateway listening (HTTP + WebSocket on /ws)");
    app.run_until_stopped().await
}
