//! Postgres storage of rooms, members and messages.

use std::time::Duration;

use chat_common::startup::Retry;
use chat_proto::v1::{Caller, Member, MemberRole, Message, Room, RoomKind};
use chrono::{DateTime, Utc};
use sqlx::migrate::MigrateDatabase;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres};

use crate::error::ServiceError;

/// Handle to the database; cheap to clone (the pool is shared).
#[derive(Clone)]
pub struct Store {
    pool: PgPool,
}

/// A message to store, already validated.
#[derive(Debug)]
pub struct NewMessage<'a> {
    pub room_id: i64,
    pub kind: &'static str,
    pub text: &'a str,
    pub reply_to: Option<i64>,
    pub client_msg_id: Option<&'a str>,
}

/// Which page of a room's history to read.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    pub before_seq: Option<i64>,
    pub after_seq: Option<i64>,
    pub limit: i64,
}

/// Columns of a message as clients see it: a deleted message keeps its seq but loses
/// its text. A macro so every query stays a `&'static str` (sqlx refuses built strings).
macro_rules! message_columns {
    () => {
        "id, room_id, seq, sender_id, sender_name, kind, \
         CASE WHEN deleted_at IS NULL THEN body END AS body, reply_to, client_msg_id, \
         created_at, edited_at, deleted_at IS NOT NULL AS deleted"
    };
}

#[derive(sqlx::FromRow)]
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
        }
    }
}

#[derive(sqlx::FromRow)]
struct RoomRow {
    id: i64,
    kind: String,
    name: Option<String>,
    last_seq: i64,
    created_at: DateTime<Utc>,
}

/// What a caller may do in a room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A member, with the room's newest seq.
    Member { last_seq: i64 },
    /// The room exists but the caller may not read it.
    Denied,
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

fn role_of(name: &str) -> MemberRole {
    if name == "owner" {
        MemberRole::Owner
    } else {
        MemberRole::Member
    }
}

/// The key that makes a direct room between two users unique, whichever of them asks.
/// Length-prefixed so no pair of ids can collide with another.
fn direct_key(a: &str, b: &str) -> String {
    let (x, y) = if a <= b { (a, b) } else { (b, a) };
    format!("{}:{x}{y}", x.len())
}

impl Store {
    /// Connects (creating the database if asked and missing), with bounded retries,
    /// and applies the embedded migrations.
    pub async fn connect(url: &str, create: bool, max_connections: u32, retry: Retry) -> anyhow::Result<Self> {
        let options: PgConnectOptions = url.parse()?;
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
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(Self { pool })
    }

    /// A store over an existing pool (tests).
    pub fn from_pool(pool: PgPool) -> Self {
        Self { pool }
    }

    /// True when Postgres answers a trivial query.
    pub async fn is_healthy(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }

    /// Creates a room with the caller as owner. A direct room between the same two users
    /// is created once; asking again returns it.
    pub async fn create_room(
        &self,
        caller: &Caller,
        kind: RoomKind,
        name: Option<String>,
        members: Vec<String>,
    ) -> Result<Room, ServiceError> {
        let key = match kind {
            RoomKind::Direct => match members.as_slice() {
                [other] => Some(direct_key(&caller.user_id, other)),
                _ => return Err(ServiceError::InvalidArgument("a direct room has exactly one other member".into())),
            },
            _ => None,
        };
        let mut tx = self.pool.begin().await?;
        let inserted: Option<RoomRow> = sqlx::query_as(
            "INSERT INTO rooms (kind, name, created_by, direct_key) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (direct_key) DO NOTHING \
             RETURNING id, kind, name, last_seq, created_at",
        )
        .bind(kind_name(kind))
        .bind(&name)
        .bind(&caller.user_id)
        .bind(&key)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(room) = inserted else {
            // The direct room exists already: hand back the one both users share.
            drop(tx);
            let id: i64 = sqlx::query_scalar("SELECT id FROM rooms WHERE direct_key = $1")
                .bind(&key)
                .fetch_one(&self.pool)
                .await?;
            return self.room(id).await;
        };
        let roles: Vec<&str> = std::iter::once("owner").chain(members.iter().map(|_| "member")).collect();
        let users: Vec<&str> =
            std::iter::once(caller.user_id.as_str()).chain(members.iter().map(String::as_str)).collect();
        sqlx::query(
            "INSERT INTO room_members (room_id, user_id, role) \
             SELECT $1, u, r FROM UNNEST($2::text[], $3::text[]) AS t(u, r)",
        )
        .bind(room.id)
        .bind(&users)
        .bind(&roles)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(self.room_with_members(room, users.iter().zip(roles).map(|(u, r)| (u.to_string(), r))))
    }

