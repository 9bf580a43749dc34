//! Client-side balancing of gRPC calls across every message-service pod.
//!
//! HTTP/2 multiplexes all of a gateway's calls over one long-lived connection, so behind
//! a ClusterIP Service every call of a gateway would land on the one pod that connection
//! reached. Instead the gateway is given a name that resolves to each pod (a headless
//! Service), re-resolves it periodically, and keeps one connection per address in a
//! power-of-two-choices balancer (tonic's `balance_channel`). Each address's gRPC health
//! is watched too: a replica that drains (NOT_SERVING after SIGTERM) gets no new calls
//! while another serves, before it stops accepting them.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::{self, Sender};
use tokio::sync::watch;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::channel::Change;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint, Uri};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Changes queued for the balancer, and health changes for its task; senders wait when
/// either is full.
const CHANGES: usize = 64;

/// Pause before watching a replica's health again after the watch failed.
const WATCH_RETRY: Duration = Duration::from_secs(1);

/// Where the message service is: one or more `http://host:port` URLs.
#[derive(Debug, Clone)]
pub struct Targets {
    targets: Vec<(String, u16)>,
}

impl std::fmt::Display for Targets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<String> = self.targets.iter().map(|(host, port)| format!("{host}:{port}")).collect();
        f.write_str(&names.join(","))
    }
}

impl Targets {
    /// Parses the URLs; each must name a host and may name a port (default 80).
    pub fn parse(urls: &[String]) -> Result<Self, String> {
        let mut targets = Vec::new();
        for url in urls.iter().map(|u| u.trim()).filter(|u| !u.is_empty()) {
            let uri: Uri = url.parse().map_err(|e| format!("{url:?} is not a URL: {e}"))?;
            if uri.scheme_str() != Some("http") {
                return Err(format!("{url:?} must be an http:// URL"));
            }
            let host = uri.host().ok_or_else(|| format!("{url:?} names no host"))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
            targets.push((host, uri.port_u16().unwrap_or(80)));
        }
        if targets.is_empty() {
            return Err("no message service URL given".into());
        }
        Ok(Self { targets })
    }

    /// Every address the targets resolve to now. A name that fails to resolve is left out;
    /// the result is empty only when every one failed.
    pub async fn resolve(&self) -> BTreeSet<SocketAddr> {
        let mut addrs = BTreeSet::new();
        for (host, port) in &self.targets {
            match tokio::net::lookup_host((host.as_str(), *port)).await {
                Ok(found) => addrs.extend(found),
                Err(err) => tracing::warn!(%host, %err, "cannot resolve the message service"),
            }
        }
        addrs
    }
}

/// How an address becomes an endpoint: timeouts and keep-alives, and the TLS config when
/// calls go over mTLS, which changes when its files do.
#[derive(Clone)]
pub struct Endpoints {
    configure: Arc<dyn Fn(Endpoint) -> Endpoint + Send + Sync>,
    tls: Option<watch::Receiver<Arc<ClientTlsConfig>>>,
}

impl Endpoints {
    pub fn new(
        configure: impl Fn(Endpoint) -> Endpoint + Send + Sync + 'static,
        tls: Option<watch::Receiver<Arc<ClientTlsConfig>>>,
    ) -> Self {
        Self { configure: Arc::new(configure), tls }
    }

    /// The endpoint of `addr`, under the TLS config in force now.
    fn endpoint(&self, addr: SocketAddr) -> Option<Endpoint> {
        let endpoint = match &self.tls {
            None => Endpoint::from_shared(format!("http://{addr}")).ok()?,
            Some(tls) => {
                let config = ClientTlsConfig::clone(&tls.borrow());
                let endpoint = Endpoint::from_shared(format!("https://{addr}")).ok()?;
                // Checked when the files were read (`backend::client_tls`).
                match endpoint.tls_config(config) {
                    Ok(endpoint) => endpoint,
                    Err(err) => {
                        tracing::warn!(%addr, %err, "no TLS endpoint for a message service address");
                        return None;
                    }
                }
            }
        };
        Some((self.configure)(endpoint))
    }

