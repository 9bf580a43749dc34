//! Attachment metadata and access rules; the bytes go through the blob store.

use chat_proto::v1::{Attachment, Caller, Message};
use sqlx::PgConnection;

use super::Store;
use crate::error::ServiceError;

#[derive(sqlx::FromRow)]
struct Row {
    id: i64,
    name: String,
    content_type: String,
    size: i64,
}

impl From<Row> for Attachment {
    fn from(r: Row) -> Self {
        Attachment { id: r.id.to_string(), name: r.name, content_type: r.content_type, size: r.size }
    }
}

/// Links new messages to the files they carry, `(message, attachments)` with positions
/// counting from 1 in the order given, in one statement for a whole group commit. Each
/// link's file, ordered by message and position.
pub(super) async fn link(
    tx: &mut PgConnection,
    links: &[(i64, &[i64])],
) -> Result<Vec<(i64, Attachment)>, ServiceError> {
    let mut message_ids: Vec<i64> = Vec::new();
    let mut attachment_ids: Vec<i64> = Vec::new();
    let mut positions: Vec<i32> = Vec::new();
    for &(message_id, attachments) in links {
        for (position, &attachment_id) in (1..).zip(attachments) {
            message_ids.push(message_id);
            attachment_ids.push(attachment_id);
            positions.push(position);
        }
    }
    if message_ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<(i64, i64, String, String, i64)> = sqlx::query_as(
        "WITH linked AS ( \
           INSERT INTO message_attachments (message_id, attachment_id, position) \
           SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::int[]) \
           RETURNING message_id, attachment_id, position) \
         SELECT l.message_id, a.id, a.name, a.content_type, a.size FROM linked l \
         JOIN attachments a ON a.id = l.attachment_id ORDER BY l.message_id, l.position",
    )
    .bind(&message_ids)
    .bind(&attachment_ids)
    .bind(&positions)
    .fetch_all(tx)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(message_id, id, name, content_type, size)| (message_id, Row { id, name, content_type, size }.into()))
        .collect())
}

impl Store {
    /// Stores an upload: metadata row, then bytes in the blob store.
    #[tracing::instrument(name = "db.create_attachment", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn create_attachment(
        &self,
        caller: &Caller,
        name: &str,
        content_type: &str,
        data: &[u8],
    ) -> Result<Attachment, ServiceError> {
        let row: Row = sqlx::query_as(
            "INSERT INTO attachments (uploader_id, name, content_type, size) VALUES ($1, $2, $3, $4) \
             RETURNING id, name, content_type, size",
        )
        .bind(&caller.user_id)
        .bind(name)
        .bind(content_type)
        .bind(data.len() as i64)
        .fetch_one(&self.pool)
        .await?;
        if let Err(err) = self.blobs.put(row.id, data).await {
            // No metadata without bytes.
            let _ = sqlx::query("DELETE FROM attachments WHERE id = $1").bind(row.id).execute(&self.pool).await;
            return Err(err);
        }
        Ok(row.into())
    }

    /// An attachment and its bytes, for its uploader or for a member of a room with a
    /// message carrying it (admins too, in support rooms).
    #[tracing::instrument(name = "db.attachment", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn attachment(&self, caller: &Caller, id: i64) -> Result<(Attachment, Vec<u8>), ServiceError> {
        let row: Option<(i64, String, String, i64, String, bool)> = sqlx::query_as(
            "SELECT a.id, a.name, a.content_type, a.size, a.uploader_id, EXISTS ( \
               SELECT 1 FROM message_attachments ma JOIN messages m ON m.id = ma.message_id \
               JOIN rooms r ON r.id = m.room_id \
               LEFT JOIN room_members rm ON rm.room_id = m.room_id AND rm.user_id = $2 \
               WHERE ma.attachment_id = a.id AND (rm.user_id IS NOT NULL OR (r.kind = 'support' AND $3))) \
             FROM attachments a WHERE a.id = $1",
        )
        .bind(id)
        .bind(&caller.user_id)
        .bind(caller.admin)
        .fetch_optional(&self.pool)
        .await?;
        let (id, name, content_type, size, uploader, shared) = row.ok_or(ServiceError::NotFound("attachment"))?;
        if uploader != caller.user_id && !shared {
            return Err(ServiceError::Forbidden("not the uploader, nor a member of a room where it was shared"));
        }
        let data = self.blobs.get(id).await?.ok_or(ServiceError::NotFound("attachment"))?;
        Ok((Row { id, name, content_type, size }.into(), data))
    }

    /// Checks that every id names an attachment the sender uploaded.
    #[tracing::instrument(name = "db.own_attachments", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn own_attachments(&self, sender: &str, ids: &[i64]) -> Result<(), ServiceError> {
        if ids.is_empty() {
            return Ok(());
        }
        let found: i64 = sqlx::query_scalar("SELECT count(*) FROM attachments WHERE id = ANY($1) AND uploader_id = $2")
            .bind(ids)
            .bind(sender)
            .fetch_one(&self.pool)
            .await?;
        if found != ids.len() as i64 {
            return Err(ServiceError::InvalidArgument("attachments must name files you uploaded".into()));
        }
        Ok(())
    }

    /// Fills in the attachments of these messages with one query.
    pub(super) async fn attach_files(&self, messages: &mut [&mut Message]) -> Result<(), ServiceError> {
        let ids: Vec<i64> = messages.iter().filter(|m| !m.deleted).filter_map(|m| m.id.parse().ok()).collect();
        if ids.is_empty() {
            return Ok(());
        }
        let rows: Vec<(i64, i64, String, String, i64)> = sqlx::query_as(
            "SELECT ma.message_id, a.id, a.name, a.content_type, a.size FROM message_attachments ma \
             JOIN attachments a ON a.id = ma.attachment_id WHERE ma.message_id = ANY($1) \
             ORDER BY ma.message_id, ma.position",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        for (message_id, id, name, content_type, size) in rows {
            let message_id = message_id.to_string();
            if let Some(m) = messages.iter_mut().find(|m| m.id == message_id) {
                m.attachments.push(Row { id, name, content_type, size }.into());
            }
        }
        Ok(())
    }
}
