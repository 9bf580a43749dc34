//! Protocol error codes, and the one mapping from gRPC statuses onto them.

use serde::Serialize;
use tonic::Code;

/// The `code` of an `error` frame (and of HTTP error bodies).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    RateLimited,
    TooLarge,
    Conflict,
    Unavailable,
    Internal,
}

/// The metadata key of the message service's RESOURCE_EXHAUSTED statuses that says when
/// to retry, in milliseconds.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

/// A command failed: what the client sees in its `error` reply.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct CommandError {
    pub code: ErrorCode,
    pub message: String,
    /// With `rate_limited`: when the client may try again.
    pub retry_after_ms: Option<u64>,
}

impl CommandError {
    /// An error with a code and a client-facing message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), retry_after_ms: None }
    }

    /// A `rate_limited` error telling the client when to try again.
    pub fn rate_limited(message: impl Into<String>, retry_after_ms: u64) -> Self {
        Self { code: ErrorCode::RateLimited, message: message.into(), retry_after_ms: Some(retry_after_ms) }
    }

    /// A `bad_request` error.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
}

impl From<tonic::Status> for CommandError {
    fn from(status: tonic::Status) -> Self {
        // A status with a source error was made by our own client transport (connection
        // refused or reset, GOAWAY from a message service shutting down, h2 errors), not
        // by the message service: the call may succeed elsewhere, so the client retries.
        let from_transport = std::error::Error::source(&status).is_some();
        // An allowance the caller used up (the upload quota): the message service says
        // when it frees up.
        let retry_after_ms = status.metadata().get(RETRY_AFTER_MS).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if let (Code::ResourceExhausted, Some(ms), false) = (status.code(), retry_after_ms, from_transport) {
            return Self::rate_limited(status.message(), ms);
        }
        let code = match status.code() {
            _ if from_transport => ErrorCode::Unavailable,
            Code::InvalidArgument | Code::OutOfRange => ErrorCode::BadRequest,
            Code::Unauthenticated => ErrorCode::Unauthorized,
            Code::PermissionDenied => ErrorCode::Forbidden,
            Code::NotFound => ErrorCode::NotFound,
            Code::AlreadyExists | Code::FailedPrecondition | Code::Aborted => ErrorCode::Conflict,
            // `Unknown` is what tonic reports when the connection breaks mid-call (the
            // message service never sends it): the outcome is unknown, so the client must
            // retry, which `client_msg_id` makes safe.
            Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::ResourceExhausted | Code::Unknown => {
                ErrorCode::Unavailable
            }
            _ => ErrorCode::Internal,
        };
        let message = match code {
            // Transport details (addresses, h2 errors) are for our logs, not for clients.
            ErrorCode::Unavailable => {
                tracing::warn!(status = %status, "message service unavailable");
                "message service unavailable; retry".to_owned()
            }
            ErrorCode::Internal => {
                tracing::error!(status = %status, "message service internal error");
                "internal error".to_owned()
            }
            _ => status.message().to_owned(),
        };
        Self { code, message, retry_after_ms: None }
    }
}

impl From<chat_common::events::PublishError> for CommandError {
    fn from(err: chat_common::events::PublishError) -> Self {
        tracing::warn!(%err, "publish failed");
        Self::new(ErrorCode::Unavailable, "event bus unavailable; retry")
    }
}

