//! Clients that behave as a careful app does across failures: a sender that retries
//! every message until it is acknowledged, and a follower that rejoins with `since_seq`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::json;
use tokio::task::JoinHandle;

use crate::tokens::token;
use crate::wait::{eventually, give_up};
use crate::ws::WsClient;

/// How long one message may take to be acknowledged, retries and reconnects included.
const SEND_FOR: Duration = Duration::from_secs(60);

/// How long a follower may take to receive everything it waits for.
const FOLLOW_FOR: Duration = Duration::from_secs(90);

/// Sends `texts` to `room` in order as `user`, the way a careful client does: each with a
/// `client_msg_id`, retried on `unavailable` or a dropped connection, reconnecting to the
/// next gateway in `urls`. Returns once every one is acknowledged.
pub async fn send_reliably(urls: Vec<String>, user: &str, room: String, texts: Vec<String>) -> Result<()> {
    // What outlives one message: the connection and which gateway comes next. Each check
    // owns them (`async move`) and hands them back with the ack: a check borrowing from
    // this function would make it a future rustc cannot prove `Send`, and tests spawn it.
    let mut conn: Option<WsClient> = None;
    let mut next = 0;
    for (i, text) in texts.into_iter().enumerate() {
        let send = json!({"type": "send", "room": room, "text": text, "client_msg_id": format!("{user}-{i}")});
        let (urls, token) = (urls.clone(), token(user));
        let mut conn_in = conn.take();
        (conn, next) = eventually(SEND_FOR, async move || {
            if conn_in.is_none() {
                let url = &urls[next % urls.len()];
                match WsClient::connect_bearer(url, &token).await {
                    Ok((c, _)) => conn_in = Some(c),
                    Err(err) => {
                        next += 1;
                        return Err(err.context(format!("connecting to {url}")));
                    }
                }
            }
            let c = conn_in.as_mut().ok_or_else(|| anyhow!("not connected"))?;
            match c.request(send.clone()).await {
                Ok(reply) if reply["type"] == "ack" => Ok((conn_in.take(), next)),
                Ok(reply) if reply["code"] == "unavailable" => bail!("refused: {reply}"),
                Ok(reply) => Err(give_up(format!("unexpected reply to send {i}: {reply}"))),
                Err(err) => {
                    conn_in = None;
                    next += 1;
                    Err(err)
                }
            }
        })
        .await
        .with_context(|| format!("send {i} never acknowledged"))?;
    }
    Ok(())
}

/// A spawned client following a room as `user` across gateway failures: on a dropped
/// connection it reconnects to the next gateway in its list and joins with `since_seq`,
/// as a client should. Its progress is visible, so a test can inject a fault once the
/// follower listens, or once traffic reaches it, rather than after a guessed sleep.
pub struct Follower {
    progress: Arc<Progress>,
    task: JoinHandle<Result<Vec<i64>>>,
}

#[derive(Default)]
struct Progress {
    joins: AtomicUsize,
    received: AtomicUsize,
}

impl Follower {
    /// Starts following; it stops once `count` messages have arrived.
    pub fn spawn(urls: Vec<String>, user: &str, room: &str, count: usize) -> Self {
        let progress = Arc::new(Progress::default());
        let task = tokio::spawn(follow(urls, user.to_owned(), room.to_owned(), count, progress.clone()));
        Self { progress, task }
    }

    /// Whether a join has been acknowledged: from then on the room's traffic reaches it.
    pub fn has_joined(&self) -> bool {
        self.progress.joins.load(Ordering::Relaxed) > 0
    }

    /// How many `message` events it has received so far.
    pub fn received(&self) -> usize {
        self.progress.received.load(Ordering::Relaxed)
    }

    /// The seqs of every `message` event received, in arrival order, once all have come.
    pub async fn seqs(self) -> Result<Vec<i64>> {
        self.task.await?
    }
}

async fn follow(
    urls: Vec<String>,
    user: String,
    room: String,
    count: usize,
    progress: Arc<Progress>,
) -> Result<Vec<i64>> {
    // Owned by the check (`async move`), so this future stays `Send` for `tokio::spawn`.
    let mut seqs: Vec<i64> = Vec::new();
    let mut next = 0;
    eventually(FOLLOW_FOR, async move || {
        let url = &urls[next % urls.len()];
        let attempt: Result<()> = async {
            let (mut c, _) = WsClient::connect_bearer(url, &token(&user)).await?;
            let since = seqs.last().copied().unwrap_or(0);
            c.ack(json!({"type": "join", "room": room, "since_seq": since})).await?;
            progress.joins.fetch_add(1, Ordering::Relaxed);
            while seqs.len() < count {
                let event = c.event("message").await?;
                seqs.push(event["message"]["seq"].as_i64().unwrap_or(-1));
                progress.received.store(seqs.len(), Ordering::Relaxed);
            }
            Ok(())
        }
        .await;
        match attempt {
            Ok(()) => Ok(seqs.clone()),
            Err(err) => {
                next += 1;
                Err(err.context(format!("{user} got {} of {count}: {seqs:?}", seqs.len())))
            }
        }
    })
    .await
}
