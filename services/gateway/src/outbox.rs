//! The outbound side of one connection: a bounded queue of frames that producers (room
//! and user fan-out, admin commands) push to without waiting, the connection's task
//! drains in batches, and the one way to close the connection with a code.
//!
//! Not a `tokio::sync::mpsc` channel: that allocates a block of 32 slots per connection
//! up front, while most connections of a chat gateway are idle most of the time. This
//! queue allocates nothing until the first frame, and the connection's task takes every
//! queued frame with one lock, so a burst costs one wake-up and one socket write.
//!
//! Cheaper still is no wake-up at all: an event frame pushed while nothing is queued and
//! the connection's task is not writing goes straight to the socket from the pushing
//! task ([`Outbox::push_frame`]); only a write that would block, or is partial, wakes
//! the connection's task. The queue's lock orders the two: a frame is written directly
//! only when every frame pushed before it has been written.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::task::Poll;

use axum::extract::ws::{Message, Utf8Bytes};
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::task::AtomicWaker;

use crate::protocol::Close;
use crate::socket::{Direct, RawWriter};

/// An event for many connections, as text and as one WebSocket frame on the wire:
/// encoded once, whichever way each connection gets it.
#[derive(Clone)]
pub struct EventFrame {
    text: Utf8Bytes,
    wire: Bytes,
}

impl EventFrame {
    pub fn new(text: Utf8Bytes) -> Self {
        let wire = text_frame(text.as_bytes());
        Self { text, wire }
    }

    /// The event's JSON text.
    pub fn text(&self) -> &Utf8Bytes {
        &self.text
    }
}

/// One final, unmasked (server-to-client) WebSocket text frame carrying `payload`.
pub fn text_frame(payload: &[u8]) -> Bytes {
    let len = payload.len();
    let mut frame = BytesMut::with_capacity(len + 10);
    // FIN and opcode 1 (text); then the length, in 7 bits or extended (RFC 6455 §5.2).
    frame.put_u8(0x81);
    if len < 126 {
        frame.put_u8(len as u8);
    } else if let Ok(len) = u16::try_from(len) {
        frame.put_u8(126);
        frame.put_u16(len);
    } else {
        frame.put_u8(127);
        frame.put_u64(len as u64);
    }
    frame.extend_from_slice(payload);
    frame.freeze()
}

/// One queue entry: a frame, or frames that must stay together and in order (a join's
/// backlog), taking a single slot.
#[derive(Debug)]
pub enum Queued {
    One(Message),
    Many(Vec<Message>),
    /// A live message event, with when it was published (Unix µs) for fan-out latency.
    Timed(Message, i64),
    /// A frame written directly went out in part; the rest is owed on the socket and goes
    /// out at the next flush. With its publish time when it is a live message event.
    Owed(Option<i64>),
}

struct Shared {
    id: u64,
    capacity: usize,
    state: Mutex<State>,
    /// Writes event frames straight to the connection's socket; `None` in unit tests.
    raw: Option<RawWriter>,
    /// The connection's task, woken when frames arrive or a close is asked for.
    waker: AtomicWaker,
    reason: OnceLock<Close>,
    /// Counts connections dropped for a full queue.
    drops: prometheus_client::metrics::counter::Counter,
}

