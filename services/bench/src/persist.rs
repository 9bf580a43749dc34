//! Persist: acknowledged sends per second and ack latency, spread over many rooms or all
//! in one hot room. Closed loop (every sender keeps a window of sends in flight: the
//! highest rate) or open loop (a fixed total send rate, whatever the acks do: the
//! latency a given load sees).

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::Semaphore;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Target};
use crate::fanout::histogram;
use crate::procstat::CpuProbe;
use crate::progress;

/// How the senders pace their sends.
#[derive(Clone, Copy)]
pub enum Load {
    /// Each sender keeps this many sends in flight.
    Window(usize),
    /// All senders together offer this many sends per second, each on its own fixed
    /// schedule. A send's latency counts from when it was due, not when it went out, so
    /// a slow server can't hide its queueing by slowing the sender (coordinated omission).
    Rate(f64),
}

/// One open-loop sender's timetable: sends every `period`, starting at `offset`.
#[derive(Clone, Copy, Debug)]
struct Schedule {
    period: Duration,
    offset: Duration,
}

impl Schedule {
    /// Sender `n` of `senders`, which together offer `rate` sends/s. Each one's start is
    /// offset by n/senders of a period, so their sends interleave evenly rather than all
    /// falling on one tick.
    fn new(rate: f64, senders: usize, n: usize) -> Self {
        let period = Duration::from_secs_f64(senders as f64 / rate);
        Self { period, offset: period.mul_f64(n as f64 / senders as f64) }
    }

    /// When send `k` (from 0) is due, from the start.
    fn due(&self, k: u32) -> Duration {
        self.offset + self.period * k
    }
}

