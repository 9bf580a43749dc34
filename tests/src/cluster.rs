//! A test cluster: a fresh database, message services and gateways on free ports, all
//! sharing a private Redis channel prefix; built with `Cluster::builder()`.

use std::time::Duration;

use anyhow::{Context, Result};
use tokio::process::Child;

use crate::db::TestDb;
use crate::http::http_get;
use crate::process::{exited, sigterm, spawn_gateway, spawn_message, terminate, Wiring};
use crate::shared::{postgres_base, redis_url};
use crate::tokens::token;
use crate::unique::{free_port, unique};
use crate::wait::{eventually, give_up};
use crate::ws::WsClient;

/// How long a process may take from spawn to ready (migrations included, on a busy machine).
const START_WITHIN: Duration = Duration::from_secs(60);

/// The gRPC health status that means a message service takes calls.
const SERVING: i32 = 1;

/// A further message service of a cluster.
pub struct Replica {
    pub grpc_addr: String,
    /// `host:port` of its `/metrics`.
    pub metrics: String,
    child: Child,
}

impl Replica {
    /// Kills it with SIGKILL.
    pub async fn kill(&mut self) -> Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// Sends SIGTERM, as Kubernetes does to a pod it replaces, and returns while it drains.
    pub fn sigterm(&self) -> Result<()> {
        sigterm(&self.child)
    }

    /// Waits (bounded) for it to exit; its exit code.
    pub async fn exited(&mut self) -> Result<Option<i32>> {
        exited(&mut self.child).await
    }

    /// Its gRPC health status for `service` (`""`: overall).
    pub async fn health(&self, service: &str) -> Result<i32> {
        grpc_health(&self.grpc_addr, service).await
    }
}

/// What a cluster will be; `start` brings it up. By default one gateway and one message
/// service, on the shared Postgres and Redis, with no extra environment.
#[must_use]
pub struct ClusterBuilder {
    gateways: usize,
    replicas: usize,
    postgres: Option<String>,
    database: Option<TestDb>,
    redis: Option<String>,
    env: Vec<(String, String)>,
    fd_soft_limit: Option<u64>,
}

impl ClusterBuilder {
    /// How many gateways to start.
    pub fn gateways(mut self, n: usize) -> Self {
        self.gateways = n;
        self
    }

    /// How many message services to start beside the first; the gateways balance their
    /// calls across all of them.
    pub fn replicas(mut self, n: usize) -> Self {
        self.replicas = n;
        self
    }

    /// The Postgres server (`postgres://user@host:port`) the fresh database is made on.
    pub fn postgres(mut self, base: impl Into<String>) -> Self {
        self.postgres = Some(base.into());
        self
    }

    /// The Redis (or one node of a Redis Cluster) every process uses.
    pub fn redis(mut self, url: impl Into<String>) -> Self {
        self.redis = Some(url.into());
        self
    }

    /// An environment variable for every process of the cluster, set after the defaults
    /// so it can override them.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Uses `db`, prepared by the test (migrated, say), instead of a fresh one.
    pub fn database(mut self, db: TestDb) -> Self {
        self.database = Some(db);
        self
    }

    /// Starts every process with this soft open-file limit, as a container runtime does
    /// (containerd 2.x: 1024).
    pub fn fd_soft_limit(mut self, limit: u64) -> Self {
        self.fd_soft_limit = Some(limit);
        self
    }

    /// Starts everything and waits until every gateway is ready and every message service
    /// serving.
    pub async fn start(self) -> Result<Cluster> {
        let db = match self.database {
            Some(db) => db,
            None => TestDb::on(&self.postgres.unwrap_or_else(postgres_base)),
        };
        let wiring = Wiring {
            redis: self.redis.unwrap_or_else(redis_url),
            // A private channel namespace: other clusters on the same Redis never cross-talk.
            prefix: unique("e2e"),
            env: self.env,
            fd_soft_limit: self.fd_soft_limit,
        };
        let grpc_addr = format!("127.0.0.1:{}", free_port());
        let message_metrics = format!("127.0.0.1:{}", free_port());
        let message = spawn_message(&grpc_addr, &message_metrics, &db.url, &wiring)?;
        let mut replicas = Vec::new();
        for _ in 0..self.replicas {
            let grpc_addr = format!("127.0.0.1:{}", free_port());
            let metrics = format!("127.0.0.1:{}", free_port());
            let child = spawn_message(&grpc_addr, &metrics, &db.url, &wiring)?;
            replicas.push(Replica { grpc_addr, metrics, child });
        }
        let message_urls: Vec<String> = std::iter::once(&grpc_addr)
            .chain(replicas.iter().map(|r| &r.grpc_addr))
            .map(|a| format!("http://{a}"))
            .collect();
        let message_urls = message_urls.join(",");
        let mut gateway_procs = Vec::new();
        let mut gateways = Vec::new();
        for _ in 0..self.gateways {
            let addr = format!("127.0.0.1:{}", free_port());
            gateway_procs.push(spawn_gateway(&addr, &message_urls, &wiring)?);
            gateways.push(addr);
        }
        let mut cluster = Cluster {
            message_metrics,
            grpc_addr,
            gateways,
            replicas,
            message_urls,
            wiring,
            message,
            gateway_procs,
            db,
        };
        for gw in cluster.gateways.clone() {
            cluster.wait_ready(&gw).await?;
        }
        // A gateway is ready once one message service answers; a test about several
        // needs every one of them up, or calls balanced to a late one fail `unavailable`.
        for replica in &cluster.replicas {
            wait_serving(&replica.grpc_addr).await?;
        }
        Ok(cluster)
    }
}

