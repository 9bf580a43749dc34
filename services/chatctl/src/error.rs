//! The failures that decide chatctl's exit status.
//!
//! Exit 0: done. Exit 2: the server answered and refused (an `error` reply, an HTTP error
//! status, a refused handshake) — retrying the same thing will not help. Exit 1: anything
//! else, chiefly connection problems — the server may never have seen the request.

use std::fmt;

use serde_json::Value;

/// Exit status for a request the server refused.
pub const EXIT_REFUSED: u8 = 2;
/// Exit status for connection problems and every other failure.
pub const EXIT_FAILED: u8 = 1;

/// The server answered with an error: `{"code","message"}` in an `error` frame or in an
/// HTTP error body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// HTTP status, for HTTP answers and refused handshakes.
    pub status: Option<u16>,
    /// The protocol's error code (`forbidden`, `unavailable`, …).
    pub code: String,
    /// The server's human-readable message.
    pub message: String,
    /// `retry_after_ms` of a `rate_limited` error.
    pub retry_after_ms: Option<u64>,
}

impl Refused {
    /// From an `error` frame or the `error` object of an HTTP body; `None` when `value`
    /// carries no error code.
    pub fn from_error(value: &Value, status: Option<u16>) -> Option<Self> {
        let code = value.get("code")?.as_str()?.to_owned();
        let message = value.get("message").and_then(Value::as_str).unwrap_or_default().to_owned();
        let retry_after_ms = value.get("retry_after_ms").and_then(Value::as_u64);
        Some(Self { status, code, message, retry_after_ms })
    }

    /// From an HTTP error response: the contract's `{"error":{...}}` body when there is
    /// one, else the status and whatever text came back (a proxy's error page, say).
    pub fn from_http(status: u16, reason: &str, body: &[u8]) -> Self {
        let parsed: Option<Value> = serde_json::from_slice(body).ok();
        if let Some(refused) =
            parsed.as_ref().and_then(|v| v.get("error")).and_then(|e| Self::from_error(e, Some(status)))
        {
            return refused;
        }
        let text = String::from_utf8_lossy(body);
        let message: String = text.trim().chars().take(200).collect();
        Self {
            status: Some(status),
            code: reason.to_ascii_lowercase().replace(' ', "_"),
            message,
            retry_after_ms: None,
        }
    }

    /// Whether the same request may succeed later: the contract's "retry" codes.
    pub fn is_transient(&self) -> bool {
        matches!(self.code.as_str(), "unavailable" | "rate_limited")
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.code, self.message)?;
        if let Some(ms) = self.retry_after_ms {
            write!(f, " (retry after {ms} ms)")?;
        }
        if let Some(status) = self.status {
            write!(f, " (HTTP {status})")?;
        }
        Ok(())
    }
}

impl std::error::Error for Refused {}

/// The connection failed, timed out or dropped before an answer: the request may or may
/// not have reached the server, so only an idempotent retry is safe.
#[derive(Debug)]
pub struct Dropped(pub String);

impl fmt::Display for Dropped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Dropped {}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn http_errors_read_the_contract_body_or_fall_back_to_the_status() {
        let r = Refused::from_http(403, "Forbidden", br#"{"error":{"code":"forbidden","message":"admin only"}}"#);
        assert_eq!(r.to_string(), "forbidden: admin only (HTTP 403)");
        let r = Refused::from_http(502, "Bad Gateway", b"<html>upstream down</html>");
        assert_eq!(r.code, "bad_gateway");
        assert!(r.to_string().contains("HTTP 502"));
    }

    #[test]
    fn error_frames_keep_retry_hints() {
        let frame = json!({"type":"error","id":"r1","code":"rate_limited","message":"slow down","retry_after_ms":250});
        let r = Refused::from_error(&frame, None).expect("an error");
        assert!(r.is_transient());
        assert_eq!(r.to_string(), "rate_limited: slow down (retry after 250 ms)");
        assert!(Refused::from_error(&json!({"type":"ack"}), None).is_none());
    }
}
