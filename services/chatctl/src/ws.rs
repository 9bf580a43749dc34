//! The WebSocket side: opening an authenticated connection, reading frames, closing.

use std::time::Duration;

use anyhow::Context;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::error::{Dropped, Refused};
use crate::target::Target;

/// An open WebSocket to a gateway.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What the socket produced next.
#[derive(Debug)]
pub enum Incoming {
    /// A text frame: the text as received and its JSON (`Null` when it was not JSON).
    Frame { text: String, value: Value },
    /// The server closed the connection with this close frame.
    Closed(Option<CloseFrame>),
    /// The connection ended without a close frame (reset, EOF, protocol error).
    Lost(String),
}

/// Connects to the gateway's `/ws` with `Authorization: Bearer` and waits for the welcome.
///
/// Returns the socket and the welcome frame (its raw text too, for `--json`). A refused
/// handshake (401, 403, 503) or an `error` frame instead of the welcome is [`Refused`];
/// failing to reach the gateway in `timeout` is [`Dropped`].
pub async fn open(target: &Target, token: &str, timeout: Duration) -> anyhow::Result<(Ws, Value, String)> {
    let mut request = target.ws_url.as_str().into_client_request().context("building the WebSocket request")?;
    let bearer = HeaderValue::from_str(&format!("Bearer {token}")).context("the token is not a valid header value")?;
    request.headers_mut().insert("Authorization", bearer);
    let url = &target.ws_url;
    let mut ws = match tokio::time::timeout(timeout, tokio_tungstenite::connect_async(request)).await {
        Err(_) => return Err(Dropped(format!("no WebSocket handshake with {url} within {timeout:?}")).into()),
        Ok(Err(WsError::Http(response))) => {
            let status = response.status();
            let body = response.body().as_deref().unwrap_or_default();
            return Err(Refused::from_http(status.as_u16(), status.canonical_reason().unwrap_or("error"), body).into());
        }
        Ok(Err(e)) => return Err(Dropped(format!("cannot connect to {url}: {e}")).into()),
        Ok(Ok((ws, _response))) => ws,
    };
    let first = match tokio::time::timeout(timeout, next(&mut ws)).await {
        Err(_) => return Err(Dropped(format!("no welcome from {url} within {timeout:?}")).into()),
        Ok(first) => first,
    };
    match first {
        Incoming::Frame { text, value } if value["type"] == "welcome" => Ok((ws, value, text)),
        // The connection cap answers with an error frame instead of the welcome, then 1008.
        Incoming::Frame { value, .. } if value["type"] == "error" => {
            Err(Refused::from_error(&value, None).unwrap_or_else(|| unexpected(&value)).into())
        }
        Incoming::Frame { text, .. } => Err(anyhow::anyhow!("expected a welcome, got {text}")),
        Incoming::Closed(frame) => {
            Err(Dropped(format!("closed before the welcome: {}", describe_close(frame.as_ref()))).into())
        }
        Incoming::Lost(e) => Err(Dropped(format!("connection lost before the welcome: {e}")).into()),
    }
}

fn unexpected(value: &Value) -> Refused {
    Refused { status: None, code: "error".into(), message: value.to_string(), retry_after_ms: None }
}

/// The next meaningful thing off the socket; pings are answered by tungstenite itself.
///
/// Cancel-safe, so it can sit in a `select!` beside stdin.
pub async fn next(ws: &mut Ws) -> Incoming {
    loop {
        match ws.next().await {
            None => return Incoming::Lost("connection ended".into()),
            Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed)) => {
                return Incoming::Lost("connection ended".into())
            }
            Some(Err(e)) => return Incoming::Lost(e.to_string()),
            Some(Ok(Message::Text(text))) => {
                let text = text.as_str().to_owned();
                let value = serde_json::from_str(&text).unwrap_or(Value::Null);
                return Incoming::Frame { text, value };
            }
            Some(Ok(Message::Close(frame))) => return Incoming::Closed(frame),
            // Pings, pongs and (never sent by the gateway) binary frames carry nothing to show.
            Some(Ok(_)) => continue,
        }
    }
}

/// Sends one text frame.
pub async fn send_text(ws: &mut Ws, text: String) -> anyhow::Result<()> {
    ws.send(Message::Text(text.into())).await.map_err(|e| Dropped(format!("sending a frame: {e}")).into())
}

/// Closes with 1000 and waits (at most `wait`) for the server's close in return, so the
/// gateway logs a clean close rather than a reset.
pub async fn close(ws: &mut Ws, wait: Duration) {
    let frame = CloseFrame { code: CloseCode::Normal, reason: "".into() };
    if ws.close(Some(frame)).await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(wait, async { while let Some(Ok(_)) = ws.next().await {} }).await;
}

/// The close code as a number, when the server sent one.
pub fn close_code(frame: Option<&CloseFrame>) -> Option<u16> {
    frame.map(|f| u16::from(f.code))
}

/// `1008 (policy: …) reason` for people reading the output.
pub fn describe_close(frame: Option<&CloseFrame>) -> String {
    let Some(frame) = frame else { return "no close code".into() };
    let code = u16::from(frame.code);
    // Meanings as the gateway uses them (docs/protocol.md, close codes).
    let meaning = match code {
        1000 => "normal",
        1001 => "going away: no heartbeat answer",
        1008 => "policy: authentication, connection cap, abuse or admin disconnect",
        1009 => "frame too large",
        1011 => "server error",
        1012 => "gateway restarting: reconnect",
        1013 => "reading too slowly: reconnect and join with since_seq",
        4001 => "token expired",
        _ => "",
    };
    let mut out = code.to_string();
    if !meaning.is_empty() {
        out.push_str(&format!(" ({meaning})"));
    }
    if !frame.reason.is_empty() {
        out.push_str(&format!(" {}", frame.reason));
    }
    out
}
