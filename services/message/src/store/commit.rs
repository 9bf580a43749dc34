//! One group commit: a batch of sends stored by one call of the `store_messages`
//! function (migrations 0006 and 0007), so a batch costs one round trip and one implicit
//! transaction whatever its size. A batch of one that is stored, the common case at
//! ordinary load, takes a single statement inside it (0007).
//!
//! The function keeps seqs gapless and idempotency exact: it locks the batch's rooms (in id
//! order, so batches never deadlock), screens each send (room, membership, reply), answers
//! the `(sender, client_msg_id)` pairs already stored as retries, numbers the new messages
//! from each locked `last_seq`, inserts them with their attachment links and moves each
//! room's `last_seq`. A batch that fails as a whole is stored again one request per call,
//! so one bad send never fails another.

use std::collections::HashMap;

use chat_proto::v1::{Caller, Message};
use chrono::{DateTime, Utc};
use sqlx::PgConnection;

use super::batch::{NewMessage, Reply};
use super::{message_columns, MessageRow, Store};
use crate::error::ServiceError;

/// One send of a batch: who sends what.
type Request = (Caller, NewMessage);

impl Store {
    /// Stores a batch of sends on `conn`; one result per request, in order. Each is
    /// answered on its own merits: when the batch fails as a whole, its requests are stored
    /// again one by one, so only the one at fault gets the error.
    pub(super) async fn insert_batch(&self, conn: &mut PgConnection, requests: &[Request]) -> Vec<Reply> {
        match self.store_retrying(conn, requests).await {
            Ok(replies) => replies,
            // An unavailable database is no request's fault, and a commit cut off on the
            // way may have landed: storing again could store a send without a
            // `client_msg_id` twice. Every request hears `unavailable`; clients retry.
            Err(err @ ServiceError::Unavailable(_)) => vec![Err(err); requests.len()],
            Err(err) if requests.len() == 1 => vec![Err(err)],
            Err(err) => self.store_one_by_one(conn, requests, err).await,
        }
    }

    /// After `batch_err` failed the batch: each request in its own call, in arrival order
    /// (so seqs keep it). Validation keeps known poison (U+0000) out of batches; this is
    /// for whatever it does not know. A request that fails alone gets its own error.
    /// Should the database become unavailable meanwhile, the rest would only fail in turn,
    /// each after its own wait: the first to meet it answers them all.
    async fn store_one_by_one(
        &self,
        conn: &mut PgConnection,
        requests: &[Request],
        batch_err: ServiceError,
    ) -> Vec<Reply> {
        tracing::warn!(error = ?batch_err, batch = requests.len(), "group commit failed; storing its sends one by one");
        let mut replies = Vec::with_capacity(requests.len());
        let mut unavailable: Option<ServiceError> = None;
        for request in requests.chunks(1) {
            if let Some(err) = &unavailable {
                replies.push(Err(err.clone()));
                continue;
            }
            match self.store_retrying(conn, request).await {
                Ok(mut one) => replies.push(one.pop().unwrap_or_else(|| Err(missing()))),
                Err(err) => {
                    if matches!(err, ServiceError::Unavailable(_)) {
                        unavailable = Some(err.clone());
                    }
                    replies.push(Err(err));
                }
            }
        }
        replies
    }

    /// A unique violation means a batch of other rooms (another replica's), which our
    /// locks do not wait for, stored the same `(sender, client_msg_id)` meanwhile; the
    /// second attempt finds it.
    async fn store_retrying(&self, conn: &mut PgConnection, requests: &[Request]) -> Result<Vec<Reply>, ServiceError> {
        match self.store_together(conn, requests).await {
            Err(ServiceError::Internal(err)) if is_unique_violation(&err) => self.store_together(conn, requests).await,
            attempt => attempt,
        }
    }

    /// One call of `store_messages`. A new message is the request's own content with the
    /// id, seq and time the database gave it; a retry within the batch is answered with
    /// the message its first request stored. Retries of messages stored before are read
    /// back with their reactions and files after the commit: failing to read them fails
    /// only those retries.
    async fn store_together(&self, conn: &mut PgConnection, requests: &[Request]) -> Result<Vec<Reply>, ServiceError> {
        let answers = call_store_messages(conn, requests).await?;
        // Committed: no error may fail the batch from here on, or the one-by-one fallback
        // would store its new messages again. Each request without its answer fails alone.
        let mut slots: Vec<Option<StoredAnswer>> = requests.iter().map(|_| None).collect();
        for answer in answers {
            let at = usize::try_from(answer.ord).ok().and_then(|ord| ord.checked_sub(1));
            if let Some(slot) = at.and_then(|i| slots.get_mut(i)) {
                *slot = Some(answer);
            }
        }
        let mut replies: Vec<Reply> = slots
            .iter()
            .zip(requests)
            .map(|(a, r)| a.as_ref().map_or_else(|| Err(missing()), |a| a.reply(r)))
            .collect();
        let stored_now: HashMap<i64, Message> = slots
            .iter()
            .zip(&replies)
            .filter_map(|(answer, reply)| match reply {
                Ok((message, false)) => Some((answer.as_ref()?.id?, message.clone())),
                _ => None,
            })
            .collect();
        let mut retried: Vec<(usize, i64)> = Vec::new();
        for (i, answer) in slots.iter().enumerate() {
            match answer.as_ref().map(|a| (a.outcome.as_str(), a.id)) {
                Some(("again", Some(id))) => {
                    replies[i] = stored_now.get(&id).cloned().map(|m| (m, true)).ok_or_else(missing);
                }
                Some(("retry", Some(id))) => retried.push((i, id)),
                _ => {}
            }
        }
        if !retried.is_empty() {
            let (at, ids): (Vec<usize>, Vec<i64>) = retried.into_iter().unzip();
            match self.stored_messages(&ids).await {
                Ok(mut found) => {
                    for (i, id) in at.into_iter().zip(ids) {
                        replies[i] = found.remove(&id).map(|m| (m, true)).ok_or_else(missing);
                    }
                }
                Err(err) => at.into_iter().for_each(|i| replies[i] = Err(err.clone())),
            }
        }
        Ok(replies)
    }

