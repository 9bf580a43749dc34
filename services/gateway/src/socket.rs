//! The gateway's TCP sockets, below HTTP and WebSocket alike: a write that makes no
//! progress for the stall timeout fails rather than waiting forever, and closing drains
//! what the client is still sending, so the client reads our last bytes, not a reset.
//!
//! A socket also lends a [`RawWriter`] to the room tasks: they write a pre-framed event
//! straight to the stream when the connection's own writer has nothing in flight, which
//! spares the connection's task a wake-up (often on the other worker) per delivery.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;

/// How long a closing socket goes on reading (and discarding) what the client still
/// sends. Closing a socket with unread bytes makes the kernel answer with a reset, and
/// a reset makes the client's kernel throw away what it had received but not yet read:
/// the 413 or the close frame we just sent. Two seconds is ample for a client to read
/// a response that is already in its buffer.
pub const LINGER: Duration = Duration::from_secs(2);

/// How many bytes a closing socket discards at most: a refused 10 MiB upload sent
/// whole, with some to spare. Past it the socket is closed even if that resets it.
pub const LINGER_MAX_BYTES: usize = 16 * 1024 * 1024;

/// Discarded bytes are read in chunks of this size, on the stack.
const DRAIN_CHUNK: usize = 8 * 1024;

/// Accepts TCP connections and wraps each in a [`Socket`].
pub struct Listener {
    tcp: TcpListener,
    stall: Duration,
}

impl Listener {
    /// Serves `tcp`; a write that makes no progress for `stall` fails.
    pub fn new(tcp: TcpListener, stall: Duration) -> Self {
        Self { tcp, stall }
    }
}

impl axum::serve::Listener for Listener {
    type Io = Socket;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Socket, SocketAddr) {
        let (tcp, addr) = axum::serve::Listener::accept(&mut self.tcp).await;
        // Every write we make is a whole frame (or a whole response) that the client is
        // waiting for. Nagle's algorithm would hold one back while an earlier one is
        // unacknowledged, and clients delay their ACKs by up to 40 ms.
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(%err, "TCP_NODELAY not set");
        }
        (Socket::new(tcp, self.stall), addr)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }
}

/// One accepted connection. hyper writes its responses and WebSocket frames through
/// it, and calls `poll_shutdown` when it ends an HTTP connection (not an upgraded
/// one: `ws.rs` lingers over the WebSocket itself).
pub struct Socket {
    shared: Arc<Shared>,
    stall: Duration,
    /// Armed while a write waits for the client's receive window, dropped as soon as a
    /// write goes through. Boxed and only then, so an idle connection holds no timer.
    stalled: Option<Pin<Box<Sleep>>>,
    /// A write failed for making no progress: the client stopped reading.
    write_stalled: bool,
    /// Set once closing has begun.
    closing: Option<Box<Linger>>,
}

/// The stream, shared by the socket and its [`RawWriter`]s.
struct Shared {
    tcp: TcpStream,
    /// Held around every write to the stream, by either side.
    wire: Mutex<Wire>,
}

#[derive(Default)]
struct Wire {
    /// The layer above (hyper, tungstenite) may have a frame half-written: set by its
    /// first write, cleared when it flushes (tungstenite flushes the stream only once its
    /// own buffer is empty). A raw write meanwhile would land inside that frame.
    dirty: bool,
    /// The unwritten tail of a raw frame. It goes out before anything else written to
    /// the stream, and a flush waits for it.
    owed: Option<Bytes>,
}

