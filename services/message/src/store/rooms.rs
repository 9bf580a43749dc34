//! Rooms and membership.

use chat_proto::v1::{Caller, Member, MemberRole, Message, Room, RoomKind, RoomSummary};
use chrono::{DateTime, Utc};

use super::{kind_name, kind_of, message_columns, MessageRow, Store};
use crate::error::ServiceError;

#[derive(sqlx::FromRow)]
struct RoomRow {
    id: i64,
    kind: String,
    name: Option<String>,
    last_seq: i64,
    created_at: DateTime<Utc>,
}

impl RoomRow {
    fn into_room(self, members: Vec<(String, String)>) -> Room {
        Room {
            id: self.id.to_string(),
            name: self.name,
            kind: kind_of(&self.kind) as i32,
            members: members
                .into_iter()
                .map(|(user_id, role)| Member {
                    user_id,
                    role: if role == "owner" { MemberRole::Owner } else { MemberRole::Member } as i32,
                })
                .collect(),
            created_at_ms: self.created_at.timestamp_millis(),
            last_seq: self.last_seq,
        }
    }
}

/// The key that makes a direct room between two users unique, whichever of them asks.
/// Length-prefixed so no pair of ids can collide with another.
fn direct_key(a: &str, b: &str) -> String {
    let (x, y) = if a <= b { (a, b) } else { (b, a) };
    format!("{}:{x}{y}", x.len())
}