#[derive(Default)]
struct State {
    queue: VecDeque<Queued>,
    /// The connection's task has frames in flight (taken from the queue, or its own
    /// replies and pings): nothing may be written directly until it releases.
    writing: bool,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock leaves a queue of whole entries: still usable.
        self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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
        Self::direct(id, capacity, drops, None)
    }

    /// As `new`, for a connection whose event frames `raw` may write directly.
    pub fn direct(
        id: u64,
        capacity: usize,
        drops: prometheus_client::metrics::counter::Counter,
        raw: Option<RawWriter>,
    ) -> (Self, Receiver) {
        let shared = Arc::new(Shared {
            id,
            capacity,
            state: Mutex::default(),
            raw,
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

    /// Queues frames that must arrive together, in order, in one slot; a full queue
    /// closes the connection as in `push_event`.
    pub fn push_batch(&self, frames: Vec<Message>) {
        if !frames.is_empty() {
            self.push(Queued::Many(frames))
        }
    }

    /// Delivers an event frame (a live message event when `published_us` is given): written
    /// to the socket at once when nothing is queued or being written before it, queued
    /// as `push_event` would otherwise (with its publish time, if given). True when the whole frame was
    /// written now, which is when the caller records its fan-out latency.
    pub fn push_frame(&self, frame: &EventFrame, published_us: Option<i64>) -> bool {
        if self.close_reason().is_some() {
            return false;
        }
        let state = self.shared.state();
        let item = match &self.shared.raw {
            Some(raw) if state.queue.is_empty() && !state.writing => match raw.try_write(&frame.wire) {
                Direct::Written => return true,
                Direct::Partial => Queued::Owed(published_us),
                Direct::Busy => Self::queued(frame, published_us),
            },
            _ => Self::queued(frame, published_us),
        };
        self.push_locked(state, item);
        false
    }

    fn queued(frame: &EventFrame, published_us: Option<i64>) -> Queued {
        let message = Message::Text(frame.text.clone());
        match published_us {
            Some(at) => Queued::Timed(message, at),
            None => Queued::One(message),
        }
    }

    fn push(&self, item: Queued) {
        if self.close_reason().is_some() {
            // The connection is going away; its task reads no more.
            return;
        }
        self.push_locked(self.shared.state(), item)
    }

    fn push_locked(&self, mut state: MutexGuard<'_, State>, item: Queued) {
        let queue = &mut state.queue;
        // An owed tail is queued only on an empty queue, so always finds room: losing it
        // would leave the connection's task not knowing to flush.
        if queue.len() >= self.shared.capacity && !matches!(item, Queued::Owed(_)) {
            drop(state);
            tracing::warn!(conn = self.id(), "outbound queue full; disconnecting slow consumer");
            if self.close_reason().is_none() {
                self.shared.drops.inc();
            }
            self.close(Close::SlowConsumer);
            return;
        }
        let was_empty = queue.is_empty();
        queue.push_back(item);
        drop(state);
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
            if self.shared.reason.get().is_some() || !self.shared.state().queue.is_empty() {
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

    /// Moves every queued entry, oldest first, to the back of `into`, and claims the
    /// socket (see `claim`) while they are written. Swapping buffers keeps the lock
    /// short and lets both sides reuse their allocations.
    pub fn take(&self, into: &mut VecDeque<Queued>) {
        let mut state = self.shared.state();
        state.writing = true;
        if into.is_empty() {
            std::mem::swap(&mut state.queue, into);
        } else {
            into.append(&mut state.queue);
        }
    }

    /// Marks the connection's task as writing: no frame is written directly to the
    /// socket until `release`, so none overtakes or interleaves with the task's own.
    pub fn claim(&self) {
        self.shared.state().writing = true;
    }

    /// Ends a claim, once everything the task took or wrote has been flushed. Frames
    /// queued meanwhile keep the claim (their wake-up is pending: the task takes them
    /// next), and so does closing: the close frame must be the last one out.
    pub fn release(&self) {
        let mut state = self.shared.state();
        if state.queue.is_empty() && self.shared.reason.get().is_none() {
            state.writing = false;
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
                Queued::Owed(_) => vec![Message::Text("<owed>".into())],
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

    #[test]
    fn text_frames_are_encoded_as_tungstenite_encodes_them() {
        use tungstenite::protocol::frame::coding::{Data, OpCode};
        for len in [0usize, 1, 125, 126, 127, 65_535, 65_536, 70_000] {
            let payload = vec![b'x'; len];
            let mut expected = Vec::new();
            tungstenite::protocol::frame::Frame::message(payload.clone(), OpCode::Data(Data::Text), true)
                .format(&mut expected)
                .unwrap();
            assert_eq!(text_frame(&payload)[..], expected[..], "payload of {len} bytes");
        }
    }

    /// A connection's outbox writing to a real socket, and the client's end, whose
    /// receive buffer is small.
    async fn direct(capacity: usize) -> (Outbox, Receiver, crate::socket::Socket, tokio::net::TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = tokio::net::TcpSocket::new_v4().unwrap();
        peer.set_recv_buffer_size(4096).unwrap();
        let (peer, accepted) = tokio::join!(peer.connect(listener.local_addr().unwrap()), listener.accept());
        let socket = crate::socket::Socket::new(accepted.unwrap().0, Duration::from_secs(10));
        let (outbox, rx) = Outbox::direct(1, capacity, Default::default(), Some(socket.raw_writer()));
        (outbox, rx, socket, peer.unwrap())
    }

    fn event(text: &str) -> EventFrame {
        EventFrame::new(text.to_owned().into())
    }

    /// Reads one unmasked text frame.
    async fn read_frame(peer: &mut tokio::net::TcpStream) -> String {
        use tokio::io::AsyncReadExt;
        let mut head = [0u8; 2];
        peer.read_exact(&mut head).await.unwrap();
        assert_eq!(head[0], 0x81, "a final text frame");
        let len = match head[1] {
            126 => peer.read_u16().await.unwrap() as usize,
            127 => peer.read_u64().await.unwrap() as usize,
            len => len as usize,
        };
        let mut payload = vec![0u8; len];
        peer.read_exact(&mut payload).await.unwrap();
        String::from_utf8(payload).unwrap()
    }

    fn writing(outbox: &Outbox) -> bool {
        outbox.shared.state().writing
    }

    #[tokio::test]
    async fn an_idle_connection_gets_event_frames_straight_from_the_pusher() {
        let (outbox, rx, _socket, mut peer) = direct(4).await;
        assert!(outbox.push_frame(&event("a"), Some(1)));
        assert!(outbox.push_frame(&event("b"), None));
        let mut taken = VecDeque::new();
        rx.take(&mut taken);
        assert!(taken.is_empty(), "nothing queued, nothing to wake the connection for");
        assert_eq!(read_frame(&mut peer).await, "a");
        assert_eq!(read_frame(&mut peer).await, "b");
    }

    #[tokio::test]
    async fn frames_wait_behind_what_the_connection_takes_and_writes_itself() {
        use tokio::io::AsyncWriteExt;
        let (outbox, rx, mut socket, mut peer) = direct(4).await;
        rx.claim();
        assert!(!outbox.push_frame(&event("a"), Some(7)), "the connection's task is writing");
        let mut taken = VecDeque::new();
        rx.take(&mut taken);
        assert!(!outbox.push_frame(&event("b"), None), "what was taken is not written yet");
        rx.release();
        assert!(writing(&outbox), "a frame queued meanwhile keeps the claim");
        assert!(!outbox.push_frame(&event("c"), None), "behind the queued frame");
        rx.take(&mut taken);
        assert_eq!(texts(&taken), ["a", "b", "c"]);
        assert!(matches!(taken[0], Queued::Timed(_, 7)));
        for text in texts(&taken) {
            socket.write_all(&text_frame(text.as_bytes())).await.unwrap();
        }
        socket.flush().await.unwrap();
        rx.release();
        assert!(!writing(&outbox));
        assert!(outbox.push_frame(&event("d"), None), "written once everything before it is");
        for expected in ["a", "b", "c", "d"] {
            assert_eq!(read_frame(&mut peer).await, expected);
        }
    }

    #[tokio::test]
    async fn a_frame_half_written_by_the_socket_layer_holds_direct_writes_until_flushed() {
        use tokio::io::AsyncWriteExt;
        let (outbox, rx, mut socket, mut peer) = direct(4).await;
        let own = text_frame(b"own");
        socket.write_all(&own[..3]).await.unwrap();
        assert!(!outbox.push_frame(&event("e"), None), "not inside tungstenite's frame");
        socket.write_all(&own[3..]).await.unwrap();
        socket.flush().await.unwrap();
        let mut taken = VecDeque::new();
        rx.take(&mut taken);
        assert_eq!(texts(&taken), ["e"]);
        socket.write_all(&text_frame(b"e")).await.unwrap();
        socket.flush().await.unwrap();
        rx.release();
        assert!(outbox.push_frame(&event("f"), None));
        for expected in ["own", "e", "f"] {
            assert_eq!(read_frame(&mut peer).await, expected);
        }
    }

    #[tokio::test]
    async fn closing_keeps_the_claim_so_nothing_follows_the_close_frame() {
        let (outbox, rx, _socket, _peer) = direct(4).await;
        outbox.close(Close::Restart);
        rx.claim();
        rx.release();
        assert!(writing(&outbox));
        assert!(!outbox.push_frame(&event("late"), None));
        let mut taken = VecDeque::new();
        rx.take(&mut taken);
        assert!(taken.is_empty());
    }

    #[tokio::test]
    async fn the_tail_of_a_partial_write_goes_out_before_anything_else() {
        use tokio::io::AsyncWriteExt;
        let (outbox, rx, mut socket, mut peer) = direct(1_000).await;
        // Large frames, each of its own letter, until the client's window is full.
        let frames: Vec<String> = (0..200u8).map(|n| ((b'a' + n % 26) as char).to_string().repeat(64 * 1024)).collect();
        let mut direct = 0;
        while direct < frames.len() && outbox.push_frame(&event(&frames[direct]), Some(direct as i64)) {
            direct += 1;
        }
        assert!(direct < frames.len(), "the window never filled");
        let mut taken = VecDeque::new();
        rx.take(&mut taken);
        assert_eq!(taken.len(), 1);
        let whole = match taken.pop_front() {
            Some(Queued::Owed(Some(at))) => {
                assert_eq!(at, direct as i64);
                // The task flushes the tail, then writes its own frame.
                let written = tokio::spawn(async move {
                    socket.flush().await.unwrap();
                    socket.write_all(&text_frame(b"own")).await.unwrap();
                    socket.flush().await.unwrap();
                });
                let sent = direct + 1;
                for frame in &frames[..sent] {
                    assert!(read_frame(&mut peer).await == *frame, "frames whole and in order");
                }
                written.await.unwrap();
                sent
            }
            // The window closed exactly at a frame's end: nothing owed, the frame queued.
            Some(Queued::Timed(..)) => direct,
            other => panic!("unexpected {other:?}"),
        };
        if whole == direct + 1 {
            assert_eq!(read_frame(&mut peer).await, "own");
        }
    }

    #[tokio::test]
    async fn the_receiver_wakes_for_frames_and_for_close_and_takes_in_order() {
        let (outbox, rx) = Outbox::new(1, 16, Default::default());
        assert!(tokio::time::timeout(Duration::from_millis(50), rx.ready()).await.is_err(), "nothing queued yet");

        let producer = outbox.clone();
        let push = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            for n in 0..5 {
                producer.push_frame(&EventFrame::new(n.to_string().into()), Some(n));
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