impl Shared {
    fn wire(&self) -> MutexGuard<'_, Wire> {
        // A panic while holding this lock leaves whole fields behind: still usable.
        self.wire.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Writes the owed tail, if any; ready once none is left.
    fn poll_owed(&self, wire: &mut Wire, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(owed) = wire.owed.as_mut() {
            match self.tcp.try_write(owed) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => {
                    owed.advance(n);
                    if owed.is_empty() {
                        wire.owed = None;
                    }
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => ready!(self.tcp.poll_write_ready(cx))?,
                Err(err) => return Poll::Ready(Err(err)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// A write by the layer above: the owed tail first, then `write`.
    fn poll_write_with<T>(
        &self,
        cx: &mut Context<'_>,
        write: impl Fn(&TcpStream) -> io::Result<T>,
    ) -> Poll<io::Result<T>> {
        let mut wire = self.wire();
        wire.dirty = true;
        ready!(self.poll_owed(&mut wire, cx))?;
        loop {
            match write(&self.tcp) {
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => ready!(self.tcp.poll_write_ready(cx))?,
                done => return Poll::Ready(done),
            }
        }
    }

    /// The layer above flushes: it has nothing half-written any more, and once the owed
    /// tail is out, the stream is free for raw writes.
    fn poll_flush(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut wire = self.wire();
        ready!(self.poll_owed(&mut wire, cx))?;
        wire.dirty = false;
        Poll::Ready(Ok(()))
    }

    fn poll_read(&self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            match self.tcp.try_read(buf.initialize_unfilled()) {
                Ok(n) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => ready!(self.tcp.poll_read_ready(cx))?,
                Err(err) => return Poll::Ready(Err(err)),
            }
        }
    }
}

/// A handle for writing pre-framed bytes to a socket beside the layers above it (see
/// [`RawWriter::try_write`]). Weak: it never keeps a closed connection's socket open.
/// Handed to request handlers as `ConnectInfo`.
#[derive(Clone)]
pub struct RawWriter {
    shared: Weak<Shared>,
}

/// What [`RawWriter::try_write`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direct {
    /// The whole frame went to the socket.
    Written,
    /// Part of it did; the rest is owed and goes out before anything else, at the
    /// connection's next write or flush: the caller must have its task flush.
    Partial,
    /// Nothing was written: the caller queues the frame as usual.
    Busy,
}

impl RawWriter {
    /// Writes `frame` (whole WebSocket frames) without waiting, unless the layer above
    /// has output in flight, a tail is still owed, or the socket would block at once.
    /// The caller must make sure no frame it has queued for this connection is still
    /// unwritten, or this one would overtake it.
    pub fn try_write(&self, frame: &Bytes) -> Direct {
        let Some(shared) = self.shared.upgrade() else { return Direct::Busy };
        let mut wire = shared.wire();
        if wire.dirty || wire.owed.is_some() {
            return Direct::Busy;
        }
        match shared.tcp.try_write(frame) {
            Ok(n) if n == frame.len() => Direct::Written,
            Ok(n) if n > 0 => {
                wire.owed = Some(frame.slice(n..));
                Direct::Partial
            }
            // An error is for the connection's task to meet on its own next write.
            Ok(_) | Err(_) => Direct::Busy,
        }
    }
}

impl<'a> axum::extract::connect_info::Connected<axum::serve::IncomingStream<'a, Listener>> for RawWriter {
    fn connect_info(stream: axum::serve::IncomingStream<'a, Listener>) -> Self {
        RawWriter { shared: Arc::downgrade(&stream.io().shared) }
    }
}

struct Linger {
    deadline: Pin<Box<Sleep>>,
    write_shut: bool,
    drained: usize,
}

/// The error of a write that made no progress for the stall timeout.
#[derive(Debug, thiserror::Error)]
#[error("no write progress for {0:?}: the client stopped reading")]
pub struct WriteStalled(pub Duration);

/// Whether `err` is a stalled write (see [`WriteStalled`]).
pub fn is_write_stall(err: &io::Error) -> bool {
    err.kind() == io::ErrorKind::TimedOut && err.get_ref().is_some_and(|inner| inner.is::<WriteStalled>())
}

impl Socket {
    pub(crate) fn new(tcp: TcpStream, stall: Duration) -> Self {
        let shared = Arc::new(Shared { tcp, wire: Mutex::default() });
        Self { shared, stall, stalled: None, write_stalled: false, closing: None }
    }

    /// A handle for raw writes beside this socket's own.
    pub fn raw_writer(&self) -> RawWriter {
        RawWriter { shared: Arc::downgrade(&self.shared) }
    }

    /// After a write that is not ready: pending while the stall timer runs, the stall
    /// error once it has run out. The timer restarts after any write goes through.
    fn poll_stall<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let stall = self.stall;
        let timer = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        ready!(timer.as_mut().poll(cx));
        self.stalled = None;
        self.write_stalled = true;
        Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, WriteStalled(stall))))
    }

    fn wrote<T>(&mut self, result: Poll<io::Result<T>>, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        match result {
            Poll::Pending => self.poll_stall(cx),
            ready => {
                self.stalled = None;
                ready
            }
        }
    }
}

/// A socket dropped while a write to it is stuck, or after one failed for a stall, is
/// reset rather than closed: a plain
/// close would leave the kernel holding its send buffer (up to megabytes) for minutes,
/// retrying a client that reads nothing. Only a client that stopped reading loses the
/// unsent bytes.
impl Drop for Socket {
    fn drop(&mut self) {
        if self.stalled.is_some() || self.write_stalled {
            let _ = self.shared.tcp.set_zero_linger();
        }
    }
}

impl AsyncRead for Socket {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        self.shared.poll_read(cx, buf)
    }
}

impl AsyncWrite for Socket {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = this.shared.poll_write_with(cx, |tcp| tcp.try_write(buf));
        this.wrote(result, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let result = this.shared.poll_write_with(cx, |tcp| tcp.try_write_vectored(bufs));
        this.wrote(result, cx)
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Writes the owed tail of a raw frame, if any (a TCP stream has nothing else to flush).
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let result = this.shared.poll_flush(cx);
        this.wrote(result, cx)
    }

