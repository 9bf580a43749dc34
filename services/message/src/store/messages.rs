//! Messages: history, edits, deletes, reactions, reads. Sends are stored by the group
//! commit (`batch`, `commit`).

use chat_proto::v1::{Caller, Message, Reaction};

use super::{message_columns, MessageRow, Store};
use crate::error::ServiceError;

/// Which page of a room's history to read.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    pub before_seq: Option<i64>,
    pub after_seq: Option<i64>,
    pub limit: i64,
}

/// Where a message lives and who sent it.
struct MessageRef {
    room_id: i64,
    seq: i64,
    sender_id: String,
    deleted: bool,
}

impl Store {
    /// A page of history in ascending seq order, and whether more lies beyond it: older
    /// messages when reading backwards (no `after_seq`), newer ones when reading forwards.
    #[tracing::instrument(name = "db.history", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn history(
        &self,
        caller: &Caller,
        room_id: i64,
        page: Page,
    ) -> Result<(Vec<Message>, bool), ServiceError> {
        self.readable(caller, room_id).await?;
        macro_rules! page_query {
            ($order:literal) => {
                concat!(
                    "SELECT ",
                    message_columns!(),
                    " FROM messages WHERE room_id = $1 \
                     AND ($2::bigint IS NULL OR seq < $2) AND ($3::bigint IS NULL OR seq > $3) \
                     ORDER BY seq ",
                    $order,
                    " LIMIT $4"
                )
            };
        }
        let forwards = page.after_seq.is_some();
        let sql = if forwards { page_query!("ASC") } else { page_query!("DESC") };
        let mut rows: Vec<MessageRow> = sqlx::query_as(sql)
            .bind(room_id)
            .bind(page.before_seq)
            .bind(page.after_seq)
            .bind(page.limit + 1)
            .fetch_all(&self.pool)
            .await?;
        let has_more = super::trim_page(&mut rows, page.limit as usize);
        if !forwards {
            rows.reverse();
        }
        Ok((self.decorate(rows).await?, has_more))
    }

    /// Messages with `after < seq < before`, ascending, at most `limit` (internal).
    #[tracing::instrument(name = "db.room_messages", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn room_messages(
        &self,
        room_id: i64,
        after: i64,
        before: i64,
        limit: i64,
    ) -> Result<Vec<Message>, ServiceError> {
        const SQL: &str = concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE room_id = $1 AND seq > $2 AND seq < $3 ORDER BY seq LIMIT $4"
        );
        let rows: Vec<MessageRow> =
            sqlx::query_as(SQL).bind(room_id).bind(after).bind(before).bind(limit).fetch_all(&self.pool).await?;
        self.decorate(rows).await
    }

    /// Messages with their reactions and attachments filled in.
    pub(super) async fn decorate(&self, rows: Vec<MessageRow>) -> Result<Vec<Message>, ServiceError> {
        let mut messages: Vec<Message> = rows.into_iter().map(Message::from).collect();
        let mut refs: Vec<&mut Message> = messages.iter_mut().collect();
        self.attach_reactions(&mut refs).await?;
        self.attach_files(&mut refs).await?;
        Ok(messages)
    }

    /// Fills in the reactions of these messages with one query.
    pub(super) async fn attach_reactions(&self, messages: &mut [&mut Message]) -> Result<(), ServiceError> {
        let ids: Vec<i64> = messages.iter().filter(|m| !m.deleted).filter_map(|m| m.id.parse().ok()).collect();
        if ids.is_empty() {
            return Ok(());
        }
        let rows: Vec<(i64, String, Vec<String>)> = sqlx::query_as(
            "SELECT message_id, emoji, array_agg(user_id ORDER BY created_at, user_id) FROM reactions \
             WHERE message_id = ANY($1) GROUP BY message_id, emoji ORDER BY message_id, min(created_at)",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        for (message_id, emoji, user_ids) in rows {
            let id = message_id.to_string();
            if let Some(m) = messages.iter_mut().find(|m| m.id == id) {
                m.reactions.push(Reaction { emoji, user_ids });
            }
        }
        Ok(())
    }

    /// Looks up a message and the caller's standing in its room (not yet checked:
    /// admins moderate rooms they cannot read).
    async fn message_ref(
        &self,
        caller: &Caller,
        message_id: i64,
    ) -> Result<(MessageRef, super::Standing), ServiceError> {
        let row: Option<(i64, i64, String, bool)> =
            sqlx::query_as("SELECT room_id, seq, sender_id, deleted_at IS NOT NULL FROM messages WHERE id = $1")
                .bind(message_id)
                .fetch_optional(&self.pool)
                .await?;
        let (room_id, seq, sender_id, deleted) = row.ok_or(ServiceError::NotFound("message"))?;
        let standing = self.standing(caller, room_id).await?;
        Ok((MessageRef { room_id, seq, sender_id, deleted }, standing))
    }

    /// Replaces a message's text; only its sender may, and not once it is deleted.
    #[tracing::instrument(name = "db.edit_message", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn edit_message(&self, caller: &Caller, message_id: i64, text: &str) -> Result<Message, ServiceError> {
        let (msg, standing) = self.message_ref(caller, message_id).await?;
        if msg.sender_id != caller.user_id || !standing.can_read() {
            return Err(ServiceError::Forbidden("only the sender may edit a message"));
        }
        if msg.deleted {
            return Err(ServiceError::Conflict("the message was deleted".into()));
        }
        const SQL: &str = concat!(
            "UPDATE messages SET body = $2, edited_at = now() WHERE id = $1 AND deleted_at IS NULL RETURNING ",
            message_columns!()
        );
        let row: MessageRow = sqlx::query_as(SQL)
            .bind(message_id)
            .bind(text)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| ServiceError::Conflict("the message was deleted".into()))?;
        let mut messages = self.decorate(vec![row]).await?;
        messages.pop().ok_or(ServiceError::NotFound("message"))
    }

    /// Soft-deletes a message (its sender, the room owner, or an admin). Returns the
    /// room, the seq, and whether it was deleted just now.
    #[tracing::instrument(name = "db.delete_message", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn delete_message(&self, caller: &Caller, message_id: i64) -> Result<(i64, i64, bool), ServiceError> {
        let (msg, standing) = self.message_ref(caller, message_id).await?;
        let own = msg.sender_id == caller.user_id && standing.can_read();
        if !own && !standing.can_manage() {
            return Err(ServiceError::Forbidden("only the sender, the room owner or an admin may delete a message"));
        }
        let changed = sqlx::query("UPDATE messages SET deleted_at = now() WHERE id = $1 AND deleted_at IS NULL")
            .bind(message_id)
            .execute(&self.pool)
            .await?
            .rows_affected()
            > 0;
        Ok((msg.room_id, msg.seq, changed))
    }

    /// Adds or removes the caller's reaction. Returns the room and whether anything changed.
    #[tracing::instrument(name = "db.react", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn react(
        &self,
        caller: &Caller,
        message_id: i64,
        emoji: &str,
        add: bool,
    ) -> Result<(i64, bool), ServiceError> {
        let (msg, standing) = self.message_ref(caller, message_id).await?;
        if !standing.can_read() {
            return Err(ServiceError::Forbidden("not a member of this room"));
        }
        if msg.deleted && add {
            return Err(ServiceError::Conflict("the message was deleted".into()));
        }
        let query = if add {
            "INSERT INTO reactions (message_id, emoji, user_id) VALUES ($1, $2, $3) ON CONFLICT DO NOTHING"
        } else {
            "DELETE FROM reactions WHERE message_id = $1 AND emoji = $2 AND user_id = $3"
        };
        let changed = sqlx::query(query)
            .bind(message_id)
            .bind(emoji)
            .bind(&caller.user_id)
            .execute(&self.pool)
            .await?
            .rows_affected()
            > 0;
        Ok((msg.room_id, changed))
    }

    /// Moves the caller's read position to `seq` (clamped to the room's newest seq; it
    /// never moves backwards). Returns the position after the call.
    #[tracing::instrument(name = "db.mark_read", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn mark_read(&self, caller: &Caller, room_id: i64, seq: i64) -> Result<i64, ServiceError> {
        let standing = self.readable(caller, room_id).await?;
        let target = seq.min(standing.last_seq);
        if standing.role.is_none() {
            // An admin reading a support room they do not belong to: nothing to store.
            return Ok(target);
        }
        let read: i64 = sqlx::query_scalar(
            // Reading a message implies having it: delivered moves with read.
            "UPDATE room_members SET read_seq = GREATEST(read_seq, $3), delivered_seq = GREATEST(delivered_seq, $3) \
             WHERE room_id = $1 AND user_id = $2 RETURNING read_seq",
        )
        .bind(room_id)
        .bind(&caller.user_id)
        .bind(target)
        .fetch_one(&self.pool)
        .await?;
        Ok(read)
    }
}