/// `senders` connections over `rooms` rooms, loaded as `load` says, for `duration`.
pub async fn run(
    target: &Target,
    rooms: usize,
    senders: usize,
    load: Load,
    duration: Duration,
    cpu: &CpuProbe,
) -> Result<Value> {
    let bar = progress::bar(senders as u64, "connecting");
    let mut conns = Vec::new();
    for n in 0..senders {
        conns.push(target.connect(n, n).await?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    // Room r holds every sender n with n % rooms == r; its first sender creates it.
    let mut room_ids = Vec::new();
    for (r, owner) in conns.iter_mut().enumerate().take(rooms) {
        let members: Vec<String> = (r..senders).step_by(rooms).skip(1).map(|n| target.user(n)).collect();
        let reply =
            client::request(owner, json!({"type": "create_room", "kind": "group", "members": members}), "c").await?;
        room_ids.push(reply["room"]["id"].as_str().unwrap_or_default().to_owned());
    }

    let latencies = Arc::new(Mutex::new(histogram()));
    let acked = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let offered = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let cpu_start = cpu.snapshot();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (n, ws) in conns.into_iter().enumerate() {
        let room = room_ids[n % room_ids.len()].clone();
        let (mut sink, mut stream) = ws.split();
        let permits = Arc::new(Semaphore::new(match load {
            Load::Window(window) => window,
            Load::Rate(_) => 0,
        }));
        // Sent and not yet answered: the reader stops once the sender has and this is 0.
        let outstanding = Arc::new(AtomicI64::new(0));
        let (latencies, acked, refused) = (latencies.clone(), acked.clone(), refused.clone());
        let reader_stop = stop.clone();
        let reader_permits = permits.clone();
        let reader_outstanding = outstanding.clone();
        // This sender's latencies, shared with its reader: a reader given up on (acks
        // still owed 10 s after the end) loses none that it recorded.
        let local = Arc::new(Mutex::new(histogram()));
        let reader_local = local.clone();
        let mut reader = tokio::spawn(async move {
            while let Some(Ok(Message::Text(text))) = stream.next().await {
                // The id is the send time: the ack's latency needs no lookup.
                let Ok(reply) = serde_json::from_str::<Value>(&text) else { continue };
                let Some(sent) = reply["id"].as_str().and_then(|id| id.parse::<i64>().ok()) else { continue };
                if reply["type"] == "ack" {
                    if let Ok(mut h) = reader_local.lock() {
                        let _ = h.record((client::now_us() - sent).max(1) as u64);
                    }
                    acked.fetch_add(1, Ordering::Relaxed);
                } else {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                if matches!(load, Load::Window(_)) {
                    reader_permits.add_permits(1);
                }
                if reader_outstanding.fetch_sub(1, Ordering::AcqRel) == 1 && reader_stop.load(Ordering::Acquire) {
                    break;
                }
            }
        });
        let stop = stop.clone();
        let offered = offered.clone();
        let schedule = match load {
            Load::Window(_) => None,
            Load::Rate(rate) => Some(Schedule::new(rate, senders, n)),
        };
        tasks.push(tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let start_us = client::now_us();
            let mut sent = 0u32;
            while !stop.load(Ordering::Relaxed) {
                // When this send is due, as the id that its latency is measured from.
                let due_us = match schedule {
                    None => {
                        let Ok(permit) = permits.acquire().await else { break };
                        permit.forget();
                        client::now_us()
                    }
                    Some(schedule) => {
                        let due = schedule.due(sent);
                        tokio::time::sleep_until(start + due).await;
                        start_us + due.as_micros() as i64
                    }
                };
                sent += 1;
                outstanding.fetch_add(1, Ordering::AcqRel);
                offered.fetch_add(1, Ordering::Relaxed);
                let frame = format!(r#"{{"type":"send","id":"{due_us}","room":"{room}","text":"{due_us}"}}"#);
                if sink.send(Message::Text(frame.into())).await.is_err() {
                    break;
                }
            }
            if outstanding.load(Ordering::Acquire) > 0 {
                let _ = tokio::time::timeout(Duration::from_secs(10), &mut reader).await;
            }
            reader.abort();
            if let (Ok(mut all), Ok(local)) = (latencies.lock(), local.lock()) {
                let _ = all.add(&*local);
            }
            let _ = sink.close().await;
        }));
    }
    let bar = progress::bar(duration.as_secs(), &format!("persist, {rooms} room(s)"));
    for _ in 0..duration.as_secs() {
        tokio::time::sleep(Duration::from_secs(1)).await;
        bar.inc(1);
    }
    let elapsed = started.elapsed();
    let acked_in_window = acked.load(Ordering::Relaxed);
    let offered_in_window = offered.load(Ordering::Relaxed);
    stop.store(true, Ordering::Release);
    bar.finish_and_clear();
    for task in tasks {
        let _ = task.await;
    }
    let cpu_s = CpuProbe::seconds_between(&cpu_start, &cpu.snapshot());
    let h = latencies.lock().map(|h| h.clone()).unwrap_or_else(|_| histogram());
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    let (scenario, window, rate) = match load {
        Load::Window(window) => (if rooms == 1 { "persist-hot-room" } else { "persist" }, Some(window), None),
        Load::Rate(rate) => ("persist-open", None, Some(rate)),
    };
    Ok(json!({
        "scenario": scenario,
        "rooms": room_ids.len(),
        "senders": senders,
        "window": window,
        "offered_per_s": rate,
        "sent": offered_in_window,
        "duration_s": elapsed.as_secs_f64(),
        "acked": acked_in_window,
        "refused": refused.load(Ordering::Relaxed),
        "acks_per_s": acked_in_window as f64 / elapsed.as_secs_f64(),
        "ack_p50_ms": ms(0.5),
        "ack_p99_ms": ms(0.99),
        "ack_max_ms": h.max() as f64 / 1000.0,
        "cpu_us_per_send": (!cpu.is_empty() && acked_in_window > 0).then(|| cpu_s * 1e6 / acked_in_window as f64),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_loop_senders_together_offer_the_rate_on_interleaved_ticks() {
        let (rate, senders) = (10_000.0, 200);
        let horizon = Duration::from_secs(1);
        let mut dues: Vec<Duration> = (0..senders)
            .flat_map(|n| {
                let schedule = Schedule::new(rate, senders, n);
                (0..).map(move |k| schedule.due(k)).take_while(move |due| *due < horizon)
            })
            .collect();
        assert_eq!(dues.len(), 10_000, "one second holds the offered rate's sends");
        dues.sort();
        let gaps: Vec<Duration> = dues.windows(2).map(|w| w[1] - w[0]).collect();
        let largest = gaps.iter().max().copied().unwrap_or_default();
        assert!(largest <= Duration::from_micros(101), "evenly spread, not bunched on one tick: {largest:?}");
    }
}