    /// Resolves when the TLS config has changed (false once it never will again); never
    /// without TLS.
    async fn changed(&mut self) -> bool {
        match &mut self.tls {
            Some(tls) => tls.changed().await.is_ok(),
            None => std::future::pending().await,
        }
    }
}

/// A channel balancing over every address of `targets`, kept current by re-resolving
/// them every `refresh` and by watching each address's gRPC health, until `shutdown`, in
/// tasks on `tasks`. When the TLS config changes, every endpoint is made anew with it:
/// a reconnect would otherwise present the old certificate.
pub async fn balanced_channel(
    targets: Targets,
    refresh: Duration,
    endpoints: Endpoints,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) -> Channel {
    let (channel, changes) = Channel::balance_channel::<SocketAddr>(CHANGES);
    let (health_tx, mut health) = mpsc::channel(CHANGES);
    let mut watchers =
        Watchers { updates: health_tx, endpoints: endpoints.clone(), tasks: tasks.clone(), stops: HashMap::new() };
    let mut balancer = Balancer::new(changes, endpoints.clone(), shutdown.clone());
    let mut tls = endpoints;
    // The first set is in place before the first call; later ones follow in the background.
    let addrs = targets.resolve().await;
    watchers.follow(&addrs, &shutdown);
    balancer.resolved(addrs).await;
    tasks.spawn(async move {
        let mut resolve = tokio::time::interval(refresh);
        resolve.set_missed_tick_behavior(MissedTickBehavior::Delay);
        resolve.tick().await;
        loop {
            let alive = tokio::select! {
                _ = resolve.tick() => {
                    let addrs = targets.resolve().await;
                    watchers.follow(&addrs, &shutdown);
                    balancer.resolved(addrs).await
                }
                Some((addr, serving)) = health.recv() => balancer.health(addr, serving).await,
                true = tls.changed() => {
                    watchers.restart(&shutdown);
                    balancer.rebuild().await
                }
                _ = shutdown.cancelled() => false,
            };
            if !alive {
                return;
            }
        }
    });
    channel
}

/// What the balancer should hold: the resolved addresses that report SERVING, or, when
/// none does (a database outage: every replica reports NOT_SERVING), all of them, so
/// that calls still fail fast with `unavailable` rather than wait for a replica.
fn wanted(resolved: &BTreeSet<SocketAddr>, not_serving: &HashSet<SocketAddr>) -> BTreeSet<SocketAddr> {
    let serving: BTreeSet<SocketAddr> = resolved.iter().filter(|a| !not_serving.contains(a)).copied().collect();
    if serving.is_empty() {
        resolved.clone()
    } else {
        serving
    }
}

struct Balancer {
    changes: Sender<Change<SocketAddr, Endpoint>>,
    /// The balancer reads changes only when a call comes: an idle gateway's queue can
    /// fill, and a send waiting on it must still end at shutdown.
    shutdown: CancellationToken,
    endpoints: Endpoints,
    resolved: BTreeSet<SocketAddr>,
    not_serving: HashSet<SocketAddr>,
    current: HashSet<SocketAddr>,
}

impl Balancer {
    fn new(changes: Sender<Change<SocketAddr, Endpoint>>, endpoints: Endpoints, shutdown: CancellationToken) -> Self {
        Self {
            changes,
            shutdown,
            endpoints,
            resolved: BTreeSet::new(),
            not_serving: HashSet::new(),
            current: HashSet::new(),
        }
    }

    /// Queues `change`; false once the channel is gone or the gateway stops.
    async fn send(&self, change: Change<SocketAddr, Endpoint>) -> bool {
        tokio::select! {
            sent = self.changes.send(change) => sent.is_ok(),
            _ = self.shutdown.cancelled() => false,
        }
    }

    /// Replaces every endpoint with one made now (under new TLS files); the balancer
    /// swaps each once its new connection is ready.
    async fn rebuild(&mut self) -> bool {
        for &addr in &self.current {
            let Some(endpoint) = self.endpoints.endpoint(addr) else { continue };
            if !self.send(Change::Insert(addr, endpoint)).await {
                return false;
            }
        }
        true
    }

