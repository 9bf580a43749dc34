//! The webhook outbox and deliveries (migration 0011): claimed with `FOR UPDATE SKIP
//! LOCKED` and leases, so any number of replicas dispatch without sending one twice at
//! once, and per member and room in seq order.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::Store;
use crate::error::ServiceError;

/// A stored message waiting to become deliveries, with who may get one.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Queued {
    pub message_id: i64,
    pub room_id: i64,
    pub seq: i64,
    /// Every member but the sender.
    pub members: Vec<String>,
}

/// One delivery to send now.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Due {
    pub id: String,
    pub body: String,
    pub attempts: i32,
    pub retry_until: DateTime<Utc>,
}

/// A delivery that ran out of retries.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Dead {
    pub id: String,
    pub user_id: String,
    pub room_id: i64,
    pub seq: i64,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// A delivery to create: one member who was offline, and the body to send them.
#[derive(Debug, Clone)]
pub struct NewDelivery {
    pub id: String,
    pub message_id: i64,
    pub room_id: i64,
    pub seq: i64,
    pub user_id: String,
    pub body: String,
}

impl Store {
    /// Claims up to `limit` outbox rows and turns them into deliveries: `expand` is given
    /// the queued messages and returns the deliveries to create (it decides who was
    /// offline). All in one transaction: a crash before the commit leaves the outbox rows
    /// for the next claim, one after leaves the deliveries.
    pub async fn expand_outbox<F, Fut, E>(&self, limit: i64, retry_for: Duration, expand: F) -> Result<usize, E>
    where
        F: FnOnce(Vec<Queued>) -> Fut,
        Fut: std::future::Future<Output = Result<Vec<NewDelivery>, E>>,
        E: From<ServiceError>,
    {
        let sql = |e: sqlx::Error| E::from(ServiceError::from(e));
        let mut tx = self.pool.begin().await.map_err(sql)?;
        let queued: Vec<Queued> = sqlx::query_as(
            "WITH claimed AS ( \
                 SELECT message_id FROM webhook_outbox ORDER BY message_id LIMIT $1 FOR UPDATE SKIP LOCKED) \
             SELECT m.id AS message_id, m.room_id, m.seq, \
                    coalesce(array_agg(rm.user_id ORDER BY rm.user_id) FILTER (WHERE rm.user_id IS NOT NULL), '{}') AS members \
             FROM claimed c JOIN messages m ON m.id = c.message_id \
             LEFT JOIN room_members rm ON rm.room_id = m.room_id AND rm.user_id <> m.sender_id \
             GROUP BY m.id ORDER BY m.id",
        )
        .bind(limit)
        .fetch_all(&mut *tx)
        .await
        .map_err(sql)?;
        if queued.is_empty() {
            return Ok(0);
        }
        let claimed: Vec<i64> = queued.iter().map(|q| q.message_id).collect();
        let deliveries = expand(queued).await?;
        let column = |f: fn(&NewDelivery) -> String| deliveries.iter().map(f).collect::<Vec<String>>();
        let ints = |f: fn(&NewDelivery) -> i64| deliveries.iter().map(f).collect::<Vec<i64>>();
        sqlx::query(
            "INSERT INTO webhook_deliveries (id, message_id, room_id, seq, user_id, body, retry_until) \
             SELECT d.id, d.message_id, d.room_id, d.seq, d.user_id, d.body, now() + $7 * interval '1 second' \
             FROM unnest($1::text[], $2::bigint[], $3::bigint[], $4::bigint[], $5::text[], $6::text[]) \
                 AS d (id, message_id, room_id, seq, user_id, body) \
             ON CONFLICT (message_id, user_id) DO NOTHING",
        )
        .bind(column(|d| d.id.clone()))
        .bind(ints(|d| d.message_id))
        .bind(ints(|d| d.room_id))
        .bind(ints(|d| d.seq))
        .bind(column(|d| d.user_id.clone()))
        .bind(column(|d| d.body.clone()))
        .bind(retry_for.as_secs_f64())
        .execute(&mut *tx)
        .await
        .map_err(sql)?;
        sqlx::query("DELETE FROM webhook_outbox WHERE message_id = ANY($1)")
            .bind(&claimed)
            .execute(&mut *tx)
            .await
            .map_err(sql)?;
        tx.commit().await.map_err(sql)?;
        Ok(deliveries.len())
    }

