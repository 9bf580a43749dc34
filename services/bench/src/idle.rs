//! Idle: N authenticated connections held open on one gateway; its RSS per connection.

use std::time::Duration;

use anyhow::Result;
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::client::Target;
use crate::procstat;
use crate::progress;

/// Opens `count` connections to the first gateway (pid `pid`) and reports the growth of
/// its resident memory per connection.
pub async fn run(target: &Target, count: usize, pid: u32) -> Result<Value> {
    let before = procstat::rss_bytes(pid)?;
    let bar = progress::bar(count as u64, "idle connections");
    let conns: Vec<_> = futures_util::stream::iter(0..count)
        .map(|n| target.connect(n, 0))
        .buffer_unordered(128)
        .inspect(|_| bar.inc(1))
        .collect()
        .await;
    bar.finish_and_clear();
    let failed = conns.iter().filter(|c| c.is_err()).count();
    let first_error = conns.iter().find_map(|c| c.as_ref().err().map(|e| e.to_string()));
    let open = count - failed;
    // Let allocations settle (welcome frames flushed, buffers returned).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = procstat::rss_bytes(pid)?;
    drop(conns);
    let per_conn = after.saturating_sub(before) as f64 / open.max(1) as f64;
    Ok(json!({
        "scenario": "idle",
        "connections": open,
        "failed": failed,
        "first_error": first_error,
        "rss_before_bytes": before,
        "rss_after_bytes": after,
        "rss_per_connection_bytes": per_conn,
    }))
}
