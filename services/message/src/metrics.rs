//! Prometheus metrics of the message service, served on their own port
//! (`METRICS_ADDR`) so the gRPC port stays gRPC-only.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Instant;

use axum::http::StatusCode;
use axum::routing::get;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::codegen::http;

use crate::health::Readiness;
use crate::store::Store;
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
    /// Seconds per RPC served, by method and gRPC status.
    requests: Family<RpcLabels, Histogram>,
    /// Webhooks answered 2xx.
    pub webhooks_sent: Counter,
    /// Webhook attempts that failed and will be tried again.
    pub webhook_retries: Counter,
    /// Webhooks that ran out of retries.
    pub webhooks_dead: Counter,
    /// Seconds since the oldest message still waiting for its webhooks was stored.
    pub webhook_oldest_pending: Gauge<f64, AtomicU64>,
}

/// The labels of one served RPC.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    code: &'static str,
}

impl Metrics {
    /// A fresh set of metrics in its own registry, without the pool's.
    pub fn new() -> Self {
        Self::build(None)
    }

    /// A fresh set of metrics, with the use of `store`'s connection pool.
    pub fn with_pool(store: &Store) -> Self {
        Self::build(Some(store.clone()))
    }

    fn build(store: Option<Store>) -> Self {
        let mut registry = Registry::with_prefix("chat_message");
        let sends_persisted = Counter::default();
        registry.register("sends_persisted", "Messages stored", sends_persisted.clone());
        let redis_errors = Counter::default();
        registry.register("redis_errors", "Failed Redis publishes", redis_errors.clone());
        registry.register("postgres_errors", "Failed Postgres operations", POSTGRES_ERRORS.clone());
        // Up to ~13 s: past the gateways' 5 s call timeout, so a slow call shows as slow.
        let requests = Family::<RpcLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 18))
        });
        registry.register(
            "grpc_request_duration_seconds",
            "Seconds per RPC served, by method and gRPC status code",
            requests.clone(),
        );
        let webhooks_sent = Counter::default();
        registry.register("webhooks_sent", "Webhooks answered 2xx", webhooks_sent.clone());
        let webhook_retries = Counter::default();
        registry.register(
            "webhook_retries",
            "Webhook attempts that failed and will be retried",
            webhook_retries.clone(),
        );
        let webhooks_dead = Counter::default();
        registry.register("webhooks_dead", "Webhooks that ran out of retries", webhooks_dead.clone());
        let webhook_oldest_pending = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "webhook_oldest_pending_seconds",
            "Seconds since the oldest message still waiting for its webhooks was stored",
            webhook_oldest_pending.clone(),
        );
        registry.register_collector(Box::new(chat_common::fdlimit::FdMetrics));
        if let Some(store) = store {
            registry.register_collector(Box::new(PoolMetrics(store)));
        }
        Self {
            registry: Arc::new(registry),
            sends_persisted,
            redis_errors,
            requests,
            webhooks_sent,
            webhook_retries,
            webhooks_dead,
            webhook_oldest_pending,
        }
    }

    /// A tower layer that times every RPC but health checks.
    pub fn rpc_timing(&self) -> RpcTiming {
        RpcTiming { requests: self.requests.clone() }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(err) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(%err, "metrics encoding failed");
        }
        out
    }

    /// Serves `GET /metrics`, and the HTTP probes `/livez` (the process answers) and
    /// `/readyz` (200 while `readiness` holds, else 503), on `listener` until `shutdown`.
    pub async fn serve(self, listener: TcpListener, readiness: Readiness, shutdown: CancellationToken) {
        let ready = move || {
            let status = if readiness.is_ready() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            async move { (status, if status.is_success() { "ready" } else { "not ready" }) }
        };
        let app = axum::Router::new().route("/livez", get(|| async { "ok" })).route("/readyz", get(ready)).route(
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

/// The Postgres pool's connections, read when scraped.
struct PoolMetrics(Store);

impl fmt::Debug for PoolMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("PoolMetrics").field(&self.0.pool_use()).finish()
    }
}

impl Collector for PoolMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let pool = self.0.pool_use();
        let mut connections = encoder.encode_descriptor(
            "db_pool_connections",
            "Postgres connections in the pool, idle or in use",
            None,
            prometheus_client::metrics::MetricType::Gauge,
        )?;
        for (state, n) in [("idle", pool.idle), ("in_use", pool.in_use)] {
            ConstGauge::new(n as i64).encode(connections.encode_family(&[("state", state)])?)?;
        }
        let max = ConstGauge::new(i64::from(pool.max));
        max.encode(encoder.encode_descriptor(
            "db_pool_max_connections",
            "The most Postgres connections the pool opens (DB_MAX_CONNECTIONS)",
            None,
            max.metric_type(),
        )?)
    }
}

/// Wraps the gRPC server's routes in [`TimedRpcs`].
#[derive(Clone)]
pub struct RpcTiming {
    requests: Family<RpcLabels, Histogram>,
}

impl<S> tower_layer::Layer<S> for RpcTiming {
    type Service = TimedRpcs<S>;

    fn layer(&self, inner: S) -> TimedRpcs<S> {
        TimedRpcs { inner, requests: self.requests.clone() }
    }
}

/// Times each RPC from its request to its response headers: the whole call for a unary
/// RPC, the time to the first bytes for an attachment stream.
#[derive(Clone)]
pub struct TimedRpcs<S> {
    inner: S,
    requests: Family<RpcLabels, Histogram>,
}

impl<S, B, R> tower_service::Service<http::Request<B>> for TimedRpcs<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path();
        let method =
            (!path.starts_with("/grpc.health.")).then(|| path.rsplit('/').next().unwrap_or_default().to_owned());
        let started = Instant::now();
        let call = self.inner.call(req);
        let requests = self.requests.clone();
        Box::pin(async move {
            let res = call.await;
            if let Some(method) = method {
                // Errors come back trailers-only, with the status in the headers; a
                // successful unary reply carries it in trailers, after the body.
                let status = match &res {
                    Ok(reply) => {
                        reply.headers().get("grpc-status").and_then(|v| v.to_str().ok()).and_then(|v| v.parse().ok())
                    }
                    Err(_) => Some(tonic::Code::Unknown as i32),
                };
                let code = status.map_or(tonic::Code::Ok, tonic::Code::from_i32);
                // A caller can name any method: unknown ones share one series.
                let method = if code == tonic::Code::Unimplemented { "unknown".to_owned() } else { method };
                let labels = RpcLabels { method, code: code_name(code) };
                requests.get_or_create(&labels).observe(started.elapsed().as_secs_f64());
            }
            res
        })
    }
}

/// The gRPC status code as the spec spells it.
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
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
