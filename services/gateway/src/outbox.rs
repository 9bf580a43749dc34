//! The outbound side of one connection: a bounded queue of frames, and the one way to
//! close the connection with a code.

use std::sync::{Arc, OnceLock};

use axum::extract::ws::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Close code for a client that cannot keep up ("try again later": it may reconnect
/// and recover with `since_seq`).
pub const CLOSE_SLOW_CONSUMER: u16 = 1013;

/// Why a connection is being closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloseReason {
    pub code: u16,
    pub reason: &'static str,
}

/// One queue entry: a frame, or frames that must stay together and in order (a join's
/// backlog), taking a single slot.
#[derive(Debug)]
pub enum Outgoing {
    One(Message),
    Many(Vec<Message>),
    /// A live message event, with when it was published (Unix µs) for fan-out latency.
    Timed(Message, i64),
}

/// Handle to a connection's queue; cheap to clone, shared with the fan-out.
#[derive(Clone)]
pub struct Outbox {
    id: u64,
    tx: mpsc::Sender<Outgoing>,
    /// Counts connections dropped for a full queue.
    drops: prometheus_client::metrics::counter::Counter,
    closing: CancellationToken,
    reason: Arc<OnceLock<CloseReason>>,
}

impl Outbox {
    /// A queue of `capacity` frames for connection `id`, and its receiving end.
    pub fn new(
        id: u64,
        capacity: usize,
        drops: prometheus_client::metrics::counter::Counter,
    ) -> (Self, mpsc::Receiver<Outgoing>) {
        let (tx, rx) = mpsc::channel(capacity);
        let outbox = Self { id, tx, drops, closing: CancellationToken::new(), reason: Arc::new(OnceLock::new()) };
        (outbox, rx)
    }

    /// The connection's id, unique within this gateway.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Queues an event without waiting. A full queue means the client reads slower than
    /// its rooms produce; rather than buffer without bound, the connection is closed
    /// with 1013 and the client recovers what it missed on reconnect.
    pub fn push_event(&self, frame: Message) {
        self.push(Outgoing::One(frame))
    }

    /// Queues a live message event published at `published_us` (Unix µs).
    pub fn push_timed(&self, frame: Message, published_us: i64) {
        self.push(Outgoing::Timed(frame, published_us))
    }

    /// Queues frames that must arrive together, in order, in one slot; a full queue
    /// closes the connection as in `push_event`.
    pub fn push_batch(&self, frames: Vec<Message>) {
        if !frames.is_empty() {
            self.push(Outgoing::Many(frames))
        }
    }

    fn push(&self, item: Outgoing) {
        match self.tx.try_send(item) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(conn = self.id, "outbound queue full; disconnecting slow consumer");
                if self.close_reason().is_none() {
                    self.drops.inc();
                }
                self.close(CLOSE_SLOW_CONSUMER, "slow consumer");
            }
            // The connection is already going away.
            Err(mpsc::error::TrySendError::Closed(_)) => {}
        }
    }

    /// Queues a reply, waiting while the queue is full (this only slows the reading of
    /// this client's own commands). False once the connection is closing.
    pub async fn reply(&self, frame: Message) -> bool {
        tokio::select! {
            sent = self.tx.send(Outgoing::One(frame)) => sent.is_ok(),
            _ = self.closing.cancelled() => false,
        }
    }

    /// Asks the connection to close with `code`; the first reason given wins.
    pub fn close(&self, code: u16, reason: &'static str) {
        let _ = self.reason.set(CloseReason { code, reason });
        self.closing.cancel();
    }

    /// Resolves once `close` has been called.
    pub async fn closing(&self) {
        self.closing.cancelled().await
    }

    /// The reason given to `close`, if it has been called.
    pub fn close_reason(&self) -> Option<CloseReason> {
        self.reason.get().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_queue_closes_the_connection_instead_of_growing() {
        let (outbox, mut rx) = Outbox::new(1, 2, Default::default());
        outbox.push_event(Message::Text("a".into()));
        outbox.push_event(Message::Text("b".into()));
        assert_eq!(outbox.close_reason(), None);
        outbox.push_event(Message::Text("c".into()));
        assert_eq!(outbox.close_reason(), Some(CloseReason { code: CLOSE_SLOW_CONSUMER, reason: "slow consumer" }));
        assert_eq!(rx.len(), 2, "the queue never holds more than its capacity");
        assert!(!outbox.reply(Message::Text("d".into())).await, "replies stop once closing");
        rx.recv().await.unwrap();
    }

    #[tokio::test]
    async fn the_first_close_reason_wins() {
        let (outbox, _rx) = Outbox::new(1, 2, Default::default());
        outbox.close(4001, "token expired");
        outbox.close(1012, "restart");
        assert_eq!(outbox.close_reason().unwrap().code, 4001);
    }
}
