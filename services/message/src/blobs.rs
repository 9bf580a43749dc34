//! Where attachment bytes live: numbered parts of at most [`PART_BYTES`], so uploads
//! append and downloads stream one part at a time and no file is ever held whole.
//! Postgres (`bytea` rows) today; the trait is the seam for an S3-compatible store later
//! (multipart uploads, ranged reads), with the metadata staying in Postgres.

use sqlx::PgPool;
use tonic::async_trait;

use crate::error::ServiceError;

/// Largest part: one gRPC message of a download, one row in Postgres. Small enough that
/// fifty downloads in flight hold a few MiB, large enough that a 10 MiB file is 160 reads.
pub const PART_BYTES: usize = 64 * 1024;

/// Stores and fetches attachment bytes by attachment id and part number.
#[async_trait]
pub trait BlobStore: Send + Sync {
    /// Stores part `part` (0, 1, ...) of an attachment.
    async fn put_part(&self, attachment_id: i64, part: i32, data: &[u8]) -> Result<(), ServiceError>;
    /// Part `part` of an attachment; `None` past its last one.
    async fn part(&self, attachment_id: i64, part: i32) -> Result<Option<Vec<u8>>, ServiceError>;
}

/// Attachment bytes in the `attachment_chunks` table; rows go with their attachment
/// (`ON DELETE CASCADE`).
pub struct PgBlobStore {
    pool: PgPool,
}

impl PgBlobStore {
    /// A store on this pool.
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

#[async_trait]
impl BlobStore for PgBlobStore {
    async fn put_part(&self, attachment_id: i64, part: i32, data: &[u8]) -> Result<(), ServiceError> {
        sqlx::query("INSERT INTO attachment_chunks (attachment_id, part, data) VALUES ($1, $2, $3)")
            .bind(attachment_id)
            .bind(part)
            .bind(data)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn part(&self, attachment_id: i64, part: i32) -> Result<Option<Vec<u8>>, ServiceError> {
        Ok(sqlx::query_scalar("SELECT data FROM attachment_chunks WHERE attachment_id = $1 AND part = $2")
            .bind(attachment_id)
            .bind(part)
            .fetch_optional(&self.pool)
            .await?)
    }
}
