//! WebSocket connections on `/ws`: authentication at the handshake or by first frame,
//! then one task per socket that runs its commands and writes its replies, events and
//! heartbeats.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use tokio::time::Instant;

use crate::auth::{self, Claims};
use crate::capacity::Slot;
use crate::error::{CommandError, ErrorCode, HttpError};
use crate::metrics::CloseLabels;
use crate::outbox::{Outbox, Queued, Receiver};
use crate::presence::Admission;
use crate::protocol::{client, server, Close, Command, Policy};
use crate::session::Session;
use crate::socket::RawWriter;
use crate::state::AppState;

/// Largest WebSocket message the socket layer reads at all; frames between the
/// protocol limit (64 KiB) and this get a `too_large` error, larger ones close with 1009.
const SOCKET_MAX_MESSAGE: usize = 1024 * 1024;

/// Bytes read from a socket at a time.
const READ_BUFFER: usize = 512;
/// Bytes of queued frames gathered before a write; the writer flushes after each batch.
const WRITE_BUFFER: usize = 16 * 1024;
/// When a client over the per-user connection cap may try again.
const CONNECTION_CAP_RETRY_MS: u64 = 5_000;
/// How long the last frames of a closing connection may take to write.
const CLOSE_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// `GET /ws`: verifies a token given in the `Authorization` header or `?token=`, then
/// upgrades. A bad token gets HTTP 401 and no upgrade; no token means the client must
/// authenticate with its first frame. `raw` writes room events straight to the socket
/// (see `outbox.rs`).
pub async fn upgrade(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
    raw: Option<RawWriter>,
) -> Response {
    if state.shutdown().is_cancelled() {
        return HttpError::unavailable("gateway is shutting down; reconnect elsewhere").into_response();
    }
    let Some(slot) = state.capacity().admit() else {
        return HttpError::unavailable("gateway is full; connect to another").into_response();
    };
    if let Some(origin) = headers.get(header::ORIGIN) {
        if !origin_allowed(&state.settings().allowed_origins, origin.to_str().unwrap_or_default()) {
            return HttpError::forbidden("origin not allowed").into_response();
        }
    }
    let header_token = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(auth::bearer);
    let token = header_token.or_else(|| query.get("token").map(String::as_str));
    let claims = match token {
        Some(token) => match state.authenticate(token) {
            Ok(claims) => Some(claims),
            Err(err) => return HttpError::unauthorized(err.to_string()).into_response(),
        },
        None => None,
    };
    let tracker = state.connections().clone();
    ws.max_message_size(SOCKET_MAX_MESSAGE)
        .max_frame_size(SOCKET_MAX_MESSAGE)
        // tungstenite's defaults (128 KiB to read, 128 KiB before writing) are sized for
        // bulk transfer; chat frames are small and a gateway holds tens of thousands of
        // sockets. The read buffer grows for a large frame when one comes.
        .read_buffer_size(READ_BUFFER)
        .write_buffer_size(WRITE_BUFFER)
        .on_upgrade(move |socket| tracker.track_future(holding(slot, serve(socket, state, claims, raw))))
}

/// Runs a connection with its place under the gateway's cap, given back when it ends.
async fn holding(_slot: Slot, connection: impl Future<Output = ()>) {
    connection.await
}

/// Whether a browser `Origin` may open a WebSocket: any, when no allowlist is
/// configured; otherwise an exact (case-insensitive) match.
pub fn origin_allowed(allowlist: &[String], origin: &str) -> bool {
    allowlist.is_empty() || allowlist.iter().any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
}

/// Runs one connection to its end. This future lives as long as the connection, so
/// it holds only the connection loop: the set-up and clean-up (Redis and gRPC calls
/// whose futures are several KiB each) run boxed, and their memory is returned when
/// they finish.
///
/// Not an `async fn`: that would keep its arguments (the socket above all) in the
/// future beside the state they move into, for the connection's whole life.
fn serve(
    socket: WebSocket,
    state: AppState,
    claims: Option<Claims>,
    raw: Option<RawWriter>,
) -> impl Future<Output = ()> + Send {
    let opening = Box::pin(open(socket, state, claims, raw));
    async move {
        let Some((mut conn, session)) = opening.await else { return };
        let session = conn.run(session).await;
        Box::pin(conn.finish(session)).await;
    }
}

