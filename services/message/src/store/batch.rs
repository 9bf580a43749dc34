//! Group commit: sends waiting for the same room are stored together, one transaction
//! per batch, so a busy room costs Postgres one commit (one fsync) per batch instead of
//! one per message.
//!
//! Seqs stay gapless and idempotency exact: the batch takes the room row's lock first,
//! then looks up which `(sender, client_msg_id)` pairs are already stored (they are
//! answered with the stored message, as a retry), numbers only the new messages from
//! the locked `last_seq`, inserts them in one statement and moves `last_seq` by exactly
//! that many before committing.

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
    /// Starts `workers` commit workers on `store` (each uses one pooled connection at a time).
    pub fn start(store: Store, workers: usize) -> Self {
        let workers: Vec<mpsc::Sender<Job>> = (0..workers.max(1))
            .map(|_| {
                let (tx, rx) = mpsc::channel(QUEUE);
                tokio::spawn(work(store.clone(), rx));
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
        // One batch per room, rooms in order of first appearance.
        let mut rooms: Vec<(i64, Vec<Job>)> = Vec::new();
        for job in jobs {
            match rooms.iter_mut().find(|(room, _)| *room == job.msg.room_id) {
                Some((_, group)) => group.push(job),
                None => rooms.push((job.msg.room_id, vec![job])),
            }
        }
        for (room, group) in rooms {
            let span = tracing::info_span!(
                "db.insert_batch",
                otel.kind = "client",
                db.system = "postgresql",
                room,
                batch = group.len()
            );
            chat_common::propagation::serve_batch(&span, group.iter().map(|j| &j.span));
            let (requests, replies): (Vec<_>, Vec<_>) = group.into_iter().map(|j| ((j.caller, j.msg), j.reply)).unzip();
            let results = store.insert_batch(room, &requests).instrument(span).await;
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(result);
            }
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
    /// Stores a batch of sends to `room_id`; one result per request, in order.
    async fn insert_batch(&self, room_id: i64, requests: &[(Caller, Outgoing)]) -> Vec<Reply> {
        let mut results: Vec<Option<Reply>> = requests.iter().map(|_| None).collect();
        if let Err(err) = self.screen(room_id, requests, &mut results).await {
            return fill(results, err);
        }
        // A unique violation means another room's batch stored the same (sender,
        // client_msg_id) concurrently; the second attempt finds it.
        let mut attempt = self.commit_batch(room_id, requests, &mut results).await;
        if matches!(&attempt, Err(ServiceError::Internal(sqlx::Error::Database(db))) if db.is_unique_violation()) {
            attempt = self.commit_batch(room_id, requests, &mut results).await;
        }
        match attempt {
            Ok(()) => {
                results.into_iter().map(|r| r.unwrap_or_else(|| Err(ServiceError::Conflict("retry".into())))).collect()
            }
            Err(err) => fill(results, err),
        }
    }

    /// Refuses, before any lock, the requests that cannot be stored: senders who are not
    /// members, and replies to messages of other rooms.
    async fn screen(
        &self,
        room_id: i64,
        requests: &[(Caller, Outgoing)],
        results: &mut [Option<Reply>],
    ) -> Result<(), ServiceError> {
        let senders: Vec<String> =
            requests.iter().map(|(c, _)| c.user_id.clone()).collect::<HashSet<_>>().into_iter().collect();
        let room: Option<(String, Vec<String>)> = sqlx::query_as(
            "SELECT r.kind, COALESCE(array_agg(m.user_id) FILTER (WHERE m.user_id IS NOT NULL), '{}') \
             FROM rooms r LEFT JOIN room_members m ON m.room_id = r.id AND m.user_id = ANY($2) \
             WHERE r.id = $1 GROUP BY r.kind",
        )
        .bind(room_id)
        .bind(&senders)
        .fetch_optional(&self.pool)
        .await?;
        let (kind, members) = room.ok_or(ServiceError::NotFound("room"))?;
        let members: HashSet<String> = members.into_iter().collect();
        let replies: Vec<i64> = requests.iter().filter_map(|(_, m)| m.reply_to).collect();
        let found: HashSet<i64> = if replies.is_empty() {
            HashSet::new()
        } else {
            sqlx::query_scalar("SELECT id FROM messages WHERE room_id = $1 AND id = ANY($2)")
                .bind(room_id)
                .bind(&replies)
                .fetch_all(&self.pool)
                .await?
                .into_iter()
                .collect()
        };
        for ((caller, msg), result) in requests.iter().zip(results.iter_mut()) {
            let may_write = members.contains(&caller.user_id) || (kind == "support" && caller.admin);
            if !may_write {
                *result = Some(Err(ServiceError::Forbidden("not a member of this room")));
            } else if msg.reply_to.is_some_and(|r| !found.contains(&r)) {
                *result = Some(Err(ServiceError::InvalidArgument("reply_to names no message of this room".into())));
            }
        }
        Ok(())
    }

    /// One transaction: lock the room, answer retries with what is stored, insert the
    /// rest under consecutive seqs.
    async fn commit_batch(
        &self,
        room_id: i64,
        requests: &[(Caller, Outgoing)],
        results: &mut [Option<Reply>],
    ) -> Result<(), ServiceError> {
        let mut tx = self.pool.begin().await?;
        let last_seq: i64 = sqlx::query_scalar("SELECT last_seq FROM rooms WHERE id = $1 FOR UPDATE")
            .bind(room_id)
            .fetch_one(&mut *tx)
            .await?;

        // Retries: (sender, client_msg_id) pairs already stored, now that the lock makes
        // every earlier batch of this room visible.
        let keyed: Vec<(String, String)> = requests
            .iter()
            .zip(results.iter())
            .filter(|(_, r)| r.is_none())
            .filter_map(|((c, m), _)| Some((c.user_id.clone(), m.client_msg_id.clone()?)))
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

        // The new messages, each (sender, client_msg_id) once, numbered in arrival order.
        let mut fresh: Vec<usize> = Vec::new();
        let mut first_of: HashMap<(String, String), usize> = HashMap::new();
        for (i, ((caller, msg), result)) in requests.iter().zip(results.iter()).enumerate() {
            if result.is_some() {
                continue;
            }
            let key = msg.client_msg_id.clone().map(|cid| (caller.user_id.clone(), cid));
            if let Some(key) = key {
                if stored.contains_key(&key) || first_of.contains_key(&key) {
                    continue;
                }
                first_of.insert(key, i);
            }
            fresh.push(i);
        }
        let n = fresh.len() as i64;
        let seqs: Vec<i64> = (1..=n).map(|k| last_seq + k).collect();
        let pick = |f: &dyn Fn(&(Caller, Outgoing)) -> Option<String>| -> Vec<Option<String>> {
            fresh.iter().map(|&i| f(&requests[i])).collect()
        };
        let senders = pick(&|(c, _)| Some(c.user_id.clone()));
        let names = pick(&|(c, _)| c.name.clone());
        let kinds = pick(&|(_, m)| Some(m.kind.to_owned()));
        let bodies = pick(&|(_, m)| Some(m.text.clone()));
        let cids = pick(&|(_, m)| m.client_msg_id.clone());
        let reply_to: Vec<Option<i64>> = fresh.iter().map(|&i| requests[i].1.reply_to).collect();
        let mut inserted: HashMap<i64, MessageRow> = HashMap::new();
        if n > 0 {
            const SQL: &str = concat!(
                "INSERT INTO messages (room_id, seq, sender_id, sender_name, kind, body, reply_to, client_msg_id) \
                 SELECT $1, t.seq, t.sender_id, t.sender_name, t.kind, t.body, t.reply_to, t.client_msg_id \
                 FROM UNNEST($2::bigint[], $3::text[], $4::text[], $5::text[], $6::text[], $7::bigint[], $8::text[]) \
                   AS t(seq, sender_id, sender_name, kind, body, reply_to, client_msg_id) \
                 RETURNING ",
                message_columns!()
            );
            let rows: Vec<MessageRow> = sqlx::query_as(SQL)
                .bind(room_id)
                .bind(&seqs)
                .bind(&senders)
                .bind(&names)
                .bind(&kinds)
                .bind(&bodies)
                .bind(&reply_to)
                .bind(&cids)
                .fetch_all(&mut *tx)
                .await?;
            inserted = rows.into_iter().map(|r| (r.seq, r)).collect();
            sqlx::query("UPDATE rooms SET last_seq = $2 WHERE id = $1")
                .bind(room_id)
                .bind(last_seq + n)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;

        // New rows carry no reactions or attachments yet: no decoration needed.
        let mut new_messages: HashMap<usize, Message> = HashMap::new();
        for (k, &i) in fresh.iter().enumerate() {
            if let Some(row) = inserted.remove(&seqs[k]) {
                new_messages.insert(i, Message::from(row));
            }
        }
        let retried: Vec<MessageRow> = stored.values().cloned().collect();
        let decorated = self.decorate(retried).await?;
        let by_key: HashMap<(String, String), Message> =
            decorated.into_iter().filter_map(|m| Some(((m.sender_id.clone(), m.client_msg_id.clone()?), m))).collect();
        for (i, ((caller, msg), result)) in requests.iter().zip(results.iter_mut()).enumerate() {
            if result.is_some() {
                continue;
            }
            if let Some(message) = new_messages.get(&i) {
                *result = Some(Ok((message.clone(), false)));
                continue;
            }
            let key = msg.client_msg_id.clone().map(|cid| (caller.user_id.clone(), cid));
            let earlier = key.as_ref().and_then(|k| {
                by_key.get(k).cloned().or_else(|| first_of.get(k).and_then(|&j| new_messages.get(&j).cloned()))
            });
            *result = Some(match earlier {
                Some(existing) if existing.room_id == room_id.to_string() => Ok((existing, true)),
                Some(_) => Err(ServiceError::Conflict("client_msg_id was already used in another room".into())),
                None => Err(ServiceError::Conflict("message not stored; retry".into())),
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
