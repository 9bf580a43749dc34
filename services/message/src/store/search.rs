//! Full-text search in the rooms a caller belongs to (migration 0008: a generated
//! `tsvector` column, GIN-indexed, in the 'simple' configuration).

use chat_proto::v1::Caller;

use super::{message_columns, MessageRow, Store};
use crate::error::ServiceError;

/// One search: the query as a user typed it, an optional room, and the page.
#[derive(Debug, Clone)]
pub struct SearchQuery {
    pub q: String,
    pub room_id: Option<i64>,
    /// Only messages with a smaller id (the last result's, to page on).
    pub before_id: Option<i64>,
    pub limit: i64,
}

/// A match and the text around it.
#[derive(Debug, Clone)]
pub struct Hit {
    pub message: chat_proto::v1::Message,
    pub snippet: String,
}

#[derive(sqlx::FromRow)]
struct HitRow {
    #[sqlx(flatten)]
    message: MessageRow,
    snippet: String,
}

impl Store {
    /// Messages matching `query.q` (words, "phrases", -exclusions: websearch syntax),
    /// newest first, in the caller's rooms or the one room named; deleted ones never.
    #[tracing::instrument(name = "db.search", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn search(&self, caller: &Caller, query: &SearchQuery) -> Result<(Vec<Hit>, bool), ServiceError> {
        let rooms: Vec<i64> = match query.room_id {
            Some(room_id) => {
                self.readable(caller, room_id).await?;
                vec![room_id]
            }
            None => {
                sqlx::query_scalar("SELECT room_id FROM room_members WHERE user_id = $1")
                    .bind(&caller.user_id)
                    .fetch_all(&self.pool)
                    .await?
            }
        };
        // The rooms as a list, planned for each query (an unnamed statement): how common
        // the word is decides the plan. A rare word is best found through the GIN index,
        // a common one by walking the newest messages until the page is full; a prepared
        // statement's generic plan, chosen after five runs, does one of them for every
        // word and took seconds for common ones at 1M messages (docs/benchmarks.md).
        const SQL: &str = concat!(
            "WITH q AS (SELECT websearch_to_tsquery('simple', $1) AS q) SELECT ",
            message_columns!(),
            ", ts_headline('simple', body, q.q, \
                'StartSel=\"\", StopSel=\"\", MaxWords=24, MinWords=8, MaxFragments=1, FragmentDelimiter=\" … \"') AS snippet \
             FROM messages, q \
             WHERE search @@ q.q AND deleted_at IS NULL AND room_id = ANY($2) \
               AND ($3::bigint IS NULL OR id < $3) \
             ORDER BY id DESC LIMIT $4"
        );
        let mut rows: Vec<HitRow> = sqlx::query_as(SQL)
            .persistent(false)
            .bind(&query.q)
            .bind(&rooms)
            .bind(query.before_id)
            .bind(query.limit + 1)
            .fetch_all(&self.pool)
            .await?;
        let has_more = super::trim_page(&mut rows, query.limit as usize);
        let (rows, snippets): (Vec<MessageRow>, Vec<String>) = rows.into_iter().map(|r| (r.message, r.snippet)).unzip();
        let messages = self.decorate(rows).await?;
        let hits = messages.into_iter().zip(snippets).map(|(message, snippet)| Hit { message, snippet }).collect();
        Ok((hits, has_more))
    }
}
