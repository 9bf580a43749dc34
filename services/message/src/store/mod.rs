//! Postgres storage of rooms, members, messages and reactions.
//!
//! `rooms` holds room and membership queries, `messages` reading and changing messages,
//! `batch` and `commit` storing new ones (the group commit); this module holds the handle,
//! connection set-up and the access rules they share.

mod attachments;
mod batch;
mod commit;
mod messages;
mod notifications;
mod receipts;
mod rooms;
pub mod schema;
mod search;
#[cfg(test)]
mod tests;
mod threads;
pub mod webhooks;

pub use attachments::File;
pub use batch::{Committer, NewMessage};
pub use messages::Page;
pub use rooms::{parse_rooms_cursor, RoomsPage, RoomsPageOut};
pub use schema::Schema;
pub use search::{Hit, SearchQuery};

use std::sync::Arc;
use std::time::Duration;

use chat_common::startup::Retry;
use chat_proto::v1::{Caller, Message, RoomKind};
use chrono::{DateTime, Utc};
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};

use crate::blobs::{BlobStore, PgBlobStore};
use crate::error::ServiceError;
use crate::StartupError;

/// Handle to the database; cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
    blobs: Arc<dyn BlobStore>,
    limits: MembershipLimits,
}

/// A page read with one row more than `limit`: keeps `limit` and says whether more lie
/// beyond (the extra row is there).
fn trim_page<T>(rows: &mut Vec<T>, limit: usize) -> bool {
    let has_more = rows.len() > limit;
    rows.truncate(limit);
    has_more
}

/// How many of the pool's connections are busy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolUse {
    pub idle: u32,
    pub in_use: u32,
    pub max: u32,
}

/// Caps on membership, enforced inside the transaction that adds members, so that
/// concurrent adds cannot overshoot them. They bound what one command can fan out to:
/// a room's presence and join work, a user's presence announcements and room list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MembershipLimits {
    /// Most members one room may have.
    pub members_per_room: u32,
    /// Most rooms one user may belong to.
    pub rooms_per_user: u32,
}

impl Default for MembershipLimits {
    fn default() -> Self {
        Self { members_per_room: 10_000, rooms_per_user: 1_000 }
    }
}

impl Store {
    /// Connects (creating the database if asked and missing), with bounded retries,
    /// then applies the embedded migrations or waits for them, as `schema` says. With
    /// `webhooks`, every message stored through this pool gets a webhook outbox row in
    /// its transaction (the trigger of migration 0011 reads `chat.webhooks`).
    pub async fn connect(
        url: &str,
        create: bool,
        max_connections: u32,
        schema: Schema,
        webhooks: bool,
        retry: Retry,
    ) -> Result<Self, StartupError> {
        let mut options: PgConnectOptions = url.parse()?;
        if webhooks {
            options = options.options([("chat.webhooks", "on")]);
        }
        if create {
            retry
                .run("Postgres", || async {
                    if !Postgres::database_exists(url).await? {
                        tracing::info!("creating database");
                        Postgres::create_database(url).await?;
                    }
                    Ok::<_, sqlx::Error>(())
                })
                .await?;
        }
        let pool = retry
            .run("Postgres", || {
                PgPoolOptions::new()
                    .max_connections(max_connections)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect_with(options.clone())
            })
            .await?;
        match schema {
            Schema::Migrate => schema::migrate(&pool).await?,
            Schema::Await => schema::await_current(&pool, retry).await?,
        }
        let blobs = Arc::new(PgBlobStore::new(pool.clone()));
        Ok(Self { pool, blobs, limits: MembershipLimits::default() })
    }

    /// The same store with other membership caps.
    pub fn with_limits(self, limits: MembershipLimits) -> Self {
        Self { limits, ..self }
    }

    /// The pool's connections now.
    pub fn pool_use(&self) -> PoolUse {
        let idle = self.pool.num_idle() as u32;
        PoolUse { idle, in_use: self.pool.size().saturating_sub(idle), max: self.pool.options().get_max_connections() }
    }