    /// Leases up to `limit` deliveries that are due and have no earlier pending one for
    /// their member and room, for `lease`; each attempt counts from here.
    pub async fn claim_due(&self, limit: i64, lease: Duration) -> Result<Vec<Due>, ServiceError> {
        Ok(sqlx::query_as(
            "UPDATE webhook_deliveries d \
             SET leased_until = now() + $2 * interval '1 millisecond', attempts = d.attempts + 1 \
             WHERE d.id IN ( \
                 SELECT c.id FROM webhook_deliveries c \
                 WHERE c.state = 'pending' AND c.next_attempt_at <= now() \
                   AND (c.leased_until IS NULL OR c.leased_until < now()) \
                   AND NOT EXISTS (SELECT 1 FROM webhook_deliveries e WHERE e.state = 'pending' \
                                   AND e.user_id = c.user_id AND e.room_id = c.room_id AND e.seq < c.seq) \
                 ORDER BY c.next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED) \
             RETURNING d.id, d.body, d.attempts, d.retry_until",
        )
        .bind(limit)
        .bind(lease.as_millis() as f64)
        .fetch_all(&self.pool)
        .await?)
    }

    /// A 2xx: the delivery is done.
    pub async fn delivered(&self, id: &str) -> Result<(), ServiceError> {
        sqlx::query("DELETE FROM webhook_deliveries WHERE id = $1").bind(id).execute(&self.pool).await?;
        Ok(())
    }

    /// A failed attempt: tried again after `retry_in`, or dead once past its retry time.
    /// True when it died.
    pub async fn failed(&self, id: &str, error: &str, retry_in: Duration) -> Result<bool, ServiceError> {
        let dead: Option<bool> = sqlx::query_scalar(
            "UPDATE webhook_deliveries SET leased_until = NULL, last_error = left($2, 500), \
                 state = CASE WHEN now() + $3 * interval '1 millisecond' > retry_until THEN 'dead' ELSE 'pending' END, \
                 next_attempt_at = now() + $3 * interval '1 millisecond' \
             WHERE id = $1 RETURNING state = 'dead'",
        )
        .bind(id)
        .bind(error)
        .bind(retry_in.as_millis() as f64)
        .fetch_optional(&self.pool)
        .await?;
        Ok(dead.unwrap_or(false))
    }

    /// Seconds since the oldest message still waiting for its webhooks was stored (0
    /// when none waits): the alert's measure of a stuck dispatcher.
    pub async fn oldest_pending_webhook(&self) -> Result<f64, ServiceError> {
        Ok(sqlx::query_scalar(
            "SELECT coalesce(extract(epoch FROM now() - least( \
                 (SELECT min(created_at) FROM webhook_outbox), \
                 (SELECT min(created_at) FROM webhook_deliveries WHERE state = 'pending')))::float8, 0)",
        )
        .fetch_one(&self.pool)
        .await?)
    }

    /// Dead deliveries, oldest first, at most `limit`.
    pub async fn dead_webhooks(&self, limit: i64) -> Result<Vec<Dead>, ServiceError> {
        Ok(sqlx::query_as(
            "SELECT id, user_id, room_id, seq, attempts, last_error, created_at FROM webhook_deliveries \
             WHERE state = 'dead' ORDER BY created_at, id LIMIT $1",
        )
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }

    /// Sends dead deliveries again (`id`, or all of them) with a fresh retry window; how
    /// many.
    pub async fn replay_webhooks(&self, id: Option<&str>, retry_for: Duration) -> Result<u64, ServiceError> {
        let done = sqlx::query(
            "UPDATE webhook_deliveries SET state = 'pending', attempts = 0, next_attempt_at = now(), \
                 leased_until = NULL, retry_until = now() + $2 * interval '1 second' \
             WHERE state = 'dead' AND ($1::text IS NULL OR id = $1)",
        )
        .bind(id)
        .bind(retry_for.as_secs_f64())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }
}