    /// A new resolution. An empty one (DNS down) keeps the last known pods rather than
    /// leaving the gateway with none. False once the channel is gone.
    async fn resolved(&mut self, addrs: BTreeSet<SocketAddr>) -> bool {
        if addrs.is_empty() {
            return true;
        }
        self.not_serving.retain(|a| addrs.contains(a));
        self.resolved = addrs;
        self.apply().await
    }

    /// An address's health changed: a draining replica, or one that lost a backend,
    /// gets no new calls while another serves.
    async fn health(&mut self, addr: SocketAddr, serving: bool) -> bool {
        if !self.resolved.contains(&addr) {
            return true;
        }
        if serving {
            self.not_serving.remove(&addr);
        } else {
            tracing::info!(%addr, "message service replica reports NOT_SERVING");
            self.not_serving.insert(addr);
        }
        self.apply().await
    }

    /// Makes the balancer's set equal to what is wanted.
    async fn apply(&mut self) -> bool {
        let wanted = wanted(&self.resolved, &self.not_serving);
        let gone: Vec<SocketAddr> = self.current.iter().filter(|a| !wanted.contains(a)).copied().collect();
        for addr in gone {
            tracing::info!(%addr, "message service address removed");
            self.current.remove(&addr);
            if !self.send(Change::Remove(addr)).await {
                return false;
            }
        }
        for addr in wanted {
            if self.current.contains(&addr) {
                continue;
            }
            let Some(endpoint) = self.endpoints.endpoint(addr) else { continue };
            tracing::info!(%addr, "message service address added");
            self.current.insert(addr);
            if !self.send(Change::Insert(addr, endpoint)).await {
                return false;
            }
        }
        true
    }
}

/// A health watch per resolved address, over a connection of its own (the balancer's
/// are not reachable one by one).
struct Watchers {
    updates: Sender<(SocketAddr, bool)>,
    endpoints: Endpoints,
    tasks: TaskTracker,
    stops: HashMap<SocketAddr, CancellationToken>,
}

impl Watchers {
    /// Watches every address again, over connections made now (under new TLS files).
    fn restart(&mut self, shutdown: &CancellationToken) {
        let addrs: BTreeSet<SocketAddr> = self.stops.keys().copied().collect();
        for stop in self.stops.values() {
            stop.cancel();
        }
        self.stops.clear();
        self.follow(&addrs, shutdown);
    }

    /// Watches every address of `addrs` and stops watching the others. An empty
    /// resolution changes nothing, as for the balancer.
    fn follow(&mut self, addrs: &BTreeSet<SocketAddr>, shutdown: &CancellationToken) {
        if addrs.is_empty() {
            return;
        }
        self.stops.retain(|addr, stop| {
            let keep = addrs.contains(addr);
            if !keep {
                stop.cancel();
            }
            keep
        });
        for &addr in addrs {
            if self.stops.contains_key(&addr) {
                continue;
            }
            let Some(endpoint) = self.endpoints.endpoint(addr) else { continue };
            let stop = shutdown.child_token();
            self.stops.insert(addr, stop.clone());
            self.tasks.spawn(watch_health(addr, endpoint, self.updates.clone(), stop));
        }
    }
}

