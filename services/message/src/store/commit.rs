//! One group commit: a batch of sends stored in one transaction.
//!
//! Seqs stay gapless and idempotency exact: the batch locks its rooms' rows (in id order,
//! so batches never deadlock), then looks up which `(sender, client_msg_id)` pairs are
//! already stored (they are answered with the stored message, as a retry), numbers only
//! the new messages from each locked `last_seq`, inserts them (and their attachment links)
//! in one statement each and moves each room's `last_seq` by exactly its count before
//! committing. A batch that fails as a whole is stored again one request per
//! transaction, so one bad send never fails another.

use std::collections::{HashMap, HashSet};

use chat_proto::v1::{Caller, Message};
use sqlx::PgConnection;

use super::batch::{NewMessage, Reply};
use super::{message_columns, MessageRow, Store};
use crate::error::ServiceError;

/// One send of a batch: who sends what.
type Request = (Caller, NewMessage);

/// `(sender, client_msg_id)`: what makes a send idempotent.
type Key = (String, String);

fn key((caller, msg): &Request) -> Option<Key> {
    Some((caller.user_id.clone(), msg.client_msg_id.clone()?))
}

/// The messages a batch stores: each key once, numbered per room in arrival order.
struct Numbered {
    /// `(request index, seq)` of each message to insert.
    fresh: Vec<(usize, i64)>,
    /// The request that stores each key; later requests with the key are its retries.
    first_of: HashMap<Key, usize>,
}

impl Store {
    /// Stores a batch of sends; one result per request, in order. Each is answered on its
    /// own merits: when the batch fails as a whole, its open requests are stored again one
    /// by one, so only the one at fault gets the error.
    pub(super) async fn insert_batch(&self, requests: &[Request]) -> Vec<Reply> {
        let mut results: Vec<Option<Reply>> = vec![None; requests.len()];
        match self.store_together(requests, &mut results).await {
            Ok(()) => {}
            // An unavailable database is no request's fault, and a commit cut off on the
            // way may have landed: storing again could store a send without a
            // `client_msg_id` twice. Every open request hears `unavailable`; clients retry.
            Err(err @ ServiceError::Unavailable(_)) => {
                results.iter_mut().filter(|r| r.is_none()).for_each(|r| *r = Some(Err(err.clone())));
            }
            Err(err) => self.store_one_by_one(requests, &mut results, err).await,
        }
        results.into_iter().map(|r| r.unwrap_or_else(|| Err(ServiceError::Conflict("retry".into())))).collect()
    }

    /// Screens the requests, then stores the rest in one transaction.
    async fn store_together(&self, requests: &[Request], results: &mut [Option<Reply>]) -> Result<(), ServiceError> {
        self.screen(requests, results).await?;
        self.commit_retrying(requests, results).await
    }

    /// After `batch_err` failed the batch: each open request in its own transaction, in
    /// arrival order (so seqs keep it). Validation keeps known poison (U+0000) out of
    /// batches; this is for whatever it does not know. A request that fails alone gets its
    /// own error. Should the database become unavailable meanwhile, the rest would only
    /// fail in turn, each after its own wait: the first to meet it answers them all.
    async fn store_one_by_one(&self, requests: &[Request], results: &mut [Option<Reply>], batch_err: ServiceError) {
        let open: Vec<usize> = (0..requests.len()).filter(|&i| results[i].is_none()).collect();
        if let [only] = open[..] {
            results[only] = Some(Err(batch_err));
            return;
        }
        tracing::warn!(error = ?batch_err, open = open.len(), "group commit failed; storing its sends one by one");
        let mut unavailable: Option<ServiceError> = None;
        for i in open {
            if let Some(err) = &unavailable {
                results[i] = Some(Err(err.clone()));
                continue;
            }
            let result = &mut results[i..=i];
            if let Err(err) = self.store_together(&requests[i..=i], result).await {
                if matches!(err, ServiceError::Unavailable(_)) {
                    unavailable = Some(err.clone());
                }
                result[0] = Some(Err(err));
            }
        }
    }