    /// Messages stored before, by id, with their reactions and files.
    async fn stored_messages(&self, ids: &[i64]) -> Result<HashMap<i64, Message>, ServiceError> {
        const SQL: &str = concat!("SELECT ", message_columns!(), " FROM messages WHERE id = ANY($1)");
        let rows: Vec<MessageRow> = sqlx::query_as(SQL).bind(ids).fetch_all(&self.pool).await?;
        let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
        Ok(ids.into_iter().zip(self.decorate(rows).await?).collect())
    }
}

/// A reply that should have come and did not: a bug, not the client's fault.
fn missing() -> ServiceError {
    ServiceError::Internal(std::sync::Arc::new(sqlx::Error::Protocol("store_messages answered too few rows".into())))
}

fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// Passes the batch as parallel arrays, one element per request; attachments as
/// `(request, attachment, position)` triples, request and position counting from 1.
async fn call_store_messages(conn: &mut PgConnection, requests: &[Request]) -> Result<Vec<StoredAnswer>, ServiceError> {
    let column = |f: &dyn Fn(&Request) -> Option<String>| -> Vec<Option<String>> { requests.iter().map(f).collect() };
    let rooms: Vec<i64> = requests.iter().map(|(_, m)| m.room_id).collect();
    let admins: Vec<bool> = requests.iter().map(|(c, _)| c.admin).collect();
    let replies: Vec<Option<i64>> = requests.iter().map(|(_, m)| m.reply_to).collect();
    let mut links: (Vec<i32>, Vec<i64>, Vec<i32>) = Default::default();
    for (request, (_, msg)) in (1..).zip(requests) {
        for (position, file) in (1..).zip(&msg.attachments) {
            links.0.push(request);
            links.1.push(file.id);
            links.2.push(position);
        }
    }
    Ok(sqlx::query_as("SELECT * FROM store_messages($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)")
        .bind(&rooms)
        .bind(column(&|(c, _)| Some(c.user_id.clone())))
        .bind(&admins)
        .bind(column(&|(c, _)| c.name.clone()))
        .bind(column(&|(_, m)| Some(m.kind.to_owned())))
        .bind(column(&|(_, m)| Some(m.text.clone())))
        .bind(&replies)
        .bind(column(&|(_, m)| m.client_msg_id.clone()))
        .bind(&links.0)
        .bind(&links.1)
        .bind(&links.2)
        .fetch_all(conn)
        .await?)
}

/// One row of `store_messages`: the outcome of one send and, unless it was refused, the
/// id of the message it names; for a new message its seq and time.
#[derive(sqlx::FromRow)]
struct StoredAnswer {
    /// The request's index, from 1.
    ord: i32,
    outcome: String,
    id: Option<i64>,
    seq: Option<i64>,
    created_at: Option<DateTime<Utc>>,
}

impl StoredAnswer {
    /// The reply to `request`; `again` and `retry` answers are completed by the caller.
    fn reply(&self, (caller, msg): &Request) -> Reply {
        match self.outcome.as_str() {
            "new" => {
                let (Some(id), Some(seq), Some(created_at)) = (self.id, self.seq, self.created_at) else {
                    return Err(missing());
                };
                let message = Message {
                    id: id.to_string(),
                    room_id: msg.room_id.to_string(),
                    seq,
                    sender_id: caller.user_id.clone(),
                    sender_name: caller.name.clone(),
                    kind: msg.kind.to_owned(),
                    text: Some(msg.text.clone()),
                    attachments: msg.attachments.iter().map(|f| f.attachment.clone()).collect(),
                    reply_to: msg.reply_to.map(|id| id.to_string()),
                    client_msg_id: msg.client_msg_id.clone(),
                    created_at_ms: created_at.timestamp_millis(),
                    edited_at_ms: None,
                    deleted: false,
                    reactions: Vec::new(),
                    reply_count: 0,
                    last_reply_at_ms: None,
                };
                Ok((message, false))
            }
            "not_found" => Err(ServiceError::NotFound("room")),
            "forbidden" => Err(ServiceError::Forbidden("not a member of this room")),
            "bad_reply" => Err(ServiceError::InvalidArgument("reply_to names no message of this room".into())),
            // A `client_msg_id` names one message per sender; reusing it in another room is
            // a client bug that must not silently return a message of a different room.
            "conflict" => Err(ServiceError::Conflict("client_msg_id was already used in another room".into())),
            _ => Err(missing()),
        }
    }
}
