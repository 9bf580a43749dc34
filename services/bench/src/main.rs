//! `chat-bench`: load scenarios against a running cluster, over real sockets and the real
//! protocol. Each prints a progress bar on stderr and one JSON line on stdout; `report`
//! turns a run's lines into `docs/benchmarks.md`.

mod client;
mod fanout;
mod floor;
mod idle;
mod persist;
mod procstat;
mod progress;
mod reconnect;
mod report;
mod search;

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use serde_json::Value;

use crate::client::Target;
use crate::procstat::CpuProbe;

#[derive(Parser)]
#[command(about = "Load generator for the chat cluster")]
struct Cli {
    #[command(subcommand)]
    command: Scenario,
}

#[derive(Args, Clone)]
struct Common {
    /// Gateways (or a load balancer), `host:port`, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:8080,127.0.0.1:8081")]
    gateways: Vec<String>,
    /// HS256 secret of the gateways' tokens.
    #[arg(long, env = "JWT_SECRET", default_value = "dev-secret-change-me", hide_env_values = true)]
    secret: String,
    /// Source addresses to spread connections over (e.g. 127.0.0.2,127.0.0.3).
    #[arg(long, value_delimiter = ',')]
    sources: Vec<IpAddr>,
    /// Pids of the processes under test, for CPU per delivery.
    #[arg(long, value_delimiter = ',')]
    pids: Vec<u32>,
    /// Process names under test, resolved at each measurement (e.g. postgres,redis-server).
    #[arg(long, value_delimiter = ',')]
    pid_names: Vec<String>,
    /// Append the JSON summary to this file too.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// Rooms and members of a fan-out.
#[derive(Args, Clone, Copy)]
struct Shape {
    #[arg(long, default_value_t = 100)]
    rooms: usize,
    #[arg(long, default_value_t = 100)]
    members: usize,
}

#[derive(Subcommand)]
enum Scenario {
    /// R rooms × M members, one sender per room, a fixed total rate for T seconds.
    Fanout {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        shape: Shape,
        /// Messages per second, all rooms together.
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Name of the result (e.g. `light`).
        #[arg(long, default_value = "fanout")]
        name: String,
    },
    /// Fan-out at rising rates: the highest deliveries/s with p99 under the limit and no loss.
    Ramp {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        shape: Shape,
        /// Message rates to try, in order.
        #[arg(long, value_delimiter = ',', default_value = "250,500,1000,1500,2000")]
        rates: Vec<f64>,
        #[arg(long, default_value_t = 8)]
        seconds: u64,
        #[arg(long, default_value_t = 50.0)]
        p99_limit_ms: f64,
    },
    /// N idle authenticated connections on the first gateway; its RSS per connection.
    Idle {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 10_000)]
        connections: usize,
        /// Pid of the first gateway.
        #[arg(long)]
        gateway_pid: u32,
    },
    /// Acknowledged sends/s and ack latency, every sender keeping a window in flight.
    Persist {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 100)]
        rooms: usize,
        #[arg(long, default_value_t = 200)]
        senders: usize,
        /// Sends each sender keeps in flight (closed loop) ...
        #[arg(long, default_value_t = 4)]
        window: usize,
        /// ... or, given, the total sends per second offered on a fixed schedule (open loop).
        #[arg(long)]
        rate: Option<f64>,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Clients lose their gateway (killed) and rejoin elsewhere with `since_seq`.
    Reconnect {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 100)]
        rooms: usize,
        #[arg(long, default_value_t = 20)]
        members: usize,
        #[arg(long, default_value_t = 200.0)]
        rate: f64,
        /// Pid of the gateway to kill (the first of --gateways).
        #[arg(long)]
        kill_pid: u32,
        #[arg(long, default_value_t = 3)]
        warmup_seconds: u64,
    },
    /// One-word `search` commands over a store seeded straight into the cluster's
    /// database: round-trip latency through the gateways (#19).
    Search {
        #[command(flatten)]
        common: Common,
        /// The cluster's database (already migrated by the message service), to seed with
        /// `psql`.
        #[arg(long, env = "BENCH_DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// Messages to seed, spread evenly over the rooms.
        #[arg(long, default_value_t = 1_000_000)]
        messages: u64,
        #[arg(long, default_value_t = 1_000)]
        rooms: u64,
        /// Rooms each searching client is a member of.
        #[arg(long, default_value_t = 100)]
        member_of: u64,
        /// Concurrent searching clients, one query in flight each.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Queries of the ~1% words (a tenth as many of a rare and of a frequent word follow) ...
        #[arg(long, default_value_t = 3_000)]
        queries: u64,
        /// ... or as many as these seconds allow (a quarter of them each for the other two).
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// The floor: CPU µs of one non-blocking send() of a frame on loopback TCP, the
    /// receiving side included (no cluster needed).
    Floor {
        #[arg(long, default_value_t = 300)]
        frame_bytes: usize,
        /// Frames per second.
        #[arg(long, default_value_t = 20_000)]
        rate: u64,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Append the JSON summary to this file too.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Writes the benchmark report from a run's JSON lines.
    Report(report::ReportArgs),
}

fn target(common: &Common) -> Target {
    let run = format!("b{}", chrono::Utc::now().format("%H%M%S%3f"));
    Target { gateways: common.gateways.clone(), secret: common.secret.clone(), sources: common.sources.clone(), run }
}

fn emit(common: &Common, summary: Value) -> Result<()> {
    emit_to(common.out.as_ref(), summary)
}

fn emit_to(out: Option<&PathBuf>, mut summary: Value) -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    summary["command"] = Value::from(args.join(" "));
    let line = summary.to_string();
    println!("{line}");
    if let Some(path) = out {
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        writeln!(file, "{line}")?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    match Cli::parse().command {
        Scenario::Fanout { common, shape, rate, seconds, name } => {
            let cpu = CpuProbe::new(common.pids.clone(), common.pid_names.clone());
            let mut setup = fanout::Setup::new(&target(&common), shape.rooms, shape.members).await?;
            let phase = setup.phase(rate, Duration::from_secs(seconds), Duration::from_secs(10), &cpu).await?;
            emit(&common, fanout::summary(&name, &setup, &phase))?;
            setup.close().await;
        }
        Scenario::Ramp { common, shape, rates, seconds, p99_limit_ms } => {
            let cpu = CpuProbe::new(common.pids.clone(), common.pid_names.clone());
            let mut setup = fanout::Setup::new(&target(&common), shape.rooms, shape.members).await?;
            let mut steps = Vec::new();
            let mut best: Option<f64> = None;
            for rate in rates {
                let phase = setup.phase(rate, Duration::from_secs(seconds), Duration::from_secs(10), &cpu).await?;
                let ok = phase.loss == 0 && phase.refused == 0 && phase.p99_ms <= p99_limit_ms;
                eprintln!(
                    "ramp {rate:>6.0} msg/s: {:>9.0} deliveries/s  p99 {:>7.1} ms  loss {}",
                    phase.deliveries_per_s, phase.p99_ms, phase.loss
                );
                if ok {
                    best = Some(best.unwrap_or(0.0).max(phase.deliveries_per_s));
                }
                steps.push(phase);
                if !ok {
                    break;
                }
            }
            let summary = serde_json::json!({
                "scenario": "ramp",
                "rooms": shape.rooms,
                "members": shape.members,
                "p99_limit_ms": p99_limit_ms,
                "best_deliveries_per_s": best,
                "steps": steps,
            });
            emit(&common, summary)?;
            setup.close().await;
        }
        Scenario::Idle { common, connections, gateway_pid } => {
            emit(&common, idle::run(&target(&common), connections, gateway_pid).await?)?;
        }
        Scenario::Persist { common, rooms, senders, window, rate, seconds } => {
            let cpu = CpuProbe::new(common.pids.clone(), common.pid_names.clone());
            let load = match rate {
                Some(rate) if rate > 0.0 => persist::Load::Rate(rate),
                Some(_) => anyhow::bail!("--rate must be above 0"),
                None => persist::Load::Window(window),
            };
            let summary =
                persist::run(&target(&common), rooms, senders, load, Duration::from_secs(seconds), &cpu).await?;
            emit(&common, summary)?;
        }
        Scenario::Reconnect { common, rooms, members, rate, kill_pid, warmup_seconds } => {
            let summary =
                reconnect::run(&target(&common), rooms, members, rate, kill_pid, Duration::from_secs(warmup_seconds))
                    .await?;
            emit(&common, summary)?;
        }
        Scenario::Search { common, database_url, messages, rooms, member_of, clients, queries, seconds } => {
            let cpu = CpuProbe::new(common.pids.clone(), common.pid_names.clone());
            let corpus = search::Corpus { messages, rooms, member_of };
            let load = search::Load { clients, queries, within: Duration::from_secs(seconds) };
            emit(&common, search::run(&target(&common), &database_url, corpus, load, &cpu).await?)?;
        }
        Scenario::Floor { frame_bytes, rate, seconds, out } => {
            let summary = tokio::task::spawn_blocking(move || floor::run(frame_bytes, rate, seconds)).await??;
            emit_to(out.as_ref(), summary)?;
        }
        Scenario::Report(args) => report::write(&args)?,
    }
    Ok(())
}
