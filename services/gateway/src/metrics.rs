//! Prometheus metrics of a gateway, served at `/metrics`.

use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Labels of a command count.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CommandLabels {
    /// The command's `type` (`invalid` when the frame did not parse).
    pub command: String,
    /// `ok`, or the error code.
    pub outcome: String,
}

/// Labels of a connection's end.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CloseLabels {
    /// The WebSocket close code (1006: the client vanished without one).
    pub code: u16,
}

/// Labels of a refused token.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// Labels of an HTTP request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    /// The route's template (`/v1/rooms/{id}/messages`), never the raw path.
    pub route: String,
    pub status: u16,
}

/// Labels of a gRPC call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    pub method: &'static str,
}

/// Every metric of the gateway; cheap to clone (each metric is shared).
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Open WebSocket connections.
    pub connections: Gauge<i64, AtomicI64>,
    /// `MAX_CONNECTIONS` (0: no cap), beside `connections` for an alert near the cap.
    pub max_connections: Gauge<i64, AtomicI64>,
    /// Connections let in (`welcome` sent).
    pub connects: Counter,
    /// Connections ended after `welcome`, by close code.
    pub disconnects: Family<CloseLabels, Counter>,
    /// Tokens refused (handshake, first frame, `refresh`, REST), by reason.
    pub auth_failures: Family<ReasonLabels, Counter>,
    /// Commands by type and outcome.
    pub commands: Family<CommandLabels, Counter>,
    /// Seconds from the message service's publish to the frame written to a socket.
    pub fanout_latency: Histogram,
    /// Seconds per HTTP request (REST, attachments, `/ws` handshakes, probes), by method,
    /// route and status; its count is the requests.
    pub http_latency: Family<HttpLabels, Histogram>,
    /// Seconds per gRPC call to the message service.
    pub grpc_latency: Family<MethodLabels, Histogram>,
    /// Redis operations that failed (publish, subscribe).
    pub redis_errors: Counter,
    /// Connections dropped because their outbound queue was full.
    pub outbound_drops: Counter,
    /// Commands refused by a rate limit.
    pub rate_limited: Counter,
    /// Messages fetched from the message service to fill a gap in the fan-out.
    pub gap_repairs: Counter,
    /// Attachment uploads and downloads streaming now (at most `ATTACHMENT_TRANSFERS`).
    pub attachment_transfers: Gauge<i64, AtomicI64>,
}

fn latency_buckets() -> impl Iterator<Item = f64> {
    // 0.1 ms … ~13 s: past the 5 s call timeout (GRPC_TIMEOUT_MS), so a call that hit
    // it, or a delivery that waited that long, falls in a bucket of its own.
    exponential_buckets(0.0001, 2.0, 18)
}

impl Metrics {
    /// A fresh set of metrics in its own registry.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("chat_gateway");
        let connections = Gauge::<i64, AtomicI64>::default();
        registry.register("connections", "Open WebSocket connections", connections.clone());
        let max_connections = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "max_connections",
            "Connections this gateway takes before it answers 503 (0: no cap)",
            max_connections.clone(),
        );
        let connects = Counter::default();
        registry.register("connects", "Connections let in (welcome sent)", connects.clone());
        let disconnects = Family::<CloseLabels, Counter>::default();
        registry.register("disconnects", "Connections ended after welcome, by close code", disconnects.clone());
        let auth_failures = Family::<ReasonLabels, Counter>::default();
        registry.register("auth_failures", "Tokens refused, by reason", auth_failures.clone());
        let commands = Family::<CommandLabels, Counter>::default();
        registry.register("commands", "Commands by type and outcome", commands.clone());
        let fanout_latency = Histogram::new(latency_buckets());
        registry.register(
            "fanout_latency_seconds",
            "Seconds from publish to the frame written to the socket",
            fanout_latency.clone(),
        );
        let grpc_latency =
            Family::<MethodLabels, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()));
        registry.register("grpc_latency_seconds", "Seconds per call to the message service", grpc_latency.clone());
        let http_latency = Family::<HttpLabels, Histogram>::new_with_constructor(|| Histogram::new(latency_buckets()));
        registry.register(
            "http_request_duration_seconds",
            "Seconds per HTTP request, by method, route and status",
            http_latency.clone(),
        );
        let redis_errors = Counter::default();
        registry.register("redis_errors", "Failed Redis operations", redis_errors.clone());
        let outbound_drops = Counter::default();
        registry.register("outbound_drops", "Connections dropped for a full outbound queue", outbound_drops.clone());
        let rate_limited = Counter::default();
        registry.register("rate_limited", "Commands refused by a rate limit", rate_limited.clone());
        let gap_repairs = Counter::default();
        registry.register("gap_repairs", "Messages fetched to fill a fan-out gap", gap_repairs.clone());
        let attachment_transfers = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "attachment_transfers",
            "Attachment uploads and downloads streaming now",
            attachment_transfers.clone(),
        );
        registry.register_collector(Box::new(chat_common::fdlimit::FdMetrics));
        Self {
            registry: Arc::new(registry),
            connections,
            max_connections,
            connects,
            disconnects,
            auth_failures,
            commands,
            fanout_latency,
            grpc_latency,
            http_latency,
            redis_errors,
            outbound_drops,
            rate_limited,
            gap_repairs,
            attachment_transfers,
        }
    }

    /// Records one HTTP request.
    pub fn http_request(&self, method: &str, route: &str, status: u16, took: std::time::Duration) {
        let labels = HttpLabels { method: method.to_owned(), route: route.to_owned(), status };
        self.http_latency.get_or_create(&labels).observe(took.as_secs_f64());
    }

    /// Counts one refused token.
    pub fn auth_failure(&self, reason: &'static str) {
        self.auth_failures.get_or_create(&ReasonLabels { reason }).inc();
    }

    /// Counts one command.
    pub fn command(&self, command: &str, outcome: &str) {
        self.commands.get_or_create(&CommandLabels { command: command.to_owned(), outcome: outcome.to_owned() }).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Err(err) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            tracing::error!(%err, "metrics encoding failed");
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
