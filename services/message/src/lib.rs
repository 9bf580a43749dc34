//! The message service: the one writer of rooms and messages. It stores each message in
//! Postgres (gapless per-room seq) and then publishes it to Redis for the gateways.

pub mod attachments;
pub mod blobs;
pub mod config;
pub mod error;
pub mod grpc;
pub mod health;
pub mod metrics;
pub mod startup_error;
pub mod store;
pub mod tls;
pub mod validate;
pub mod webhooks;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;

use chat_common::events::EventBus;
use chat_common::MAX_GRPC_MESSAGE;
use chat_proto::v1::chat_service_server::ChatServiceServer;
use secrecy::ExposeSecret;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::server::TcpIncoming;

use crate::config::Config;
use crate::grpc::GrpcHandlers;
use crate::metrics::Metrics;
pub use crate::startup_error::StartupError;
use crate::store::{Committer, Store};

pub use crate::health::{Readiness, LIVENESS};

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
    drain_delay: Duration,
    attachments: attachments::AttachmentLimits,
    unattached_ttl: Duration,
    /// The gRPC port's TLS config, when it runs mTLS, kept current with its files.
    tls: Option<tokio::sync::watch::Receiver<std::sync::Arc<rustls::ServerConfig>>>,
    /// Offline members' webhooks, when `WEBHOOK_URL` is set.
    dispatcher: Option<webhooks::Dispatcher>,
    webhook_retry_for: Duration,
    tasks: TaskTracker,
    /// Stops what runs until the very end: the reloads, the metrics port.
    background: CancellationToken,
}

impl Application {
    /// Connects to Postgres (creating and migrating the database) and Redis, with
    /// bounded retries, and binds the gRPC port.
    pub async fn build(config: &Config) -> Result<Self, StartupError> {
        let retry = config.backend.startup_retry();
        let url = config.database_url();
        // Validated at start (`Config::validate`): an error here cannot happen.
        let webhooks = config.webhooks().ok().flatten();
        let store = Store::connect(
            url.expose_secret(),
            config.create_database,
            config.db_max_connections,
            config.schema(),
            webhooks.is_some(),
            retry,
        )
        .await?
        .with_limits(config.membership_limits());
        let redis = config.backend.connect_redis(PUBLISH_TIMEOUT).await?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|cause| StartupError::Listen { addr: config.listen, cause })?;
        let metrics_listener = metrics::bind(config.metrics_addr).await?;
        let (tasks, background) = (TaskTracker::new(), CancellationToken::new());
        let tls = match config.server_tls() {
            Some(files) => Some(chat_common::tls::watch(files, tls::server_config, background.clone(), &tasks)?),
            None => None,
        };
        let metrics = Metrics::with_pool(&store);
        let dispatcher = match webhooks {
            Some(webhooks) => Some(
                webhooks::Dispatcher::new(webhooks, store.clone(), redis.clone(), metrics.clone())
                    .map_err(StartupError::WebhookClient)?,
            ),
            None => None,
        };
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
            drain_delay: config.drain_delay(),
            attachments: config.attachment_limits(),
            unattached_ttl: config.unattached_ttl(),
            tls,
            dispatcher,
            webhook_retry_for: Duration::from_secs(config.webhook_retry_for_secs),
            tasks,
            background,
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

