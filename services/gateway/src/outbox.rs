//! The outbound side of one connection: a bounded queue of frames that producers (room
//! and user fan-out, admin commands) push to without waiting, the connection's task
//! drains in batches, and the one way to close the connection with a code.
//!
//! Not a `tokio::sync::mpsc` channel: that allocates a block of 32 slots per connection
//! up front, while most connections of a chat gateway are idle most of the time. This
//! queue allocates nothing until the first frame, and the connection's task takes every
//! queued frame with one lock, so a burst costs one wake-up and one socket write.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::Poll;

use axum::extract::ws::Message;
use futures_util::task::AtomicWaker;

use crate::protocol::Close;

/// One queue entry: a frame, or frames that must stay together and in order (a join's
/// backlog), taking a single slot.
#[derive(Debug)]
pub enum Queued {
    One(Message),
    Many(Vec<Message>),
    /// A live message event, with when it was published (Unix µs) for fan-out latency.
    Timed(Message, i64),
}

struct Shared {
    id: u64,
    capacity: usize,
    queue: Mutex<VecDeque<Queued>>,
    /// The connection's task, woken when frames arrive or a close is asked for.
    waker: AtomicWaker,
    reason: OnceLock<Close>,
    /// Counts connections dropped for a full queue.
    drops: prometheus_client::metrics::counter::Counter,
}

impl Shared {
    fn queue(&self) -> MutexGuard<'_, VecDeque<Queued>> {
        // A panic while holding this lock leaves a queue of whole entries: still usable.
        self.queue.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Handle to a connection's queue; cheap to clone, shared with the fan-out.
#[derive(Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
}

/// The connection task's end of the queue.
pub struct Receiver {
    shared: Arc<Shared>,
}

impl Outbox {
    /// A queue of `capacity` entries for connection `id`, and its receiving end.
    pub fn new(id: u64, capacity: usize, drops: prometheus_client::metrics::counter::Counter) -> (Self, Receiver) {
        let shared = Arc::new(Shared {
            id,
            capacity,
            queue: Mutex::new(VecDeque::new()),
            waker: AtomicWaker::new(),
            reason: OnceLock::new(),
            drops,
        });
        (Self { shared: shared.clone() }, Receiver { shared })
    }

    /// The connection's id, unique within this gateway.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// Queues an event without waiting. A full queue means the client reads slower than
    /// its rooms produce; rather than buffer without bound, the connection is closed
    /// with 1013 and the client recovers what it missed on reconnect.
    pub fn push_event(&self, frame: Message) {
        self.push(Queued::One(frame))
    }

    /// Queues a live message event published at `published_us` (Unix µs).
    pub fn push_timed(&self, frame: Message, published_us: i64) {
        self.push(Queued::Timed(frame, published_us))
    }

    /// Queues frames that must arrive together, in order, in one slot; a full queue
    /// closes the connection as in `push_event`.
    pub fn push_batch(&self, frames: Vec<Message>) {
        if !frames.is_empty() {
            self.push(Queued::Many(frames))
        }
    }

    fn push(&self, item: Queued) {
        if self.close_reason().is_some() {
            // The connection is going away; its task reads no more.
            return;
        }
        let mut queue = self.shared.queue();
        if queue.len() >= self.shared.capacity {
            drop(queue);
            tracing::warn!(conn = self.id(), "outbound queue full; disconnecting slow consumer");
            if self.close_reason().is_none() {
                self.shared.drops.inc();
            }
            self.close(Close::SlowConsumer);
            return;
        }
        let was_empty = queue.is_empty();
        queue.push_back(item);
        drop(queue);
        // A non-empty queue has already woken the task, which will take this entry too.
        if was_empty {
            self.shared.waker.wake();
        }
    }

    /// Asks the connection to close; the first reason given wins.
    pub fn close(&self, close: Close) {
        let _ = self.shared.reason.set(close);
        self.shared.waker.wake();
    }

    /// The reason given to `close`, if it has been called.
    pub fn close_reason(&self) -> Option<Close> {
        self.shared.reason.get().copied()
    }
}

