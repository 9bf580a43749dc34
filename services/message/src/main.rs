//! Wires the message service: config, telemetry, signals, then run.

use anyhow::Context;
use chat_message::config::Config;
use chat_message::Application;
use clap::Parser;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    config.validate().context("invalid configuration")?;
    let telemetry = config.telemetry.init("chat-message")?;

    let shutdown = CancellationToken::new();
    tokio::spawn(chat_common::shutdown::cancel_on_signal(shutdown.clone()));

    let result = run(&config, shutdown).await;
    telemetry.shutdown().await;
    result
}

async fn run(config: &Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let app = Application::build(config).await.context("message service failed to start")?;
    tracing::info!(addr = %app.local_addr()?, "message service listening (gRPC)");
    app.run_until_stopped(shutdown).await
}
