//! The TypeScript SDK (`clients/ts`) against a real two-gateway cluster: runs its
//! `npm test` (build, then `node --test`) with the cluster's gateways and secret.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chat_tests::{Cluster, SECRET};
use tokio::process::Command;

/// The whole npm run, compilation included, may take this long.
const NPM_TEST_TIMEOUT: Duration = Duration::from_secs(180);

/// `clients/ts` in the workspace (this crate is `tests/`, one level below its root).
fn sdk_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("the workspace root").join("clients").join("ts")
}

/// Runs `npm test` in `dir` against `gateways` (`host:port`); its output, within the timeout.
async fn npm_test(dir: &Path, gateways: &[String]) -> Result<Output> {
    let urls: Vec<String> = gateways.iter().map(|g| format!("http://{g}")).collect();
    let child = Command::new("npm")
        .arg("test")
        .current_dir(dir)
        .env("CHAT_GATEWAYS", urls.join(","))
        .env("JWT_SECRET", SECRET)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: npm runs node through a shell, and a timeout must stop all of them.
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .context("running npm: is Node.js installed?")?;
    let pgid = child.id();
    match tokio::time::timeout(NPM_TEST_TIMEOUT, child.wait_with_output()).await {
        Ok(output) => Ok(output?),
        Err(_) => {
            if let Some(pgid) = pgid {
                let _ = std::process::Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).status();
            }
            bail!("npm test did not finish within {} s", NPM_TEST_TIMEOUT.as_secs())
        }
    }
}

#[tokio::test]
async fn the_typescript_sdk_passes_its_tests_against_a_live_cluster() -> Result<()> {
    let dir = sdk_dir();
    anyhow::ensure!(
        dir.join("node_modules").is_dir(),
        "{} is missing: run `npm ci --prefix clients/ts` (make test does)",
        dir.join("node_modules").display()
    );
    // The SDK's tests search more often than the per-user search rate allows a person.
    let cluster = Cluster::builder().gateways(2).env("RATE_SEARCH_BURST", "100").start().await?;
    let output = npm_test(&dir, &cluster.gateways).await?;
    if !output.status.success() {
        bail!(
            "npm test failed ({}):\n--- stdout\n{}\n--- stderr\n{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}
