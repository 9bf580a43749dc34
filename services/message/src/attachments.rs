//! What attachments may cost: the per-user upload quota, the downloads one replica
//! streams at once, and the collector that deletes uploads no message ever carried.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use crate::error::ServiceError;
use crate::store::Store;

/// How long a download waits for a free stream before it is refused as busy: long enough
/// to ride out a burst, short enough that the client hears `unavailable` and backs off.
const STREAM_WAIT: Duration = Duration::from_secs(2);

/// Attachments deleted per statement: one short transaction, whatever the backlog.
const COLLECT_BATCH: i64 = 100;

/// Limits on attachments, from the config; cheap to clone.
#[derive(Clone)]
pub struct AttachmentLimits {
    /// Bytes one user may upload per `quota_window` (0: no quota).
    pub quota_bytes: u64,
    pub quota_window: Duration,
    /// Downloads streaming at once on this replica. Each holds one part (64 KiB) and its
    /// Postgres read at a time.
    streams: Arc<Semaphore>,
}

impl AttachmentLimits {
    /// Limits with `streams` downloads at once.
    pub fn new(quota_bytes: u64, quota_window: Duration, streams: usize) -> Self {
        Self { quota_bytes, quota_window, streams: Arc::new(Semaphore::new(streams)) }
    }

    /// A slot for one download, held until its stream ends or is dropped.
    pub async fn stream_slot(&self) -> Result<OwnedSemaphorePermit, ServiceError> {
        match tokio::time::timeout(STREAM_WAIT, self.streams.clone().acquire_owned()).await {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(ServiceError::Busy("too many attachment downloads in flight; retry")),
        }
    }

    /// Refuses `user` when `adding` more bytes would pass their quota. Checked when an
    /// upload begins (one byte more must fit) and when it finishes (what it stored must
    /// fit), not for each part: the check sums the user's uploads in the window, and a
    /// 10 MiB file has 160 parts. An upload in flight may pass the quota until it
    /// finishes, by at most one file per upload in flight; it is then refused and dropped.
    pub async fn check_quota(&self, store: &Store, user: &str, adding: u64) -> Result<(), ServiceError> {
        if self.quota_bytes == 0 {
            return Ok(());
        }
        let (used, frees_in_ms) = store.uploaded_within(user, self.quota_window).await?;
        if used.saturating_add(adding) > self.quota_bytes {
            return Err(ServiceError::Exhausted {
                message: format!(
                    "upload quota used: at most {} bytes per {} s",
                    self.quota_bytes,
                    self.quota_window.as_secs()
                ),
                retry_after_ms: frees_in_ms.max(1000),
            });
        }
        Ok(())
    }
}

/// How often the collector runs for a given age limit: often enough that an upload
/// outlives its TTL by at most half of it, at most every 5 minutes, at least every second.
pub fn collect_interval(ttl: Duration) -> Duration {
    (ttl / 2).clamp(Duration::from_secs(1), Duration::from_secs(300))
}

/// Deletes uploads no message carries once they are older than `ttl`, until `shutdown`.
/// Safe to run on every replica: each batch skips the rows another one holds.
pub async fn collect_unattached(store: Store, ttl: Duration, shutdown: CancellationToken) {
    let interval = collect_interval(ttl);
    loop {
        // A full batch means more are due: take the next one at once.
        while !shutdown.is_cancelled() {
            let deleted = match store.collect_unattached(ttl, COLLECT_BATCH).await {
                Ok(n) => n,
                Err(err) => {
                    tracing::warn!(%err, "collecting unattached uploads failed; retrying next round");
                    0
                }
            };
            if deleted > 0 {
                tracing::info!(deleted, "collected attachments never sent");
            }
            if deleted < COLLECT_BATCH as u64 {
                break;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_collector_runs_at_half_the_ttl_within_bounds() {
        assert_eq!(collect_interval(Duration::from_secs(86_400)), Duration::from_secs(300));
        assert_eq!(collect_interval(Duration::from_secs(4)), Duration::from_secs(2));
        assert_eq!(collect_interval(Duration::from_millis(10)), Duration::from_secs(1));
    }
}