    /// A room with its members.
    pub async fn room(&self, id: i64) -> Result<Room, ServiceError> {
        let room: RoomRow = sqlx::query_as("SELECT id, kind, name, last_seq, created_at FROM rooms WHERE id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(ServiceError::NotFound("room"))?;
        let members: Vec<(String, String)> =
            sqlx::query_as("SELECT user_id, role FROM room_members WHERE room_id = $1 ORDER BY joined_at, user_id")
                .bind(id)
                .fetch_all(&self.pool)
                .await?;
        Ok(self.room_with_members(
            room,
            members.into_iter().map(|(u, r)| (u, if r == "owner" { "owner" } else { "member" })),
        ))
    }

    fn room_with_members(&self, room: RoomRow, members: impl Iterator<Item = (String, &'static str)>) -> Room {
        Room {
            id: room.id.to_string(),
            name: room.name,
            kind: kind_of(&room.kind) as i32,
            members: members.map(|(user_id, role)| Member { user_id, role: role_of(role) as i32 }).collect(),
            created_at_ms: room.created_at.timestamp_millis(),
            last_seq: room.last_seq,
        }
    }

    /// Whether the caller may read and write the room: its members, and every admin in
    /// a support room. `NotFound` when the room does not exist.
    pub async fn access(&self, caller: &Caller, room_id: i64) -> Result<Access, ServiceError> {
        let row: Option<(i64, String, bool)> = sqlx::query_as(
            "SELECT r.last_seq, r.kind, EXISTS (SELECT 1 FROM room_members m WHERE m.room_id = r.id AND m.user_id = $2) \
             FROM rooms r WHERE r.id = $1",
        )
        .bind(room_id)
        .bind(&caller.user_id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            None => Err(ServiceError::NotFound("room")),
            Some((last_seq, kind, member)) if member || (kind == "support" && caller.admin) => {
                Ok(Access::Member { last_seq })
            }
            Some(_) => Ok(Access::Denied),
        }
    }

    async fn require_access(&self, caller: &Caller, room_id: i64) -> Result<i64, ServiceError> {
        match self.access(caller, room_id).await? {
            Access::Member { last_seq } => Ok(last_seq),
            Access::Denied => Err(ServiceError::Forbidden("not a member of this room")),
        }
    }

    /// The newest seq of a room the caller may read.
    pub async fn join(&self, caller: &Caller, room_id: i64) -> Result<i64, ServiceError> {
        self.require_access(caller, room_id).await
    }

    /// The message a sender stored earlier under `client_msg_id`, if any.
    async fn by_client_msg_id(&self, sender: &str, client_msg_id: &str) -> Result<Option<Message>, ServiceError> {
        const SQL: &str =
            concat!("SELECT ", message_columns!(), " FROM messages WHERE sender_id = $1 AND client_msg_id = $2");
        let row: Option<MessageRow> =
            sqlx::query_as(SQL).bind(sender).bind(client_msg_id).fetch_optional(&self.pool).await?;
        Ok(row.map(Message::from))
    }

    /// Stores a message: allocates the room's next seq and inserts the row in one
    /// transaction. Returns the message and whether it was already stored (a retry with
    /// the same sender and `client_msg_id`).
    pub async fn insert_message(&self, caller: &Caller, msg: NewMessage<'_>) -> Result<(Message, bool), ServiceError> {
        if let Some(cid) = msg.client_msg_id {
            if let Some(existing) = self.by_client_msg_id(&caller.user_id, cid).await? {
                return same_room(existing, msg.room_id).map(|m| (m, true));
            }
        }
        let mut tx = self.pool.begin().await?;
        // The row lock taken here orders concurrent writers of one room; a rollback
        // gives the seq back, so seqs stay gapless.
        let seq: Option<i64> = sqlx::query_scalar(
            "UPDATE rooms SET last_seq = last_seq + 1 WHERE id = $1 AND ( \
               EXISTS (SELECT 1 FROM room_members WHERE room_id = $1 AND user_id = $2) \
               OR (kind = 'support' AND $3)) \
             RETURNING last_seq",
        )
        .bind(msg.room_id)
        .bind(&caller.user_id)
        .bind(caller.admin)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(seq) = seq else {
            drop(tx);
            self.require_access(caller, msg.room_id).await?;
            // Became a member between the two statements: let the client retry.
            return Err(ServiceError::Conflict("membership changed; retry".into()));
        };
        if let Some(reply_to) = msg.reply_to {
            let found: Option<i64> = sqlx::query_scalar("SELECT id FROM messages WHERE id = $1 AND room_id = $2")
                .bind(reply_to)
                .bind(msg.room_id)
                .fetch_optional(&mut *tx)
                .await?;
            if found.is_none() {
                return Err(ServiceError::InvalidArgument("reply_to names no message of this room".into()));
            }
        }
        const SQL: &str = concat!(
            "INSERT INTO messages (room_id, seq, sender_id, sender_name, kind, body, reply_to, client_msg_id) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
             ON CONFLICT (sender_id, client_msg_id) DO NOTHING RETURNING ",
            message_columns!()
        );
        let row: Option<MessageRow> = sqlx::query_as(SQL)
            .bind(msg.room_id)
            .bind(seq)
            .bind(&caller.user_id)
            .bind(&caller.name)
            .bind(msg.kind)
            .bind(msg.text)
            .bind(msg.reply_to)
            .bind(msg.client_msg_id)
            .fetch_optional(&mut *tx)
            .await?;
        match row {
            Some(row) => {
                tx.commit().await?;
                Ok((row.into(), false))
            }
            None => {
                // A concurrent retry won the race; roll back our seq and return its message.
                tx.rollback().await?;
                let cid = msg.client_msg_id.unwrap_or_default();
                let existing = self
                    .by_client_msg_id(&caller.user_id, cid)
                    .await?
                    .ok_or(ServiceError::Conflict("client_msg_id in use; retry".into()))?;
                same_room(existing, msg.room_id).map(|m| (m, true))
            }
        }
    }

    /// A page of history in ascending seq order, and whether more lies beyond it: older
    /// messages when reading backwards (no `after_seq`), newer ones when reading forwards.
    pub async fn history(
        &self,
        caller: &Caller,
        room_id: i64,
        page: Page,
    ) -> Result<(Vec<Message>, bool), ServiceError> {
        self.require_access(caller, room_id).await?;
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
        let has_more = rows.len() as i64 > page.limit;
        rows.truncate(page.limit as usize);
        if !forwards {
            rows.reverse();
        }
        Ok((rows.into_iter().map(Message::from).collect(), has_more))
    }
}

/// A `client_msg_id` names one message per sender; reusing it in another room is a
/// client bug that must not silently return a message of a different room.
fn same_room(existing: Message, room_id: i64) -> Result<Message, ServiceError> {
    if existing.room_id == room_id.to_string() {
        Ok(existing)
    } else {
        Err(ServiceError::Conflict("client_msg_id was already used in another room".into()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_keys_ignore_order_and_cannot_collide() {
        assert_eq!(direct_key("alice", "bob"), direct_key("bob", "alice"));
        assert_ne!(direct_key("ab", "c"), direct_key("a", "bc"));
    }
}
