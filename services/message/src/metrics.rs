//! Prometheus metrics of the message service, served on their own port
//! (`METRICS_ADDR`) so the gRPC port stays gRPC-only.

use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};

use axum::routing::get;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::StartupError;

/// Postgres operations that failed. Process-wide because every store error passes
/// through one conversion (`From<sqlx::Error>`), which has no handle to carry.
pub static POSTGRES_ERRORS: LazyLock<Counter> = LazyLock::new(Counter::default);

/// Every metric of the message service; cheap to clone.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Messages stored (retries of a stored message not counted).
    pub sends_persisted: Counter,
    /// Redis publishes that failed.
    pub redis_errors: Counter,
}

impl Metrics {
    /// A fresh set of metrics in its own registry.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("chat_message");
        let sends_persisted = Counter::default();
        registry.register("sends_persisted", "Messages stored", sends_persisted.clone());
        let redis_errors = Counter::default();
        registry.register("redis_errors", "Failed Redis publishes", redis_errors.clone());
        registry.register("postgres_errors", "Failed Postgres operations", POSTGRES_ERRORS.clone());
        registry.register_collector(Box::new(chat_common::fdlimit::FdMetrics));
        Self { registry: Arc::new(registry), sends_persisted, redis_errors }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(err) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(%err, "metrics encoding failed");
        }
        out
    }

    /// Serves `GET /metrics` on `listener` until `shutdown`.
    pub async fn serve(self, listener: TcpListener, shutdown: CancellationToken) {
        let app = axum::Router::new().route(
            "/metrics",
            get(move || {
                let body = self.encode();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        body,
                    )
                }
            }),
        );
        if let Err(err) = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await {
            tracing::error!(%err, "metrics server failed");
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Binds the metrics port with a clear error.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, StartupError> {
    TcpListener::bind(addr).await.map_err(|cause| StartupError::MetricsListen { addr, cause })
}
