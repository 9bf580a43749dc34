//! Token buckets for commands: one per connection and one per user on this gateway
//! (shared by that user's connections), so neither one noisy socket nor many sockets of
//! one user can flood the cluster; and when refusals amount to abuse.
//!
//! A burst is not abuse: an SDK flushing its offline queue after a reconnect writes
//! hundreds of commands before it can read the first refusal. Only a client that goes
//! on being refused for `abuse_after` without ever pausing as told is closed (1008).

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
    abuse_after: Duration,
    /// The refusals since the client last paused as told, if any.
    streak: Option<Streak>,
}

/// A run of refusals the client has not paused for.
#[derive(Debug, Clone, Copy)]
struct Streak {
    /// The first refusal of the run.
    since: Instant,
    /// The latest refusal.
    last_refused: Instant,
    /// The latest command, refused or not.
    last_command: Instant,
    /// How long the client must then send nothing to show it honours `retry_after_ms`:
    /// the wait told at the first refusal after its latest accepted command. Not the
    /// latest wait told: that shrinks towards zero as a token refills, and a flooder
    /// who sends every millisecond would seem to pause before each new token.
    quiet: Duration,
    /// Whether the latest command was accepted.
    last_allowed: bool,
}

/// A run of refusals ends once no command has been refused for this long: the client
/// is back under its rate, whatever its pace.
const STREAK_GAP: Duration = Duration::from_secs(1);

/// What to do with a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Refuse with `rate_limited`; the client may retry after this long.
    Refuse(Duration),
    /// The client has kept sending while refused for `abuse_after`: close the
    /// connection (1008).
    Abuse,
}

impl ConnLimiter {
    /// Checks one command, arriving at `now`, against both buckets.
    pub fn check(&mut self, now: Instant) -> Verdict {
        if let Some(streak) = self.streak {
            let paused = now.saturating_duration_since(streak.last_command) >= streak.quiet;
            let calm = now.saturating_duration_since(streak.last_refused) >= STREAK_GAP;
            if paused || calm {
                self.streak = None;
            }
        }
        let own = self.own.as_mut().map_or(Ok(()), |b| b.take(now));
        let user = match (&own, &self.user) {
            // A command the connection's own bucket refuses does not spend the user's.
            (Ok(()), Some(user)) => user.lock().unwrap_or_else(|e| e.into_inner()).take(now),
            _ => Ok(()),
        };
        let verdict = match own.and(user) {
            // An accepted command does not end a run: a flooder gets one whenever a token
            // refills, and must still count as sending without pause.
            Ok(()) => Verdict::Allow,
            Err(wait) => {
                // Told in whole milliseconds, rounded up: a client that waits as told
                // must find a token, not be refused again for a fraction of one.
                let wait =
                    Duration::from_millis(u64::try_from(wait.as_nanos().div_ceil(1_000_000)).unwrap_or(u64::MAX));
                let streak = self.streak.get_or_insert(Streak {
                    since: now,
                    last_refused: now,
                    last_command: now,
                    quiet: wait,
                    last_allowed: false,
                });
                if streak.last_allowed {
                    streak.quiet = wait;
                }
                streak.last_refused = now;
                if now.saturating_duration_since(streak.since) >= self.abuse_after {
                    Verdict::Abuse
                } else {
                    Verdict::Refuse(wait)
                }
            }
        };
        if let Some(streak) = self.streak.as_mut() {
            streak.last_command = now;
            streak.last_allowed = verdict == Verdict::Allow;
        }
        verdict
    }
}

/// Rates (commands per second) and bursts; 0 per second disables a bucket.
#[derive(Debug, Clone, Copy)]
pub struct Rates {
    pub conn_per_sec: u32,
    pub conn_burst: u32,
    pub user_per_sec: u32,
    pub user_burst: u32,
    /// How long refusals must go on, without the client pausing as told, before the
    /// connection is closed as abusive.
    pub abuse_after: Duration,
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
        ConnLimiter { own, user, abuse_after: r.abuse_after, streak: None }
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
        let limits = Limits::new(Rates {
            conn_per_sec: 0,
            conn_burst: 0,
            user_per_sec: 1,
            user_burst: 2,
            abuse_after: Duration::from_secs(10),
        });
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

    const TEN_SECS: Duration = Duration::from_secs(10);