/// Message services and gateways on free ports, against a fresh database.
pub struct Cluster {
    /// `host:port` of the message service's `/metrics`.
    pub message_metrics: String,
    pub grpc_addr: String,
    pub gateways: Vec<String>,
    /// Message services beyond the first (see `ClusterBuilder::replicas`).
    pub replicas: Vec<Replica>,
    /// What the gateways' `MESSAGE_SERVICE_URL` is, for restarts.
    message_urls: String,
    wiring: Wiring,
    // Fields drop in order: the processes die before their database is dropped.
    message: Child,
    gateway_procs: Vec<Child>,
    pub db: TestDb,
}

/// Waits (bounded) until the message service at `addr` reports SERVING.
async fn wait_serving(addr: &str) -> Result<()> {
    eventually(START_WITHIN, async || -> Result<()> {
        let status = grpc_health(addr, "").await?;
        anyhow::ensure!(status == SERVING, "health status {status}");
        Ok(())
    })
    .await
    .with_context(|| format!("message service {addr} not serving within {START_WITHIN:?}"))
}

/// The gRPC health status of `service` (`""`: overall) at `addr`.
async fn grpc_health(addr: &str, service: &str) -> Result<i32> {
    let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))?.connect().await?;
    let mut client = tonic_health::pb::health_client::HealthClient::new(channel);
    let request = tonic_health::pb::HealthCheckRequest { service: service.to_owned() };
    Ok(client.check(request).await?.into_inner().status)
}