/// Authenticates (by the first frame when the handshake carried no token), admits the
/// user, registers for per-user events and sends `welcome`; `None` when the
/// connection ends here.
async fn open(
    mut socket: WebSocket,
    state: AppState,
    claims: Option<Claims>,
    raw: Option<RawWriter>,
) -> Option<(Connection, Box<Session>)> {
    let (claims, auth_id) = match claims {
        Some(claims) => (claims, None),
        None => first_frame_auth(&state, &mut socket).await?,
    };

    let conn_id = state.next_conn_id();
    let settings = state.settings();
    let session_id = format!("{:032x}", rand::rng().random::<u128>());
    let welcome = server::welcome(auth_id.as_deref(), &claims.sub, &session_id, settings.heartbeat);
    tracing::debug!(conn = conn_id, user = %claims.sub, session = %session_id, "connection authenticated");

    let admission = state.presence().admit(&claims.sub).await;
    if admission == Admission::OverCap {
        let err = CommandError::rate_limited(
            "connection limit reached: too many open connections for this user",
            CONNECTION_CAP_RETRY_MS,
        );
        let error = server::error(auth_id.as_deref(), &err);
        refuse(&mut socket, error, Close::Policy(Policy::TooManyConnections)).await;
        return None;
    }
    let (outbox, queue) = Outbox::direct(conn_id, settings.outbound_queue, state.metrics().outbound_drops.clone(), raw);
    // Without its user's channel a connection never hears `room_removed` or an admin
    // disconnect, and a removal would not reach its joins: refuse it, and let the
    // client retry (1013) rather than admit it half-working.
    if let Err(err) = state.fanout().add_user_conn(&claims.sub, &outbox).await {
        // Uncounted in the background: with Redis down it would keep the client waiting.
        // Counted but never announced online, so only a count it kept from going to zero
        // (another connection that closed meanwhile) still owes an offline.
        let first = admission == (Admission::Admitted { first: true });
        let (presence, user) = (state.presence().clone(), claims.sub.clone());
        state.tasks().spawn(async move {
            if presence.release(&user).await && !first {
                presence.announce(&user, false).await;
            }
        });
        refuse(&mut socket, server::error(auth_id.as_deref(), &err), Close::Unavailable).await;
        return None;
    }
    state.metrics().connections.inc();
    state.metrics().connects.inc();
    if admission == (Admission::Admitted { first: true }) {
        let presence = state.presence().clone();
        let user = claims.sub.clone();
        state.tasks().spawn(async move { presence.announce(&user, true).await });
    }
    let session = Box::new(Session::new(state.clone(), claims, outbox.clone()));
    state.open_connections().add(&outbox);
    let mut conn = Connection { socket, queue, outbox, pending: VecDeque::new(), published: Vec::new(), state };
    if let Err(close) = conn.write(Message::Text(welcome.into())).await {
        conn.outbox.close(close);
    }
    Some((conn, session))
}

/// Tells a connection the gateway is restarting: a `reconnect` event, then close 1012.
pub fn restart(outbox: &Outbox) {
    // Spread reconnects so a restarting gateway doesn't stampede the others.
    let after_ms = rand::rng().random_range(0..2_000u64);
    outbox.push_event(Message::Text(server::reconnect(after_ms).into()));
    outbox.close(Close::Restart);
}

/// Sends an error frame and a close frame to a client that is not let in.
async fn refuse(socket: &mut WebSocket, error: String, close: Close) {
    let sent = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, async {
        socket.send(Message::Text(error.into())).await?;
        socket.send(Message::Close(Some(close_frame(close)))).await
    })
    .await;
    if let Ok(Ok(())) = sent {
        linger(socket).await;
    }
}

