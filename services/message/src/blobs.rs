//! Where attachment bytes live. Postgres (`bytea`) today; the trait is the seam for an
//! S3-compatible store later, with the metadata staying in Postgres.

use sqlx::PgPool;
use tonic::async_trait;

use crate::error::ServiceError;

/// Stores and fetches attachment bytes by attachment id.
#[async_trait]
pub trait BlobStore: Send + Sync {
    /// Stores the bytes of a new attachment.
    async fn put(&self, attachment_id: i64, data: &[u8]) -> Result<(), ServiceError>;
    /// The bytes of an attachment, if stored.
    async fn get(&self, attachment_id: i64) -> Result<Option<Vec<u8>>, ServiceError>;
}

/// Attachment bytes in the `attachment_blobs` table.
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
    async fn put(&self, attachment_id: i64, data: &[u8]) -> Result<(), ServiceError> {
        sqlx::query("INSERT INTO attachment_blobs (attachment_id, data) VALUES ($1, $2)")
            .bind(attachment_id)
            .bind(data)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn get(&self, attachment_id: i64) -> Result<Option<Vec<u8>>, ServiceError> {
        Ok(sqlx::query_scalar("SELECT data FROM attachment_blobs WHERE attachment_id = $1")
            .bind(attachment_id)
            .fetch_optional(&self.pool)
            .await?)
    }
}