impl Cluster {
    /// A cluster of one gateway and one message service, until told otherwise.
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder {
            gateways: 1,
            replicas: 0,
            postgres: None,
            database: None,
            redis: None,
            env: Vec::new(),
            fd_soft_limit: None,
        }
    }

    /// Waits (bounded) until gateway `gw` answers `/readyz` with 200; fails at once if a
    /// process of the cluster has died meanwhile.
    async fn wait_ready(&mut self, gw: &str) -> Result<()> {
        eventually(START_WITHIN, async || -> Result<()> {
            let ready = http_get(gw, "/readyz").await;
            if let Ok((200, _)) = ready {
                return Ok(());
            }
            if let Some(status) = self.message.try_wait().map_err(give_up)? {
                return Err(give_up(format!("chat-message exited early: {status}")));
            }
            for p in &mut self.gateway_procs {
                if let Some(status) = p.try_wait().map_err(give_up)? {
                    return Err(give_up(format!("chat-gateway exited early: {status}")));
                }
            }
            let (status, body) = ready?;
            anyhow::bail!("/readyz answered {status}: {body}")
        })
        .await
        .with_context(|| format!("gateway {gw} not ready within {START_WITHIN:?}"))
    }

    /// Kills the message service (SIGKILL) and starts it again on the same port.
    pub async fn restart_message_service(&mut self) -> Result<()> {
        self.message.kill().await?;
        self.message = spawn_message(&self.grpc_addr, &self.message_metrics, &self.db.url, &self.wiring)?;
        Ok(())
    }

    /// Kills the message service (SIGKILL) and starts it again on the same port with `env`
    /// on top of the cluster's.
    pub async fn restart_message_service_with(&mut self, env: &[(&str, &str)]) -> Result<()> {
        self.message.kill().await?;
        let mut wiring = self.wiring.clone();
        wiring.env.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
        self.message = spawn_message(&self.grpc_addr, &self.message_metrics, &self.db.url, &wiring)?;
        Ok(())
    }

    /// The message service's gRPC health status for `service` (`""`: overall).
    pub async fn message_health(&self, service: &str) -> Result<i32> {
        grpc_health(&self.grpc_addr, service).await
    }

    /// Process id of gateway `i`, while it runs.
    pub fn gateway_pid(&self, i: usize) -> Option<u32> {
        self.gateway_procs[i].id()
    }

    /// Kills gateway `i` with SIGKILL: no drain, no clean-up.
    pub async fn kill_gateway(&mut self, i: usize) -> Result<()> {
        self.gateway_procs[i].kill().await?;
        Ok(())
    }

    /// Sends SIGTERM to gateway `i` and waits (bounded) for it to exit; its exit code.
    pub async fn terminate_gateway(&mut self, i: usize) -> Result<Option<i32>> {
        terminate(&mut self.gateway_procs[i]).await
    }

    /// Stops gateway `i` with SIGTERM (its clients get `reconnect` and close 1012), starts
    /// it again on the same address and waits until it is ready.
    pub async fn restart_gateway(&mut self, i: usize) -> Result<()> {
        terminate(&mut self.gateway_procs[i]).await?;
        let addr = self.gateways[i].clone();
        self.gateway_procs[i] = spawn_gateway(&addr, &self.message_urls, &self.wiring)?;
        self.wait_ready(&addr).await
    }

    /// Sends SIGTERM to the message service and waits (bounded) for it; its exit code.
    pub async fn terminate_message_service(&mut self) -> Result<Option<i32>> {
        terminate(&mut self.message).await
    }

    /// Starts a further message service at `grpc_addr` (one the gateways may already be
    /// configured with) and waits until it serves.
    pub async fn add_replica(&mut self, grpc_addr: &str) -> Result<()> {
        let metrics = format!("127.0.0.1:{}", free_port());
        let child = spawn_message(grpc_addr, &metrics, &self.db.url, &self.wiring)?;
        self.replicas.push(Replica { grpc_addr: grpc_addr.to_owned(), metrics, child });
        wait_serving(grpc_addr).await
    }

    /// Starts replica `i` again, after it exited, at its address, and waits until it
    /// serves.
    pub async fn respawn_replica(&mut self, i: usize) -> Result<()> {
        let replica = &mut self.replicas[i];
        replica.child = spawn_message(&replica.grpc_addr, &replica.metrics, &self.db.url, &self.wiring)?;
        wait_serving(&replica.grpc_addr).await
    }

    /// Starts one more gateway on the cluster's message services with `env` on top of the
    /// cluster's, and waits until it is ready; its index.
    pub async fn add_gateway_with(&mut self, env: &[(&str, String)]) -> Result<usize> {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut wiring = self.wiring.clone();
        wiring.env.extend(env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
        self.gateway_procs.push(spawn_gateway(&addr, &self.message_urls, &wiring)?);
        self.gateways.push(addr.clone());
        self.wait_ready(&addr).await?;
        Ok(self.gateways.len() - 1)
    }

    /// Starts one more gateway that calls the message service at `message_url` (a proxy
    /// in front of it, say) instead of the cluster's own, and waits until it is ready;
    /// its index. (`restart_gateway` brings it back on the cluster's own URLs.)
    pub async fn add_gateway(&mut self, message_url: &str) -> Result<usize> {
        let addr = format!("127.0.0.1:{}", free_port());
        self.gateway_procs.push(spawn_gateway(&addr, message_url, &self.wiring)?);
        self.gateways.push(addr.clone());
        self.wait_ready(&addr).await?;
        Ok(self.gateways.len() - 1)
    }

    /// The `ws://` URL of gateway `i`.
    pub fn ws_url(&self, i: usize) -> String {
        format!("ws://{}/ws", self.gateways[i])
    }

    /// Connects `user` to gateway `i` with a header token and reads the welcome.
    pub async fn client(&self, i: usize, user: &str) -> Result<WsClient> {
        self.client_with(i, &token(user)).await
    }

    /// Connects to gateway `i` with this token and reads the welcome.
    pub async fn client_with(&self, i: usize, token: &str) -> Result<WsClient> {
        let (client, welcome) = WsClient::connect_bearer(&self.ws_url(i), token).await?;
        anyhow::ensure!(welcome["type"] == "welcome", "expected welcome, got {welcome}");
        Ok(client)
    }
}

impl Drop for Cluster {
    /// The processes die with their handles (SIGKILL), leaving presence keys behind in
    /// Redis: remove everything under this cluster's private prefix.
    fn drop(&mut self) {
        let script = format!(
            "redis-cli -u {url} --scan --pattern '{prefix}:*' | xargs -r redis-cli -u {url} del >/dev/null",
            url = self.wiring.redis,
            prefix = self.wiring.prefix
        );
        let _ = std::process::Command::new("sh").args(["-c", &script]).status();
    }
}