    /// A unique violation means a batch of other rooms (another worker's, here or in
    /// another replica), which our locks do not wait for, stored the same
    /// `(sender, client_msg_id)` meanwhile; the second attempt finds it.
    async fn commit_retrying(&self, requests: &[Request], results: &mut [Option<Reply>]) -> Result<(), ServiceError> {
        match self.commit_batch(requests, results).await {
            Err(ServiceError::Internal(err)) if is_unique_violation(&err) => self.commit_batch(requests, results).await,
            attempt => attempt,
        }
    }

    /// Refuses, before any lock, the requests that cannot be stored: rooms that do not
    /// exist, senders who are not members, replies to messages of other rooms.
    async fn screen(&self, requests: &[Request], results: &mut [Option<Reply>]) -> Result<(), ServiceError> {
        let rooms: Vec<i64> = requests.iter().map(|(_, m)| m.room_id).collect::<HashSet<_>>().into_iter().collect();
        let senders: Vec<String> =
            requests.iter().map(|(c, _)| c.user_id.clone()).collect::<HashSet<_>>().into_iter().collect();
        let found: Vec<(i64, String, Vec<String>)> = sqlx::query_as(
            "SELECT r.id, r.kind, COALESCE(array_agg(m.user_id) FILTER (WHERE m.user_id IS NOT NULL), '{}') \
             FROM rooms r LEFT JOIN room_members m ON m.room_id = r.id AND m.user_id = ANY($2) \
             WHERE r.id = ANY($1) GROUP BY r.id, r.kind",
        )
        .bind(&rooms)
        .bind(&senders)
        .fetch_all(&self.pool)
        .await?;
        let rooms: HashMap<i64, (bool, HashSet<String>)> = found
            .into_iter()
            .map(|(id, kind, members)| (id, (kind == "support", members.into_iter().collect())))
            .collect();
        let replies: Vec<i64> = requests.iter().filter_map(|(_, m)| m.reply_to).collect();
        let reply_rooms: HashMap<i64, i64> = if replies.is_empty() {
            HashMap::new()
        } else {
            sqlx::query_as("SELECT id, room_id FROM messages WHERE id = ANY($1)")
                .bind(&replies)
                .fetch_all(&self.pool)
                .await?
                .into_iter()
                .collect()
        };
        for ((caller, msg), result) in requests.iter().zip(results.iter_mut()) {
            let Some((support, members)) = rooms.get(&msg.room_id) else {
                *result = Some(Err(ServiceError::NotFound("room")));
                continue;
            };
            let may_write = members.contains(&caller.user_id) || (*support && caller.admin);
            if !may_write {
                *result = Some(Err(ServiceError::Forbidden("not a member of this room")));
            } else if msg.reply_to.is_some_and(|r| reply_rooms.get(&r) != Some(&msg.room_id)) {
                *result = Some(Err(ServiceError::InvalidArgument("reply_to names no message of this room".into())));
            }
        }
        Ok(())
    }

    /// One transaction: lock the rooms, answer retries with what is stored, insert the
    /// rest under consecutive seqs per room.
    async fn commit_batch(&self, requests: &[Request], results: &mut [Option<Reply>]) -> Result<(), ServiceError> {
        let open: Vec<usize> = (0..requests.len()).filter(|&i| results[i].is_none()).collect();
        if open.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        let mut last_seqs = lock_rooms(&mut tx, requests, &open).await?;
        let stored = stored_retries(&mut tx, requests, &open).await?;
        let numbered = number_fresh(requests, &open, &stored, &mut last_seqs);
        let inserted = insert(&mut tx, requests, &numbered.fresh, &last_seqs).await?;
        tx.commit().await?;
        // Committed: no error may fail the batch from here on, or the one-by-one fallback
        // would store its new messages again. Failing to read back the stored messages'
        // reactions and files fails only the retries that answer with them.
        let retried: HashSet<Key> = stored.keys().cloned().collect();
        let stored = match self.decorate(stored.into_values().collect()).await {
            Ok(stored) => stored,
            Err(err) => {
                for &i in &open {
                    if key(&requests[i]).is_some_and(|k| retried.contains(&k)) {
                        results[i] = Some(Err(err.clone()));
                    }
                }
                Vec::new()
            }
        };
        let open: Vec<usize> = open.into_iter().filter(|&i| results[i].is_none()).collect();
        answer(requests, &open, &numbered, inserted, stored, results);
        Ok(())
    }
}

fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// Locks the rooms of the open requests, in id order; each room's `last_seq`. A room
/// deleted since `screen` is missing.
async fn lock_rooms(
    tx: &mut PgConnection,
    requests: &[Request],
    open: &[usize],
) -> Result<HashMap<i64, i64>, ServiceError> {
    let mut rooms: Vec<i64> = open.iter().map(|&i| requests[i].1.room_id).collect();
    rooms.sort_unstable();
    rooms.dedup();
    let locked: Vec<(i64, i64)> =
        sqlx::query_as("SELECT id, last_seq FROM rooms WHERE id = ANY($1) ORDER BY id FOR UPDATE")
            .bind(&rooms)
            .fetch_all(tx)
            .await?;
    Ok(locked.into_iter().collect())
}

/// The open requests' keys already stored: retries. Looked up under the room locks, which
/// make every earlier batch of these rooms visible.
async fn stored_retries(
    tx: &mut PgConnection,
    requests: &[Request],
    open: &[usize],
) -> Result<HashMap<Key, MessageRow>, ServiceError> {
    let (senders, ids): (Vec<String>, Vec<String>) = open.iter().filter_map(|&i| key(&requests[i])).unzip();
    if senders.is_empty() {
        return Ok(HashMap::new());
    }
    const SQL: &str = concat!(
        "SELECT ",
        message_columns!(),
        " FROM messages WHERE (sender_id, client_msg_id) IN (SELECT * FROM UNNEST($1::text[], $2::text[]))"
    );
    let rows: Vec<MessageRow> = sqlx::query_as(SQL).bind(&senders).bind(&ids).fetch_all(tx).await?;
    Ok(rows.into_iter().filter_map(|row| Some(((row.sender_id.clone(), row.client_msg_id.clone()?), row))).collect())
}

/// Numbers the open requests that store a new message, moving `last_seqs` past them.
fn number_fresh(
    requests: &[Request],
    open: &[usize],
    stored: &HashMap<Key, MessageRow>,
    last_seqs: &mut HashMap<i64, i64>,
) -> Numbered {
    let mut numbered = Numbered { fresh: Vec::new(), first_of: HashMap::new() };
    for &i in open {
        if let Some(key) = key(&requests[i]) {
            if stored.contains_key(&key) || numbered.first_of.contains_key(&key) {
                continue;
            }
            numbered.first_of.insert(key, i);
        }
        let Some(last) = last_seqs.get_mut(&requests[i].1.room_id) else { continue };
        *last += 1;
        numbered.fresh.push((i, *last));
    }
    numbered
}

/// Inserts the numbered messages and their attachment links, and moves the rooms'
/// `last_seq`; the new messages by request index, complete (new rows carry no reactions,
/// and their attachments are filled in from the links).
async fn insert(
    tx: &mut PgConnection,
    requests: &[Request],
    fresh: &[(usize, i64)],
    last_seqs: &HashMap<i64, i64>,
) -> Result<HashMap<usize, Message>, ServiceError> {
    if fresh.is_empty() {
        return Ok(HashMap::new());
    }
    let mut rows: HashMap<(i64, i64), MessageRow> =
        insert_messages(tx, requests, fresh).await?.into_iter().map(|r| ((r.room_id, r.seq), r)).collect();
    let mut inserted: HashMap<usize, Message> = HashMap::new();
    for &(i, seq) in fresh {
        if let Some(row) = rows.remove(&(requests[i].1.room_id, seq)) {
            inserted.insert(i, Message::from(row));
        }
    }
    attach_new_files(tx, requests, &mut inserted).await?;
    advance_rooms(tx, last_seqs).await?;
    Ok(inserted)
}

