//! The message service's error type, and its one mapping onto gRPC statuses.

use std::sync::Arc;

use tonic::{Code, Status};

/// Why a request failed. Each variant maps to one gRPC code, which the gateway maps to
/// one protocol error code. Cloneable (the causes are shared) so one failed group commit
/// can answer every send that waited on it.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ServiceError {
    /// The request itself is malformed (protocol `bad_request`).
    #[error("{0}")]
    InvalidArgument(String),
    /// The room or message does not exist (protocol `not_found`).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The caller may not do this (protocol `forbidden`).
    #[error("{0}")]
    Forbidden(&'static str),
    /// The request collides with stored state (protocol `conflict`).
    #[error("{0}")]
    Conflict(String),
    /// Postgres is unreachable or overloaded; the caller may retry (protocol `unavailable`).
    #[error("database unavailable")]
    Unavailable(#[source] Arc<sqlx::Error>),
    /// Anything else; the cause is logged, never sent to the client (protocol `internal`).
    #[error("internal error")]
    Internal(#[source] Arc<sqlx::Error>),
    /// The caller has used up an allowance (the upload quota) until `retry_after_ms` has
    /// passed (protocol `rate_limited`: RESOURCE_EXHAUSTED with `retry-after-ms` metadata).
    #[error("{message}")]
    Exhausted { message: String, retry_after_ms: u64 },
    /// Every slot for this kind of work is taken; the caller may retry soon (protocol
    /// `unavailable`).
    #[error("{0}")]
    Busy(&'static str),
}

/// The metadata key carrying how long a RESOURCE_EXHAUSTED caller should wait.
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

impl From<sqlx::Error> for ServiceError {
    fn from(err: sqlx::Error) -> Self {
        crate::metrics::POSTGRES_ERRORS.inc();
        match err {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
            | sqlx::Error::Tls(_) => ServiceError::Unavailable(Arc::new(err)),
            sqlx::Error::Database(ref db) if is_transient(db.code().as_deref()) => {
                ServiceError::Unavailable(Arc::new(err))
            }
            sqlx::Error::Database(ref db) if is_data_exception(db.code().as_deref()) => {
                // The request's own value, not the service, is at fault: the client hears
                // `bad_request`; the cause names the column only in the log.
                tracing::info!(error = %err, "Postgres refused a value");
                ServiceError::InvalidArgument("the request holds a value that cannot be stored".into())
            }
            sqlx::Error::Database(ref db) if db.code().as_deref() == Some(FOREIGN_KEY_VIOLATION) => {
                // What the request names was there when it was checked and is gone now (an
                // upload collected, a message deleted): the request's fault, as if it had
                // never been there.
                tracing::info!(error = %err, "a row the request names is gone");
                ServiceError::InvalidArgument("the request names something that no longer exists".into())
            }
            _ => ServiceError::Internal(Arc::new(err)),
        }
    }
}

/// SQLSTATE classes that mean "try again": connection exceptions (08), insufficient
/// resources (53), operator intervention such as shutdown (57), serialization failures
/// and deadlocks (40).
fn is_transient(code: Option<&str>) -> bool {
    matches!(code.map(|c| &c[..2.min(c.len())]), Some("08" | "53" | "57" | "40"))
}

/// SQLSTATE 23503: a row refers to one that does not exist.
const FOREIGN_KEY_VIOLATION: &str = "23503";

/// SQLSTATE class 22, data exceptions: a value Postgres cannot take (U+0000 in `text` or
/// `jsonb`, invalid JSON, a number out of range). Validation refuses the known ones first;
/// this keeps any other from reading as a server fault.
fn is_data_exception(code: Option<&str>) -> bool {
    code.is_some_and(|c| c.starts_with("22"))
}

impl From<ServiceError> for Status {
    fn from(err: ServiceError) -> Self {
        match &err {
            ServiceError::Unavailable(cause) => tracing::warn!(error = %cause, "database unavailable"),
            ServiceError::Internal(cause) => tracing::error!(error = %cause, "internal error"),
            _ => {}
        }
        if let ServiceError::Exhausted { message, retry_after_ms } = &err {
            let mut status = Status::resource_exhausted(message.clone());
            status.metadata_mut().insert(RETRY_AFTER_MS, (*retry_after_ms).into());
            return status;
        }
        let code = match err {
            ServiceError::InvalidArgument(_) => Code::InvalidArgument,
            ServiceError::NotFound(_) => Code::NotFound,
            ServiceError::Forbidden(_) => Code::PermissionDenied,
            ServiceError::Conflict(_) => Code::AlreadyExists,
            ServiceError::Unavailable(_) => Code::Unavailable,
            ServiceError::Internal(_) => Code::Internal,
            ServiceError::Exhausted { .. } => Code::ResourceExhausted,
            ServiceError::Busy(_) => Code::Unavailable,
        };
        Status::new(code, err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_variant_maps_to_its_grpc_code_without_leaking_causes() {
        let cases = [
            (ServiceError::InvalidArgument("text too long".into()), Code::InvalidArgument, "text too long"),
            (ServiceError::NotFound("room"), Code::NotFound, "room not found"),
            (ServiceError::Forbidden("not a member of this room"), Code::PermissionDenied, "not a member of this room"),
            (ServiceError::Conflict("taken".into()), Code::AlreadyExists, "taken"),
            (ServiceError::Unavailable(Arc::new(sqlx::Error::PoolTimedOut)), Code::Unavailable, "database unavailable"),
            (ServiceError::Internal(Arc::new(sqlx::Error::RowNotFound)), Code::Internal, "internal error"),
        ];
        for (err, code, message) in cases {
            let status = Status::from(err);
            assert_eq!(status.code(), code);
            assert_eq!(status.message(), message);
        }
    }

    #[test]
    fn an_exhausted_allowance_says_when_to_retry() {
        let status = Status::from(ServiceError::Exhausted { message: "quota".into(), retry_after_ms: 1500 });
        assert_eq!(status.code(), Code::ResourceExhausted);
        assert_eq!(status.metadata().get(RETRY_AFTER_MS).and_then(|v| v.to_str().ok()), Some("1500"));
        assert_eq!(Status::from(ServiceError::Busy("busy")).code(), Code::Unavailable);
    }

    #[test]
    fn a_cloned_error_keeps_its_code_and_its_cause() {
        let err = ServiceError::from(sqlx::Error::PoolTimedOut);
        let copy = err.clone();
        assert!(matches!(&copy, ServiceError::Unavailable(cause) if matches!(**cause, sqlx::Error::PoolTimedOut)));
        assert_eq!(Status::from(copy).code(), Status::from(err).code());
    }

    #[test]
    fn connection_and_resource_sqlstates_are_transient() {
        assert!(is_transient(Some("08006")));
        assert!(is_transient(Some("53300")));
        assert!(is_transient(Some("57P01")));
        assert!(is_transient(Some("40001")));
        assert!(!is_transient(Some("23505")));
        assert!(!is_transient(None));
    }

    #[test]
    fn data_exception_sqlstates_are_the_requests_fault() {
        assert!(is_data_exception(Some("22021")));
        assert!(is_data_exception(Some("22P05")));
        assert!(is_data_exception(Some("22P02")));
        assert!(!is_data_exception(Some("23503")));
        assert!(!is_data_exception(Some("08006")));
        assert!(!is_data_exception(None));
    }
}