    /// The pool itself, for the `migrate` command's grants.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// True when Postgres answers a trivial query.
    pub async fn is_healthy(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// The caller's standing in a room. `NotFound` when the room does not exist.
    async fn standing(&self, caller: &Caller, room_id: i64) -> Result<Standing, ServiceError> {
        let row: Option<(i64, String, Option<String>)> = sqlx::query_as(
            "SELECT r.last_seq, r.kind, m.role FROM rooms r \
             LEFT JOIN room_members m ON m.room_id = r.id AND m.user_id = $2 WHERE r.id = $1",
        )
        .bind(room_id)
        .bind(&caller.user_id)
        .fetch_optional(&self.pool)
        .await?;
        let (last_seq, kind, role) = row.ok_or(ServiceError::NotFound("room"))?;
        Ok(Standing { last_seq, support: kind == "support", role, admin: caller.admin })
    }

    /// The caller's standing in a room they may read; `Forbidden` otherwise.
    async fn readable(&self, caller: &Caller, room_id: i64) -> Result<Standing, ServiceError> {
        let standing = self.standing(caller, room_id).await?;
        if standing.can_read() {
            Ok(standing)
        } else {
            Err(ServiceError::Forbidden("not a member of this room"))
        }
    }
}

/// What a caller may do in one room.
#[derive(Debug, Clone)]
struct Standing {
    last_seq: i64,
    support: bool,
    /// `owner` or `member`; `None` for non-members.
    role: Option<String>,
    admin: bool,
}

impl Standing {
    /// Members read and write; in a support room, so does every admin.
    fn can_read(&self) -> bool {
        self.role.is_some() || (self.support && self.admin)
    }

    /// The room owner and admins manage membership and moderate messages.
    fn can_manage(&self) -> bool {
        self.admin || self.role.as_deref() == Some("owner")
    }
}

/// Columns of a message as clients see it: a deleted message keeps its seq but loses
/// its text. A macro so every query stays a `&'static str` (sqlx refuses built strings).
macro_rules! message_columns {
    () => {
        "id, room_id, seq, sender_id, sender_name, kind, \
         CASE WHEN deleted_at IS NULL THEN body END AS body, reply_to, client_msg_id, \
         created_at, edited_at, deleted_at IS NOT NULL AS deleted, reply_count, last_reply_at"
    };
}
use message_columns;

#[derive(sqlx::FromRow, Clone)]
struct MessageRow {
    id: i64,
    room_id: i64,
    seq: i64,
    sender_id: String,
    sender_name: Option<String>,
    kind: String,
    body: Option<String>,
    reply_to: Option<i64>,
    client_msg_id: Option<String>,
    created_at: DateTime<Utc>,
    edited_at: Option<DateTime<Utc>>,
    deleted: bool,
    reply_count: i32,
    last_reply_at: Option<DateTime<Utc>>,
}

impl From<MessageRow> for Message {
    fn from(r: MessageRow) -> Self {
        Message {
            id: r.id.to_string(),
            room_id: r.room_id.to_string(),
            seq: r.seq,
            sender_id: r.sender_id,
            sender_name: r.sender_name,
            kind: r.kind,
            text: r.body,
            attachments: Vec::new(),
            reply_to: r.reply_to.map(|id| id.to_string()),
            client_msg_id: r.client_msg_id,
            created_at_ms: r.created_at.timestamp_millis(),
            edited_at_ms: r.edited_at.map(|t| t.timestamp_millis()),
            deleted: r.deleted,
            reactions: Vec::new(),
            reply_count: i64::from(r.reply_count),
            last_reply_at_ms: r.last_reply_at.map(|t| t.timestamp_millis()),
        }
    }
}

fn kind_name(kind: RoomKind) -> &'static str {
    match kind {
        RoomKind::Direct => "direct",
        RoomKind::Support => "support",
        RoomKind::Group | RoomKind::Unspecified => "group",
    }
}

fn kind_of(name: &str) -> RoomKind {
    match name {
        "direct" => RoomKind::Direct,
        "support" => RoomKind::Support,
        _ => RoomKind::Group,
    }
}
