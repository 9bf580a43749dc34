//! WebSocket connections on `/ws`: authentication at the handshake or by first frame,
//! then a reader (commands) and a writer (replies, events, heartbeats) per socket.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use rand::Rng;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::auth::{self, Claims};
use crate::error::{CommandError, ErrorCode, HttpError};
use crate::outbox::{Outbox, Outgoing, CLOSE_SLOW_CONSUMER};
use crate::presence::Admission;
use crate::protocol::{self, Command};
use crate::session::Session;
use crate::state::AppState;

/// Largest WebSocket message the socket layer reads at all; frames between the
/// protocol limit (64 KiB) and this get a `too_large` error, larger ones close with 1009.
const SOCKET_MAX_MESSAGE: usize = 1024 * 1024;

/// Close codes used here.
const CLOSE_POLICY: u16 = 1008;
const CLOSE_RESTART: u16 = 1012;
/// Bytes read from a socket at a time.
const READ_BUFFER: usize = 4 * 1024;
/// Bytes of queued frames gathered before a write; the writer flushes after each batch.
const WRITE_BUFFER: usize = 16 * 1024;
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_TOKEN_EXPIRED: u16 = 4001;
/// When a client over the per-user connection cap may try again.
const CONNECTION_CAP_RETRY_MS: u64 = 5_000;
/// Not sent on the wire: the socket is already gone.
const CLOSE_ABNORMAL: u16 = 1006;

