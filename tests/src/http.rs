//! Minimal HTTP/1.1 over a plain TCP stream: exactly the bytes a test means to send,
//! and the raw response back.

use anyhow::{anyhow, Result};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::wait::WAIT;

/// A minimal HTTP/1.1 GET: status code and body.
pub async fn http_get(addr: &str, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(addr).await?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(req.as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| anyhow!("bad response: {text}"))?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or_default().to_owned();
    Ok((status, body))
}

/// A response: status and body parsed as JSON (`Null` when empty or not JSON).
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub headers: String,
    pub body: Value,
    pub raw: Vec<u8>,
}

/// A minimal HTTP/1.1 request with an optional Bearer token and body.
pub async fn http(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    content_type: &str,
    body: &[u8],
) -> Result<HttpReply> {
    let mut stream = TcpStream::connect(addr).await?;
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if !body.is_empty() {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).await?;
    // A server may answer (413) before reading the whole body; that is not our failure.
    let _ = stream.write_all(body).await;
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(WAIT, stream.read_to_end(&mut buf)).await?;
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| anyhow!("no HTTP response"))?;
    let headers = String::from_utf8_lossy(&buf[..split]).into_owned();
    let status = headers.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| anyhow!("bad status line"))?;
    let raw = buf[split + 4..].to_vec();
    let body = serde_json::from_slice(&raw).unwrap_or(Value::Null);
    Ok(HttpReply { status, headers, body, raw })
}

/// A JSON request.
pub async fn http_json(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> Result<HttpReply> {
    let bytes = body.map(|b| b.to_string().into_bytes()).unwrap_or_default();
    http(addr, method, path, token, "application/json", &bytes).await
}