impl From<chat_common::events::PublishError> for HttpError {
    fn from(err: chat_common::events::PublishError) -> Self {
        Self(err.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_codes_map_to_protocol_codes() {
        let cases = [
            (Code::InvalidArgument, ErrorCode::BadRequest),
            (Code::PermissionDenied, ErrorCode::Forbidden),
            (Code::NotFound, ErrorCode::NotFound),
            (Code::AlreadyExists, ErrorCode::Conflict),
            (Code::Unavailable, ErrorCode::Unavailable),
            (Code::DeadlineExceeded, ErrorCode::Unavailable),
            (Code::Internal, ErrorCode::Internal),
            (Code::Unknown, ErrorCode::Unavailable),
            (Code::DataLoss, ErrorCode::Internal),
        ];
        for (grpc, want) in cases {
            assert_eq!(CommandError::from(tonic::Status::new(grpc, "m")).code, want, "{grpc:?}");
        }
    }

    #[test]
    fn an_exhausted_allowance_is_rate_limited_with_its_wait() {
        let mut status = tonic::Status::resource_exhausted("upload quota used");
        status.metadata_mut().insert(RETRY_AFTER_MS, 1500u64.into());
        let err = CommandError::from(status);
        assert_eq!((err.code, err.retry_after_ms), (ErrorCode::RateLimited, Some(1500)));
        // Without a wait it is tonic's own (a message over the size limit): unavailable.
        let err = CommandError::from(tonic::Status::resource_exhausted("message too large"));
        assert_eq!(err.code, ErrorCode::Unavailable);
    }

    #[test]
    fn rate_limited_responses_carry_retry_after_in_whole_seconds_rounded_up() {
        use axum::response::IntoResponse;
        let res = HttpError(CommandError::rate_limited("slow down", 1001)).into_response();
        assert_eq!(res.status(), axum::http::StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(res.headers()[axum::http::header::RETRY_AFTER], "2");
        let res = HttpError(CommandError::rate_limited("slow down", 10)).into_response();
        assert_eq!(res.headers()[axum::http::header::RETRY_AFTER], "1");
    }

    #[test]
    fn transport_failures_are_unavailable_whatever_their_code() {
        // What tonic reports when a message service shutting down sends GOAWAY mid-call.
        let mut status = tonic::Status::internal("h2 protocol error: http2 error");
        status.set_source(std::sync::Arc::new(std::io::Error::other("GoAway(NO_ERROR, Remote)")));
        assert_eq!(CommandError::from(status).code, ErrorCode::Unavailable);
        assert_eq!(CommandError::from(tonic::Status::internal("bug")).code, ErrorCode::Internal);
    }

    #[test]
    fn internal_details_are_not_passed_to_clients() {
        let err = CommandError::from(tonic::Status::unavailable("tcp connect 10.0.0.7:50051 refused"));
        assert!(!err.message.contains("10.0.0.7"));
        let err = CommandError::from(tonic::Status::not_found("room not found"));
        assert_eq!(err.message, "room not found");
    }

    #[test]
    fn codes_serialise_in_snake_case() {
        assert_eq!(serde_json::to_string(&ErrorCode::BadRequest).unwrap(), "\"bad_request\"");
        assert_eq!(serde_json::to_string(&ErrorCode::TooLarge).unwrap(), "\"too_large\"");
        for code in [ErrorCode::BadRequest, ErrorCode::RateLimited, ErrorCode::NotFound, ErrorCode::Internal] {
            assert_eq!(serde_json::to_string(&code).unwrap(), format!("\"{}\"", code.as_str()));
        }
    }
}

/// An HTTP error response: `{"error":{"code","message"}}`, its status following the code.
#[derive(Debug)]
pub struct HttpError(pub CommandError);

impl HttpError {
    /// A 401 `unauthorized` response.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self(CommandError::new(ErrorCode::Unauthorized, message))
    }

    /// A 503 `unavailable` response.
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self(CommandError::new(ErrorCode::Unavailable, message))
    }

    /// A 400 `bad_request` response.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self(CommandError::bad_request(message))
    }

    /// A 403 `forbidden` response.
    pub fn forbidden(message: impl Into<String>) -> Self {
        Self(CommandError::new(ErrorCode::Forbidden, message))
    }
}

impl From<CommandError> for HttpError {
    fn from(err: CommandError) -> Self {
        Self(err)
    }
}

impl ErrorCode {
    /// The code as it appears on the wire (and in metrics).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::NotFound => "not_found",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Internal => "internal",
        }
    }

    /// The HTTP status of this code: the one mapping, used by every REST handler.
    pub fn http_status(self) -> axum::http::StatusCode {
        use axum::http::StatusCode as S;
        match self {
            ErrorCode::BadRequest => S::BAD_REQUEST,
            ErrorCode::Unauthorized => S::UNAUTHORIZED,
            ErrorCode::Forbidden => S::FORBIDDEN,
            ErrorCode::NotFound => S::NOT_FOUND,
            ErrorCode::RateLimited => S::TOO_MANY_REQUESTS,
            ErrorCode::TooLarge => S::PAYLOAD_TOO_LARGE,
            ErrorCode::Conflict => S::CONFLICT,
            ErrorCode::Unavailable => S::SERVICE_UNAVAILABLE,
            ErrorCode::Internal => S::INTERNAL_SERVER_ERROR,
        }
    }
}

impl axum::response::IntoResponse for HttpError {
    fn into_response(self) -> axum::response::Response {
        let body = crate::protocol::json::http_error_body(&self.0);
        let mut res = (self.0.code.http_status(), axum::Json(body)).into_response();
        // `Retry-After` is in whole seconds: round up, so a client that waits it is never early.
        if let Some(ms) = self.0.retry_after_ms {
            res.headers_mut().insert(axum::http::header::RETRY_AFTER, ms.div_ceil(1000).max(1).into());
        }
        res
    }
}
