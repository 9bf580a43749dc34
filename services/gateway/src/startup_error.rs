//! Why the gateway could not start; `main` prints it with its causes. Each message reads
//! as it did when these were ad-hoc errors: operators and runbooks match on them.

use std::net::SocketAddr;

use chat_common::startup::Unreachable;

use crate::config::ConfigError;

/// A start-up failure of the gateway: configuration, a backend, or its port.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("invalid configuration")]
    Config(#[from] ConfigError),
    /// The message service or Redis, after the bounded retries.
    #[error(transparent)]
    Unreachable(#[from] Unreachable),
    /// The subscriber's Redis client: a URL fred refuses, or the first subscription.
    #[error(transparent)]
    Redis(#[from] fred::error::Error),
    /// The Redis client for commands and publishing.
    #[error(transparent)]
    RedisConnect(#[from] chat_common::config::ConnectError),
    /// The I/O error is already part of the message, so it is not also a `source()`:
    /// the `Caused by:` chain would print it twice.
    #[error("cannot listen on {addr}: {cause}")]
    Listen { addr: SocketAddr, cause: std::io::Error },
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn a_port_in_use_is_told_once_with_its_address() {
        let addr = SocketAddr::from(([127, 0, 0, 1], 8080));
        let err = StartupError::Listen { addr, cause: std::io::ErrorKind::AddrInUse.into() };
        assert_eq!(err.to_string(), "cannot listen on 127.0.0.1:8080: address in use");
        assert!(err.source().is_none(), "the cause is in the message already");
    }

    #[test]
    fn a_bad_setting_reads_as_invalid_configuration_caused_by_the_setting() {
        let err = StartupError::from(ConfigError::NoJwtSecret);
        assert_eq!(err.to_string(), "invalid configuration");
        let cause = err.source().map(ToString::to_string);
        assert_eq!(cause.as_deref(), Some("JWT_SECRET must be set (and not empty) for HS256 tokens"));
    }
}
