//! Why the gateway could not start; `main` prints it with its causes. Each message reads
//! as it did when these were ad-hoc errors: operators and runbooks match on them.

use std::net::SocketAddr;

use chat_common::startup::Unreachable;

use crate::auth::KeyError;
use crate::config::ConfigError;

/// A start-up failure of the gateway: configuration, a backend, or its port.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// One line, as operators have always read it: the setting's message carries its cause.
    #[error("invalid configuration: {0}")]
    Config(ConfigError),
    /// A key file that was read but holds no usable key.
    #[error(transparent)]
    PublicKey(KeyError),
    /// The message service or Redis, after the bounded retries.
    #[error(transparent)]
    Unreachable(#[from] Unreachable),
    /// The subscriber's Redis client: a URL fred refuses, or the first subscription.
    #[error(transparent)]
    Redis(#[from] fred::error::Error),
    /// The Redis client for commands and publishing.
    #[error(transparent)]
    RedisConnect(#[from] chat_common::config::ConnectError),
    #[error(transparent)]
    Tls(#[from] chat_common::tls::TlsError),
    /// The I/O error is already part of the message, so it is not also a `source()`:
    /// the `Caused by:` chain would print it twice.
    #[error("cannot listen on {addr}: {cause}")]
    Listen { addr: SocketAddr, cause: std::io::Error },
}

impl From<ConfigError> for StartupError {
    fn from(err: ConfigError) -> Self {
        match err {
            // Its own line, as before: the file was read, its content is wrong.
            ConfigError::PublicKey(key) => Self::PublicKey(key),
            other => Self::Config(other),
        }
    }
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
    fn a_bad_setting_reads_as_invalid_configuration_on_one_line() {
        let path = std::path::PathBuf::from("/nonexistent");
        let unreadable = ConfigError::UnreadablePublicKey { path, cause: std::io::ErrorKind::NotFound.into() };
        let err = StartupError::Config(unreadable);
        assert_eq!(
            err.to_string(),
            "invalid configuration: cannot read JWT_PUBLIC_KEY_FILE /nonexistent: entity not found"
        );
        assert!(err.source().is_none(), "the cause is in the message already");
    }
}
