//! How both services' `main` runs: logs and traces set up, the open-file limit raised,
//! a shutdown token cancelled by SIGINT/SIGTERM, and the traces flushed whatever the
//! outcome.

use std::future::Future;

use tokio_util::sync::CancellationToken;

use crate::shutdown::cancel_on_signal;
use crate::telemetry::{TelemetryConfig, TelemetryError};

/// Runs `body` with telemetry for `service` and the process's shutdown token. The error
/// is the body's own (`main`'s), so a telemetry failure must convert into it.
pub async fn run<F, Fut, E>(telemetry: &TelemetryConfig, service: &'static str, body: F) -> Result<(), E>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: From<TelemetryError>,
{
    let telemetry = telemetry.init(service)?;
    crate::fdlimit::raise_and_log();
    let shutdown = CancellationToken::new();
    tokio::spawn(cancel_on_signal(shutdown.clone()));
    let result = body(shutdown).await;
    telemetry.shutdown().await;
    result
}
