//! What every connection and handler of one gateway shares.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_common::events::EventBus;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::attachments::Transfers;
use crate::auth::{AuthError, Claims, Verifier};
use crate::backend::Backend;
use crate::capacity::Capacity;
use crate::config::Config;
use crate::delivery::Deliveries;
use crate::devtoken::DevTokens;
use crate::error::CommandError;
use crate::fanout::Fanout;
use crate::metrics::Metrics;
use crate::outbox::Registry;
use crate::presence::Presence;
use crate::ratelimit::Limits;
use crate::rest_limits::RestLimits;
use crate::StartupError;

/// Per-connection limits and timings, from the config.
#[derive(Debug, Clone)]
pub struct ConnSettings {
    /// Browser origins allowed to upgrade; empty allows all.
    pub allowed_origins: Arc<[String]>,
    /// Rooms one connection may have joined at once.
    pub max_rooms: usize,
    /// Largest request line plus headers.
    pub max_header_bytes: usize,
    pub heartbeat: Duration,
    pub auth_timeout: Duration,
    pub max_frame_bytes: usize,
    pub outbound_queue: usize,
}

/// Cheap-to-clone handle to the gateway's shared parts.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Shared>,
}

struct Shared {
    verifier: Verifier,
    backend: Backend,
    fanout: Fanout,
    presence: Presence,
    /// Clients' `received` seqs, stored once a second.
    deliveries: Deliveries,
    events: EventBus,
    limits: Limits,
    metrics: Metrics,
    settings: ConnSettings,
    dev_tokens: Option<DevTokens>,
    /// `/v1` request rates per user.
    rest_limits: RestLimits,
    /// Searches per user (WebSocket and REST), the costly command.
    search_limits: RestLimits,
    /// Attachment uploads and downloads in flight.
    transfers: Transfers,
    shutdown: CancellationToken,
    /// Open connections, told to reconnect and closed with 1012 after the drain delay.
    open: Registry,
    connections: TaskTracker,
    /// The cap on `connections` (`MAX_CONNECTIONS`).
    capacity: Capacity,
    /// Everything else spawned (dispatcher, room tasks, housekeeping, drain, presence
    /// announcements, resyncs), waited for after the connections, since most of it serves them.
    tasks: TaskTracker,
    next_conn: AtomicU64,
    backend_serving: AtomicBool,
    started: Instant,
}

impl AppState {
    /// Connects to the message service and Redis (bounded retries) and builds the rest
    /// from `config`. Its shutdown token is its own: the caller cancels it to drain.
    pub async fn connect(config: &Config) -> Result<Self, StartupError> {
        let verifier = config.verifier()?;
        let metrics = Metrics::new();
        metrics.max_connections.set(i64::try_from(config.max_connections).unwrap_or(i64::MAX));
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let backend = Backend::connect(config, metrics.clone(), shutdown.clone(), &tasks).await?;
        let fanout = Fanout::connect(config, backend.clone(), metrics.clone(), tasks.clone()).await?;
        let redis = config.backend.connect_redis(crate::presence::COMMAND_TIMEOUT).await?;
        let events = EventBus::new(
            config.backend.redis.publisher(redis.clone()),
            config.backend.channels(),
            metrics.redis_errors.clone(),
        );
        let presence = Presence::new(config, redis, backend.clone(), events.clone());
        Ok(Self {
            inner: Arc::new(Shared {
                verifier,
                backend,
                fanout,
                presence,
                deliveries: Deliveries::default(),
                events,
                limits: Limits::new(config.rates()),
                metrics,
                settings: config.conn_settings(),
                dev_tokens: config.dev_tokens(),
                rest_limits: RestLimits::new(config.rest_rates()),
                search_limits: RestLimits::new(config.search_rates()),
                transfers: config.transfers(),
                shutdown,
                open: Registry::default(),
                connections: TaskTracker::new(),
                capacity: Capacity::new(config.max_connections),
                tasks,
                next_conn: AtomicU64::new(1),
                backend_serving: AtomicBool::new(true),
                started: Instant::now(),
            }),
        })
    }

    pub fn verifier(&self) -> &Verifier {
        &self.inner.verifier
    }

    /// Verifies a client's token, counting a refusal by its reason.
    pub fn authenticate(&self, token: &str) -> Result<Claims, AuthError> {
        self.inner.verifier.verify(token).inspect_err(|err| self.inner.metrics.auth_failure(err.reason()))
    }

