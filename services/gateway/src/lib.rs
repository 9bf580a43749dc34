//! The WebSocket gateway: terminates client connections, authenticates them with JWT,
//! forwards commands to the message service over gRPC, and pushes room events it hears
//! on Redis to the local connections that joined those rooms.

pub mod api;
pub mod attachments;
pub mod auth;
pub mod backend;
pub mod config;
pub mod devtoken;
pub mod discovery;
pub mod error;
pub mod fanout;
pub mod http;
pub mod metrics;
pub mod outbox;
pub mod presence;
pub mod protocol;
pub mod publisher;
pub mod ratelimit;
pub mod room;
pub mod session;
pub mod state;
pub mod stripes;
pub mod web;
pub mod ws;

use std::net::SocketAddr;
use std::time::Duration;

use chat_common::channels::Channels;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::Verifier;
use crate::backend::Backend;
use crate::config::Config;
use crate::devtoken::DevTokens;
use crate::fanout::Fanout;
use crate::metrics::Metrics;
use crate::presence::Presence;
use crate::ratelimit::{Limits, Rates};
use crate::state::{AppState, ConnSettings, Parts};

/// How often the message service's health is checked for `/readyz`.
const READINESS_INTERVAL: Duration = Duration::from_secs(2);

/// A gateway with its backends connected and its port bound, ready to run.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    grace: Duration,
    drain_delay: Duration,
}

impl Application {
    /// Connects to the message service and Redis (bounded retries) and binds the port.
    /// `shutdown` is the token whose cancellation starts the drain.
    pub async fn build(config: &Config, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let retry = config.startup_retry();
        let keys = config.jwt_keys().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        let verifier = Verifier::new(&keys, config.jwt_issuer.as_deref(), config.jwt_audience.as_deref())?;
        let metrics = Metrics::new();
        let targets = config.message_targets().map_err(|e| anyhow::anyhow!("invalid configuration: {e}"))?;
        let backend = Backend::connect(
            targets,
            Duration::from_millis(config.message_service_dns_refresh_ms),
            Duration::from_millis(config.grpc_timeout_ms),
            retry,
            metrics.clone(),
            shutdown.clone(),
        )
        .await?;
        let fanout = Fanout::connect(
            &config.redis,
            Channels::new(&config.redis_channel_prefix),
            backend.clone(),
            metrics.clone(),
            retry,
        )
        .await?;
        let presence = Presence::connect(
            &config.redis,
            &config.redis_channel_prefix,
            backend.clone(),
            config.max_connections_per_user,
            Duration::from_millis(config.presence_stale_ms),
            metrics.redis_errors.clone(),
            retry,
        )
        .await?;
        let settings = ConnSettings {
            max_rooms: config.max_rooms_per_connection,
            max_header_bytes: config.max_header_bytes,
            allowed_origins: config
                .allowed_origins
                .iter()
                .map(|o| o.trim().to_owned())
                .filter(|o| !o.is_empty())
                .collect(),
            heartbeat: config.heartbeat(),
            auth_timeout: Duration::from_secs(config.auth_timeout_secs),
            max_frame_bytes: config.max_frame_bytes,
            outbound_queue: config.outbound_queue,
        };
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
        let limits = Limits::new(Rates {
            conn_per_sec: config.rate_conn_per_sec,
            conn_burst: config.rate_conn_burst,
            user_per_sec: config.rate_user_per_sec,
            user_burst: config.rate_user_burst,
        });
        let dev_tokens = config.dev_tokens.then(|| {
            let secret = config.jwt_secret.as_deref().unwrap_or_default().as_bytes();
            DevTokens::new(secret, config.jwt_issuer.clone(), config.jwt_audience.clone())
        });
        let state = AppState::new(Parts {
            verifier,
            backend,
            fanout,
            presence,
            limits,
            metrics,
            settings,
            dev_tokens,
            shutdown,
        });
        Ok(Self {
            listener,
            state,
            grace: Duration::from_secs(config.shutdown_grace_secs),
            drain_delay: Duration::from_millis(config.drain_delay_ms),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until the shutdown token is cancelled; then every connection is told to
    /// reconnect and closed with 1012, within the grace period.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let state = self.state;
        let shutdown = state.shutdown().clone();
        // The dispatcher outlives the HTTP server so connections still draining get events.
        let dispatcher_stop = CancellationToken::new();
        let dispatcher = tokio::spawn(state.fanout().clone().run_dispatcher(dispatcher_stop.clone()));
        tokio::spawn(watch_backend(state.clone()));
        let housekeeping = tokio::spawn(state.presence().clone().run_housekeeping(dispatcher_stop.clone()));

        // Drain in order: readiness 503 and new upgrades refused at once (the shutdown
        // token), then after the drain delay every connection is told to reconnect and
        // closed with 1012 once its in-flight command has answered.
        let (closing, delay) = (state.clone(), self.drain_delay);
        let draining = shutdown.clone();
        tokio::spawn(async move {
            draining.cancelled().await;
            tokio::time::sleep(delay).await;
            closing.open_connections().close_all(ws::restart);
        });

        let app = http::router(state.clone());
        let stopped = shutdown.clone();
        let drain_delay = self.drain_delay;
        axum::serve(self.listener, app)
            .with_graceful_shutdown(async move {
                stopped.cancelled().await;
                // Keep answering /readyz (503) while the load balancer notices.
                tokio::time::sleep(drain_delay).await;
            })
            .await?;

        state.connections().close();
        if tokio::time::timeout(self.grace, state.connections().wait()).await.is_err() {
            tracing::warn!(grace = ?self.grace, "connections still open after the grace period");
        }
        dispatcher_stop.cancel();
        let _ = dispatcher.await;
        let _ = housekeeping.await;
        tracing::info!("gateway stopped");
        Ok(())
    }
}

/// Keeps the readiness flag in step with the message service's health.
async fn watch_backend(state: AppState) {
    loop {
        let serving = state.backend().is_serving().await;
        state.set_backend_serving(serving);
        tokio::select! {
            _ = tokio::time::sleep(READINESS_INTERVAL) => {}
            _ = state.shutdown().cancelled() => return,
        }
    }
}
