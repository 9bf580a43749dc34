//! Notifications: stored per user, listed newest first, marked read.

use chat_proto::v1::Notification;
use chrono::{DateTime, Utc};

use super::Store;
use crate::error::ServiceError;

#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    user_id: String,
    title: String,
    body: String,
    data: String,
    created_at: DateTime<Utc>,
    read: bool,
}

impl From<Row> for Notification {
    fn from(r: Row) -> Self {
        Notification {
            id: r.id.to_string(),
            user_id: r.user_id,
            title: r.title,
            body: r.body,
            data_json: r.data,
            created_at_ms: r.created_at.timestamp_millis(),
            read: r.read,
        }
    }
}

impl Store {
    /// Stores one notification per user; `data_json` must be valid JSON.
    #[tracing::instrument(name = "db.create_notifications", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn create_notifications(
        &self,
        user_ids: &[String],
        title: &str,
        body: &str,
        data_json: &str,
    ) -> Result<Vec<Notification>, ServiceError> {
        let rows: Vec<Row> = sqlx::query_as(
            "INSERT INTO notifications (user_id, title, body, data) \
             SELECT u, $2, $3, $4::jsonb FROM UNNEST($1::text[]) AS u \
             RETURNING id, user_id, title, body, data::text AS data, created_at, read_at IS NOT NULL AS read",
        )
        .bind(user_ids)
        .bind(title)
        .bind(body)
        .bind(data_json)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.into_iter().map(Notification::from).collect())
    }

    /// A page of a user's notifications, newest first; whether older ones exist; and
    /// how many are unread in all.
    #[tracing::instrument(name = "db.list_notifications", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn list_notifications(
        &self,
        user_id: &str,
        before_id: Option<i64>,
        limit: i64,
        unread_only: bool,
    ) -> Result<(Vec<Notification>, bool, i64), ServiceError> {
        let mut rows: Vec<Row> = sqlx::query_as(
            "SELECT id, user_id, title, body, data::text AS data, created_at, read_at IS NOT NULL AS read \
             FROM notifications WHERE user_id = $1 AND ($2::bigint IS NULL OR id < $2) \
             AND (NOT $3 OR read_at IS NULL) ORDER BY id DESC LIMIT $4",
        )
        .bind(user_id)
        .bind(before_id)
        .bind(unread_only)
        .bind(limit + 1)
        .fetch_all(&self.pool)
        .await?;
        let has_more = super::trim_page(&mut rows, limit as usize);
        let unread: i64 =
            sqlx::query_scalar("SELECT count(*) FROM notifications WHERE user_id = $1 AND read_at IS NULL")
                .bind(user_id)
                .fetch_one(&self.pool)
                .await?;
        Ok((rows.into_iter().map(Notification::from).collect(), has_more, unread))
    }

    /// Marks the user's notifications read: those named, or all. Others' ids are ignored.
    #[tracing::instrument(name = "db.mark_notifications_read", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn mark_notifications_read(&self, user_id: &str, ids: &[i64], all: bool) -> Result<i64, ServiceError> {
        let done = sqlx::query(
            "UPDATE notifications SET read_at = now() WHERE user_id = $1 AND read_at IS NULL \
             AND ($3 OR id = ANY($2))",
        )
        .bind(user_id)
        .bind(ids)
        .bind(all)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() as i64)
    }
}
