//! Threads: a message and the replies to it, one level deep (migration 0010 keeps each
//! message's reply count and newest reply time).

use chat_proto::v1::{Caller, Message};

use super::{message_columns, MessageRow, Page, Store};
use crate::error::ServiceError;

impl Store {
    /// The message at `root_seq` in the room and a page of its direct replies in seq
    /// order (after `page.after_seq`), and whether more follow.
    #[tracing::instrument(name = "db.thread", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn thread(
        &self,
        caller: &Caller,
        room_id: i64,
        root_seq: i64,
        page: Page,
    ) -> Result<(Message, Vec<Message>, bool), ServiceError> {
        self.readable(caller, room_id).await?;
        const ROOT: &str = concat!("SELECT ", message_columns!(), " FROM messages WHERE room_id = $1 AND seq = $2");
        let root: MessageRow = sqlx::query_as(ROOT)
            .bind(room_id)
            .bind(root_seq)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(ServiceError::NotFound("message"))?;
        const REPLIES: &str = concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE reply_to = $1 AND ($2::bigint IS NULL OR seq > $2) ORDER BY seq LIMIT $3"
        );
        let mut rows: Vec<MessageRow> = sqlx::query_as(REPLIES)
            .bind(root.id)
            .bind(page.after_seq)
            .bind(page.limit + 1)
            .fetch_all(&self.pool)
            .await?;
        let has_more = super::trim_page(&mut rows, page.limit as usize);
        rows.insert(0, root);
        let mut messages = self.decorate(rows).await?.into_iter();
        let root = messages.next().ok_or(ServiceError::NotFound("message"))?;
        Ok((root, messages.collect(), has_more))
    }

    /// One message as members see it (the root a reply changed, to announce).
    pub async fn message(&self, message_id: i64) -> Result<Option<Message>, ServiceError> {
        const SQL: &str = concat!("SELECT ", message_columns!(), " FROM messages WHERE id = $1");
        let row: Option<MessageRow> = sqlx::query_as(SQL).bind(message_id).fetch_optional(&self.pool).await?;
        Ok(self.decorate(row.into_iter().collect()).await?.pop())
    }
}
