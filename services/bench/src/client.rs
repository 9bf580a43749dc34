//! WebSocket clients speaking the chat protocol, bound to chosen source addresses so one
//! machine can open more connections than one address's ephemeral ports allow.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

/// One client connection.
pub type Ws = WebSocketStream<TcpStream>;

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct Target {
    /// `host:port` of each gateway (or load balancer).
    pub gateways: Vec<String>,
    /// HS256 secret the gateways verify tokens with.
    pub secret: String,
    /// Source addresses to spread connections over; empty lets the OS choose.
    pub sources: Vec<IpAddr>,
    /// Prefix of every user name, so runs do not share users.
    pub run: String,
}

static NEXT_SOURCE: AtomicUsize = AtomicUsize::new(0);

impl Target {
    /// User `n` of this run.
    pub fn user(&self, n: usize) -> String {
        format!("{}-u{n}", self.run)
    }

    /// Connects user `n` to gateway `gateway % len` and waits for `welcome`.
    pub async fn connect(&self, n: usize, gateway: usize) -> Result<Ws> {
        let addr = &self.gateways[gateway % self.gateways.len()];
        let source = (!self.sources.is_empty())
            .then(|| self.sources[NEXT_SOURCE.fetch_add(1, Ordering::Relaxed) % self.sources.len()]);
        connect(addr, &token(&self.secret, &self.user(n)), source).await
    }
}

/// A token for `sub`, valid for a day.
pub fn token(secret: &str, sub: &str) -> String {
    let claims = serde_json::json!({"sub": sub, "exp": chrono::Utc::now().timestamp() + 86_400});
    jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap_or_default()
}

/// Opens `ws://addr/ws` with a bearer token from `source` and reads the `welcome`.
pub async fn connect(addr: &str, token: &str, source: Option<IpAddr>) -> Result<Ws> {
    let remote: SocketAddr = tokio::net::lookup_host(addr).await?.next().context("gateway address")?;
    let socket = if remote.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0)).with_context(|| format!("binding {ip}"))?;
    }
    let stream = socket.connect(remote).await.with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    let mut request = format!("ws://{addr}/ws").into_client_request()?;
    request.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {token}"))?);
    // Small buffers: the bench holds thousands of sockets on the machine it measures.
    let config = WebSocketConfig::default().read_buffer_size(4096).write_buffer_size(0);
    let (mut ws, _) = tokio_tungstenite::client_async_with_config(request, stream, Some(config)).await?;
    let welcome = next_json(&mut ws).await?;
    if welcome["type"] != "welcome" {
        bail!("expected welcome, got {welcome}");
    }
    Ok(ws)
}

/// The next JSON text frame (control frames skipped), within 30 s.
pub async fn next_json(ws: &mut Ws) -> Result<Value> {
    loop {
        let frame = tokio::time::timeout(Duration::from_secs(30), ws.next()).await.context("no frame in 30 s")?;
        match frame {
            Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text)?),
            Some(Ok(Message::Close(close))) => bail!("closed: {close:?}"),
            Some(Ok(_)) => continue,
            Some(Err(err)) => return Err(err.into()),
            None => bail!("connection ended"),
        }
    }
}

/// Sends `frame` with `id` and waits for its reply, skipping events; errors are errors.
pub async fn request(ws: &mut Ws, mut frame: Value, id: &str) -> Result<Value> {
    frame["id"] = Value::from(id);
    ws.send(Message::Text(frame.to_string().into())).await?;
    loop {
        let reply = next_json(ws).await?;
        if reply["id"] == id {
            if reply["type"] == "ack" {
                return Ok(reply);
            }
            bail!("{frame} → {reply}");
        }
    }
}

/// `(seq, sent_at_us)` of a `message` event whose text is a send timestamp, read without
/// a full JSON parse: the bench must stay cheap next to the servers it measures.
pub fn message_stamp(frame: &str) -> Option<(i64, i64)> {
    if !frame.starts_with(r#"{"type":"message""#) {
        return None;
    }
    let seq = number_after(frame, r#""seq":"#)?;
    let sent = number_after(frame, r#""text":""#)?;
    Some((seq, sent))
}

fn number_after(frame: &str, key: &str) -> Option<i64> {
    let at = frame.find(key)? + key.len();
    let digits: &str = &frame[at..];
    let end = digits.find(|c: char| !c.is_ascii_digit()).unwrap_or(digits.len());
    digits[..end].parse().ok()
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_read_from_message_events_only() {
        let frame = r#"{"type":"message","room":"3","message":{"id":"9","room":"3","seq":42,"sender_id":"a","kind":"text","text":"1700000000123456","attachments":[]}}"#;
        assert_eq!(message_stamp(frame), Some((42, 1_700_000_000_123_456)));
        assert_eq!(message_stamp(r#"{"type":"ack","message":{"seq":1,"text":"5"}}"#), None);
    }
}
