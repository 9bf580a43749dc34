//! Fan-out: R rooms × M members spread over the gateways, S senders at a fixed total
//! rate; every delivery's send → receive latency goes into an HDR histogram.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Target, Ws};
use crate::procstat::CpuProbe;
use crate::progress;

/// Latency shards: readers record into `reader % SHARDS`, so thousands of readers share
/// a few histograms without contending on one lock.
const SHARDS: usize = 64;

/// Microseconds; up to a minute at three significant figures.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| Histogram::new(3).expect("histogram"))
}

/// What every reader records into.
struct Tally {
    shards: Vec<Mutex<Histogram<u64>>>,
    received: AtomicU64,
    acks: AtomicU64,
    refused: AtomicU64,
    stop: AtomicBool,
}

/// Rooms joined by every member, readers running, senders' sinks ready.
pub struct Setup {
    tally: Arc<Tally>,
    /// One sink per room: its first member sends.
    senders: Vec<(String, SplitSink<Ws, Message>)>,
    /// The other members' sinks, kept so their sockets stay open.
    _idle: Vec<SplitSink<Ws, Message>>,
    pub rooms: usize,
    pub members: usize,
}

/// Result of one phase at one rate.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Phase {
    pub rate: f64,
    pub duration_s: f64,
    pub sent: u64,
    pub expected: u64,
    pub received: u64,
    pub loss: u64,
    pub refused: u64,
    pub deliveries_per_s: f64,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub cpu_us_per_delivery: Option<f64>,
}