    /// Serves until `shutdown` is cancelled, then drains: NOT_SERVING for the drain delay
    /// while still serving, then no new calls, and in-flight RPCs finish within the grace
    /// period, and the commits they queued after them.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), tonic::transport::Error> {
        let tasks = self.tasks.clone();
        // Scrapes go on through the drain; they stop with the background tasks.
        let stopped_serving = self.background.clone();
        // Cancelled once new calls are refused: health watches end then, or they would
        // hold the graceful shutdown open until the grace period.
        let refusing = CancellationToken::new();
        let (reporter, health_service) = health::service(refusing.clone());
        // The workers hold `commit_workers` pooled connections; the rest serve reads and other writes.
        let committer = Committer::start(self.store.clone(), self.commit_workers as usize, &tasks);
        let handlers = GrpcHandlers::new(
            self.store.clone(),
            committer,
            self.events.clone(),
            self.max_text_chars,
            self.metrics.clone(),
        )
        .with_attachment_limits(self.attachments.clone())
        .with_webhook_retry_for(self.webhook_retry_for);
        tasks.spawn(attachments::collect_unattached(self.store.clone(), self.unattached_ttl, shutdown.clone()));
        if let Some(dispatcher) = self.dispatcher {
            // Stops at SIGTERM: what it leased, another replica takes over once the lease ends.
            tasks.spawn(dispatcher.run(shutdown.clone()));
        }
        let readiness = health::Readiness::default();
        let (store, events) = (self.store.clone(), self.events.clone());
        tasks.spawn(health::report(reporter, readiness.clone(), store, events, shutdown.clone()));
        tasks.spawn(self.metrics.clone().serve(self.metrics_listener, readiness, stopped_serving.clone()));

        let stopped = shutdown.clone();
        let drain_delay = self.drain_delay;
        let refused = refusing.clone();
        let refuse_calls = async move {
            stopped.cancelled().await;
            if !drain_delay.is_zero() {
                tracing::info!(?drain_delay, "draining: NOT_SERVING, still serving calls");
                tokio::time::sleep(drain_delay).await;
            }
            refused.cancel();
        };
        let router = tonic::transport::Server::builder()
            .trace_fn(rpc_span)
            .layer(self.metrics.rpc_timing())
            .add_service(health_service)
            .add_service(
                ChatServiceServer::new(handlers)
                    .max_decoding_message_size(MAX_GRPC_MESSAGE)
                    .max_encoding_message_size(MAX_GRPC_MESSAGE),
            );
        let mut server: Pin<Box<dyn Future<Output = Result<(), tonic::transport::Error>> + Send>> = match self.tls {
            Some(configs) => {
                let incoming = tls::incoming(self.listener, configs, refusing.clone(), &tasks);
                Box::pin(router.serve_with_incoming_shutdown(incoming, refuse_calls))
            }
            None => {
                let incoming = TcpIncoming::from(self.listener).with_nodelay(Some(true));
                Box::pin(router.serve_with_incoming_shutdown(incoming, refuse_calls))
            }
        };

        // A server error still stops and waits for the background tasks below.
        let (served, deadline) = tokio::select! {
            res = &mut server => (res, tokio::time::Instant::now() + self.grace),
            _ = shutdown.cancelled() => {
                // After the drain delay the server stops accepting and finishes in-flight
                // RPCs; bound that.
                let deadline = tokio::time::Instant::now() + self.drain_delay + self.grace;
                let served = tokio::time::timeout_at(deadline, &mut server).await.unwrap_or_else(|_| {
                    tracing::warn!(grace = ?self.grace, "in-flight RPCs still running after the grace period");
                    Ok(())
                });
                (served, deadline)
            }
        };
        // Dropping the server drops the last committer handle: the workers finish what is
        // queued and stop.
        drop(server);
        shutdown.cancel();
        stopped_serving.cancel();
        tasks.close();
        if tokio::time::timeout_at(deadline, tasks.wait()).await.is_err() {
            tracing::warn!("background tasks still running after the grace period");
        }
        self.events.quit().await;
        tracing::info!("message service stopped");
        served
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

/// Applies the migrations to the database (creating it if asked), grants the service's
/// role its rights, and returns: the `migrate` command.
pub async fn migrate(config: &Config, grant_to: Option<&str>) -> Result<(), StartupError> {
    let url = config.database_url();
    let retry = config.backend.startup_retry();
    let store =
        Store::connect(url.expose_secret(), config.create_database, 2, store::Schema::Migrate, false, retry).await?;
    tracing::info!(version = store::schema::latest_version(), "schema migrated");
    if let Some(role) = grant_to {
        store::schema::grant_dml(store.pool(), role).await?;
        tracing::info!(role, "granted reading and writing rows");
    }
    Ok(())
}
