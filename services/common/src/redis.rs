//! One way to configure Redis clients for both services.

use std::time::Duration;

use fred::prelude::{Builder, Config, ReconnectPolicy};

/// A builder for `url` that reconnects forever with capped exponential backoff and
/// fails commands after `command_timeout` instead of queueing them while Redis is down.
///
/// `broadcast_capacity` sizes the pub/sub message buffer of subscriber clients: a
/// consumer that falls further behind than that loses messages (and must repair them).
pub fn builder(url: &str, command_timeout: Duration, broadcast_capacity: usize) -> Result<Builder, fred::error::Error> {
    let config = Config::from_url(url)?;
    let mut builder = Builder::from_config(config);
    builder
        .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
        .with_connection_config(|c| {
            c.connection_timeout = Duration::from_secs(2);
            c.internal_command_timeout = Duration::from_secs(2);
        })
        .with_performance_config(|p| {
            p.default_command_timeout = command_timeout;
            p.broadcast_channel_capacity = broadcast_capacity;
        });
    Ok(builder)
}