impl Setup {
    /// Creates `rooms` rooms of `members` users each; member `m` of room `r` connects to
    /// gateway `(r * members + m) % gateways` and joins.
    pub async fn new(target: &Target, rooms: usize, members: usize) -> Result<Self> {
        let tally = Arc::new(Tally {
            shards: (0..SHARDS).map(|_| Mutex::new(histogram())).collect(),
            received: AtomicU64::new(0),
            acks: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let bar = progress::bar((rooms * members) as u64, "connecting and joining");
        let mut senders = Vec::new();
        let mut idle = Vec::new();
        for r in 0..rooms {
            let first = r * members;
            let mut owner = target.connect(first, first).await?;
            let others: Vec<String> = (1..members).map(|m| target.user(first + m)).collect();
            let created =
                client::request(&mut owner, json!({"type": "create_room", "kind": "group", "members": others}), "c")
                    .await?;
            let room = created["room"]["id"].as_str().unwrap_or_default().to_owned();
            client::request(&mut owner, json!({"type": "join", "room": room}), "j").await?;
            bar.inc(1);
            let joins = futures_util::stream::iter(1..members)
                .map(|m| {
                    let room = room.clone();
                    async move {
                        let mut ws = target.connect(first + m, first + m).await?;
                        client::request(&mut ws, json!({"type": "join", "room": room}), "j").await?;
                        anyhow::Ok(ws)
                    }
                })
                .buffer_unordered(64);
            let joined: Vec<Result<Ws>> = joins.inspect(|_| bar.inc(1)).collect().await;
            let (sink, stream) = owner.split();
            spawn_reader(stream, tally.clone(), r);
            senders.push((room.clone(), sink));
            for (i, ws) in joined.into_iter().enumerate() {
                let (sink, stream) = ws?.split();
                spawn_reader(stream, tally.clone(), r * members + i);
                idle.push(sink);
            }
        }
        bar.finish_and_clear();
        Ok(Self { tally, senders, _idle: idle, rooms, members })
    }

    /// Sends `rate` messages/s in total (spread over `senders` rooms' senders) for
    /// `duration`, waits up to `drain` for the deliveries, and reports.
    pub async fn phase(&mut self, rate: f64, duration: Duration, drain: Duration, cpu: &CpuProbe) -> Result<Phase> {
        let tally = &self.tally;
        for shard in &tally.shards {
            if let Ok(mut h) = shard.lock() {
                h.reset();
            }
        }
        tally.received.store(0, Ordering::Relaxed);
        tally.acks.store(0, Ordering::Relaxed);
        tally.refused.store(0, Ordering::Relaxed);
        let cpu_start = cpu.snapshot();
        let started = Instant::now();

        let senders = self.senders.len();
        let per_sender = rate / senders as f64;
        let bar = progress::bar(duration.as_secs(), &format!("{rate:.0} msg/s"));
        let mut tasks = Vec::new();
        for (i, (room, mut sink)) in std::mem::take(&mut self.senders).into_iter().enumerate() {
            tasks.push(tokio::spawn(async move {
                let period = Duration::from_secs_f64(1.0 / per_sender.max(0.001));
                // Spread the senders' first ticks over one period: no synchronized bursts.
                let offset = period.mul_f64(i as f64 / senders as f64);
                let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + offset, period);
                ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let end = tokio::time::Instant::now() + duration;
                let mut sent = 0u64;
                while ticker.tick().await < end {
                    let frame = format!(r#"{{"type":"send","room":"{room}","text":"{}"}}"#, client::now_us());
                    if sink.send(Message::Text(frame.into())).await.is_err() {
                        break;
                    }
                    sent += 1;
                }
                (room, sink, sent)
            }));
        }
        let ticker = tokio::spawn({
            let bar = bar.clone();
            async move {
                for _ in 0..duration.as_secs() {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    bar.inc(1);
                }
            }
        });
        let mut sent = 0;
        for task in tasks {
            let (room, sink, n) = task.await?;
            sent += n;
            self.senders.push((room, sink));
        }
        let _ = ticker.await;
        bar.finish_and_clear();
        let send_time = started.elapsed();

        // Acks tell how many were stored; each reaches every member of its room.
        let deadline = Instant::now() + drain;
        let expected = loop {
            let acks = tally.acks.load(Ordering::Relaxed);
            let expected = acks * self.members as u64;
            let settled = acks + tally.refused.load(Ordering::Relaxed) >= sent;
            if (settled && tally.received.load(Ordering::Relaxed) >= expected) || Instant::now() > deadline {
                break expected;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let received = tally.received.load(Ordering::Relaxed);
        let cpu_end = cpu.snapshot();
        let mut merged = histogram();
        for shard in &tally.shards {
            if let Ok(h) = shard.lock() {
                let _ = merged.add(&*h);
            }
        }
        let ms = |q: f64| merged.value_at_quantile(q) as f64 / 1000.0;
        let cpu_s = CpuProbe::seconds_between(&cpu_start, &cpu_end);
        Ok(Phase {
            rate,
            duration_s: send_time.as_secs_f64(),
            sent,
            expected,
            received,
            loss: expected.saturating_sub(received),
            refused: tally.refused.load(Ordering::Relaxed),
            deliveries_per_s: received as f64 / send_time.as_secs_f64(),
            p50_ms: ms(0.5),
            p95_ms: ms(0.95),
            p99_ms: ms(0.99),
            max_ms: merged.max() as f64 / 1000.0,
            cpu_us_per_delivery: (!cpu.is_empty() && received > 0).then(|| cpu_s * 1e6 / received as f64),
        })
    }

    /// Stops the readers and closes every socket.
    pub async fn close(self) {
        self.tally.stop.store(true, Ordering::Relaxed);
        for (_, mut sink) in self.senders {
            let _ = sink.close().await;
        }
        for mut sink in self._idle {
            let _ = sink.close().await;
        }
    }
}

fn spawn_reader(mut stream: SplitStream<Ws>, tally: Arc<Tally>, n: usize) {
    tokio::spawn(async move {
        let shard = n % SHARDS;
        while let Some(Ok(frame)) = stream.next().await {
            if tally.stop.load(Ordering::Relaxed) {
                return;
            }
            let Message::Text(text) = frame else { continue };
            if let Some((_, sent_us)) = client::message_stamp(&text) {
                let latency = (client::now_us() - sent_us).max(1) as u64;
                if let Ok(mut h) = tally.shards[shard].lock() {
                    let _ = h.record(latency);
                }
                tally.received.fetch_add(1, Ordering::Relaxed);
            } else if text.starts_with(r#"{"type":"ack""#) {
                tally.acks.fetch_add(1, Ordering::Relaxed);
            } else if text.starts_with(r#"{"type":"error""#) {
                tally.refused.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
}

/// The JSON summary of a phase for `scenario`.
pub fn summary(scenario: &str, setup: &Setup, phase: &Phase) -> Value {
    let mut v = serde_json::to_value(phase).unwrap_or_default();
    v["scenario"] = Value::from(scenario);
    v["rooms"] = Value::from(setup.rooms);
    v["members"] = Value::from(setup.members);
    v
}
