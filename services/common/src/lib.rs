//! What the gateway and the message service truly share: Redis channel naming,
//! telemetry initialisation and trace-context propagation, bounded start-up retries, the shutdown signal, and minting dev tokens.

pub mod channels;
pub mod propagation;
pub mod redis;
pub mod shutdown;
pub mod startup;
pub mod telemetry;
pub mod token;
