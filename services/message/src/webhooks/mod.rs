//! Webhooks for offline members: when a message is stored, each member with no live
//! connection anywhere gets a signed `POST` to `WEBHOOK_URL` (the app backend then sends
//! the mobile push). The outbox row is written with the message (migration 0011); this
//! dispatcher, in every replica, turns it into deliveries and sends them, at least once,
//! with the same `webhook-id` on every retry, per member and room in seq order.

mod signature;

use std::time::Duration;

use chat_common::message_json::MessageJson;
use fred::prelude::{Client, KeysInterface};
use rand::Rng;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

pub use signature::{Secret, SecretError};

use crate::error::ServiceError;
use crate::metrics::Metrics;
use crate::store::webhooks::{Due, NewDelivery, Queued};
use crate::store::Store;

/// Outbox rows turned into deliveries per round, and deliveries sent per round.
const BATCH: i64 = 64;

/// The longest wait between two attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(3600);

/// Why a round of the dispatcher stopped short; what it did not do waits for the next.
#[derive(Debug, thiserror::Error)]
pub enum DispatchError {
    #[error(transparent)]
    Store(#[from] ServiceError),
    #[error("who is online is unknown (Redis): {0}")]
    Redis(#[from] fred::error::Error),
}

/// Where and how webhooks are sent.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub url: reqwest::Url,
    pub secret: Secret,
    /// How long a delivery is retried before it is marked dead.
    pub retry_for: Duration,
    /// The first retry's delay; each later one doubles it (with jitter), up to an hour.
    pub retry_base: Duration,
    /// One attempt's limit, connection included.
    pub timeout: Duration,
    /// How often the outbox and the due deliveries are looked at.
    pub poll: Duration,
    /// The presence keys' prefix (REDIS_CHANNEL_PREFIX).
    pub prefix: String,
}

/// The dispatcher of one replica.
pub struct Dispatcher {
    config: WebhookConfig,
    store: Store,
    redis: Client,
    http: reqwest::Client,
    metrics: Metrics,
}

impl Dispatcher {
    pub fn new(config: WebhookConfig, store: Store, redis: Client, metrics: Metrics) -> Result<Self, reqwest::Error> {
        // reqwest's TLS is built without a crypto provider of its own: ours (ring), once.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .pool_idle_timeout(Duration::from_secs(90))
            .user_agent(concat!("chat-message/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self { config, store, redis, http, metrics })
    }

    /// Every `poll` until `stop`: turns new outbox rows into deliveries, sends the due
    /// ones, and measures the oldest still waiting. Errors are logged; the rows wait for
    /// the next round.
    pub async fn run(self, stop: CancellationToken) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(self.config.poll) => {}
                _ = stop.cancelled() => return,
            }
            if let Err(err) = self.expand().await {
                tracing::warn!(%err, "webhook outbox not expanded; retrying");
            }
            if let Err(err) = self.send_due(&stop).await {
                tracing::warn!(%err, "webhook deliveries not claimed; retrying");
            }
            match self.store.oldest_pending_webhook().await {
                Ok(age) => {
                    self.metrics.webhook_oldest_pending.set(age);
                }
                Err(err) => tracing::warn!(%err, "oldest pending webhook not measured"),
            }
        }
    }

    /// Outbox rows to deliveries, one per member who has no connection anywhere now.
    async fn expand(&self) -> Result<(), DispatchError> {
        self.store.expand_outbox(BATCH, self.config.retry_for, |queued| self.deliveries(queued)).await?;
        Ok(())
    }

    async fn deliveries(&self, queued: Vec<Queued>) -> Result<Vec<NewDelivery>, DispatchError> {
        let mut out = Vec::new();
        for q in queued {
            let Some(message) = self.store.message(q.message_id).await? else { continue };
            for (user, online) in self.online(&q.members).await? {
                if online {
                    continue;
                }
                let body = serde_json::json!({
                    "type": "message.offline",
                    "user_id": user,
                    "room": q.room_id.to_string(),
                    "message": MessageJson(&message),
                })
                .to_string();
                out.push(NewDelivery {
                    id: delivery_id(q.message_id, user),
                    message_id: q.message_id,
                    room_id: q.room_id,
                    seq: q.seq,
                    user_id: user.clone(),
                    body,
                });
            }
        }
        Ok(out)
    }

