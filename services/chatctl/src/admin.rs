//! The admin commands: `push`, `notify`, `disconnect`, over the gateway's HTTP API.

use std::time::Duration;

use anyhow::Context;
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpStream;

use crate::error::{Dropped, Refused};
use crate::render::out;
use crate::target::{Credentials, Target};

/// An HTTP answer with a success status: the status and the body as JSON (`Null` when
/// empty).
#[derive(Debug)]
pub struct Answer {
    /// The status code.
    pub status: StatusCode,
    /// The parsed body.
    pub body: Value,
}

/// One HTTP/1.1 request on a fresh connection, bounded by `timeout` as a whole.
///
/// An error status becomes [`Refused`] carrying the server's `{"error":{code,message}}`.
pub async fn call(
    target: &Target,
    creds: &Credentials,
    method: Method,
    path: &str,
    body: Option<&Value>,
    timeout: Duration,
) -> anyhow::Result<Answer> {
    tokio::time::timeout(timeout, call_unbounded(target, creds, method, path, body))
        .await
        .map_err(|_| Dropped(format!("no answer from {} within {timeout:?}", target.authority)))?
}

async fn call_unbounded(
    target: &Target,
    creds: &Credentials,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> anyhow::Result<Answer> {
    let stream = TcpStream::connect(&target.authority)
        .await
        .map_err(|e| Dropped(format!("cannot connect to {}: {e}", target.authority)))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| Dropped(format!("HTTP handshake with {}: {e}", target.authority)))?;
    // The connection future drives the socket; it ends when the request is done.
    tokio::spawn(connection);
    let bytes = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
    let mut request = Request::builder()
        .method(method)
        .uri(target.http_path(path))
        .header("host", &target.authority)
        .header("authorization", format!("Bearer {}", creds.token))
        .header("accept", "application/json");
    if body.is_some() {
        request = request.header("content-type", "application/json");
    }
    let request = request.body(Full::new(bytes)).context("building the HTTP request")?;
    let response = sender.send_request(request).await.map_err(|e| Dropped(format!("HTTP request failed: {e}")))?;
    let status = response.status();
    let raw = response
        .into_body()
        .collect()
        .await
        .map_err(|e| Dropped(format!("reading the HTTP response: {e}")))?
        .to_bytes();
    if !status.is_success() {
        return Err(Refused::from_http(status.as_u16(), status.canonical_reason().unwrap_or("error"), &raw).into());
    }
    let body = if raw.is_empty() { Value::Null } else { serde_json::from_slice(&raw).unwrap_or(Value::Null) };
    Ok(Answer { status, body })
}

/// Parses a `--data` argument as JSON, with a message that says which flag was wrong.
pub fn parse_data(data: Option<&str>) -> anyhow::Result<Value> {
    match data {
        None => Ok(Value::Null),
        Some(text) => serde_json::from_str(text).with_context(|| format!("--data is not valid JSON: {text}")),
    }
}

/// Who a push goes to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Audience {
    /// These users' connections.
    Users(Vec<String>),
    /// Every connection in the cluster.
    Everyone,
}

/// `POST /v1/push`: every addressed connection gets `{"type":"push","event","data"}`.
pub async fn push(
    target: &Target,
    creds: &Credentials,
    audience: &Audience,
    event: &str,
    data: Value,
    timeout: Duration,
) -> anyhow::Result<()> {
    let (body, who) = match audience {
        Audience::Users(users) => (json!({"user_ids": users, "event": event, "data": data}), users.join(", ")),
        Audience::Everyone => (json!({"all": true, "event": event, "data": data}), "everyone".to_owned()),
    };
    let answer = call(target, creds, Method::POST, "/v1/push", Some(&body), timeout).await?;
    out(format_args!("push {event:?} accepted for {who} (HTTP {})", answer.status.as_u16()))
}

/// `POST /v1/notifications`: stores one notification per user (each live connection gets
/// `notification`); prints the server's `{"notifications":[…]}`.
pub async fn notify(
    target: &Target,
    creds: &Credentials,
    users: &[String],
    title: &str,
    body: Option<&str>,
    data: Value,
    timeout: Duration,
) -> anyhow::Result<()> {
    let mut request = json!({"user_ids": users, "title": title, "data": data});
    if let Some(body) = body {
        request["body"] = json!(body);
    }
    let answer = call(target, creds, Method::POST, "/v1/notifications", Some(&request), timeout).await?;
    out(serde_json::to_string_pretty(&answer.body).context("printing the answer")?)
}

/// `DELETE /v1/users/{id}/connections`: the user's sockets on every gateway close with 1008.
pub async fn disconnect(target: &Target, creds: &Credentials, user: &str, timeout: Duration) -> anyhow::Result<()> {
    let path = format!("/v1/users/{}/connections", encode_segment(user));
    let answer = call(target, creds, Method::DELETE, &path, None, timeout).await?;
    out(format_args!("disconnected {user} (HTTP {})", answer.status.as_u16()))
}

/// Percent-encodes a path segment: user ids are arbitrary strings and may hold `/`, `?`
/// or spaces.
fn encode_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_ids_are_safe_in_a_path() {
        assert_eq!(encode_segment("bob"), "bob");
        assert_eq!(encode_segment("a/b c?é"), "a%2Fb%20c%3F%C3%A9");
    }

    #[test]
    fn data_must_be_json() {
        assert_eq!(parse_data(None).ok(), Some(Value::Null));
        assert_eq!(parse_data(Some(r#"{"v":2}"#)).ok(), Some(json!({"v":2})));
        assert!(parse_data(Some("{v:2}")).is_err());
    }
}