impl Receiver {
    /// Resolves once frames are queued or `close` has been called.
    pub async fn ready(&self) {
        poll_fn(|cx| {
            self.shared.waker.register(cx.waker());
            if self.shared.reason.get().is_some() || !self.shared.queue().is_empty() {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Resolves once the queue has overflowed. The connection's task races every socket
    /// write against this: a write blocked on a client that stopped reading must not
    /// keep a slow consumer open. Other close reasons wait for the write, which may
    /// carry what the client should read before the close (a `reconnect` notice).
    pub async fn overflowed(&self) {
        poll_fn(|cx| {
            self.shared.waker.register(cx.waker());
            if self.shared.reason.get() == Some(&Close::SlowConsumer) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        })
        .await
    }

    /// Moves every queued entry, oldest first, to the back of `into`. Swapping buffers
    /// keeps the lock short and lets both sides reuse their allocations.
    pub fn take(&self, into: &mut VecDeque<Queued>) {
        let mut queue = self.shared.queue();
        if into.is_empty() {
            std::mem::swap(&mut *queue, into);
        } else {
            into.append(&mut queue);
        }
    }

    /// The reason given to `close`, if it has been called.
    pub fn close_reason(&self) -> Option<Close> {
        self.shared.reason.get().copied()
    }
}

/// Every open connection's outbox, so the gateway can tell them all to go at once.
///
/// Not a shared cancellation token each connection waits on: a connection's task
/// re-polls what it waits on at every wake-up (every delivery), and the waiters of one
/// shared token sit behind one lock, which all connections would then contend on.
#[derive(Default)]
pub struct Registry {
    inner: Mutex<RegistryInner>,
}

#[derive(Default)]
struct RegistryInner {
    open: std::collections::HashMap<u64, Outbox>,
    /// Set by `close_all`, which `on_close` then applies to latecomers too.
    on_close: Option<fn(&Outbox)>,
}

impl Registry {
    fn inner(&self) -> MutexGuard<'_, RegistryInner> {
        self.inner.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Adds a connection; once `close_all` has run, it is closed the same way at once.
    pub fn add(&self, outbox: &Outbox) {
        let mut inner = self.inner();
        match inner.on_close {
            Some(close) => close(outbox),
            None => {
                inner.open.insert(outbox.id(), outbox.clone());
            }
        }
    }

    /// Removes a connection that has ended.
    pub fn remove(&self, id: u64) {
        self.inner().open.remove(&id);
    }

    /// Applies `close` to every open connection and to any added from now on.
    pub fn close_all(&self, close: fn(&Outbox)) {
        let open = {
            let mut inner = self.inner();
            inner.on_close = Some(close);
            std::mem::take(&mut inner.open)
        };
        for outbox in open.values() {
            close(outbox);
        }
    }

    /// How many connections are registered.
    pub fn len(&self) -> usize {
        self.inner().open.len()
    }

    /// Whether no connection is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn texts(items: &VecDeque<Queued>) -> Vec<String> {
        items
            .iter()
            .flat_map(|item| match item {
                Queued::One(m) | Queued::Timed(m, _) => vec![m.clone()],
                Queued::Many(ms) => ms.clone(),
            })
            .map(|m| m.into_text().map(|t| t.to_string()).unwrap_or_default())
            .collect()
    }

    #[tokio::test]
    async fn a_full_queue_closes_the_connection_instead_of_growing() {
        let (outbox, rx) = Outbox::new(1, 2, Default::default());
        outbox.push_event(Message::Text("a".into()));
        outbox.push_batch(vec![Message::Text("b".into()), Message::Text("c".into())]);
        assert_eq!(outbox.close_reason(), None);
        outbox.push_event(Message::Text("d".into()));
        assert_eq!(outbox.close_reason(), Some(Close::SlowConsumer));
        assert_eq!(outbox.close_reason().map(|c| (c.code(), c.reason())), Some((1013, "slow consumer")));
        outbox.push_event(Message::Text("e".into()));
        let mut taken = VecDeque::new();
        rx.take(&mut taken);
        assert_eq!(texts(&taken), ["a", "b", "c"], "the queue never holds more than its capacity");
    }

    #[tokio::test]
    async fn a_write_in_progress_hears_of_an_overflow_but_not_of_other_closes() {
        let (outbox, rx) = Outbox::new(1, 1, Default::default());
        let mut overflowed = std::pin::pin!(rx.overflowed());
        assert!(futures_util::poll!(overflowed.as_mut()).is_pending());
        let (other, other_rx) = Outbox::new(2, 1, Default::default());
        other.close(Close::Restart);
        assert!(tokio::time::timeout(Duration::from_millis(50), other_rx.overflowed()).await.is_err());
        outbox.push_event(Message::Text("a".into()));
        outbox.push_event(Message::Text("b".into()));
        tokio::time::timeout(Duration::from_secs(5), overflowed).await.expect("woken by the overflow");
    }

    #[tokio::test]
    async fn the_first_close_reason_wins() {
        let (outbox, rx) = Outbox::new(1, 2, Default::default());
        outbox.close(Close::TokenExpired);
        outbox.close(Close::Restart);
        assert_eq!(outbox.close_reason().unwrap().code(), 4001);
        assert_eq!(rx.close_reason().unwrap().code(), 4001);
    }

    #[test]
    fn close_all_reaches_open_connections_and_latecomers_but_not_ended_ones() {
        let registry = Registry::default();
        let (a, _qa) = Outbox::new(1, 4, Default::default());
        let (b, _qb) = Outbox::new(2, 4, Default::default());
        registry.add(&a);
        registry.add(&b);
        registry.remove(2);
        assert_eq!(registry.len(), 1);
        registry.close_all(|o| o.close(Close::Restart));
        assert_eq!(a.close_reason().map(|r| r.code()), Some(1012));
        assert_eq!(b.close_reason(), None, "an ended connection is not touched");
        let (late, _ql) = Outbox::new(3, 4, Default::default());
        registry.add(&late);
        assert_eq!(late.close_reason().map(|r| r.code()), Some(1012));
        assert!(registry.is_empty());
    }

    #[tokio::test]
    async fn the_receiver_wakes_for_frames_and_for_close_and_takes_in_order() {
        let (outbox, rx) = Outbox::new(1, 16, Default::default());
        assert!(tokio::time::timeout(Duration::from_millis(50), rx.ready()).await.is_err(), "nothing queued yet");

        let producer = outbox.clone();
        let push = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            for n in 0..5 {
                producer.push_timed(Message::Text(n.to_string().into()), n);
            }
        });
        tokio::time::timeout(Duration::from_secs(5), rx.ready()).await.expect("woken by a push");
        push.await.unwrap();
        let mut taken = VecDeque::new();
        rx.take(&mut taken);
        assert_eq!(texts(&taken), ["0", "1", "2", "3", "4"]);
        rx.take(&mut taken);
        assert_eq!(taken.len(), 5, "taking again finds nothing new");

        let closer = outbox.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            closer.close(Close::Normal);
        });
        tokio::time::timeout(Duration::from_secs(5), rx.ready()).await.expect("woken by close");
        assert_eq!(rx.close_reason().unwrap().code(), 1000);
        outbox.push_event(Message::Text("late".into()));
        let mut after = VecDeque::new();
        rx.take(&mut after);
        assert!(after.is_empty(), "nothing is queued once closing");
    }
}