/// One `INSERT` for all the numbered messages.
async fn insert_messages(
    tx: &mut PgConnection,
    requests: &[Request],
    fresh: &[(usize, i64)],
) -> Result<Vec<MessageRow>, ServiceError> {
    let column = |f: &dyn Fn(&Request) -> Option<String>| -> Vec<Option<String>> {
        fresh.iter().map(|&(i, _)| f(&requests[i])).collect()
    };
    let room_ids: Vec<i64> = fresh.iter().map(|&(i, _)| requests[i].1.room_id).collect();
    let seqs: Vec<i64> = fresh.iter().map(|&(_, seq)| seq).collect();
    let reply_to: Vec<Option<i64>> = fresh.iter().map(|&(i, _)| requests[i].1.reply_to).collect();
    const SQL: &str = concat!(
        "INSERT INTO messages (room_id, seq, sender_id, sender_name, kind, body, reply_to, client_msg_id) \
         SELECT * FROM UNNEST($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], \
           $7::bigint[], $8::text[]) \
         RETURNING ",
        message_columns!()
    );
    let rows = sqlx::query_as(SQL)
        .bind(&room_ids)
        .bind(&seqs)
        .bind(column(&|(c, _)| Some(c.user_id.clone())))
        .bind(column(&|(c, _)| c.name.clone()))
        .bind(column(&|(_, m)| Some(m.kind.to_owned())))
        .bind(column(&|(_, m)| Some(m.text.clone())))
        .bind(&reply_to)
        .bind(column(&|(_, m)| m.client_msg_id.clone()))
        .fetch_all(tx)
        .await?;
    Ok(rows)
}

/// Links the new messages that carry attachments to them, and fills them in.
async fn attach_new_files(
    tx: &mut PgConnection,
    requests: &[Request],
    inserted: &mut HashMap<usize, Message>,
) -> Result<(), ServiceError> {
    let mut by_id: HashMap<i64, &mut Message> = HashMap::new();
    let mut links: Vec<(i64, &[i64])> = Vec::new();
    for (&i, message) in inserted.iter_mut() {
        let files = requests[i].1.attachments.as_slice();
        let Ok(id) = message.id.parse::<i64>() else { continue };
        if !files.is_empty() {
            links.push((id, files));
            by_id.insert(id, message);
        }
    }
    for (message_id, attachment) in super::attachments::link(tx, &links).await? {
        if let Some(message) = by_id.get_mut(&message_id) {
            message.attachments.push(attachment);
        }
    }
    Ok(())
}

/// Moves each locked room's `last_seq` to its last number.
async fn advance_rooms(tx: &mut PgConnection, last_seqs: &HashMap<i64, i64>) -> Result<(), ServiceError> {
    let (ids, lasts): (Vec<i64>, Vec<i64>) = last_seqs.iter().map(|(id, last)| (*id, *last)).unzip();
    sqlx::query(
        "UPDATE rooms SET last_seq = t.last FROM UNNEST($1::bigint[], $2::bigint[]) AS t(id, last) \
         WHERE rooms.id = t.id AND rooms.last_seq <> t.last",
    )
    .bind(&ids)
    .bind(&lasts)
    .execute(tx)
    .await?;
    Ok(())
}

/// Answers every open request: its new message, or the message its key names (stored
/// before, or stored by an earlier request of this batch) if that is in the same room.
fn answer(
    requests: &[Request],
    open: &[usize],
    numbered: &Numbered,
    inserted: HashMap<usize, Message>,
    stored: Vec<Message>,
    results: &mut [Option<Reply>],
) {
    let stored: HashMap<Key, Message> =
        stored.into_iter().filter_map(|m| Some(((m.sender_id.clone(), m.client_msg_id.clone()?), m))).collect();
    for &i in open {
        if let Some(message) = inserted.get(&i) {
            results[i] = Some(Ok((message.clone(), false)));
            continue;
        }
        let earlier = key(&requests[i])
            .and_then(|k| stored.get(&k).or_else(|| numbered.first_of.get(&k).and_then(|j| inserted.get(j))));
        results[i] = Some(match earlier {
            Some(existing) if existing.room_id == requests[i].1.room_id.to_string() => Ok((existing.clone(), true)),
            // A `client_msg_id` names one message per sender; reusing it in another room is
            // a client bug that must not silently return a message of a different room.
            Some(_) => Err(ServiceError::Conflict("client_msg_id was already used in another room".into())),
            None => Err(ServiceError::NotFound("room")),
        });
    }
}
