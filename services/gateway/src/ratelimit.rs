//! Token buckets for commands: one per connection and one per user on this gateway
//! (shared by that user's connections), so neither one noisy socket nor many sockets of
//! one user can flood the cluster.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A token bucket: `burst` tokens, refilled at `per_sec`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    updated: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(per_sec: u32, burst: u32, now: Instant) -> Self {
        let burst = f64::from(burst.max(1));
        Self { per_sec: f64::from(per_sec), burst, tokens: burst, updated: now }
    }

    /// Takes a token, or says how long until one is available.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        self.updated = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else if self.per_sec <= 0.0 {
            Err(Duration::from_secs(1))
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.per_sec))
        }
    }
}

/// Limits for one connection: its own bucket and its user's shared one.
pub struct ConnLimiter {
    own: Option<TokenBucket>,
    user: Option<Arc<Mutex<TokenBucket>>>,
    /// Commands refused since the last one accepted.
    refused_in_a_row: u32,
}

/// What to do with a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refuse with `rate_limited`; the client may retry after this long.
    Refuse(Duration),
    /// The client keeps sending while refused: close the connection (1008).
    Abuse,
}

/// Refused commands in a row that count as abuse.
pub const ABUSE_AFTER: u32 = 100;

impl ConnLimiter {
    /// Checks one command against both buckets.
    pub fn check(&mut self, now: Instant) -> Verdict {
        let own = self.own.as_mut().map_or(Ok(()), |b| b.take(now));
        let user = match (&own, &self.user) {
            // A command the connection's own bucket refuses does not spend the user's.
            (Ok(()), Some(user)) => user.lock().unwrap_or_else(|e| e.into_inner()).take(now),
            _ => Ok(()),
        };
        match own.and(user) {
            Ok(()) => {
                self.refused_in_a_row = 0;
                Verdict::Allow
            }
            Err(wait) => {
                self.refused_in_a_row += 1;
                if self.refused_in_a_row >= ABUSE_AFTER {
                    Verdict::Abuse
                } else {
                    Verdict::Refuse(wait)
                }
            }
        }
    }
}

/// Rates (commands per second) and bursts; 0 per second disables a bucket.
#[derive(Debug, Clone, Copy)]
pub struct Rates {
    pub conn_per_sec: u32,
    pub conn_burst: u32,
    pub user_per_sec: u32,
    pub user_burst: u32,
}

/// Hands out limiters and keeps the per-user buckets of this gateway.
pub struct Limits {
    rates: Rates,
    users: Mutex<HashMap<String, Arc<Mutex<TokenBucket>>>>,
}

impl Limits {
    /// Limits at these rates.
    pub fn new(rates: Rates) -> Self {
        Self { rates, users: Mutex::new(HashMap::new()) }
    }

    /// A limiter for a new connection of `user`.
    pub fn connect(&self, user: &str) -> ConnLimiter {
        let now = Instant::now();
        let r = self.rates;
        let own = (r.conn_per_sec > 0).then(|| TokenBucket::new(r.conn_per_sec, r.conn_burst, now));
        let user = (r.user_per_sec > 0).then(|| {
            let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
            users
                .entry(user.to_owned())
                .or_insert_with(|| Arc::new(Mutex::new(TokenBucket::new(r.user_per_sec, r.user_burst, now))))
                .clone()
        });
        ConnLimiter { own, user, refused_in_a_row: 0 }
    }

    /// Forgets the user's bucket once none of their connections holds it.
    pub fn disconnect(&self, user: &str, limiter: ConnLimiter) {
        drop(limiter);
        let mut users = self.users.lock().unwrap_or_else(|e| e.into_inner());
        if users.get(user).is_some_and(|b| Arc::strong_count(b) == 1) {
            users.remove(user);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(10, 3, t0);
        assert!(b.take(t0).is_ok());
        assert!(b.take(t0).is_ok());
        assert!(b.take(t0).is_ok());
        let wait = b.take(t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::ZERO, "{wait:?}");
        assert!(b.take(t0 + Duration::from_millis(100)).is_ok());
        assert!(b.take(t0 + Duration::from_millis(100)).is_err());
    }

    #[test]
    fn the_users_bucket_is_shared_by_their_connections() {
        let limits = Limits::new(Rates { conn_per_sec: 0, conn_burst: 0, user_per_sec: 1, user_burst: 2 });
        let mut a = limits.connect("u");
        let mut b = limits.connect("u");
        let now = Instant::now();
        assert_eq!(a.check(now), Verdict::Allow);
        assert_eq!(b.check(now), Verdict::Allow);
        assert!(matches!(a.check(now), Verdict::Refuse(_)));
        let mut other = limits.connect("someone else");
        assert_eq!(other.check(now), Verdict::Allow);
        limits.disconnect("u", a);
        limits.disconnect("u", b);
        assert!(!limits.users.lock().unwrap().contains_key("u"));
    }

    #[test]
    fn refusing_without_pause_becomes_abuse() {
        let limits = Limits::new(Rates { conn_per_sec: 1, conn_burst: 1, user_per_sec: 0, user_burst: 0 });
        let mut c = limits.connect("u");
        let now = Instant::now();
        assert_eq!(c.check(now), Verdict::Allow);
        for _ in 1..ABUSE_AFTER {
            assert!(matches!(c.check(now), Verdict::Refuse(_)));
        }
        assert_eq!(c.check(now), Verdict::Abuse);
    }
}
