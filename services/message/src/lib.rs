//! The message service: the one writer of rooms and messages. It stores each message in
//! Postgres (gapless per-room seq) and then publishes it to Redis for the gateways.

pub mod attachments;
pub mod blobs;
pub mod config;
pub mod error;
pub mod grpc;
pub mod metrics;
pub mod startup_error;
pub mod store;
pub mod validate;

use std::net::SocketAddr;
use std::time::Duration;

use chat_common::events::EventBus;
use chat_common::MAX_GRPC_MESSAGE;
use chat_proto::v1::chat_service_server::ChatServiceServer;
use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::TcpIncoming;
use tonic_health::server::HealthReporter;

use crate::config::Config;
use crate::grpc::GrpcHandlers;
use crate::metrics::Metrics;
pub use crate::startup_error::StartupError;
use crate::store::{Committer, Store};

/// The gRPC health service name that reports SERVING while the process runs (for
/// liveness); the overall status ("") follows the backends (for readiness).
pub const LIVENESS: &str = "liveness";

/// How often the health status is re-checked against Postgres and Redis.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);

/// Publishing is on the send path: a Redis outage must fail fast, not stall sends.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(1);

/// A message service with its backends connected and its port bound, ready to run.
pub struct Application {
    listener: TcpListener,
    metrics_listener: TcpListener,
    metrics: Metrics,
    max_text_chars: usize,
    commit_workers: u32,
    store: Store,
    events: EventBus,
    grace: Duration,
    attachments: attachments::AttachmentLimits,
    unattached_ttl: Duration,
}

impl Application {
    /// Connects to Postgres (creating and migrating the database) and Redis, with
    /// bounded retries, and binds the gRPC port.
    pub async fn build(config: &Config) -> Result<Self, StartupError> {
        let retry = config.backend.startup_retry();
        let url = config.database_url();
        let store = Store::connect(url.expose_secret(), config.create_database, config.db_max_connections, retry)
            .await?
            .with_limits(config.membership_limits());
        let redis = config.backend.connect_redis(PUBLISH_TIMEOUT).await?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|cause| StartupError::Listen { addr: config.listen, cause })?;
        let metrics_listener = metrics::bind(config.metrics_addr).await?;
        let metrics = Metrics::new();
        let events = EventBus::new(
            config.backend.redis.publisher(redis),
            config.backend.channels(),
            metrics.redis_errors.clone(),
        );
        Ok(Self {
            listener,
            metrics_listener,
            metrics,
            max_text_chars: config.max_text_chars,
            commit_workers: config.commit_workers,
            store,
            events,
            grace: config.shutdown_grace(),
            attachments: config.attachment_limits(),
            unattached_ttl: config.unattached_ttl(),
        })
    }

    /// The bound metrics address (useful with port 0).
    pub fn metrics_addr(&self) -> std::io::Result<SocketAddr> {
        self.metrics_listener.local_addr()
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` is cancelled, then lets in-flight RPCs finish within the
    /// grace period, and the commits they queued after them.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), tonic::transport::Error> {
        let tasks = TaskTracker::new();
        let (reporter, health_service) = tonic_health::server::health_reporter();
        // The workers hold `commit_workers` pooled connections; the rest serve reads and other writes.
        let committer = Committer::start(self.store.clone(), self.commit_workers as usize, &tasks);
        let handlers = GrpcHandlers::new(
            self.store.clone(),
            committer,
            self.events.clone(),
            self.max_text_chars,
            self.metrics.clone(),
        )
        .with_attachment_limits(self.attachments.clone());
        tasks.spawn(attachments::collect_unattached(self.store.clone(), self.unattached_ttl, shutdown.clone()));
        tasks.spawn(report_health(reporter, self.store.clone(), self.events.clone(), shutdown.clone()));
        tasks.spawn(self.metrics.clone().serve(self.metrics_listener, shutdown.clone()));

        let incoming = TcpIncoming::from(self.listener).with_nodelay(Some(true));
        let stopped = shutdown.clone();
        let mut server = Box::pin(
            tonic::transport::Server::builder()
                .trace_fn(rpc_span)
                .add_service(health_service)
                .add_service(
                    ChatServiceServer::new(handlers)
                        .max_decoding_message_size(MAX_GRPC_MESSAGE)
                        .max_encoding_message_size(MAX_GRPC_MESSAGE),
                )
                .serve_with_incoming_shutdown(incoming, async move { stopped.cancelled().await }),
        );

        let deadline = tokio::select! {
            res = &mut server => {
                res?;
                tokio::time::Instant::now() + self.grace
            }
            _ = shutdown.cancelled() => {
                // The server stops accepting at once and drains in-flight RPCs; bound that.
                let deadline = tokio::time::Instant::now() + self.grace;
                match tokio::time::timeout_at(deadline, &mut server).await {
                    Ok(res) => res?,
                    Err(_) => tracing::warn!(grace = ?self.grace, "in-flight RPCs still running after the grace period"),
                }
                deadline
            }
        };
        // Dropping the server drops the last committer handle: the workers finish what is
        // queued and stop.
        drop(server);
        shutdown.cancel();
        tasks.close();
        if tokio::time::timeout_at(deadline, tasks.wait()).await.is_err() {
            tracing::warn!("background tasks still running after the grace period");
        }
        self.events.quit().await;
        tracing::info!("message service stopped");
        Ok(())
    }
}

/// The server span of one RPC, continuing the caller's trace from the `traceparent`
/// metadata. Health checks (probes, gateway readiness) get none: they would bury the
/// traces that matter.
fn rpc_span(req: &tonic::codegen::http::Request<()>) -> tracing::Span {
    let path = req.uri().path();
    if path.starts_with("/grpc.health.") {
        return tracing::Span::none();
    }
    let method = path.rsplit('/').next().unwrap_or(path);
    let span = tracing::info_span!(
        "grpc.server",
        otel.name = path.trim_start_matches('/'),
        otel.kind = "server",
        rpc.system = "grpc",
        rpc.method = method,
    );
    chat_common::propagation::set_parent_from_headers(&span, req.headers());
    span
}

/// Keeps the gRPC health status in step with the backends, so gateways and Kubernetes
/// stop routing to a message service that cannot reach Postgres or Redis.
async fn report_health(reporter: HealthReporter, store: Store, events: EventBus, shutdown: CancellationToken) {
    // For liveness probes: the process answers, whatever its backends do.
    reporter.set_service_status(LIVENESS, tonic_health::ServingStatus::Serving).await;
    let mut serving = None;
    loop {
        let healthy = events.is_connected() && store.is_healthy().await;
        if serving != Some(healthy) {
            if healthy {
                reporter.set_serving::<ChatServiceServer<GrpcHandlers>>().await;
                reporter.set_service_status("", tonic_health::ServingStatus::Serving).await;
            } else {
                tracing::warn!("a backend is unreachable; reporting NOT_SERVING");
                reporter.set_not_serving::<ChatServiceServer<GrpcHandlers>>().await;
                reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
            }
            serving = Some(healthy);
        }
        tokio::select! {
            _ = tokio::time::sleep(HEALTH_INTERVAL) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}
