//! Per-user request rates of the HTTP API on this gateway: one token bucket per user,
//! forgotten once it would be full again, so memory follows the users active in the
//! last few seconds, not every user ever seen.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::ratelimit::TokenBucket;

/// Request rate and burst per user; 0 per second disables the limit.
#[derive(Debug, Clone, Copy)]
pub struct RestRates {
    pub per_sec: u32,
    pub burst: u32,
}

/// The buckets of the users who made requests recently.
pub struct RestLimits {
    rates: RestRates,
    /// A bucket left alone this long has refilled: dropping it changes nothing.
    idle_after: Duration,
    users: Mutex<Users>,
}

struct Users {
    buckets: HashMap<String, Entry>,
    swept: Instant,
}

struct Entry {
    bucket: TokenBucket,
    used: Instant,
}

impl RestLimits {
    /// Limits at these rates.
    pub fn new(rates: RestRates) -> Self {
        let idle_after = match rates.per_sec {
            0 => Duration::ZERO,
            per_sec => Duration::from_secs_f64(f64::from(rates.burst.max(1)) / f64::from(per_sec)),
        };
        let users = Users { buckets: HashMap::new(), swept: Instant::now() };
        Self { rates, idle_after, users: Mutex::new(users) }
    }

    /// Takes one request's token from `user`'s bucket, or says how long until one is there.
    pub fn check(&self, user: &str, now: Instant) -> Result<(), Duration> {
        if self.rates.per_sec == 0 {
            return Ok(());
        }
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        // At most once per refill time, so the sweep costs O(1) per request on average.
        if now.saturating_duration_since(users.swept) >= self.idle_after.max(Duration::from_secs(1)) {
            let idle_after = self.idle_after;
            users.buckets.retain(|_, e| now.saturating_duration_since(e.used) < idle_after);
            users.swept = now;
        }
        let rates = self.rates;
        let entry = users
            .buckets
            .entry(user.to_owned())
            .or_insert_with(|| Entry { bucket: TokenBucket::new(rates.per_sec, rates.burst, now), used: now });
        entry.used = now;
        entry.bucket.take(now)
    }

    /// Users with a bucket right now.
    pub fn tracked(&self) -> usize {
        self.users.lock().unwrap_or_else(|e| e.into_inner()).buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_user_has_their_own_burst() {
        let limits = RestLimits::new(RestRates { per_sec: 1, burst: 2 });
        let now = Instant::now();
        assert!(limits.check("ann", now).is_ok());
        assert!(limits.check("ann", now).is_ok());
        let wait = limits.check("ann", now).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_secs(1), "{wait:?}");
        assert!(limits.check("bob", now).is_ok(), "another user is not slowed down");
    }

    #[test]
    fn idle_users_are_forgotten() {
        let limits = RestLimits::new(RestRates { per_sec: 10, burst: 10 });
        let t0 = Instant::now();
        for i in 0..1000 {
            assert!(limits.check(&format!("user-{i}"), t0).is_ok());
        }
        assert_eq!(limits.tracked(), 1000);
        // Full again after 1 s (10 tokens at 10/s); the next request sweeps.
        assert!(limits.check("late", t0 + Duration::from_secs(2)).is_ok());
        assert_eq!(limits.tracked(), 1);
    }

    #[test]
    fn a_busy_user_is_not_forgotten_early() {
        let limits = RestLimits::new(RestRates { per_sec: 1, burst: 2 });
        let t0 = Instant::now();
        assert!(limits.check("ann", t0).is_ok());
        assert!(limits.check("ann", t0).is_ok());
        // Ann's bucket is still refilling: a sweep now must keep it empty.
        let t1 = t0 + Duration::from_millis(1500);
        assert!(limits.check("bob", t1).is_ok());
        assert!(limits.check("ann", t1).is_ok(), "1.5 tokens back");
        assert!(limits.check("ann", t1).is_err());
    }

    #[test]
    fn zero_per_second_means_no_limit() {
        let limits = RestLimits::new(RestRates { per_sec: 0, burst: 0 });
        let now = Instant::now();
        for _ in 0..1000 {
            assert!(limits.check("ann", now).is_ok());
        }
        assert_eq!(limits.tracked(), 0);
    }
}
