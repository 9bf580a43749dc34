//! What the gateway and the message service truly share: Redis channel naming and the
//! event bus, the flags both take, telemetry initialisation and trace-context
//! propagation, the one spelling of an id, bounded start-up retries, the shutdown
//! signal and how each `main` runs, and minting dev tokens.

pub mod channels;
pub mod config;
pub mod events;
pub mod fdlimit;
pub mod ids;
pub mod message_json;
pub mod propagation;
pub mod redis;
pub mod service;
pub mod shutdown;
pub mod startup;
pub mod telemetry;
pub mod tls;
pub mod token;

/// Largest gRPC message between the gateway and the message service, both ways: an
/// attachment (10 MiB) plus its envelope.
pub const MAX_GRPC_MESSAGE: usize = 11 * 1024 * 1024;