    fn one_connection(per_sec: u32, burst: u32) -> ConnLimiter {
        let rates =
            Rates { conn_per_sec: per_sec, conn_burst: burst, user_per_sec: 0, user_burst: 0, abuse_after: TEN_SECS };
        Limits::new(rates).connect("u")
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_burst_of_any_size_is_refused_for_its_excess_but_is_not_abuse() {
        let mut c = one_connection(100, 200);
        let t0 = Instant::now();
        let verdicts: Vec<Verdict> = (0..5_000).map(|_| c.check(t0)).collect();
        assert!(verdicts[..200].iter().all(|v| *v == Verdict::Allow));
        assert!(verdicts[200..].iter().all(|v| matches!(v, Verdict::Refuse(_))), "no abuse within one burst");
    }

    #[test]
    fn a_burst_followed_by_a_client_that_waits_as_told_is_never_closed() {
        let mut c = one_connection(100, 200);
        let t0 = Instant::now();
        let mut backlog = 500;
        // The whole backlog is written at once (the SDK reads no reply until then) ...
        let mut now = t0;
        let mut wait = Duration::ZERO;
        for _ in 0..500 {
            match c.check(now) {
                Verdict::Allow => backlog -= 1,
                Verdict::Refuse(w) => wait = w,
                Verdict::Abuse => panic!("a burst is not abuse"),
            }
            now += Duration::from_micros(20);
        }
        // ... then it resends one at a time, pausing after a refusal for as long as told,
        // for far longer than the abuse period.
        now += wait;
        let end = t0 + 3 * TEN_SECS;
        while now < end {
            match c.check(now) {
                Verdict::Allow => {
                    backlog = (backlog - 1).max(0);
                    now += Duration::from_micros(300);
                }
                Verdict::Refuse(w) => now += w.max(ms(1)),
                Verdict::Abuse => panic!("closed at {:?} though it waited as told", now - t0),
            }
        }
        assert_eq!(backlog, 0, "the backlog went through at the rate");
    }

    #[test]
    fn the_wait_told_is_whole_milliseconds_and_enough() {
        let mut c = one_connection(3, 1);
        let t0 = Instant::now();
        assert_eq!(c.check(t0), Verdict::Allow);
        let Verdict::Refuse(wait) = c.check(t0) else { panic!("refused") };
        assert_eq!(wait, ms(334), "a third of a second, rounded up");
        assert_eq!(c.check(t0 + wait), Verdict::Allow);
    }

    #[test]
    fn a_flooder_that_never_pauses_is_closed_once_refused_for_the_whole_period() {
        let mut c = one_connection(100, 200);
        let t0 = Instant::now();
        let mut now = t0;
        let mut accepted = 0;
        let closed_at = loop {
            match c.check(now) {
                Verdict::Allow => accepted += 1,
                Verdict::Refuse(_) => {}
                Verdict::Abuse => break now,
            }
            assert!(now < t0 + 2 * TEN_SECS, "never closed");
            // A command every millisecond: ten times the rate, yet it gets a token each
            // time one refills.
            now += ms(1);
        };
        // The burst of 200 runs out after about 220 ms; the period counts from there.
        assert!(closed_at >= t0 + ms(200) + TEN_SECS, "closed after {:?}", closed_at - t0);
        assert!(closed_at <= t0 + ms(250) + TEN_SECS, "closed after {:?}", closed_at - t0);
        assert!(accepted > 1_000, "tokens that refill still go to it: {accepted}");
    }

    #[test]
    fn a_run_of_refusals_ends_when_the_client_gets_back_under_its_rate() {
        let mut c = one_connection(10, 1);
        let t0 = Instant::now();
        assert_eq!(c.check(t0), Verdict::Allow);
        // Refused without pause for most of the period ...
        let mut now = t0;
        while now < t0 + ms(9_000) {
            now += ms(1);
            assert_ne!(c.check(now), Verdict::Abuse);
        }
        // ... then commands at under the rate: never refused, so the run is over.
        for _ in 0..50 {
            now += ms(150);
            assert_eq!(c.check(now), Verdict::Allow);
        }
        // A new run starts from its own first refusal.
        now += ms(150);
        assert_eq!(c.check(now), Verdict::Allow);
        assert!(matches!(c.check(now), Verdict::Refuse(_)), "a fresh refusal, not abuse");
    }

    #[test]
    fn a_pause_shorter_than_the_wait_told_does_not_end_the_run() {
        let mut c = one_connection(1, 1);
        let t0 = Instant::now();
        assert_eq!(c.check(t0), Verdict::Allow);
        let mut now = t0;
        let verdict = loop {
            now += ms(400);
            match c.check(now) {
                Verdict::Abuse => break now,
                _ => assert!(now < t0 + 2 * TEN_SECS, "never closed"),
            }
        };
        // Told to wait up to a second, it came back every 400 ms: that is not pausing.
        assert!(verdict >= t0 + TEN_SECS, "{:?}", verdict - t0);
    }

    #[test]
    fn refusing_without_pause_becomes_abuse_after_the_period_not_a_count() {
        let rates = Rates { conn_per_sec: 1, conn_burst: 1, user_per_sec: 0, user_burst: 0, abuse_after: ms(2_000) };
        let mut c = Limits::new(rates).connect("u");
        let t0 = Instant::now();
        assert_eq!(c.check(t0), Verdict::Allow);
        for _ in 0..10_000 {
            assert!(
                matches!(c.check(t0 + ms(10)), Verdict::Refuse(_)),
                "ten thousand refusals in a row are no abuse yet"
            );
        }
        let mut now = t0 + ms(10);
        while now < t0 + ms(2_000) {
            now += ms(10);
            assert_ne!(c.check(now), Verdict::Abuse, "at {:?}", now - t0);
        }
        now += ms(10);
        assert_eq!(c.check(now), Verdict::Abuse);
    }
}
