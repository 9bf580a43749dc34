//! Why the message service could not start; `main` prints it with its causes. Each
//! message reads as it did when these were ad-hoc errors: operators and runbooks match on them.

use std::net::SocketAddr;

use chat_common::startup::Unreachable;

/// A start-up failure of the message service: a backend, the migrations, or a port.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// Postgres or Redis, after the bounded retries.
    #[error(transparent)]
    Unreachable(#[from] Unreachable),
    /// A `DATABASE_URL` the driver cannot use.
    #[error(transparent)]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Schema(#[from] crate::store::schema::SchemaError),
    #[error(transparent)]
    Redis(#[from] chat_common::config::ConnectError),
    #[error(transparent)]
    Tls(#[from] chat_common::tls::TlsError),
    #[error("cannot build the webhook HTTP client: {0}")]
    WebhookClient(reqwest::Error),
    /// The I/O error is already part of the message, so it is not also a `source()`:
    /// the `Caused by:` chain would print it twice.
    #[error("cannot listen on {addr}: {cause}")]
    Listen { addr: SocketAddr, cause: std::io::Error },
    /// Like `Listen`, for the metrics port.
    #[error("cannot listen on {addr} (METRICS_ADDR): {cause}")]
    MetricsListen { addr: SocketAddr, cause: std::io::Error },
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn a_port_in_use_is_told_once_with_its_address_and_setting() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 9091));
        let err = StartupError::MetricsListen { addr, cause: std::io::ErrorKind::AddrInUse.into() };
        assert_eq!(err.to_string(), "cannot listen on 127.0.0.1:9091 (METRICS_ADDR): address in use");
        assert!(err.source().is_none(), "the cause is in the message already");
    }
}