/// Reports `addr`'s status each time it changes, until `stop`. A lost watch keeps the
/// last status: a replica that drained and stopped stays out until it serves again (or
/// leaves the resolution); one that never answered is left to the balancer, which skips
/// endpoints it cannot connect to.
async fn watch_health(
    addr: SocketAddr,
    endpoint: Endpoint,
    updates: Sender<(SocketAddr, bool)>,
    stop: CancellationToken,
) {
    let mut client = HealthClient::new(endpoint.connect_lazy());
    let mut last = None;
    loop {
        let watch = tokio::select! {
            watch = client.watch(HealthCheckRequest { service: String::new() }) => watch,
            _ = stop.cancelled() => return,
        };
        if let Ok(watch) = watch {
            let mut statuses = watch.into_inner();
            loop {
                let status = tokio::select! {
                    status = statuses.message() => status,
                    _ = stop.cancelled() => return,
                };
                let Ok(Some(status)) = status else { break };
                let serving = status.status == ServingStatus::Serving as i32;
                if last != Some(serving) {
                    last = Some(serving);
                    // Full: the balancer task is behind; waiting is the back-pressure.
                    if updates.send((addr, serving)).await.is_err() {
                        return;
                    }
                }
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(WATCH_RETRY) => {}
            _ = stop.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_to_hosts_and_ports() {
        let targets = Targets::parse(&[
            "http://chat-message-headless:50051".into(),
            " http://[::1]:7 ".into(),
            "http://a".into(),
        ])
        .unwrap();
        assert_eq!(targets.targets, vec![("chat-message-headless".into(), 50051), ("::1".into(), 7), ("a".into(), 80)]);
    }

    #[test]
    fn bad_urls_are_refused_with_the_reason() {
        assert!(Targets::parse(&[]).unwrap_err().contains("no message service"));
        assert!(Targets::parse(&["https://x:1".into()]).unwrap_err().contains("http://"));
        assert!(Targets::parse(&["not a url".into()]).is_err());
    }

    #[tokio::test]
    async fn names_resolve_to_every_address_and_literals_to_themselves() {
        let targets = Targets::parse(&["http://127.0.0.1:5".into(), "http://localhost:6".into()]).unwrap();
        let addrs = targets.resolve().await;
        assert!(addrs.contains(&"127.0.0.1:5".parse().unwrap()), "{addrs:?}");
        assert!(addrs.iter().any(|a| a.port() == 6 && a.ip().is_loopback()), "{addrs:?}");
    }

    #[tokio::test]
    async fn the_balancer_follows_the_resolved_set_and_keeps_it_through_a_dns_outage() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let mut balancer = Balancer::new(tx, Endpoints::new(|e| e, None), CancellationToken::new());
        let [a, b, c] = addrs();
        assert!(balancer.resolved([a, b].into()).await);
        assert!(balancer.resolved([b, c].into()).await);
        assert!(balancer.resolved(BTreeSet::new()).await);
        drop(balancer);
        assert_eq!(
            changes(&mut rx).await,
            ["+10.0.0.1:50051", "+10.0.0.2:50051", "-10.0.0.1:50051", "+10.0.0.3:50051"]
        );
    }

    #[tokio::test]
    async fn a_replica_not_serving_gets_no_calls_while_another_serves() {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let mut balancer = Balancer::new(tx, Endpoints::new(|e| e, None), CancellationToken::new());
        let [a, b, c] = addrs();
        assert!(balancer.resolved([a, b].into()).await);
        assert!(balancer.health(a, false).await, "a drains");
        assert!(balancer.health(c, false).await, "not resolved: ignored");
        assert!(balancer.health(a, true).await, "a serves again");
        assert!(balancer.health(a, false).await);
        assert!(balancer.health(b, false).await, "none serves: all are used");
        drop(balancer);
        assert_eq!(
            changes(&mut rx).await,
            [
                "+10.0.0.1:50051",
                "+10.0.0.2:50051",
                "-10.0.0.1:50051",
                "+10.0.0.1:50051",
                "-10.0.0.1:50051",
                "+10.0.0.1:50051"
            ]
        );
    }

    fn addrs() -> [SocketAddr; 3] {
        ["10.0.0.1:50051", "10.0.0.2:50051", "10.0.0.3:50051"].map(|a| a.parse().unwrap())
    }

    async fn changes(rx: &mut tokio::sync::mpsc::Receiver<Change<SocketAddr, Endpoint>>) -> Vec<String> {
        let mut seen = Vec::new();
        while let Some(change) = rx.recv().await {
            seen.push(match change {
                Change::Insert(addr, _) => format!("+{addr}"),
                Change::Remove(addr) => format!("-{addr}"),
            });
        }
        seen
    }
}
