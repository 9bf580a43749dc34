//! Every way the gateway ends a WebSocket connection: the close code and reason the
//! client reads, in one place.

use std::error::Error;

/// Why a connection ends; each variant is one close code and reason on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Close {
    /// 1000: the client left, or the connection ended with nothing more to say.
    Normal,
    /// 1001: the client stopped answering heartbeats.
    HeartbeatTimeout,
    /// 1006: the socket is already gone, so nothing is sent.
    Abnormal,
    /// 1008: the client broke a rule.
    Policy(Policy),
    /// 1009: a message larger than the socket reads at all.
    TooBig,
    /// 1012: the gateway is restarting; the client reconnects (elsewhere).
    Restart,
    /// 1013: the client reads slower than its rooms produce ("try again later": it
    /// may reconnect and recover with `since_seq`).
    SlowConsumer,
    /// 1013: refused at connect because a backend it needs (the user's event channel in
    /// Redis) is unreachable; "try again later" is the code reconnecting clients retry.
    Unavailable,
    /// 4001: the token expired and was not refreshed.
    TokenExpired,
    /// 1013: a write made no progress for the stall timeout (the client stopped reading
    /// its socket). Same code as a slow consumer, and the same recovery.
    WriteStalled,
}

/// The rules whose breach closes a connection with 1008.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Kept sending while rate limited.
    RateLimit,
    /// Over the per-user connection cap.
    TooManyConnections,
    /// No valid auth frame.
    Unauthorized,
    /// An admin disconnected the user.
    AdminDisconnect,
}

impl Close {
    /// The close code.
    pub fn code(self) -> u16 {
        match self {
            Close::Normal => 1000,
            Close::HeartbeatTimeout => 1001,
            Close::Abnormal => 1006,
            Close::Policy(_) => 1008,
            Close::TooBig => 1009,
            Close::Restart => 1012,
            Close::SlowConsumer | Close::Unavailable | Close::WriteStalled => 1013,
            Close::TokenExpired => 4001,
        }
    }

    /// The close frame's reason text.
    pub fn reason(self) -> &'static str {
        match self {
            Close::Normal | Close::Abnormal => "",
            Close::HeartbeatTimeout => "heartbeat timeout",
            Close::Policy(Policy::RateLimit) => "rate limit exceeded",
            Close::Policy(Policy::TooManyConnections) => "too many connections",
            Close::Policy(Policy::Unauthorized) => "unauthorized",
            Close::Policy(Policy::AdminDisconnect) => "disconnected by an admin",
            Close::TooBig => "message too big",
            Close::Restart => "server restart",
            Close::SlowConsumer => "slow consumer",
            Close::Unavailable => "service unavailable; retry",
            Close::WriteStalled => "write stalled",
            Close::TokenExpired => "token expired",
        }
    }

    /// Whether frames still queued are given up rather than written before the close
    /// frame: the client is not reading them.
    pub fn abandons_queue(self) -> bool {
        matches!(self, Close::SlowConsumer | Close::WriteStalled)
    }

    /// How a connection ends after writing to its socket failed: 1013 when the write
    /// made no progress for the stall timeout, the socket gone for anything else.
    pub fn after_write_error(err: &(dyn Error + 'static)) -> Close {
        let stalled = std::iter::successors(Some(err), |e| (*e).source())
            .filter_map(|e| e.downcast_ref::<std::io::Error>())
            .any(crate::socket::is_write_stall);
        if stalled {
            Close::WriteStalled
        } else {
            Close::Abnormal
        }
    }

    /// How a connection ends after reading from its socket failed: 1009 for a message
    /// over the socket's size limit (tungstenite refuses it before we see it), the socket
    /// gone for anything else.
    pub fn after_read_error(err: &(dyn Error + 'static)) -> Close {
        // axum wraps tungstenite's error; walk the chain rather than rely on that depth.
        let cause =
            std::iter::successors(Some(err), |e| (*e).source()).find_map(|e| e.downcast_ref::<tungstenite::Error>());
        match cause {
            Some(tungstenite::Error::Capacity(_)) => Close::TooBig,
            _ => Close::Abnormal,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tungstenite::error::{CapacityError, ProtocolError};

    #[test]
    fn each_close_keeps_its_code_and_reason() {
        let all = [
            (Close::Normal, 1000, ""),
            (Close::HeartbeatTimeout, 1001, "heartbeat timeout"),
            (Close::Abnormal, 1006, ""),
            (Close::Policy(Policy::RateLimit), 1008, "rate limit exceeded"),
            (Close::Policy(Policy::TooManyConnections), 1008, "too many connections"),
            (Close::Policy(Policy::Unauthorized), 1008, "unauthorized"),
            (Close::Policy(Policy::AdminDisconnect), 1008, "disconnected by an admin"),
            (Close::TooBig, 1009, "message too big"),
            (Close::Restart, 1012, "server restart"),
            (Close::SlowConsumer, 1013, "slow consumer"),
            (Close::Unavailable, 1013, "service unavailable; retry"),
            (Close::WriteStalled, 1013, "write stalled"),
            (Close::TokenExpired, 4001, "token expired"),
        ];
        for (close, code, reason) in all {
            assert_eq!((close.code(), close.reason()), (code, reason), "{close:?}");
        }
    }

    #[test]
    fn an_oversized_message_closes_with_1009() {
        let too_long = tungstenite::Error::Capacity(CapacityError::MessageTooLong { size: 2 << 20, max_size: 1 << 20 });
        assert_eq!(Close::after_read_error(&axum::Error::new(too_long)), Close::TooBig);
        let headers = tungstenite::Error::Capacity(CapacityError::TooManyHeaders);
        assert_eq!(Close::after_read_error(&axum::Error::new(headers)), Close::TooBig);
        let unwrapped = tungstenite::Error::Capacity(CapacityError::TooManyHeaders);
        assert_eq!(Close::after_read_error(&unwrapped), Close::TooBig);
    }

    #[test]
    fn a_stalled_write_closes_with_1013_and_any_other_write_error_means_the_socket_is_gone() {
        let stall = std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            crate::socket::WriteStalled(std::time::Duration::from_secs(10)),
        );
        let wrapped = axum::Error::new(tungstenite::Error::Io(stall));
        assert_eq!(Close::after_write_error(&wrapped), Close::WriteStalled);
        let timed_out = tungstenite::Error::Io(std::io::Error::from(std::io::ErrorKind::TimedOut));
        assert_eq!(Close::after_write_error(&axum::Error::new(timed_out)), Close::Abnormal, "only our stall timer");
        let reset = tungstenite::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionReset));
        assert_eq!(Close::after_write_error(&axum::Error::new(reset)), Close::Abnormal);
    }

    #[test]
    fn any_other_read_error_means_the_socket_is_gone() {
        let reset = tungstenite::Error::Protocol(ProtocolError::ResetWithoutClosingHandshake);
        assert_eq!(Close::after_read_error(&axum::Error::new(reset)), Close::Abnormal);
        let io = tungstenite::Error::Io(std::io::Error::other("message too long"));
        assert_eq!(Close::after_read_error(&axum::Error::new(io)), Close::Abnormal, "the text is not what counts");
        let other = std::io::Error::other("Space limit");
        assert_eq!(Close::after_read_error(&axum::Error::new(other)), Close::Abnormal);
    }
}
