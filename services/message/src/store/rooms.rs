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

/// The first key of the transaction-scoped advisory locks that serialise adding one
/// user to rooms (the second is a hash of the user id).
const USER_MEMBERSHIP_LOCK: i32 = 0x726d; // "rm"

fn room_full(cap: u32) -> ServiceError {
    ServiceError::Conflict(format!("a room may have at most {cap} members"))
}

/// Which page of `list_rooms`: at most `limit` rooms after the cursor `after`
/// (`(last_seq, id)` of the previous page's last room).
#[derive(Debug, Clone, Copy)]
pub struct RoomsPage {
    pub limit: u32,
    pub after: Option<(i64, i64)>,
}

/// One page of `list_rooms`.
#[derive(Debug)]
pub struct RoomsPageOut {
    pub rooms: Vec<RoomSummary>,
    pub has_more: bool,
    /// The cursor of the page's last room, when more follow.
    pub next: Option<String>,
}

/// Reads a `list_rooms` cursor, `"{last_seq}.{id}"`; anything else is a bad request.
pub fn parse_rooms_cursor(cursor: &str) -> Result<(i64, i64), ServiceError> {
    let bad = || ServiceError::InvalidArgument("after is not a cursor this service issued".into());
    let (seq, id) = cursor.split_once('.').ok_or_else(bad)?;
    Ok((seq.parse().map_err(|_| bad())?, id.parse().map_err(|_| bad())?))
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
        if users.len() > self.limits.members_per_room as usize {
            return Err(room_full(self.limits.members_per_room));
        }
        self.admit_to_rooms(&mut tx, &users).await?;
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
        let mut tx = self.pool.begin().await?;
        // The room's row lock orders concurrent adds to one room, so its cap holds. The
        // count is a statement of its own: a statement's snapshot predates its lock wait.
        let kind: String = sqlx::query_scalar("SELECT kind FROM rooms WHERE id = $1 FOR UPDATE")
            .bind(room_id)
            .fetch_one(&mut *tx)
            .await?;
        let count: i64 = sqlx::query_scalar("SELECT count(*) FROM room_members WHERE room_id = $1")
            .bind(room_id)
            .fetch_one(&mut *tx)
            .await?;
        if kind == "direct" {
            return Err(ServiceError::InvalidArgument("direct rooms have exactly two members".into()));
        }
        let fresh: Vec<String> = sqlx::query_scalar(
            "SELECT u FROM UNNEST($2::text[]) AS u \
             WHERE NOT EXISTS (SELECT 1 FROM room_members WHERE room_id = $1 AND user_id = u)",
        )
        .bind(room_id)
        .bind(&members)
        .fetch_all(&mut *tx)
        .await?;
        if count as usize + fresh.len() > self.limits.members_per_room as usize {
            return Err(room_full(self.limits.members_per_room));
        }
        self.admit_to_rooms(&mut tx, &fresh).await?;
        let added: Vec<String> = sqlx::query_scalar(
            "INSERT INTO room_members (room_id, user_id, role) SELECT $1, u, 'member' FROM UNNEST($2::text[]) AS u \
             ON CONFLICT (room_id, user_id) DO NOTHING RETURNING user_id",
        )
        .bind(room_id)
        .bind(&fresh)
        .fetch_all(&mut *tx)
        .await?;
        tx.commit().await?;
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
    pub async fn list_rooms(&self, caller: &Caller, page: RoomsPage) -> Result<RoomsPageOut, ServiceError> {
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
             WHERE (m.user_id IS NOT NULL OR (r.kind = 'support' AND $2)) \
               AND ($3::bigint IS NULL OR (r.last_seq, r.id) < ($3, $4)) \
             ORDER BY r.last_seq DESC, r.id DESC LIMIT $5",
        )
        .bind(&caller.user_id)
        .bind(caller.admin)
        .bind(page.after.map(|(seq, _)| seq))
        .bind(page.after.map(|(_, id)| id))
        .bind(page.limit as i64 + 1)
        .fetch_all(&self.pool)
        .await?;
        let mut rows = rows;
        let has_more = super::trim_page(&mut rows, page.limit as usize);
        let next = if has_more { rows.last().map(|r| format!("{}.{}", r.last_seq, r.id)) } else { None };
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
        Ok(RoomsPageOut { rooms: summaries, has_more, next })
    }

    /// The most rooms one page of `list_rooms` holds: the rooms-per-user cap, so a user
    /// within the cap gets every room in one page, as before pages existed.
    pub fn max_rooms_page(&self) -> u32 {
        self.limits.rooms_per_user
    }

    /// Refuses to add `users` to one more room when any of them is at the rooms-per-user
    /// cap. Takes a transaction-scoped lock per user (in a fixed order, so two adds never
    /// deadlock) so concurrent adds of one user to different rooms cannot overshoot.
    async fn admit_to_rooms(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        users: &[String],
    ) -> Result<(), ServiceError> {
        if users.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "SELECT pg_advisory_xact_lock($2, k) \
             FROM (SELECT DISTINCT hashtext(u) AS k FROM UNNEST($1::text[]) AS u ORDER BY k) AS s",
        )
        .bind(users)
        .bind(USER_MEMBERSHIP_LOCK)
        .execute(&mut **tx)
        .await?;
        let full: Option<String> = sqlx::query_scalar(
            "SELECT u FROM UNNEST($1::text[]) AS u \
             WHERE (SELECT count(*) FROM room_members WHERE user_id = u) >= $2 LIMIT 1",
        )
        .bind(users)
        .bind(self.limits.rooms_per_user as i64)
        .fetch_optional(&mut **tx)
        .await?;
        match full {
            Some(user) => Err(ServiceError::Conflict(format!(
                "{user} already belongs to {} rooms, the most one user may",
                self.limits.rooms_per_user
            ))),
            None => Ok(()),
        }
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
    /// At most `limit` (0: all), the most recently active first.
    pub async fn user_rooms(&self, user_id: &str, limit: u32) -> Result<Vec<i64>, ServiceError> {
        let limit = if limit == 0 { None } else { Some(limit as i64) };
        Ok(sqlx::query_scalar(
            "SELECT m.room_id FROM room_members m JOIN rooms r ON r.id = m.room_id WHERE m.user_id = $1 \
             ORDER BY r.last_seq DESC, r.id DESC LIMIT $2",
        )
        .bind(user_id)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MembershipLimits;

    async fn store(limits: MembershipLimits) -> anyhow::Result<(Store, chat_tests::TestDb)> {
        let db = chat_tests::TestDb::new();
        let retry = chat_common::startup::Retry { attempts: 1, delay: std::time::Duration::ZERO };
        let store =
            Store::connect(&db.url, true, 16, crate::store::Schema::Migrate, false, retry).await?.with_limits(limits);
        Ok((store, db))
    }

    fn user(id: &str) -> Caller {
        Caller { user_id: id.to_owned(), name: None, admin: false }
    }

    async fn group(store: &Store, owner: &str, members: &[&str]) -> anyhow::Result<i64> {
        let members = members.iter().map(|m| (*m).to_owned()).collect();
        let (room, _) = store.create_room(&user(owner), RoomKind::Group, None, members).await?;
        Ok(room.id.parse()?)
    }

    async fn joined<T>(tasks: Vec<tokio::task::JoinHandle<T>>) -> anyhow::Result<Vec<T>> {
        let mut out = Vec::new();
        for task in tasks {
            out.push(task.await?);
        }
        Ok(out)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_adds_cannot_overshoot_the_members_per_room_cap() -> anyhow::Result<()> {
        let (store, _db) = store(MembershipLimits { members_per_room: 5, rooms_per_user: 100 }).await?;
        let room = group(&store, "owner", &[]).await?;
        let adds = (0..12).map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.add_members(&user("owner"), room, vec![format!("u{i}")]).await })
        });
        let results = joined(adds.collect()).await?;
        let refused = results.iter().filter(|r| matches!(r, Err(ServiceError::Conflict(_)))).count();
        assert_eq!((results.len() - refused, refused), (4, 8), "{results:?}");
        assert_eq!(store.room(room).await?.members.len(), 5);
        let err = store.create_room(&user("a"), RoomKind::Group, None, (0..5).map(|i| format!("m{i}")).collect()).await;
        assert!(matches!(err, Err(ServiceError::Conflict(_))), "a new room over the cap: {err:?}");
        Ok(())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_adds_cannot_overshoot_the_rooms_per_user_cap() -> anyhow::Result<()> {
        let (store, _db) = store(MembershipLimits { members_per_room: 100, rooms_per_user: 3 }).await?;
        let mut rooms = Vec::new();
        for i in 0..8 {
            rooms.push(group(&store, &format!("owner{i}"), &[]).await?);
        }
        let adds = rooms.iter().enumerate().map(|(i, room)| {
            let (store, room) = (store.clone(), *room);
            tokio::spawn(async move { store.add_members(&user(&format!("owner{i}")), room, vec!["zed".into()]).await })
        });
        let results = joined(adds.collect()).await?;
        let refused = results.iter().filter(|r| matches!(r, Err(ServiceError::Conflict(_)))).count();
        assert_eq!((results.len() - refused, refused), (3, 5), "{results:?}");
        assert_eq!(store.user_rooms("zed", 0).await?.len(), 3);
        let err = store.create_room(&user("zed"), RoomKind::Group, None, vec![]).await;
        assert!(matches!(err, Err(ServiceError::Conflict(_))), "the creator is at the cap too: {err:?}");
        Ok(())
    }

    #[tokio::test]
    async fn user_rooms_are_capped_to_the_most_recently_active() -> anyhow::Result<()> {
        let (store, _db) = store(MembershipLimits::default()).await?;
        let mut made = Vec::new();
        for _ in 0..4 {
            made.push(group(&store, "ann", &[]).await?);
        }
        sqlx::query("UPDATE rooms SET last_seq = 5 WHERE id = $1").bind(made[1]).execute(&store.pool).await?;
        assert_eq!(store.user_rooms("ann", 2).await?, [made[1], made[3]]);
        assert_eq!(store.user_rooms("ann", 0).await?.len(), 4, "0 lists them all");
        Ok(())
    }

    #[tokio::test]
    async fn rooms_pages_list_every_room_once_newest_activity_first() -> anyhow::Result<()> {
        let (store, _db) = store(MembershipLimits::default()).await?;
        let mut made = Vec::new();
        for _ in 0..7 {
            made.push(group(&store, "ann", &[]).await?.to_string());
        }
        let (mut seen, mut after) = (Vec::new(), None);
        loop {
            let page = store.list_rooms(&user("ann"), RoomsPage { limit: 3, after }).await?;
            assert!(page.rooms.len() <= 3);
            seen.extend(page.rooms.into_iter().map(|r| r.id));
            match page.next {
                Some(next) if page.has_more => after = Some(parse_rooms_cursor(&next)?),
                _ => break,
            }
        }
        made.reverse();
        assert_eq!(seen, made);
        Ok(())
    }

    #[test]
    fn rooms_cursors_round_trip_and_refuse_anything_else() {
        assert_eq!(parse_rooms_cursor("12.34").unwrap(), (12, 34));
        for bad in ["", "12", "a.b", "12.34.5", "12."] {
            assert!(matches!(parse_rooms_cursor(bad), Err(ServiceError::InvalidArgument(_))), "{bad}");
        }
    }

    #[test]
    fn direct_keys_ignore_order_and_cannot_collide() {
        assert_eq!(direct_key("alice", "bob"), direct_key("bob", "alice"));
        assert_ne!(direct_key("ab", "c"), direct_key("a", "bc"));
    }
}
