//! Bounded retries for reaching a backend at start-up.
//!
//! In a cluster the services and their backends start in any order, so a first
//! failure is normal; a backend that is still unreachable after the bounded retries
//! is a configuration error and must stop the process with a clear message.

use std::future::Future;
use std::time::Duration;

/// A backend still unreachable when the start-up retries ran out.
#[derive(Debug, thiserror::Error)]
#[error("{what} still unreachable after {attempts} attempts: {last}")]
pub struct Unreachable {
    what: String,
    attempts: u32,
    /// The last attempt's error.
    last: String,
}

/// How many times, and how far apart, to try reaching a backend at start.
#[derive(Debug, Clone, Copy)]
pub struct Retry {
    /// Attempts in all (at least one).
    pub attempts: u32,
    /// Pause between attempts.
    pub delay: Duration,
}

impl Retry {
    /// Runs `op` until it succeeds or `attempts` have failed; the last error is returned
    /// with `what` and the attempt count in its context.
    pub async fn run<T, E, F, Fut>(self, what: &str, mut op: F) -> Result<T, Unreachable>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, E>>,
        E: std::fmt::Display,
    {
        let attempts = self.attempts.max(1);
        let mut attempt = 1;
        loop {
            match op().await {
                Ok(value) => return Ok(value),
                Err(err) if attempt >= attempts => {
                    return Err(Unreachable { what: what.to_owned(), attempts, last: err.to_string() });
                }
                Err(err) => {
                    tracing::warn!(%err, attempt, attempts, "{what} not reachable yet, retrying");
                    tokio::time::sleep(self.delay).await;
                    attempt += 1;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    #[tokio::test]
    async fn gives_up_after_the_configured_attempts_with_a_clear_message() {
        let calls = Cell::new(0);
        let retry = Retry { attempts: 3, delay: Duration::from_millis(1) };
        let err = retry
            .run("Redis at redis://x", || {
                calls.set(calls.get() + 1);
                async { Err::<(), _>("connection refused") }
            })
            .await
            .unwrap_err();
        assert_eq!(calls.get(), 3);
        assert_eq!(err.to_string(), "Redis at redis://x still unreachable after 3 attempts: connection refused");
    }

    #[tokio::test]
    async fn returns_the_first_success() {
        let calls = Cell::new(0);
        let retry = Retry { attempts: 5, delay: Duration::from_millis(1) };
        let value = retry
            .run("db", || {
                calls.set(calls.get() + 1);
                let n = calls.get();
                async move {
                    if n < 2 {
                        Err("down")
                    } else {
                        Ok(n)
                    }
                }
            })
            .await
            .unwrap();
        assert_eq!(value, 2);
    }
}
