//! The browser client in a real browser: `tests/browser/e2e.mjs` drives Debian's
//! Chromium with playwright-core against a cluster started here. Screenshots land in
//! `target/e2e-artifacts/browser/`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use chat_tests::Cluster;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::Command;

/// The whole browser scenario, restarts included, must finish within this.
const LIMIT: Duration = Duration::from_secs(240);

fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[tokio::test]
async fn two_people_chat_in_browsers_across_gateways_and_survive_a_restart() -> Result<()> {
    let root = workspace_root();
    let dir = root.join("tests/browser");
    if !dir.join("node_modules/playwright-core").exists() {
        bail!("playwright-core is missing: run `npm ci --prefix tests/browser` (make test does)");
    }
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    ensure!(
        std::path::Path::new(&chromium).exists(),
        "{chromium} is missing: install Debian's chromium (deploy/install-test-tools.sh does)"
    );
    let artifacts = root.join("target/e2e-artifacts/browser");
    let _ = std::fs::remove_dir_all(&artifacts);

    let mut cluster =
        Cluster::builder().gateways(2).env("ENVIRONMENT", "development").env("DEV_TOKENS", "true").start().await?;
    let mut child = Command::new("node")
        .arg("e2e.mjs")
        .current_dir(&dir)
        .env("GATEWAY_A", format!("http://{}", cluster.gateways[0]))
        .env("GATEWAY_B", format!("http://{}", cluster.gateways[1]))
        .env("ARTIFACTS", &artifacts)
        .env("CHROMIUM", &chromium)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting node (is Node.js installed?)")?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let mut stdout = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut stderr = child.stderr.take().context("stderr")?;
    let log = tokio::spawn(async move {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text).await;
        text
    });

    // The script's stdout carries only requests to the harness.
    let scenario = async {
        while let Some(line) = stdout.next_line().await? {
            match line.strip_prefix("RESTART ") {
                Some(index) => {
                    cluster.restart_gateway(index.trim().parse()?).await?;
                    stdin.write_all(b"restarted\n").await?;
                }
                None => bail!("unexpected line from the browser script: {line}"),
            }
        }
        Ok(child.wait().await?)
    };
    let outcome = tokio::time::timeout(LIMIT, scenario).await;
    let _ = child.start_kill();
    let log = log.await.unwrap_or_default();
    let status = match outcome {
        Ok(status) => status.with_context(|| format!("browser script log:\n{log}"))?,
        Err(_) => bail!("the browser scenario took over {LIMIT:?}; its log:\n{log}"),
    };
    ensure!(status.success(), "the browser scenario failed ({status}); its log:\n{log}");
    for shot in [
        "02-unread-badge.png",
        "02-delivered-ticks.png",
        "02-read-ticks.png",
        "03-typing.png",
        "04-sent-tick.png",
        "05-recovered.png",
        "06-markup-as-text.png",
        "07-attachment.png",
        "09-thread.png",
    ] {
        ensure!(artifacts.join(shot).exists(), "screenshot {shot} is missing");
    }
    Ok(())
}