/// After our close frame: reads and discards what the client still sends until its
/// close frame or EOF, within `socket::LINGER` and `socket::LINGER_MAX_BYTES`. Dropping
/// the socket with unread bytes would reset it, and the reset would make the client's
/// kernel discard our close frame unread: the client would see 1006, not our code.
async fn linger(socket: &mut WebSocket) {
    let deadline = Instant::now() + crate::socket::LINGER;
    let mut discarded = 0;
    while discarded < crate::socket::LINGER_MAX_BYTES {
        match tokio::time::timeout_at(deadline, socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => discarded += text.len(),
            Ok(Some(Ok(Message::Binary(bytes) | Message::Ping(bytes) | Message::Pong(bytes)))) => {
                discarded += bytes.len()
            }
            // Its close frame (the handshake is complete), EOF, a broken socket, or time up.
            Ok(Some(Ok(Message::Close(_))) | None | Some(Err(_))) | Err(_) => return,
        }
    }
}

/// Runs one socket write to its end, unless the outbox overflows meanwhile: a client
/// whose window stays shut must not keep a slow consumer open. (A write that makes no
/// progress at all fails by itself after the stall timeout: see `socket.rs`.)
async fn guarded(queue: &Receiver, write: impl Future<Output = Result<(), axum::Error>>) -> Result<(), Close> {
    tokio::select! {
        biased;
        () = queue.overflowed() => Err(Close::SlowConsumer),
        written = write => written.map_err(|err| Close::after_write_error(&err)),
    }
}

fn close_frame(close: Close) -> CloseFrame {
    CloseFrame { code: close.code(), reason: close.reason().into() }
}

/// Waits for `{"type":"auth","token":...}` within the auth timeout. Anything else gets
/// an `unauthorized` error frame and close 1008.
async fn first_frame_auth(state: &AppState, socket: &mut WebSocket) -> Option<(Claims, Option<String>)> {
    let deadline = Instant::now() + state.settings().auth_timeout;
    // A refused token is counted by `authenticate`; no token at all, here.
    let no_token = |id: Option<String>, message: &str| {
        state.metrics().auth_failure("no_auth_frame");
        (id, message.to_owned())
    };
    let refusal = loop {
        let frame = tokio::select! {
            frame = tokio::time::timeout_at(deadline, socket.next()) => frame,
            _ = state.shutdown().cancelled() => return None,
        };
        let text = match frame {
            Err(_) => break no_token(None, "no auth frame within the time limit"),
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return None,
            Ok(Some(Ok(Message::Text(text)))) => text,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(Message::Binary(_)))) => break no_token(None, "the first frame must be an auth frame"),
        };
        match client::parse(&text) {
            Ok(client::ClientFrame { id, command: Command::Auth { token } }) => match state.authenticate(&token) {
                Ok(claims) => return Some((claims, id)),
                Err(err) => break (id, err.to_string()),
            },
            Ok(frame) => break no_token(frame.id, "the first frame must be an auth frame"),
            Err(bad) => break no_token(bad.id, "the first frame must be an auth frame"),
        }
    };
    let (id, message) = refusal;
    let error = server::error(id.as_deref(), &CommandError::new(ErrorCode::Unauthorized, message));
    refuse(socket, error, Close::Policy(Policy::Unauthorized)).await;
    None
}

/// A command being handled: it owns the session while it runs and hands it back with
/// the reply. Boxed, so an idle connection's task holds no command's state.
type Running = Pin<Box<dyn Future<Output = (Box<Session>, String)> + Send>>;

/// One authenticated connection: its socket and its queue of outbound frames, both
/// served by the connection's one task. One task (not a reader and a writer over a
/// split socket) keeps an idle connection small and a delivery to one wake-up.
struct Connection {
    socket: WebSocket,
    queue: Receiver,
    /// The producers' end of `queue`, kept to close the connection with a reason.
    outbox: Outbox,
    /// Entries taken from the queue, written in one batch and one flush.
    pending: VecDeque<Queued>,
    /// Publish times (Unix µs) of the live events in the batch being written.
    published: Vec<i64>,
    state: AppState,
}

