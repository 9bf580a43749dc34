//! The WebSocket gateway: terminates client connections, authenticates them with JWT,
//! forwards commands to the message service over gRPC, and pushes room events it hears
//! on Redis to the local connections that joined those rooms.

pub mod attachments;
pub mod auth;
pub mod backend;
pub mod capacity;
pub mod config;
pub mod delivery;
pub mod devtoken;
pub mod discovery;
pub mod error;
pub mod fanout;
pub mod http;
pub mod listening;
pub mod metrics;
pub mod outbox;
pub mod presence;
pub mod protocol;
pub mod ratelimit;
pub mod rest;
pub mod rest_limits;
pub mod room;
pub mod session;
pub mod socket;
pub mod startup_error;
pub mod state;
pub mod stripes;
pub mod web;
pub mod ws;

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
pub use crate::startup_error::StartupError;
use crate::state::AppState;

/// How often the message service's health is checked for `/readyz`.
const READINESS_INTERVAL: Duration = Duration::from_secs(2);

/// Background work (the dispatcher's and presence's last Redis commands, announcements
/// in flight) gets what is left of the grace period once the connections are gone, and
/// at least this: the whole stop must stay inside the pod's termination grace period.
const TASKS_GRACE_MIN: Duration = Duration::from_secs(1);

/// A gateway with its backends connected and its port bound, ready to run.
pub struct Application {
    listener: TcpListener,
    state: AppState,
    grace: Duration,
    drain_delay: Duration,
    write_stall: Duration,
}

impl Application {
    /// Connects to the message service and Redis (bounded retries) and binds the port.
    pub async fn build(config: &Config) -> Result<Self, StartupError> {
        let state = AppState::connect(config).await?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|cause| StartupError::Listen { addr: config.listen, cause })?;
        Ok(Self {
            listener,
            state,
            grace: config.shutdown_grace(),
            drain_delay: config.drain_delay(),
            write_stall: config.write_stall_timeout(),
        })
    }

    /// The bound address (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` is cancelled; then every connection is told to reconnect
    /// and closed with 1012, within the grace period, and background work is waited for.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> std::io::Result<()> {
        let state = self.state;
        let tasks = state.tasks().clone();
        // The state was built before the caller's token existed; it follows that token.
        let draining = state.shutdown().clone();
        tasks.spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => draining.cancel(),
                _ = draining.cancelled() => {}
            }
        });
        let shutdown = state.shutdown().clone();
        // The dispatcher outlives the HTTP server so connections still draining get events.
        let dispatcher_stop = CancellationToken::new();
        tasks.spawn(state.fanout().clone().run_dispatcher(dispatcher_stop.clone()));
        tasks.spawn(watch_backend(state.clone()));
        tasks.spawn(state.presence().clone().run_housekeeping(dispatcher_stop.clone()));
        // Stops with the dispatcher, after the connections: what they reported last is stored.
        tasks.spawn(state.deliveries().clone().run(state.backend().clone(), dispatcher_stop.clone()));

        // Drain in order: readiness 503 and new upgrades refused at once (the shutdown
        // token), then after the drain delay every connection is told to reconnect and
        // closed with 1012 once its in-flight command has answered.
        let (closing, delay) = (state.clone(), self.drain_delay);
        let draining = shutdown.clone();
        tasks.spawn(async move {
            draining.cancelled().await;
            tokio::time::sleep(delay).await;
            closing.open_connections().close_all(ws::restart);
        });

        let app = http::router(state.clone());
        let stopped = shutdown.clone();
        let drain_delay = self.drain_delay;
        let app = app.into_make_service_with_connect_info::<socket::RawWriter>();
        let served = axum::serve(socket::Listener::new(self.listener, self.write_stall), app)
            .with_graceful_shutdown(async move {
                stopped.cancelled().await;
                // Keep answering /readyz (503) while the load balancer notices.
                tokio::time::sleep(drain_delay).await;
            })
            .await;
        // Whatever ended the server, the background tasks must hear it.
        shutdown.cancel();
        served?;

        let deadline = tokio::time::Instant::now() + self.grace;
        state.connections().close();
        if tokio::time::timeout_at(deadline, state.connections().wait()).await.is_err() {
            tracing::warn!(grace = ?self.grace, "connections still open after the grace period");
        }
        dispatcher_stop.cancel();
        tasks.close();
        let deadline = deadline.max(tokio::time::Instant::now() + TASKS_GRACE_MIN);
        if tokio::time::timeout_at(deadline, tasks.wait()).await.is_err() {
            tracing::warn!("background tasks still running after the grace period");
        }
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