    /// Whether each of `users` has a connection anywhere now: one pipelined round trip
    /// per chunk. Unknown while Redis is down: the message stays in the outbox until it
    /// is back.
    async fn online<'a>(&self, users: &'a [String]) -> Result<Vec<(&'a String, bool)>, DispatchError> {
        const CHUNK: usize = 500;
        let mut out = Vec::with_capacity(users.len());
        for chunk in users.chunks(CHUNK) {
            let pipeline = self.redis.pipeline();
            for user in chunk {
                let _: () = pipeline.exists(chat_common::channels::presence_key(&self.config.prefix, user)).await?;
            }
            let flags: Vec<i64> = pipeline.all().await?;
            out.extend(chunk.iter().zip(flags.into_iter().map(|n| n > 0)));
        }
        Ok(out)
    }

    /// Sends what is due, each delivery once per round, all at once.
    async fn send_due(&self, stop: &CancellationToken) -> Result<(), ServiceError> {
        let lease = self.config.timeout * 2 + Duration::from_secs(1);
        let due = self.store.claim_due(BATCH, lease).await?;
        let sends = due.into_iter().map(|d| self.send(d));
        tokio::select! {
            _ = futures_util::future::join_all(sends) => {}
            // Unfinished ones are taken over once their lease ends.
            _ = stop.cancelled() => {}
        }
        Ok(())
    }

    async fn send(&self, due: Due) {
        let timestamp = chrono::Utc::now().timestamp();
        let signature = self.config.secret.sign(&due.id, timestamp, &due.body);
        let sent = self
            .http
            .post(self.config.url.clone())
            .header("content-type", "application/json")
            .header("webhook-id", &due.id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signature)
            .body(due.body.clone())
            .send()
            .await;
        let error = match sent {
            Ok(reply) if reply.status().is_success() => None,
            Ok(reply) => Some(format!("HTTP {}", reply.status())),
            Err(err) => Some(err.to_string()),
        };
        let outcome = match &error {
            None => self.store.delivered(&due.id).await.map(|()| {
                self.metrics.webhooks_sent.inc();
            }),
            Some(error) => {
                let retry_in = backoff(self.config.retry_base, due.attempts);
                self.store.failed(&due.id, error, retry_in).await.map(|dead| {
                    if dead {
                        tracing::warn!(id = %due.id, %error, attempts = due.attempts, "webhook dead after its retries");
                        self.metrics.webhooks_dead.inc();
                    } else {
                        self.metrics.webhook_retries.inc();
                    }
                })
            }
        };
        if let Err(err) = outcome {
            // The lease ends and the delivery is tried again: at least once.
            tracing::warn!(%err, id = %due.id, "webhook outcome not recorded");
        }
    }
}

/// The wait after `attempts` failed attempts: `base` doubled each time, capped at an
/// hour, with full jitter over its upper half, so that a receiver that comes back is not
/// hit by every delivery at once.
fn backoff(base: Duration, attempts: i32) -> Duration {
    let exponent = u32::try_from(attempts.saturating_sub(1)).unwrap_or(0).min(20);
    let ceiling = base.saturating_mul(1 << exponent).min(MAX_BACKOFF);
    ceiling.mul_f64(rand::rng().random_range(0.5..=1.0))
}

/// A delivery's `webhook-id`: the same on every retry, and header-safe whatever the user
/// id holds.
fn delivery_id(message_id: i64, user: &str) -> String {
    let digest = Sha256::digest(user.as_bytes());
    let user: String = digest.iter().take(8).map(|b| format!("{b:02x}")).collect();
    format!("msg_{message_id}_{user}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_jitter_and_stops_at_an_hour() {
        let base = Duration::from_secs(1);
        for (attempts, ceiling) in [(1, 1), (2, 2), (3, 4), (10, 512)] {
            let wait = backoff(base, attempts);
            assert!(
                wait >= Duration::from_secs(ceiling) / 2 && wait <= Duration::from_secs(ceiling),
                "{attempts}: {wait:?}"
            );
        }
        assert!(backoff(base, 40) <= MAX_BACKOFF);
    }

    #[test]
    fn delivery_ids_are_stable_and_header_safe() {
        assert_eq!(delivery_id(7, "bob\r\n"), delivery_id(7, "bob\r\n"));
        assert_ne!(delivery_id(7, "bob"), delivery_id(7, "carol"));
        assert!(delivery_id(7, "ünïcode").chars().all(|c| c.is_ascii_alphanumeric() || c == '_'));
    }
}