    /// A lingering close: half-close (the client reads our FIN after the response),
    /// then read and discard until the client closes too, [`LINGER`] has passed or
    /// [`LINGER_MAX_BYTES`] have been read, whichever comes first.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let linger = this.closing.get_or_insert_with(|| {
            Box::new(Linger { deadline: Box::pin(tokio::time::sleep(LINGER)), write_shut: false, drained: 0 })
        });
        if !linger.write_shut {
            match socket2::SockRef::from(&this.shared.tcp).shutdown(std::net::Shutdown::Write) {
                // Not connected any more: there is nobody to linger for.
                Err(_) => return Poll::Ready(Ok(())),
                Ok(()) => linger.write_shut = true,
            }
        }
        let mut chunk = [0u8; DRAIN_CHUNK];
        loop {
            if linger.drained >= LINGER_MAX_BYTES {
                return Poll::Ready(Ok(()));
            }
            if linger.deadline.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Ok(()));
            }
            let mut buf = ReadBuf::new(&mut chunk);
            match this.shared.poll_read(cx, &mut buf) {
                Poll::Pending => return Poll::Pending,
                // The client closed (or reset): nothing more will arrive.
                Poll::Ready(Err(_)) => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) if buf.filled().is_empty() => return Poll::Ready(Ok(())),
                Poll::Ready(Ok(())) => linger.drained += buf.filled().len(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpSocket;

    #[tokio::test]
    async fn accepted_sockets_send_each_write_at_once() {
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = tcp.local_addr().unwrap();
        let mut listener = Listener::new(tcp, Duration::from_secs(10));
        let (accepted, _peer) = tokio::join!(axum::serve::Listener::accept(&mut listener), TcpStream::connect(addr));
        assert!(accepted.0.shared.tcp.nodelay().unwrap(), "Nagle's algorithm off: no frame waits for a delayed ACK");
    }

    /// A connected pair: our `Socket` (accepted) and the peer, whose receive buffer is small.
    async fn pair(stall: Duration) -> (Socket, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpSocket::new_v4().unwrap();
        peer.set_recv_buffer_size(4096).unwrap();
        let (peer, accepted) = tokio::join!(peer.connect(listener.local_addr().unwrap()), listener.accept());
        (Socket::new(accepted.unwrap().0, stall), peer.unwrap())
    }

    #[tokio::test]
    async fn a_write_to_a_peer_that_reads_nothing_fails_once_it_makes_no_progress() {
        let (mut socket, _peer) = pair(Duration::from_millis(200)).await;
        let chunk = vec![0u8; 64 * 1024];
        let mut written = 0usize;
        let err = loop {
            match tokio::time::timeout(Duration::from_secs(10), socket.write_all(&chunk)).await {
                Ok(Ok(())) => written += chunk.len(),
                Ok(Err(err)) => break err,
                Err(_) => panic!("the write waited past the stall timeout"),
            }
            assert!(written < 256 * 1024 * 1024, "never stalled");
        };
        assert!(is_write_stall(&err), "{err}");
        assert!(socket.stalled.is_none(), "the timer is re-armed only by the next blocked write");
    }

    #[tokio::test]
    async fn a_socket_dropped_after_a_stalled_write_is_reset_so_the_kernel_lets_go_of_its_buffer() {
        let (mut socket, mut peer) = pair(Duration::from_millis(200)).await;
        let chunk = vec![0u8; 64 * 1024];
        while tokio::time::timeout(Duration::from_secs(10), socket.write_all(&chunk)).await.expect("stalls").is_ok() {}
        // hyper drops a connection whose write failed without writing again.
        drop(socket);
        let mut buf = vec![0u8; 64 * 1024];
        let ended = loop {
            match tokio::time::timeout(Duration::from_secs(10), peer.read(&mut buf)).await.expect("ends") {
                Ok(0) => break None,
                Ok(_) => continue,
                Err(err) => break Some(err.kind()),
            }
        };
        assert_eq!(ended, Some(io::ErrorKind::ConnectionReset), "closed behind the unsent bytes, not reset");
    }

    #[tokio::test]
    async fn a_closing_socket_drains_the_peer_so_it_reads_our_last_bytes() {
        let (mut socket, mut peer) = pair(Duration::from_secs(10)).await;
        // The peer is still sending (an upload we refused) when we answer and close.
        peer.write_all(&[1u8; 32 * 1024]).await.unwrap();
        socket.write_all(b"HTTP/1.1 413 Payload Too Large\r\n\r\n").await.unwrap();
        let closing = tokio::spawn(async move { socket.shutdown().await });
        peer.write_all(&[1u8; 1024 * 1024]).await.expect("no reset while the client still sends");
        let mut response = Vec::new();
        peer.read_to_end(&mut response).await.expect("our FIN, not a reset");
        assert!(response.starts_with(b"HTTP/1.1 413"));
        drop(peer);
        closing.await.unwrap().unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_never_closes_is_let_go_after_the_linger_time() {
        let (mut socket, _peer) = pair(Duration::from_secs(10)).await;
        let started = tokio::time::Instant::now();
        socket.shutdown().await.unwrap();
        assert!(started.elapsed() >= LINGER, "{:?}", started.elapsed());
    }
}
