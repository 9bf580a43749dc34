//! Client-side balancing of gRPC calls across every message-service pod.
//!
//! HTTP/2 multiplexes all of a gateway's calls over one long-lived connection, so behind
//! a ClusterIP Service every call of a gateway would land on the one pod that connection
//! reached. Instead the gateway is given a name that resolves to each pod (a headless
//! Service), re-resolves it periodically, and keeps one connection per address in a
//! power-of-two-choices balancer (tonic's `balance_channel`).

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use tokio::sync::mpsc::Sender;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::transport::channel::Change;
use tonic::transport::{Channel, Endpoint, Uri};

/// Changes queued for the balancer; resolution waits when it is full.
const CHANGES: usize = 64;

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

/// A channel balancing over every address of `targets`, kept current by re-resolving
/// them every `refresh` until `shutdown`, in a task on `tasks`. `configure` sets timeouts
/// and keep-alives on each address's endpoint.
pub async fn balanced_channel(
    targets: Targets,
    refresh: Duration,
    configure: impl Fn(Endpoint) -> Endpoint + Send + 'static,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) -> Channel {
    let (channel, changes) = Channel::balance_channel::<SocketAddr>(CHANGES);
    let mut balancer = Balancer { changes, configure: Box::new(configure), current: HashSet::new() };
    // The first set is in place before the first call; later ones follow in the background.
    balancer.update(targets.resolve().await).await;
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(refresh) => {}
                _ = shutdown.cancelled() => return,
            }
            let addrs = targets.resolve().await;
            if !balancer.update(addrs).await {
                return;
            }
        }
    });
    channel
}

struct Balancer {
    changes: Sender<Change<SocketAddr, Endpoint>>,
    configure: Box<dyn Fn(Endpoint) -> Endpoint + Send>,
    current: HashSet<SocketAddr>,
}

impl Balancer {
    /// Makes the balancer's set equal to `addrs`. An empty resolution (DNS down) keeps the
    /// last known pods rather than leaving the gateway with none. False once the channel
    /// is gone.
    async fn update(&mut self, addrs: BTreeSet<SocketAddr>) -> bool {
        if addrs.is_empty() {
            return true;
        }
        let gone: Vec<SocketAddr> = self.current.iter().filter(|a| !addrs.contains(a)).copied().collect();
        for addr in gone {
            tracing::info!(%addr, "message service address removed");
            self.current.remove(&addr);
            if self.changes.send(Change::Remove(addr)).await.is_err() {
                return false;
            }
        }
        for addr in addrs {
            if self.current.contains(&addr) {
                continue;
            }
            let Ok(endpoint) = Endpoint::from_shared(format!("http://{addr}")) else { continue };
            tracing::info!(%addr, "message service address added");
            self.current.insert(addr);
            if self.changes.send(Change::Insert(addr, (self.configure)(endpoint))).await.is_err() {
                return false;
            }
        }
        true
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
        let mut balancer = Balancer { changes: tx, configure: Box::new(|e| e), current: HashSet::new() };
        let a: SocketAddr = "10.0.0.1:50051".parse().unwrap();
        let b: SocketAddr = "10.0.0.2:50051".parse().unwrap();
        let c: SocketAddr = "10.0.0.3:50051".parse().unwrap();
        assert!(balancer.update([a, b].into()).await);
        assert!(balancer.update([b, c].into()).await);
        assert!(balancer.update(BTreeSet::new()).await);
        drop(balancer);
        let mut seen = Vec::new();
        while let Some(change) = rx.recv().await {
            seen.push(match change {
                Change::Insert(addr, _) => format!("+{addr}"),
                Change::Remove(addr) => format!("-{addr}"),
            });
        }
        assert_eq!(seen, ["+10.0.0.1:50051", "+10.0.0.2:50051", "-10.0.0.1:50051", "+10.0.0.3:50051"]);
    }
}
