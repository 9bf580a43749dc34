//! The gRPC health service: SERVING while Postgres and Redis answer, NOT_SERVING while
//! one does not and from SIGTERM on (the drain), so gateways and probes move away.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chat_common::events::EventBus;
use chat_proto::v1::chat_service_server::ChatServiceServer;
use futures_util::{Stream, StreamExt};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};
use tonic_health::server::{HealthReporter, HealthService};

use crate::grpc::GrpcHandlers;
use crate::store::Store;

/// The gRPC health service name that reports SERVING while the process runs (for
/// liveness); the overall status ("") follows the backends (for readiness).
pub const LIVENESS: &str = "liveness";

/// How often the health status is re-checked against Postgres and Redis.
const HEALTH_INTERVAL: Duration = Duration::from_secs(2);

/// The overall status, for the HTTP probes on the metrics port (`/readyz`): the
/// kubelet's gRPC probes cannot present the client certificate mTLS asks for.
#[derive(Debug, Clone, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// True while the overall gRPC status is SERVING.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Relaxed);
    }
}

/// The reporter that sets the statuses, and the service that serves them, whose watches
/// end when `refusing` is cancelled.
pub(crate) fn service(refusing: CancellationToken) -> (HealthReporter, HealthServer<EndingWatches>) {
    let reporter = HealthReporter::new();
    let inner = HealthService::from_health_reporter(reporter.clone());
    (reporter, HealthServer::new(EndingWatches { inner, refusing }))
}

/// tonic-health's service, but a watch ends once the server refuses new calls: a
/// gateway's watch would otherwise be an RPC in flight until the grace period is over.
pub(crate) struct EndingWatches {
    inner: HealthService,
    refusing: CancellationToken,
}

type Statuses = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for EndingWatches {
    async fn check(&self, request: Request<HealthCheckRequest>) -> Result<Response<HealthCheckResponse>, Status> {
        self.inner.check(request).await
    }

    type WatchStream = Statuses;

    async fn watch(&self, request: Request<HealthCheckRequest>) -> Result<Response<Statuses>, Status> {
        let statuses = self.inner.watch(request).await?.into_inner();
        let ended: Statuses = Box::pin(statuses.take_until(self.refusing.clone().cancelled_owned()));
        Ok(Response::new(ended))
    }
}

/// Keeps the gRPC health status in step with the backends, so gateways and Kubernetes
/// stop routing to a message service that cannot reach Postgres or Redis.
pub(crate) async fn report(
    reporter: HealthReporter,
    readiness: Readiness,
    store: Store,
    events: EventBus,
    shutdown: CancellationToken,
) {
    // For liveness probes: the process answers, whatever its backends do.
    reporter.set_service_status(LIVENESS, tonic_health::ServingStatus::Serving).await;
    let mut serving = None;
    loop {
        let healthy = tokio::select! {
            healthy = async { events.is_connected() && store.is_healthy().await } => healthy,
            _ = shutdown.cancelled() => break,
        };
        if serving != Some(healthy) {
            readiness.set(healthy);
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
            _ = shutdown.cancelled() => break,
        }
    }
    // Draining: gateways and probes move away while calls are still served.
    readiness.set(false);
    reporter.set_not_serving::<ChatServiceServer<GrpcHandlers>>().await;
    reporter.set_service_status("", tonic_health::ServingStatus::NotServing).await;
}
