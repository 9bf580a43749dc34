//! Bounded waiting: how long one expected thing may take, and `eventually` for a
//! condition that becomes true on its own time (a process up, a fault noticed).

use std::fmt;
use std::time::Duration;

use anyhow::{anyhow, Result};
use tokio::time::Instant;

/// How long any single expected thing may take before a test fails.
pub const WAIT: Duration = Duration::from_secs(15);

/// The first retry comes quickly, for conditions that are nearly true already; later ones
/// back off to `MAX_POLL` so a long wait does not hammer the process it asks.
const FIRST_POLL: Duration = Duration::from_millis(10);
const MAX_POLL: Duration = Duration::from_millis(100);

/// What a check of `eventually` returns: `Ok`, `Some` or `true` ends the wait.
pub trait Outcome {
    type Value;
    fn settle(self) -> Result<Self::Value>;
}

impl<T, E: Into<anyhow::Error>> Outcome for Result<T, E> {
    type Value = T;
    fn settle(self) -> Result<T> {
        self.map_err(Into::into)
    }
}

impl<T> Outcome for Option<T> {
    type Value = T;
    fn settle(self) -> Result<T> {
        self.ok_or_else(|| anyhow!("the check found nothing yet"))
    }
}

impl Outcome for bool {
    type Value = ();
    fn settle(self) -> Result<()> {
        self.then_some(()).ok_or_else(|| anyhow!("the condition is still false"))
    }
}

/// An error that ends `eventually` at once, because waiting longer cannot help: the
/// process being waited for has died, or a reply no retry will change has arrived.
#[derive(Debug)]
pub struct GiveUp(String);

impl fmt::Display for GiveUp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GiveUp {}

/// Returned from a check, ends `eventually` with this error instead of retrying.
pub fn give_up(why: impl fmt::Display) -> anyhow::Error {
    GiveUp(format!("{why:#}")).into()
}

/// Runs `check` until it returns `Ok`, `Some` or `true`, and returns what it found. Fails
/// once `within` has elapsed (an attempt still running then is cut off), with the last
/// attempt's error as the cause, or at once if a check returns `give_up(..)`.
pub async fn eventually<O: Outcome>(within: Duration, mut check: impl AsyncFnMut() -> O) -> Result<O::Value> {
    let started = Instant::now();
    let deadline = started + within;
    let mut poll = FIRST_POLL;
    let mut attempts = 0u32;
    loop {
        attempts += 1;
        let last = match tokio::time::timeout_at(deadline, check()).await {
            Ok(outcome) => match outcome.settle() {
                Ok(value) => return Ok(value),
                Err(err) if err.is::<GiveUp>() => return Err(err),
                Err(err) => err,
            },
            Err(_) => anyhow!("attempt {attempts} was still running at the deadline"),
        };
        if Instant::now() + poll >= deadline {
            return Err(last.context(format!(
                "not within {within:?} ({attempts} attempts over {:?}); the last attempt said",
                started.elapsed()
            )));
        }
        tokio::time::sleep(poll).await;
        poll = (poll * 2).min(MAX_POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_condition_that_turns_true_ends_the_wait_with_its_value() -> Result<()> {
        let mut calls = 0;
        let found = eventually(WAIT, async || {
            calls += 1;
            (calls >= 3).then_some(calls)
        })
        .await?;
        assert_eq!(found, 3);
        Ok(())
    }

    #[tokio::test]
    async fn a_condition_that_stays_false_fails_with_the_last_error_after_the_bound() {
        let started = Instant::now();
        let mut calls = 0;
        let err = eventually(Duration::from_millis(200), async || -> Result<()> {
            calls += 1;
            Err(anyhow!("still nothing after {calls} calls"))
        })
        .await
        .expect_err("never true");
        assert!(started.elapsed() >= Duration::from_millis(100), "{:?}", started.elapsed());
        let text = format!("{err:#}");
        assert!(text.contains("not within 200ms") && text.contains(&format!("after {calls} calls")), "{text}");
    }

    #[tokio::test]
    async fn giving_up_ends_the_wait_at_once() {
        let started = Instant::now();
        let err =
            eventually(WAIT, async || -> Result<()> { Err(give_up("the process died")) }).await.expect_err("gave up");
        assert!(started.elapsed() < Duration::from_secs(1));
        assert_eq!(err.to_string(), "the process died");
    }

    #[tokio::test]
    async fn an_attempt_that_hangs_is_cut_off_at_the_deadline() {
        let started = Instant::now();
        let outcome = eventually(Duration::from_millis(100), async || {
            std::future::pending::<()>().await;
            true
        })
        .await;
        assert!(outcome.is_err());
        assert!(started.elapsed() < Duration::from_secs(1));
    }
}
