//! Group commit: every send waits at one worker and is stored together with the sends
//! queued behind it, one transaction per batch whatever their rooms, so Postgres does one
//! commit (one fsync) per batch instead of one per message. `commit` stores a batch.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_proto::v1::{Caller, Message};
use sqlx::pool::PoolConnection;
use sqlx::{PgConnection, PgPool, Postgres};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::attachments::File;
use super::Store;
use crate::error::ServiceError;

/// Most sends one transaction stores.
const MAX_BATCH: usize = 256;
/// Sends queued per worker before `submit` waits (back-pressure onto the gRPC handler).
const QUEUE: usize = 4096;
/// How long a worker keeps its connection between batches (see [`Lease`]).
const HOLD_IDLE: Duration = Duration::from_secs(1);

/// A validated message to store, owned so it can wait in a queue.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub room_id: i64,
    pub kind: &'static str,
    pub text: String,
    pub reply_to: Option<i64>,
    pub client_msg_id: Option<String>,
    /// Uploads the message carries, in the order the sender listed them; the handler has
    /// checked that the sender uploaded each one.
    pub attachments: Vec<File>,
}

/// The stored message and whether it was stored before (a retry).
pub(super) type Reply = Result<(Message, bool), ServiceError>;

struct Job {
    caller: Caller,
    msg: NewMessage,
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
    pub async fn submit(&self, caller: Caller, msg: NewMessage) -> Reply {
        let worker = &self.workers[msg.room_id.unsigned_abs() as usize % self.workers.len()];
        let (reply, rx) = oneshot::channel();
        let span = tracing::Span::current();
        worker.send(Job { caller, msg, reply, span }).await.map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }
}

fn stopped() -> ServiceError {
    ServiceError::Unavailable(Arc::new(sqlx::Error::PoolClosed))
}

async fn work(store: Store, mut rx: mpsc::Receiver<Job>) {
    let mut lease = Lease::default();
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
        let results = async {
            match lease.connection(&store.pool).await {
                Ok(conn) => store.insert_batch(conn, &requests).await,
                Err(err) => vec![Err(err); requests.len()],
            }
        }
        .instrument(span)
        .await;
        if results.iter().any(|r| matches!(r, Err(ServiceError::Unavailable(_)))) {
            lease.discard();
        }
        for (reply, result) in replies.into_iter().zip(results) {
            let _ = reply.send(result);
        }
    }
}

/// A worker's connection, kept between batches: the pool pings every connection it hands
/// out, a round trip as dear as the batch's own. One idle for `HOLD_IDLE` goes back to the
/// pool and is taken again with that ping, since Postgres may have gone away meanwhile;
/// one that met an unavailable database is closed.
#[derive(Default)]
struct Lease {
    conn: Option<(PoolConnection<Postgres>, Instant)>,
}

impl Lease {
    async fn connection(&mut self, pool: &PgPool) -> Result<&mut PgConnection, ServiceError> {
        let conn = match self.conn.take() {
            Some((conn, used)) if used.elapsed() < HOLD_IDLE => conn,
            _ => pool.acquire().await?,
        };
        let (conn, _) = self.conn.insert((conn, Instant::now()));
        Ok(&mut **conn)
    }

    fn discard(&mut self) {
        if let Some((mut conn, _)) = self.conn.take() {
            conn.close_on_drop();
        }
    }
}
