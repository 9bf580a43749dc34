//! Test harness for end-to-end tests: a fresh Postgres database per cluster, the real
//! `chat-message` and `chat-gateway` binaries on free ports, and a WebSocket client
//! that speaks the protocol.
//!
//! A test starts a cluster with `Cluster::builder()`, talks to it with `WsClient` and the
//! `http` helpers, reads `/metrics` with `Metrics::scrape`, and waits for anything that
//! happens on its own time with `eventually` — never with a bare sleep.

mod cluster;
mod db;
mod http;
pub mod manifests;
mod metrics;
pub mod otlp;
mod process;
mod proxy;
mod reliable;
mod servers;
mod shared;
mod tokens;
mod unique;
mod wait;
pub mod webhook_receiver;
mod ws;

pub use cluster::{Cluster, ClusterBuilder, Replica};
pub use db::TestDb;
pub use http::{http, http_get, http_json, HttpReply};
pub use metrics::Metrics;
pub use process::bin;
pub use proxy::HoldingProxy;
pub use reliable::{send_reliably, Follower};
pub use servers::{PgServer, RedisCluster, RedisServer};
pub use shared::{postgres_base, redis_url};
pub use tokens::{token, token_with, SECRET};
pub use unique::{free_port, unique};
pub use wait::{eventually, give_up, GiveUp, Outcome, WAIT};
pub use ws::{small_buffer_member, WsClient};