/// `GET /ws`: verifies a token given in the `Authorization` header or `?token=`, then
/// upgrades. A bad token gets HTTP 401 and no upgrade; no token means the client must
/// authenticate with its first frame.
pub async fn upgrade(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    if state.shutdown().is_cancelled() {
        return HttpError::unavailable("gateway is shutting down; reconnect elsewhere").into_response();
    }
    if let Some(origin) = headers.get(header::ORIGIN) {
        if !origin_allowed(&state.settings().allowed_origins, origin.to_str().unwrap_or_default()) {
            return HttpError::forbidden("origin not allowed").into_response();
        }
    }
    let header_token = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(auth::bearer);
    let token = header_token.or_else(|| query.get("token").map(String::as_str));
    let claims = match token {
        Some(token) => match state.verifier().verify(token) {
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
        .on_upgrade(move |socket| tracker.track_future(serve(socket, state, claims)))
}

/// Whether a browser `Origin` may open a WebSocket: any, when no allowlist is
/// configured; otherwise an exact (case-insensitive) match.
pub fn origin_allowed(allowlist: &[String], origin: &str) -> bool {
    allowlist.is_empty() || allowlist.iter().any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
}

/// Runs one connection to its end.
async fn serve(socket: WebSocket, state: AppState, claims: Option<Claims>) {
    let (mut sink, mut stream) = socket.split();
    let (claims, auth_id) = match claims {
        Some(claims) => (claims, None),
        None => match first_frame_auth(&state, &mut sink, &mut stream).await {
            Some(authed) => authed,
            None => return,
        },
    };

    let conn_id = state.next_conn_id();
    let settings = state.settings();
    let (outbox, rx) = Outbox::new(conn_id, settings.outbound_queue, state.metrics().outbound_drops.clone());
    let session_id = format!("{:032x}", rand::rng().random::<u128>());
    let welcome = protocol::Welcome {
        kind: "welcome",
        id: auth_id.as_deref(),
        user_id: &claims.sub,
        session_id: &session_id,
        heartbeat_ms: settings.heartbeat.as_millis() as u64,
        server_time: protocol::now(),
    };
    let welcome = serde_json::to_string(&welcome).unwrap_or_default();
    tracing::debug!(conn = conn_id, user = %claims.sub, session = %session_id, "connection authenticated");

    let user = claims.sub.clone();
    let admission = state.presence().admit(&user).await;
    if admission == Admission::OverCap {
        let err = CommandError::rate_limited(
            "connection limit reached: too many open connections for this user",
            CONNECTION_CAP_RETRY_MS,
        );
        let _ = outbox.reply(Message::Text(protocol::error(auth_id.as_deref(), &err).into())).await;
        outbox.close(CLOSE_POLICY, "too many connections");
        write_loop(sink, rx, outbox, state, Arc::new(AtomicU64::new(0))).await;
        return;
    }
    state.metrics().connections.inc();
    let last_seen = Arc::new(AtomicU64::new(state.uptime_ms()));
    let writer = tokio::spawn(write_loop(sink, rx, outbox.clone(), state.clone(), last_seen.clone()));
    if let Err(err) = state.fanout().add_user_conn(&user, &outbox).await {
        tracing::warn!(%err.message, "per-user events unavailable for this connection");
    }
    if admission == (Admission::Admitted { first: true }) {
        let presence = state.presence().clone();
        let user = user.clone();
        tokio::spawn(async move { presence.announce(&user, true).await });
    }
    if outbox.reply(Message::Text(welcome.into())).await {
        let mut session = Session::new(state.clone(), claims, outbox.clone());
        read_loop(&mut session, &mut stream, &outbox, &state, &last_seen).await;
        session.end().await;
    }
    outbox.close(1000, "");
    state.metrics().connections.dec();
    state.fanout().remove_user_conn(&user, conn_id).await;
    if state.presence().release(&user).await {
        let presence = state.presence().clone();
        tokio::spawn(async move { presence.announce(&user, false).await });
    }
    if let Err(err) = writer.await {
        tracing::warn!(%err, conn = conn_id, "writer task failed");
    }
}

/// Waits for `{"type":"auth","token":...}` within the auth timeout. Anything else gets
/// an `unauthorized` error frame and close 1008.
async fn first_frame_auth(
    state: &AppState,
    sink: &mut SplitSink<WebSocket, Message>,
    stream: &mut SplitStream<WebSocket>,
) -> Option<(Claims, Option<String>)> {
    let deadline = Instant::now() + state.settings().auth_timeout;
    let refusal = loop {
        let frame = tokio::select! {
            frame = tokio::time::timeout_at(deadline, stream.next()) => frame,
            _ = state.shutdown().cancelled() => return None,
        };
        let text = match frame {
            Err(_) => break (None, "no auth frame within the time limit".to_owned()),
            Ok(None | Some(Err(_)) | Some(Ok(Message::Close(_)))) => return None,
            Ok(Some(Ok(Message::Text(text)))) => text,
            Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
            Ok(Some(Ok(Message::Binary(_)))) => break (None, "the first frame must be an auth frame".to_owned()),
        };
        match protocol::parse(&text) {
            Ok(protocol::ClientFrame { id, command: Command::Auth { token } }) => {
                match state.verifier().verify(&token) {
                    Ok(claims) => return Some((claims, id)),
                    Err(err) => break (id, err.to_string()),
                }
            }
            Ok(frame) => break (frame.id, "the first frame must be an auth frame".to_owned()),
            Err(bad) => break (bad.id, "the first frame must be an auth frame".to_owned()),
        }
    };
    let (id, message) = refusal;
    let error = protocol::error(id.as_deref(), &CommandError::new(ErrorCode::Unauthorized, message));
    let _ = sink.send(Message::Text(error.into())).await;
    let _ = sink.send(Message::Close(Some(CloseFrame { code: CLOSE_POLICY, reason: "unauthorized".into() }))).await;
    None
}

/// Reads frames and runs commands until the client leaves, the connection is closed,
/// the token expires or the gateway shuts down.
async fn read_loop(
    session: &mut Session,
    stream: &mut SplitStream<WebSocket>,
    outbox: &Outbox,
    state: &AppState,
    last_seen: &AtomicU64,
) {
    // Created once, not per frame: each creation registers with a timer or a token.
    let closing = outbox.closing();
    let restart = state.close_connections().cancelled();
    let expiry = tokio::time::sleep_until(session.expires_at());
    tokio::pin!(closing, restart, expiry);
    loop {
        if expiry.deadline() != session.expires_at() {
            // `refresh_token` moved the deadline.
            expiry.as_mut().reset(session.expires_at());
        }
        let frame = tokio::select! {
            frame = stream.next() => frame,
            _ = &mut closing => return,
            _ = &mut expiry => {
                outbox.close(CLOSE_TOKEN_EXPIRED, "token expired");
                return;
            }
            _ = &mut restart => {
                // Spread reconnects so a restarting gateway doesn't stampede the others.
                let after_ms = rand::rng().random_range(0..2_000u64);
                let frame = format!(r#"{{"type":"reconnect","after_ms":{after_ms}}}"#);
                outbox.push_event(Message::Text(frame.into()));
                outbox.close(CLOSE_RESTART, "server restart");
                return;
            }
        };
        last_seen.store(state.uptime_ms(), Ordering::Relaxed);
        let reply = match frame {
            Some(Ok(Message::Text(text))) => session.handle_text(&text).await,
            Some(Ok(Message::Binary(_))) => protocol::error(
                None,
                &CommandError::bad_request("binary frames are not supported; send JSON text frames"),
            ),
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
            Some(Ok(Message::Close(_))) | None => return,
            Some(Err(err)) => {
                // Oversized messages end here: tungstenite refuses them before we see them.
                let too_big = err.to_string().contains("too long") || err.to_string().contains("Space limit");
                if too_big {
                    outbox.close(1009, "message too big");
                } else {
                    outbox.close(CLOSE_ABNORMAL, "");
                }
                return;
            }
        };
        if !outbox.reply(Message::Text(reply.into())).await {
            return;
        }
    }
}

/// Writes queued frames (batched into one flush when several are ready) and sends a
/// WebSocket ping every heartbeat; drops a peer silent for two heartbeats.
async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Outgoing>,
    outbox: Outbox,
    state: AppState,
    last_seen: Arc<AtomicU64>,
) {
    let heartbeat = state.settings().heartbeat;
    let mut ping = tokio::time::interval_at(Instant::now() + heartbeat, heartbeat);
    // Created once: re-creating it on every wake-up re-registered it with the token.
    let closing = outbox.closing();
    tokio::pin!(closing);
    loop {
        tokio::select! {
            item = rx.recv() => {
                let Some(item) = item else { break };
                let mut published = Vec::new();
                let mut ok = feed(&mut sink, item, &mut published).await;
                while ok {
                    match rx.try_recv() {
                        Ok(item) => ok = feed(&mut sink, item, &mut published).await,
                        Err(_) => break,
                    }
                }
                if !ok || sink.flush().await.is_err() {
                    outbox.close(CLOSE_ABNORMAL, "");
                    return;
                }
                let now_us = chrono::Utc::now().timestamp_micros();
                for at in published {
                    state.metrics().fanout_latency.observe((now_us - at).max(0) as f64 / 1e6);
                }
            }
            _ = ping.tick() => {
                let silent_ms = state.uptime_ms().saturating_sub(last_seen.load(Ordering::Relaxed));
                if silent_ms > 2 * heartbeat.as_millis() as u64 {
                    outbox.close(CLOSE_GOING_AWAY, "heartbeat timeout");
                    break;
                }
                if sink.send(Message::Ping(Default::default())).await.is_err() {
                    outbox.close(CLOSE_ABNORMAL, "");
                    return;
                }
            }
            _ = &mut closing => break,
        }
    }
    let reason = outbox.close_reason().unwrap_or(crate::outbox::CloseReason { code: 1000, reason: "" });
    if reason.code == CLOSE_ABNORMAL {
        return;
    }
    // Frames already queued (an error reply, a `reconnect` notice) go out before the
    // close frame, except to a slow consumer, whose queue is what we are giving up on.
    if reason.code != CLOSE_SLOW_CONSUMER {
        while let Ok(item) = rx.try_recv() {
            if !feed(&mut sink, item, &mut Vec::new()).await {
                return;
            }
        }
    }
    let close = CloseFrame { code: reason.code, reason: reason.reason.into() };
    let _ = tokio::time::timeout(Duration::from_secs(2), sink.send(Message::Close(Some(close)))).await;
}

/// Writes a queue entry without flushing; false when the socket is gone. Publish times
/// of timed entries are collected into `published`.
async fn feed(sink: &mut SplitSink<WebSocket, Message>, item: Outgoing, published: &mut Vec<i64>) -> bool {
    match item {
        Outgoing::One(frame) => sink.feed(frame).await.is_ok(),
        Outgoing::Timed(frame, at) => {
            published.push(at);
            sink.feed(frame).await.is_ok()
        }
        Outgoing::Many(frames) => {
            for frame in frames {
                if sink.feed(frame).await.is_err() {
                    return false;
                }
            }
            true
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
