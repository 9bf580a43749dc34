//! Delivery ticks: each member's delivered seq beside its read seq (migration 0009).

use chat_proto::v1::{Caller, Delivery, MemberReceipt};

use super::Store;
use crate::error::ServiceError;

impl Store {
    /// Moves each member's delivered seq forward to the seq given, at most the room's
    /// newest; lower seqs, non-members and unknown rooms change nothing. The ones that
    /// moved, with the seq stored. One statement for the whole batch: a gateway
    /// coalesces its clients' `received`s into one call a second.
    #[tracing::instrument(name = "db.mark_delivered", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn mark_delivered(&self, deliveries: &[(i64, String, i64)]) -> Result<Vec<Delivery>, ServiceError> {
        let rooms: Vec<i64> = deliveries.iter().map(|d| d.0).collect();
        let users: Vec<&str> = deliveries.iter().map(|d| d.1.as_str()).collect();
        let seqs: Vec<i64> = deliveries.iter().map(|d| d.2).collect();
        // Rows are locked in (room, user) order, so two gateways' batches over the same
        // members wait for each other instead of deadlocking.
        let moved: Vec<(i64, String, i64)> = sqlx::query_as(
            "WITH wanted AS ( \
                 SELECT m.room_id, m.user_id, LEAST(d.seq, r.last_seq) AS seq \
                 FROM unnest($1::bigint[], $2::text[], $3::bigint[]) AS d (room_id, user_id, seq) \
                 JOIN rooms r ON r.id = d.room_id \
                 JOIN room_members m ON m.room_id = d.room_id AND m.user_id = d.user_id \
                 WHERE m.delivered_seq < LEAST(d.seq, r.last_seq) \
                 ORDER BY m.room_id, m.user_id \
                 FOR UPDATE OF m) \
             UPDATE room_members m SET delivered_seq = wanted.seq FROM wanted \
             WHERE m.room_id = wanted.room_id AND m.user_id = wanted.user_id AND m.delivered_seq < wanted.seq \
             RETURNING m.room_id, m.user_id, m.delivered_seq",
        )
        .bind(&rooms)
        .bind(&users)
        .bind(&seqs)
        .fetch_all(&self.pool)
        .await?;
        Ok(moved
            .into_iter()
            .map(|(room_id, user_id, seq)| Delivery { room_id: room_id.to_string(), user_id, seq })
            .collect())
    }

    /// Each member's delivered and read seqs, by user id; delivered is never below read.
    #[tracing::instrument(name = "db.receipts", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn receipts(&self, caller: &Caller, room_id: i64) -> Result<Vec<MemberReceipt>, ServiceError> {
        self.readable(caller, room_id).await?;
        let rows: Vec<(String, i64, i64)> = sqlx::query_as(
            "SELECT user_id, GREATEST(delivered_seq, read_seq), read_seq FROM room_members \
             WHERE room_id = $1 ORDER BY user_id",
        )
        .bind(room_id)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows
            .into_iter()
            .map(|(user_id, delivered_seq, read_seq)| MemberReceipt { user_id, delivered_seq, read_seq })
            .collect())
    }
}
