//! Attachment metadata, access rules, chunked uploads and the collection of uploads
//! never sent; the bytes go through the blob store.

use std::collections::HashMap;
use std::time::Duration;

use chat_proto::v1::{Attachment, Caller, Message};

use super::Store;
use crate::error::ServiceError;

/// An upload a new message carries: its id, and what clients are told of it.
#[derive(Debug, Clone)]
pub struct File {
    pub id: i64,
    pub attachment: Attachment,
}

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

impl Store {
    /// Starts an upload: a metadata row, invisible (not sendable, not downloadable) until
    /// [`Store::finish_upload`]. Its id is the upload id.
    #[tracing::instrument(name = "db.begin_upload", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn begin_upload(&self, caller: &Caller, name: &str, content_type: &str) -> Result<i64, ServiceError> {
        Ok(sqlx::query_scalar(
            "INSERT INTO attachments (uploader_id, name, content_type, size, complete) VALUES ($1, $2, $3, 0, false) \
             RETURNING id",
        )
        .bind(&caller.user_id)
        .bind(name)
        .bind(content_type)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Bytes `user` uploaded within `window` (finished or not), and how many ms until the
    /// oldest of them leaves it.
    #[tracing::instrument(name = "db.uploaded_since", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn uploaded_within(&self, user: &str, window: Duration) -> Result<(u64, u64), ServiceError> {
        let (bytes, frees_in_ms): (i64, i64) = sqlx::query_as(
            "SELECT COALESCE(sum(size), 0)::bigint, \
               COALESCE(ceil(EXTRACT(EPOCH FROM min(created_at) + make_interval(secs => $2) - now()) * 1000), 0)::bigint \
             FROM attachments WHERE uploader_id = $1 AND created_at > now() - make_interval(secs => $2)",
        )
        .bind(user)
        .bind(window.as_secs_f64())
        .fetch_one(&self.pool)
        .await?;
        Ok((bytes.max(0) as u64, frees_in_ms.max(0) as u64))
    }

