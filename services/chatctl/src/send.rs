//! `chatctl send`: connect, send one message, print what was stored, close.
//!
//! It behaves as docs/reliability.md asks of a client: the message carries a
//! `client_msg_id`, and an `unavailable`, a `rate_limited`, a timeout or a dropped
//! connection is retried with the same id, so a retry can never store a duplicate.

use std::time::Duration;

use serde_json::{json, Value};

use crate::error::{Dropped, Refused};
use crate::render;
use crate::target::{Credentials, Target};
use crate::ws::{self, Incoming};

/// What to send and how to report it.
#[derive(Debug, Clone)]
pub struct Request {
    /// Room id.
    pub room: String,
    /// Message text.
    pub text: String,
    /// The idempotency key; generated when not given.
    pub client_msg_id: Option<String>,
    /// Attempts after the first, for transient failures.
    pub retries: u32,
    /// Per-attempt bound on connecting and on waiting for the reply.
    pub timeout: Duration,
    /// Print a readable line instead of the message JSON.
    pub readable: bool,
}

/// A suffix unlikely to repeat: the clock in nanoseconds and the process id.
///
/// Uniqueness matters only per sender (the server keys on sender and `client_msg_id`),
/// and one person rarely starts two chatctl processes in the same nanosecond.
pub fn unique_suffix() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("{nanos:x}-{:x}", std::process::id())
}

/// Sends the message and prints the stored copy on stdout.
pub async fn run(target: &Target, creds: &Credentials, req: &Request) -> anyhow::Result<()> {
    anyhow::ensure!(!req.text.is_empty(), "the message text is empty");
    let client_msg_id = req.client_msg_id.clone().unwrap_or_else(|| format!("chatctl-{}", unique_suffix()));
    let frame = json!({
        "type": "send",
        "id": "send",
        "room": req.room,
        "text": req.text,
        "client_msg_id": client_msg_id,
    });
    let mut attempt = 0;
    let message = loop {
        let error = match attempt_once(target, creds, &frame, req.timeout).await {
            Ok(message) => break message,
            Err(e) => e,
        };
        let delay = match (error.downcast_ref::<Refused>(), error.downcast_ref::<Dropped>()) {
            (Some(refused), _) if refused.is_transient() => backoff(attempt, refused.retry_after_ms),
            (None, Some(_)) => backoff(attempt, None),
            _ => return Err(error),
        };
        if attempt >= req.retries {
            return Err(error);
        }
        attempt += 1;
        eprintln!("! {error:#}; retry {attempt} of {} in {} ms", req.retries, delay.as_millis());
        tokio::time::sleep(delay).await;
    };
    if req.readable {
        render::out(render::message(&message))
    } else {
        render::out(message)
    }
}

/// The server's `retry_after_ms` when it gave one, else exponential from 200 ms (capped
/// at 5 s) with jitter from the clock, so several clients do not retry in step.
fn backoff(attempt: u32, retry_after_ms: Option<u64>) -> Duration {
    if let Some(ms) = retry_after_ms {
        return Duration::from_millis(ms);
    }
    let base = 200u64.saturating_mul(1 << attempt.min(5)).min(5_000);
    let jitter = u64::from(
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos(),
    ) % (base / 2 + 1);
    Duration::from_millis(base / 2 + jitter)
}

/// One connection: welcome, send, the reply, close. Returns the stored message.
async fn attempt_once(target: &Target, creds: &Credentials, frame: &Value, timeout: Duration) -> anyhow::Result<Value> {
    let (mut ws, _welcome, _) = ws::open(target, &creds.token, timeout).await?;
    ws::send_text(&mut ws, frame.to_string()).await?;
    let reply = tokio::time::timeout(timeout, async {
        loop {
            match ws::next(&mut ws).await {
                // Events (room_added, a push) may arrive first; only our reply counts.
                Incoming::Frame { value, .. } if value["id"] == frame["id"] => return Ok(value),
                Incoming::Frame { .. } => continue,
                Incoming::Closed(close) => {
                    let described = ws::describe_close(close.as_ref());
                    // 1008 is a decision about this user (disconnected, over the cap): final.
                    if ws::close_code(close.as_ref()) == Some(1008) {
                        return Err(anyhow::anyhow!("closed by the server before the reply: {described}"));
                    }
                    return Err(Dropped(format!("closed by the server before the reply: {described}")).into());
                }
                Incoming::Lost(e) => return Err(Dropped(format!("connection lost before the reply: {e}")).into()),
            }
        }
    })
    .await
    .map_err(|_| Dropped(format!("no reply within {timeout:?}")))??;
    ws::close(&mut ws, Duration::from_secs(2)).await;
    match reply["type"].as_str() {
        Some("ack") if reply["message"].is_object() => Ok(reply["message"].clone()),
        Some("error") => Err(Refused::from_error(&reply, None)
            .unwrap_or_else(|| Refused {
                status: None,
                code: "error".into(),
                message: reply.to_string(),
                retry_after_ms: None,
            })
            .into()),
        _ => Err(anyhow::anyhow!("unexpected reply: {reply}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_honours_the_server_and_stays_bounded() {
        assert_eq!(backoff(0, Some(750)), Duration::from_millis(750));
        for attempt in 0..20 {
            let d = backoff(attempt, None);
            assert!(d >= Duration::from_millis(100) && d <= Duration::from_millis(5_000), "{attempt}: {d:?}");
        }
    }
}
