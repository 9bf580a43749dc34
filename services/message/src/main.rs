//! Wires the message service: config, telemetry, signals, then run.

use anyhow::Context;
use chat_message::config::{Command, Config};
use chat_message::Application;
use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    config.validate().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
    let config = &config;
    if let Some(Command::Migrate { grant_to }) = &config.command {
        return chat_common::service::run(&config.telemetry, "chat-message", |_| async move {
            chat_message::migrate(config, grant_to.as_deref()).await.context("migration failed")
        })
        .await;
    }
    chat_common::service::run(&config.telemetry, "chat-message", |shutdown| async move {
        let app = Application::build(config).await.context("message service failed to start")?;
        tracing::info!(addr = %app.local_addr()?, "message service listening (gRPC)");
        Ok(app.run_until_stopped(shutdown).await?)
    })
    .await
}