    /// Appends part `part` of the caller's unfinished upload `id`, keeping the whole at
    /// most `max_bytes`; returns the bytes stored so far.
    #[tracing::instrument(name = "db.append_upload", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn append_upload(
        &self,
        caller: &Caller,
        id: i64,
        part: i32,
        data: &[u8],
        max_bytes: usize,
    ) -> Result<u64, ServiceError> {
        let size: Option<i64> = sqlx::query_scalar(
            "UPDATE attachments SET size = size + $3 \
             WHERE id = $1 AND uploader_id = $2 AND NOT complete AND size + $3 <= $4 RETURNING size",
        )
        .bind(id)
        .bind(&caller.user_id)
        .bind(data.len() as i64)
        .bind(max_bytes as i64)
        .fetch_optional(&self.pool)
        .await?;
        let size = match size {
            Some(size) => size,
            None if self.upload_exists(caller, id).await? => {
                return Err(ServiceError::InvalidArgument(format!("attachments are at most {max_bytes} bytes")));
            }
            None => return Err(ServiceError::NotFound("upload")),
        };
        // A failed part leaves the upload unfinishable in practice: the gateway aborts it,
        // and failing that the collector takes it.
        self.blobs.put_part(id, part, data).await?;
        Ok(size as u64)
    }

    async fn upload_exists(&self, caller: &Caller, id: i64) -> Result<bool, ServiceError> {
        Ok(sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM attachments WHERE id = $1 AND uploader_id = $2 AND NOT complete)",
        )
        .bind(id)
        .bind(&caller.user_id)
        .fetch_one(&self.pool)
        .await?)
    }

    /// Completes the caller's upload `id`: from now on it can be sent and downloaded.
    #[tracing::instrument(name = "db.finish_upload", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn finish_upload(&self, caller: &Caller, id: i64) -> Result<Attachment, ServiceError> {
        let row: Option<Row> = sqlx::query_as(
            "UPDATE attachments SET complete = true WHERE id = $1 AND uploader_id = $2 AND NOT complete AND size > 0 \
             RETURNING id, name, content_type, size",
        )
        .bind(id)
        .bind(&caller.user_id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok(row.into()),
            None if self.upload_exists(caller, id).await? => {
                Err(ServiceError::InvalidArgument("the upload is empty".into()))
            }
            None => Err(ServiceError::NotFound("upload")),
        }
    }

    /// Stores a whole file at once (small files: tests and tools); the gateway streams.
    pub async fn create_attachment(
        &self,
        caller: &Caller,
        name: &str,
        content_type: &str,
        data: &[u8],
    ) -> Result<Attachment, ServiceError> {
        let id = self.begin_upload(caller, name, content_type).await?;
        let stored = async {
            for (part, chunk) in (0..).zip(data.chunks(crate::blobs::PART_BYTES)) {
                self.append_upload(caller, id, part, chunk, data.len()).await?;
            }
            self.finish_upload(caller, id).await
        };
        let result = stored.await;
        if result.is_err() {
            let _ = self.abort_upload(caller, id).await;
        }
        result
    }

    /// Drops the caller's unfinished upload `id` and its parts.
    #[tracing::instrument(name = "db.abort_upload", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn abort_upload(&self, caller: &Caller, id: i64) -> Result<(), ServiceError> {
        sqlx::query("DELETE FROM attachments WHERE id = $1 AND uploader_id = $2 AND NOT complete")
            .bind(id)
            .bind(&caller.user_id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// A finished attachment's metadata, for its uploader or for a member of a room with a
    /// message carrying it (admins too, in support rooms). Its bytes: [`Store::attachment_part`].
    #[tracing::instrument(name = "db.attachment", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn attachment(&self, caller: &Caller, id: i64) -> Result<Attachment, ServiceError> {
        let row: Option<(i64, String, String, i64, String, bool)> = sqlx::query_as(
            "SELECT a.id, a.name, a.content_type, a.size, a.uploader_id, EXISTS ( \
               SELECT 1 FROM message_attachments ma JOIN messages m ON m.id = ma.message_id \
               JOIN rooms r ON r.id = m.room_id \
               LEFT JOIN room_members rm ON rm.room_id = m.room_id AND rm.user_id = $2 \
               WHERE ma.attachment_id = a.id AND (rm.user_id IS NOT NULL OR (r.kind = 'support' AND $3))) \
             FROM attachments a WHERE a.id = $1 AND a.complete",
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
        Ok(Row { id, name, content_type, size }.into())
    }

    /// Part `part` of an attachment's bytes (access checked by [`Store::attachment`]);
    /// `None` past the last.
    pub async fn attachment_part(&self, id: i64, part: i32) -> Result<Option<Vec<u8>>, ServiceError> {
        self.blobs.part(id, part).await
    }

    /// Deletes up to `batch` attachments (with their bytes) that no message carries and
    /// that are older than `ttl`: uploads never sent, and uploads abandoned half way.
    /// Rows another replica's collector (or a send linking them) holds are skipped, so
    /// several replicas can run this at once. Returns how many it deleted.
    #[tracing::instrument(name = "db.collect_unattached", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn collect_unattached(&self, ttl: Duration, batch: i64) -> Result<u64, ServiceError> {
        let done = sqlx::query(
            "DELETE FROM attachments WHERE id IN ( \
               SELECT a.id FROM attachments a \
               WHERE a.created_at < now() - make_interval(secs => $1) \
                 AND NOT EXISTS (SELECT 1 FROM message_attachments ma WHERE ma.attachment_id = a.id) \
               ORDER BY a.created_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
        )
        .bind(ttl.as_secs_f64())
        .bind(batch)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// Checks that every id names a finished upload of the sender's; the files, in the
    /// order given (a message carries them so).
    #[tracing::instrument(name = "db.own_attachments", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn own_attachments(&self, sender: &str, ids: &[i64]) -> Result<Vec<File>, ServiceError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT id, name, content_type, size FROM attachments WHERE id = ANY($1) AND uploader_id = $2 AND complete",
        )
        .bind(ids)
        .bind(sender)
        .fetch_all(&self.pool)
        .await?;
        let mut found: HashMap<i64, Row> = rows.into_iter().map(|row| (row.id, row)).collect();
        ids.iter()
            .map(|id| found.remove(id).map(|row| File { id: row.id, attachment: row.into() }))
            .collect::<Option<Vec<File>>>()
            .ok_or_else(|| ServiceError::InvalidArgument("attachments must name files you uploaded".into()))
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