impl Connection {
    /// Runs commands (one at a time, in order), writes queued frames and heartbeats
    /// until the client leaves, the connection is closed, the token expires or the
    /// gateway restarts; returns the session for its clean-up.
    async fn run(&mut self, session: Box<Session>) -> Box<Session> {
        let state = self.state.clone();
        let heartbeat = state.settings().heartbeat;
        let mut last_seen_ms = state.uptime_ms();
        // One timer for both the next heartbeat and the token's expiry, created once:
        // each creation registers with the timer wheel, and every timer a connection
        // holds is memory and a poll on each wake-up.
        let mut next_ping = Instant::now() + heartbeat;
        let mut expires_at = session.expires_at();
        let timer = tokio::time::sleep_until(next_ping.min(expires_at));
        tokio::pin!(timer);
        // Exactly one of these holds the session: it waits for a frame, or runs one.
        let mut idle = Some(session);
        let mut running: Option<Running> = None;
        loop {
            tokio::select! {
                frame = self.socket.next(), if running.is_none() => {
                    last_seen_ms = state.uptime_ms();
                    let text = match frame {
                        Some(Ok(Message::Text(text))) => text,
                        Some(Ok(Message::Binary(_))) => {
                            let error = server::error(
                                None,
                                &CommandError::bad_request("binary frames are not supported; send JSON text frames"),
                            );
                            if let Err(close) = self.reply(error).await {
                                self.outbox.close(close);
                                break;
                            }
                            continue;
                        }
                        Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                        Some(Ok(Message::Close(_))) | None => break,
                        Some(Err(err)) => {
                            self.outbox.close(Close::after_read_error(&err));
                            break;
                        }
                    };
                    if let Some(mut session) = idle.take() {
                        running = Some(Box::pin(async move {
                            let reply = session.handle_text(&text).await;
                            (session, reply)
                        }));
                    }
                }
                (session, reply) = async { running.as_mut().expect("guarded by the branch condition").await }, if running.is_some() => {
                    running = None;
                    if expires_at != session.expires_at() {
                        // `refresh_token` moved the deadline.
                        expires_at = session.expires_at();
                        timer.as_mut().reset(next_ping.min(expires_at));
                    }
                    idle = Some(session);
                    if let Err(close) = self.reply(reply).await {
                        self.outbox.close(close);
                        break;
                    }
                }
                () = self.queue.ready() => {
                    if self.queue.close_reason().is_some() {
                        break;
                    }
                    if let Err(close) = self.flush_queue().await {
                        self.outbox.close(close);
                        break;
                    }
                }
                () = &mut timer => {
                    let now = Instant::now();
                    if now >= expires_at {
                        self.outbox.close(Close::TokenExpired);
                        break;
                    }
                    next_ping = now + heartbeat;
                    timer.as_mut().reset(next_ping.min(expires_at));
                    let silent_ms = state.uptime_ms().saturating_sub(last_seen_ms);
                    if silent_ms > 2 * heartbeat.as_millis() as u64 {
                        self.outbox.close(Close::HeartbeatTimeout);
                        break;
                    }
                    if let Err(close) = self.write(Message::Ping(Default::default())).await {
                        self.outbox.close(close);
                        break;
                    }
                }
            }
        }
        match (idle, running) {
            (Some(session), _) => session,
            // A command still running (a send waiting for its ack) finishes, and answers
            // while the socket is still there: what it stored is delivered to everyone
            // else, and the session is needed to leave its rooms.
            (None, Some(running)) => {
                let (session, reply) = running.await;
                if !self.outbox.close_reason().is_some_and(|c| c == Close::Abnormal || c.abandons_queue()) {
                    // Bounded like the close frame: a client that stopped reading can't hold us.
                    let _ = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, self.reply(reply)).await;
                }
                session
            }
            (None, None) => unreachable!("the session is always idle or running"),
        }
    }

    /// Leaves the session's rooms, closes the socket, and gives up the user's
    /// registration and presence.
    async fn finish(mut self, session: Box<Session>) {
        let user = session.claims().sub.clone();
        session.end().await;
        self.close().await;
        let state = self.state;
        state.metrics().connections.dec();
        state.open_connections().remove(self.outbox.id());
        state.fanout().remove_user_conn(&user, self.outbox.id()).await;
        if state.presence().release(&user).await {
            let presence = state.presence().clone();
            state.tasks().spawn(async move { presence.announce(&user, false).await });
        }
    }

    /// Writes a command's reply after every frame queued before it; the close to end
    /// with when that fails.
    async fn reply(&mut self, reply: String) -> Result<(), Close> {
        self.flush_queue().await?;
        self.write(Message::Text(reply.into())).await
    }

    /// Writes one frame and flushes; the close to end with when that fails.
    async fn write(&mut self, frame: Message) -> Result<(), Close> {
        self.queue.claim();
        guarded(&self.queue, self.socket.send(frame)).await?;
        self.queue.release();
        Ok(())
    }

    /// Writes every queued frame with one flush; the close to end with when that fails.
    async fn flush_queue(&mut self) -> Result<(), Close> {
        self.queue.take(&mut self.pending);
        if self.pending.is_empty() {
            self.queue.release();
            return Ok(());
        }
        let written = self.write_pending().await;
        if written.is_err() {
            self.pending.clear();
            self.published.clear();
        }
        written?;
        self.queue.release();
        if !self.published.is_empty() {
            let now_us = chrono::Utc::now().timestamp_micros();
            for at in self.published.drain(..) {
                self.state.metrics().fanout_latency.observe((now_us - at).max(0) as f64 / 1e6);
            }
        }
        Ok(())
    }

    /// Feeds the entries taken from the queue to the socket, then flushes.
    async fn write_pending(&mut self) -> Result<(), Close> {
        let Self { socket, queue, pending, published, .. } = self;
        while let Some(item) = pending.pop_front() {
            match item {
                Queued::One(frame) => guarded(queue, socket.feed(frame)).await?,
                Queued::Timed(frame, at) => {
                    published.push(at);
                    guarded(queue, socket.feed(frame)).await?
                }
                Queued::Many(frames) => {
                    for frame in frames {
                        guarded(queue, socket.feed(frame)).await?;
                    }
                }
                // The socket writes the owed tail before any later byte; flushing
                // makes sure it goes now even if nothing follows.
                Queued::Owed(at) => {
                    published.extend(at);
                    guarded(queue, socket.flush()).await?
                }
            }
        }
        guarded(queue, socket.flush()).await
    }

    /// Ends the connection: frames already queued (an error reply, a `reconnect`
    /// notice) go out before the close frame, except to a client that stopped reading
    /// (a slow consumer, a stalled write), whose queue is what we are giving up on.
    /// The writes are bounded; once the close frame is out, the connection lingers
    /// for the client's reply.
    async fn close(&mut self) {
        let reason = self.outbox.close_reason().unwrap_or(Close::Normal);
        self.outbox.close(reason);
        self.state.metrics().disconnects.get_or_create(&CloseLabels { code: reason.code() }).inc();
        // Kept to the end: nothing may follow the close frame.
        self.queue.claim();
        match reason {
            Close::Abnormal => return,
            Close::WriteStalled => tracing::warn!(conn = self.outbox.id(), "socket write stalled; disconnecting"),
            _ => {}
        }
        let sent = tokio::time::timeout(CLOSE_WRITE_TIMEOUT, async {
            if !reason.abandons_queue() {
                self.flush_queue().await.map_err(|_| ())?;
            }
            self.socket.send(Message::Close(Some(close_frame(reason)))).await.map_err(|_| ())
        })
        .await;
        if let Ok(Ok(())) = sent {
            linger(&mut self.socket).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_match_exactly_when_an_allowlist_is_set() {
        assert!(origin_allowed(&[], "https://anything.example"));
        let list = vec!["https://app.example.com".to_owned()];
        assert!(origin_allowed(&list, "https://app.example.com"));
        assert!(origin_allowed(&list, "HTTPS://APP.EXAMPLE.COM"));
        assert!(!origin_allowed(&list, "https://app.example.com.evil.test"));
        assert!(!origin_allowed(&list, "null"));
        assert!(origin_allowed(&["*".to_owned()], "https://x.test"));
    }
}
