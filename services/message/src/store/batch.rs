//! Group commit: sends waiting at one worker are stored together, one transaction per
//! batch whatever their rooms, so Postgres does one commit (one fsync) per batch instead
//! of one per message.
//!
//! Seqs stay gapless and idempotency exact: the batch locks its rooms' rows (in id order,
//! so batches never deadlock), then looks up which `(sender, client_msg_id)` pairs are
//! already stored (they are answered with the stored message, as a retry), numbers only
//! the new messages from each locked `last_seq`, inserts them in one statement and moves
//! each room's `last_seq` by exactly its count before committing.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use chat_proto::v1::{Caller, Message};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::{message_columns, MessageRow, Store};
use crate::error::ServiceError;

/// Most sends one transaction stores.
const MAX_BATCH: usize = 256;
/// Sends queued per worker before `submit` waits (back-pressure onto the gRPC handler).
const QUEUE: usize = 4096;

/// A validated message to store, owned so it can wait in a queue.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub room_id: i64,
    pub kind: &'static str,
    pub text: String,
    pub reply_to: Option<i64>,
    pub client_msg_id: Option<String>,
}

type Reply = Result<(Message, bool), ServiceError>;

struct Job {
    caller: Caller,
    msg: Outgoing,
    reply: oneshot::Sender<Reply>,
    /// The request's span, so the batch shows up in its trace.
    span: tracing::Span,
}

/// Handle to the commit workers; cheap to clone. Each room is always served by the same
/// worker, so its sends queue up behind one another and batch naturally under load.
#[derive(Clone)]
pub struct Committer {
    workers: Arc<[mpsc::Sender<Job>]>,
}

impl Committer {
    /// Starts `workers` commit workers on `store` (each uses one pooled connection at a time),
    /// tracked by `tasks`; they stop once every handle is dropped and their queue is empty.
    pub fn start(store: Store, workers: usize, tasks: &tokio_util::task::TaskTracker) -> Self {
        let workers: Vec<mpsc::Sender<Job>> = (0..workers.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel(QUEUE);
                tasks.spawn(work(store.clone(), rx));
                tx
            })
            .collect();
        Self { workers: workers.into() }
    }

    /// Stores `msg` from `caller`; the message and whether it was stored before (a retry).
    pub async fn submit(&self, caller: Caller, msg: Outgoing) -> Reply {
        let worker = &self.workers[msg.room_id.unsigned_abs() as usize % self.workers.len()];
        let (reply, rx) = oneshot::channel();
        let span = tracing::Span::current();
        worker.send(Job { caller, msg, reply, span }).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

fn stopped() -> ServiceError {
    ServiceError::Unavailable(sqlx::Error::PoolClosed)
}

async fn work(store: Store, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let mut jobs = vec![first];
        while jobs.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(job) => jobs.push(job),
                Err(_) => break,
            }
        }
        let span =
            tracing::info_span!("db.insert_batch", otel.kind = "client", db.system = "postgresql", batch = jobs.len());
        chat_common::propagation::serve_batch(&span, jobs.iter().map(|j| &j.span));
        let (requests, replies): (Vec<_>, Vec<_>) = jobs.into_iter().map(|j| ((j.caller, j.msg), j.reply)).unzip();
        let results = store.insert_batch(&requests).instrument(span).await;
        for (reply, result) in replies.into_iter().zip(results) {
            let _ = reply.send(result);
        }
    }
}

/// The same failure for every member of a failed batch (the first keeps the cause).
fn shared(err: &ServiceError) -> ServiceError {
    let echo = || sqlx::Error::Protocol(format!("the batch failed: {err}"));
    match err {
        ServiceError::Unavailable(_) => ServiceError::Unavailable(echo()),
        ServiceError::InvalidArgument(m) => ServiceError::InvalidArgument(m.clone()),
        ServiceError::NotFound(m) => ServiceError::NotFound(m),
        ServiceError::Forbidden(m) => ServiceError::Forbidden(m),
        ServiceError::Conflict(m) => ServiceError::Conflict(m.clone()),
        ServiceError::Internal(_) => ServiceError::Internal(echo()),
    }
}

impl Store {
    /// Stores a batch of sends; one result per request, in order.
    async fn insert_batch(&self, requests: &[(Caller, Outgoing)]) -> Vec<Reply> {
        let mut results: Vec<Option<Reply>> = requests.iter().map(|_| None).collect();
        if let Err(err) = self.screen(requests, &mut results).await {
            return fill(results, err);
        }
        // A unique violation means a concurrent writer (another worker's batch, or the
        // attachment path) stored the same (sender, client_msg_id); the second attempt
        // finds it.
        let mut attempt = self.commit_batch(requests, &mut results).await;
        if matches!(&attempt, Err(ServiceError::Internal(sqlx::Error::Database(db))) if db.is_unique_violation()) {
            attempt = self.commit_batch(requests, &mut results).await;
        }
        match attempt {
            Ok(()) => {
                results.into_iter().map(|r| r.unwrap_or_else(|| Err(ServiceError::Conflict("retry".into())))).collect()
            }
            Err(err) => fill(results, err),
        }
    }