    pub fn backend(&self) -> &Backend {
        &self.inner.backend
    }

    pub fn fanout(&self) -> &Fanout {
        &self.inner.fanout
    }

    pub fn presence(&self) -> &Presence {
        &self.inner.presence
    }

    pub fn deliveries(&self) -> &Deliveries {
        &self.inner.deliveries
    }

    /// Publishes the events the gateway originates: typing, presence, admin pushes.
    pub fn events(&self) -> &EventBus {
        &self.inner.events
    }

    /// Prometheus metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Command rate limits.
    pub fn limits(&self) -> &Limits {
        &self.inner.limits
    }

    pub fn settings(&self) -> &ConnSettings {
        &self.inner.settings
    }

    /// `/v1` request rates per user.
    /// Takes one of `user`'s searches, or refuses with `rate_limited` and the wait.
    pub fn spend_search(&self, user: &str) -> Result<(), CommandError> {
        self.inner.search_limits.check(user, Instant::now()).map_err(|wait| {
            self.inner.metrics.rate_limited.inc();
            let ms = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX).max(1);
            CommandError::rate_limited(format!("too many searches; retry in {ms} ms"), ms)
        })
    }

    pub fn rest_limits(&self) -> &RestLimits {
        &self.inner.rest_limits
    }

    /// Attachment transfer slots.
    pub fn transfers(&self) -> &Transfers {
        &self.inner.transfers
    }

    /// The dev-token signer; `None` unless `DEV_TOKENS` is on.
    pub fn dev_tokens(&self) -> Option<&DevTokens> {
        self.inner.dev_tokens.as_ref()
    }

    /// Cancelled when the gateway starts shutting down.
    pub fn shutdown(&self) -> &CancellationToken {
        &self.inner.shutdown
    }

    /// Every open connection's outbox (see `ws::restart` for how they are told to go).
    pub fn open_connections(&self) -> &Registry {
        &self.inner.open
    }

    /// Tracks every WebSocket connection task, so shutdown can wait for them.
    pub fn connections(&self) -> &TaskTracker {
        &self.inner.connections
    }

    /// Tracks every other task the gateway spawns, so shutdown can wait for them too.
    pub fn tasks(&self) -> &TaskTracker {
        &self.inner.tasks
    }

    /// A fresh connection id.
    pub fn next_conn_id(&self) -> u64 {
        self.inner.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Milliseconds since the gateway started: a cheap monotonic clock for heartbeats.
    pub fn uptime_ms(&self) -> u64 {
        self.inner.started.elapsed().as_millis() as u64
    }

    /// Records the last health check of the message service.
    pub fn set_backend_serving(&self, serving: bool) {
        self.inner.backend_serving.store(serving, Ordering::Relaxed);
    }

    /// The gateway's connection cap.
    pub fn capacity(&self) -> &Capacity {
        &self.inner.capacity
    }

    /// Readiness: not draining, not full, the message service serving, Redis connected.
    pub fn readiness(&self) -> Readiness {
        Readiness {
            draining: self.inner.shutdown.is_cancelled(),
            full: self.inner.capacity.is_full(),
            message_service: self.inner.backend_serving.load(Ordering::Relaxed),
            redis: self.inner.fanout.is_connected(),
        }
    }
}

/// What `/readyz` reports.
#[derive(Debug, Clone, Copy)]
pub struct Readiness {
    pub draining: bool,
    /// At `MAX_CONNECTIONS`.
    pub full: bool,
    pub message_service: bool,
    pub redis: bool,
}

impl Readiness {
    /// Ready, as the contract's `/readyz` means it: takes new clients, and every
    /// backend is up.
    pub fn is_ready(&self) -> bool {
        self.takes_new_clients() && self.message_service && self.redis
    }

    /// Whether a load balancer should send this gateway new clients (`/readyz/local`):
    /// it is not draining and not full. A backend outage is every gateway's at once, so
    /// it is left out: turning them all unready would leave the load balancer nothing to
    /// route to, where an open gateway still serves what needs no backend and answers the
    /// rest `unavailable`, which clients retry.
    pub fn takes_new_clients(&self) -> bool {
        !self.draining && !self.full
    }
}
