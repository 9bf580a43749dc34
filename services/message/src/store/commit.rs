//! One group commit: a batch of sends stored by one call of the `store_messages`
//! function (migration 0006), so a batch costs one round trip and one implicit
//! transaction whatever its size.
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

use super::attachments::File;
use super::batch::{NewMessage, Reply};
use super::{MessageRow, Store};
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

    /// One call of `store_messages`; then the retries' reactions and files, read back
    /// after the commit. Failing to read them fails only those retries.
    async fn store_together(&self, conn: &mut PgConnection, requests: &[Request]) -> Result<Vec<Reply>, ServiceError> {
        let mut answers = call_store_messages(conn, requests).await?;
        answers.sort_unstable_by_key(|a| a.ord);
        if answers.iter().map(|a| a.ord).ne(1..=requests.len() as i32) {
            return Err(missing());
        }
        // A message stored now carries the files its request named (`again` answers name
        // a message an earlier request of the batch stored).
        let files: HashMap<i64, &[File]> = answers
            .iter()
            .zip(requests)
            .filter(|(a, _)| a.outcome == "new")
            .filter_map(|(a, (_, msg))| Some((a.id?, msg.attachments.as_slice())))
            .collect();
        let mut replies: Vec<Reply> = Vec::with_capacity(answers.len());
        let mut retried: Vec<(usize, MessageRow)> = Vec::new();
        for answer in answers {
            match answer.into_reply(&files) {
                Answered::Reply(reply) => replies.push(reply),
                Answered::Retry(row) => {
                    retried.push((replies.len(), row));
                    replies.push(Err(missing()));
                }
            }
        }
        if retried.is_empty() {
            return Ok(replies);
        }
        let (at, rows): (Vec<usize>, Vec<MessageRow>) = retried.into_iter().unzip();
        match self.decorate(rows).await {
            Ok(messages) => at.into_iter().zip(messages).for_each(|(i, m)| replies[i] = Ok((m, true))),
            Err(err) => at.into_iter().for_each(|i| replies[i] = Err(err.clone())),
        }
        Ok(replies)
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
/// message it names.
#[derive(sqlx::FromRow)]
struct StoredAnswer {
    /// The request's index, from 1.
    ord: i32,
    outcome: String,
    id: Option<i64>,
    room_id: Option<i64>,
    seq: Option<i64>,
    sender_id: Option<String>,
    sender_name: Option<String>,
    kind: Option<String>,
    body: Option<String>,
    reply_to: Option<i64>,
    client_msg_id: Option<String>,
    created_at: Option<DateTime<Utc>>,
    edited_at: Option<DateTime<Utc>>,
    deleted: bool,
}

enum Answered {
    Reply(Reply),
    /// Stored before this batch: its reactions and files are read back separately.
    Retry(MessageRow),
}

impl StoredAnswer {
    /// `files` holds what each message stored by this batch carries, by message id.
    fn into_reply(self, files: &HashMap<i64, &[File]>) -> Answered {
        let refused = match self.outcome.as_str() {
            "new" | "again" | "retry" => None,
            "not_found" => Some(ServiceError::NotFound("room")),
            "forbidden" => Some(ServiceError::Forbidden("not a member of this room")),
            "bad_reply" => Some(ServiceError::InvalidArgument("reply_to names no message of this room".into())),
            // A `client_msg_id` names one message per sender; reusing it in another room is
            // a client bug that must not silently return a message of a different room.
            "conflict" => Some(ServiceError::Conflict("client_msg_id was already used in another room".into())),
            _ => Some(missing()),
        };
        if let Some(err) = refused {
            return Answered::Reply(Err(err));
        }
        let duplicate = self.outcome != "new";
        let retry = self.outcome == "retry";
        let Some(row) = self.message_row() else { return Answered::Reply(Err(missing())) };
        if retry {
            return Answered::Retry(row);
        }
        let carried = files.get(&row.id).copied().unwrap_or_default();
        let mut message = Message::from(row);
        message.attachments = carried.iter().map(|f| f.attachment.clone()).collect();
        Answered::Reply(Ok((message, duplicate)))
    }

    fn message_row(self) -> Option<MessageRow> {
        Some(MessageRow {
            id: self.id?,
            room_id: self.room_id?,
            seq: self.seq?,
            sender_id: self.sender_id?,
            sender_name: self.sender_name,
            kind: self.kind?,
            body: self.body,
            reply_to: self.reply_to,
            client_msg_id: self.client_msg_id,
            created_at: self.created_at?,
            edited_at: self.edited_at,
            deleted: self.deleted,
        })
    }
}