impl Store {
    /// Creates a room with the caller as owner. A direct room between the same two users
    /// is created once; asking again returns it (and `false`: nothing was created).
    #[tracing::instrument(name = "db.create_room", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn create_room(
        &self,
        caller: &Caller,
        kind: RoomKind,
        name: Option<String>,
        members: Vec<String>,
    ) -> Result<(Room, bool), ServiceError> {
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
            return Ok((self.room(id).await?, false));
        };
        let mut users = vec![caller.user_id.clone()];
        users.extend(members);
        let roles: Vec<&str> = users.iter().enumerate().map(|(i, _)| if i == 0 { "owner" } else { "member" }).collect();
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
        let members = users.into_iter().zip(roles.into_iter().map(str::to_owned)).collect();
        Ok((room.into_room(members), true))
    }

    /// A room with its members.
    #[tracing::instrument(name = "db.room", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
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
        Ok(room.into_room(members))
    }

    /// For a caller who may read the room: its newest seq and its members' ids.
    #[tracing::instrument(name = "db.join", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn join(&self, caller: &Caller, room_id: i64) -> Result<(i64, Vec<String>), ServiceError> {
        let standing = self.readable(caller, room_id).await?;
        let members: Vec<String> = sqlx::query_scalar("SELECT user_id FROM room_members WHERE room_id = $1")
            .bind(room_id)
            .fetch_all(&self.pool)
            .await?;
        Ok((standing.last_seq, members))
    }

    /// Adds members (room owner or admin). Returns the room and who was newly added.
    #[tracing::instrument(name = "db.add_members", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn add_members(
        &self,
        caller: &Caller,
        room_id: i64,
        members: Vec<String>,
    ) -> Result<(Room, Vec<String>), ServiceError> {
        let standing = self.standing(caller, room_id).await?;
        if !standing.can_manage() {
            return Err(ServiceError::Forbidden("only the room owner or an admin may add members"));
        }
        let kind: String =
            sqlx::query_scalar("SELECT kind FROM rooms WHERE id = $1").bind(room_id).fetch_one(&self.pool).await?;
        if kind == "direct" {
            return Err(ServiceError::InvalidArgument("direct rooms have exactly two members".into()));
        }
        let added: Vec<String> = sqlx::query_scalar(
            "INSERT INTO room_members (room_id, user_id, role) SELECT $1, u, 'member' FROM UNNEST($2::text[]) AS u \
             ON CONFLICT (room_id, user_id) DO NOTHING RETURNING user_id",
        )
        .bind(room_id)
        .bind(&members)
        .fetch_all(&self.pool)
        .await?;
        Ok((self.room(room_id).await?, added))
    }

    /// Removes a member: the room owner or an admin may remove anyone, a member may
    /// remove themself. False when the user was not a member.
    #[tracing::instrument(name = "db.remove_member", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn remove_member(&self, caller: &Caller, room_id: i64, user_id: &str) -> Result<bool, ServiceError> {
        let standing = self.standing(caller, room_id).await?;
        let leaving_self = caller.user_id == user_id && standing.role.is_some();
        if !leaving_self && !standing.can_manage() {
            return Err(ServiceError::Forbidden("only the room owner or an admin may remove other members"));
        }
        let removed = sqlx::query("DELETE FROM room_members WHERE room_id = $1 AND user_id = $2")
            .bind(room_id)
            .bind(user_id)
            .execute(&self.pool)
            .await?
            .rows_affected();
        Ok(removed > 0)
    }

    /// The caller's rooms (and, for admins, every support room), newest activity first,
    /// with unread counts (messages by others above the read position, not deleted)
    /// and the last message.
    #[tracing::instrument(name = "db.list_rooms", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn list_rooms(&self, caller: &Caller) -> Result<Vec<RoomSummary>, ServiceError> {
        #[derive(sqlx::FromRow)]
        struct Row {
            id: i64,
            kind: String,
            name: Option<String>,
            last_seq: i64,
            unread: i64,
        }
        let rows: Vec<Row> = sqlx::query_as(
            "SELECT r.id, r.kind, r.name, r.last_seq, \
               (SELECT count(*) FROM messages x WHERE x.room_id = r.id AND x.seq > COALESCE(m.read_seq, 0) \
                  AND x.sender_id <> $1 AND x.deleted_at IS NULL) AS unread \
             FROM rooms r LEFT JOIN room_members m ON m.room_id = r.id AND m.user_id = $1 \
             WHERE m.user_id IS NOT NULL OR (r.kind = 'support' AND $2) \
             ORDER BY r.last_seq DESC, r.id DESC",
        )
        .bind(&caller.user_id)
        .bind(caller.admin)
        .fetch_all(&self.pool)
        .await?;
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        let last: Vec<MessageRow> = sqlx::query_as(concat!(
            "SELECT ",
            message_columns!(),
            " FROM messages WHERE (room_id, seq) IN (SELECT id, last_seq FROM rooms WHERE id = ANY($1))"
        ))
        .bind(&ids)
        .fetch_all(&self.pool)
        .await?;
        let mut last: std::collections::HashMap<i64, Message> =
            last.into_iter().map(|row| (row.room_id, Message::from(row))).collect();
        let mut summaries: Vec<RoomSummary> = rows
            .into_iter()
            .map(|r| RoomSummary {
                id: r.id.to_string(),
                name: r.name,
                kind: kind_of(&r.kind) as i32,
                last_seq: r.last_seq,
                unread: r.unread,
                last_message: last.remove(&r.id),
            })
            .collect();
        let mut messages: Vec<&mut Message> = summaries.iter_mut().filter_map(|s| s.last_message.as_mut()).collect();
        self.attach_reactions(&mut messages).await?;
        self.attach_files(&mut messages).await?;
        Ok(summaries)
    }

    /// A room's newest seq (internal).
    #[tracing::instrument(name = "db.room_seq", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn room_seq(&self, room_id: i64) -> Result<i64, ServiceError> {
        sqlx::query_scalar("SELECT last_seq FROM rooms WHERE id = $1")
            .bind(room_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or(ServiceError::NotFound("room"))
    }

    /// The ids of every room a user belongs to (internal).
    #[tracing::instrument(name = "db.user_rooms", skip_all, fields(otel.kind = "client", db.system = "postgresql"))]
    pub async fn user_rooms(&self, user_id: &str) -> Result<Vec<i64>, ServiceError> {
        Ok(sqlx::query_scalar("SELECT room_id FROM room_members WHERE user_id = $1")
            .bind(user_id)
            .fetch_all(&self.pool)
            .await?)
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