    /// Refuses, before any lock, the requests that cannot be stored: rooms that do not
    /// exist, senders who are not members, replies to messages of other rooms.
    async fn screen(&self, requests: &[(Caller, Outgoing)], results: &mut [Option<Reply>]) -> Result<(), ServiceError> {
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
    async fn commit_batch(
        &self,
        requests: &[(Caller, Outgoing)],
        results: &mut [Option<Reply>],
    ) -> Result<(), ServiceError> {
        let open: Vec<usize> = (0..requests.len()).filter(|&i| results[i].is_none()).collect();
        if open.is_empty() {
            return Ok(());
        }
        let mut rooms: Vec<i64> = open.iter().map(|&i| requests[i].1.room_id).collect();
        rooms.sort_unstable();
        rooms.dedup();
        let mut tx = self.pool.begin().await?;
        let locked: Vec<(i64, i64)> =
            sqlx::query_as("SELECT id, last_seq FROM rooms WHERE id = ANY($1) ORDER BY id FOR UPDATE")
                .bind(&rooms)
                .fetch_all(&mut *tx)
                .await?;
        let mut next: HashMap<i64, i64> = locked.into_iter().collect();

        // Retries: (sender, client_msg_id) pairs already stored, now that the locks make
        // every earlier batch of these rooms visible.
        let keyed: Vec<(String, String)> = open
            .iter()
            .filter_map(|&i| Some((requests[i].0.user_id.clone(), requests[i].1.client_msg_id.clone()?)))
            .collect();
        let mut stored: HashMap<(String, String), MessageRow> = HashMap::new();
        if !keyed.is_empty() {
            const SQL: &str = concat!(
                "SELECT ",
                message_columns!(),
                " FROM messages WHERE (sender_id, client_msg_id) IN \
                 (SELECT * FROM UNNEST($1::text[], $2::text[]))"
            );
            let (senders, ids): (Vec<String>, Vec<String>) = keyed.iter().cloned().unzip();
            let rows: Vec<MessageRow> = sqlx::query_as(SQL).bind(&senders).bind(&ids).fetch_all(&mut *tx).await?;
            for row in rows {
                if let Some(cid) = row.client_msg_id.clone() {
                    stored.insert((row.sender_id.clone(), cid), row);
                }
            }
        }

        // The new messages, each (sender, client_msg_id) once, numbered per room in
        // arrival order.
        let mut fresh: Vec<(usize, i64)> = Vec::new();
        let mut first_of: HashMap<(String, String), usize> = HashMap::new();
        for &i in &open {
            let (caller, msg) = &requests[i];
            if let Some(cid) = &msg.client_msg_id {
                let key = (caller.user_id.clone(), cid.clone());
                if stored.contains_key(&key) || first_of.contains_key(&key) {
                    continue;
                }
                first_of.insert(key, i);
            }
            let Some(last) = next.get_mut(&msg.room_id) else { continue };
            *last += 1;
            fresh.push((i, *last));
        }
        let mut inserted: HashMap<(i64, i64), MessageRow> = HashMap::new();
        if !fresh.is_empty() {
            let column = |f: &dyn Fn(&(Caller, Outgoing)) -> Option<String>| -> Vec<Option<String>> {
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
            let rows: Vec<MessageRow> = sqlx::query_as(SQL)
                .bind(&room_ids)
                .bind(&seqs)
                .bind(column(&|(c, _)| Some(c.user_id.clone())))
                .bind(column(&|(c, _)| c.name.clone()))
                .bind(column(&|(_, m)| Some(m.kind.to_owned())))
                .bind(column(&|(_, m)| Some(m.text.clone())))
                .bind(&reply_to)
                .bind(column(&|(_, m)| m.client_msg_id.clone()))
                .fetch_all(&mut *tx)
                .await?;
            inserted = rows.into_iter().map(|r| ((r.room_id, r.seq), r)).collect();
            let (ids, lasts): (Vec<i64>, Vec<i64>) = next.iter().map(|(id, last)| (*id, *last)).unzip();
            sqlx::query(
                "UPDATE rooms SET last_seq = t.last FROM UNNEST($1::bigint[], $2::bigint[]) AS t(id, last) \
                 WHERE rooms.id = t.id AND rooms.last_seq <> t.last",
            )
            .bind(&ids)
            .bind(&lasts)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;

        // New rows carry no reactions or attachments yet: no decoration needed.
        let mut new_messages: HashMap<usize, Message> = HashMap::new();
        for &(i, seq) in &fresh {
            if let Some(row) = inserted.remove(&(requests[i].1.room_id, seq)) {
                new_messages.insert(i, Message::from(row));
            }
        }
        let decorated = self.decorate(stored.into_values().collect()).await?;
        let by_key: HashMap<(String, String), Message> =
            decorated.into_iter().filter_map(|m| Some(((m.sender_id.clone(), m.client_msg_id.clone()?), m))).collect();
        for &i in &open {
            let (caller, msg) = &requests[i];
            if let Some(message) = new_messages.get(&i) {
                results[i] = Some(Ok((message.clone(), false)));
                continue;
            }
            let key = msg.client_msg_id.clone().map(|cid| (caller.user_id.clone(), cid));
            let earlier = key.as_ref().and_then(|k| {
                by_key.get(k).cloned().or_else(|| first_of.get(k).and_then(|&j| new_messages.get(&j).cloned()))
            });
            results[i] = Some(match earlier {
                Some(existing) if existing.room_id == msg.room_id.to_string() => Ok((existing, true)),
                Some(_) => Err(ServiceError::Conflict("client_msg_id was already used in another room".into())),
                None => Err(ServiceError::NotFound("room")),
            });
        }
        Ok(())
    }
}

/// Every unanswered request gets (a copy of) `err`.
fn fill(results: Vec<Option<Reply>>, err: ServiceError) -> Vec<Reply> {
    let mut first = Some(err);
    let mut copy: Option<ServiceError> = None;
    results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| match first.take() {
                Some(err) => {
                    copy = Some(shared(&err));
                    Err(err)
                }
                None => Err(copy.as_ref().map(shared).unwrap_or_else(stopped)),
            })
        })
        .collect()
}
