//! Persist: acknowledged sends per second and ack latency, every sender keeping a window
//! of sends in flight, spread over many rooms or all in one hot room.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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

/// `senders` connections over `rooms` rooms, each with `window` sends in flight, for
/// `duration`.
pub async fn run(
    target: &Target,
    rooms: usize,
    senders: usize,
    window: usize,
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
    let stop = Arc::new(AtomicBool::new(false));
    let cpu_start = cpu.snapshot();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (n, ws) in conns.into_iter().enumerate() {
        let room = room_ids[n % room_ids.len()].clone();
        let (mut sink, mut stream) = ws.split();
        let permits = Arc::new(Semaphore::new(window));
        let (latencies, acked, refused) = (latencies.clone(), acked.clone(), refused.clone());
        let reader_stop = stop.clone();
        let reader_permits = permits.clone();
        let reader = tokio::spawn(async move {
            let mut local = histogram();
            while let Some(Ok(Message::Text(text))) = stream.next().await {
                // The id is the send time: the ack's latency needs no lookup.
                let Ok(reply) = serde_json::from_str::<Value>(&text) else { continue };
                let Some(sent) = reply["id"].as_str().and_then(|id| id.parse::<i64>().ok()) else { continue };
                if reply["type"] == "ack" {
                    let _ = local.record((client::now_us() - sent).max(1) as u64);
                    acked.fetch_add(1, Ordering::Relaxed);
                } else {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                reader_permits.add_permits(1);
                if reader_stop.load(Ordering::Relaxed) && reader_permits.available_permits() >= window {
                    break;
                }
            }
            if let Ok(mut h) = latencies.lock() {
                let _ = h.add(&local);
            }
        });
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let Ok(permit) = permits.acquire().await else { break };
                permit.forget();
                let now = client::now_us();
                let frame = format!(r#"{{"type":"send","id":"{now}","room":"{room}","text":"{now}"}}"#);
                if sink.send(Message::Text(frame.into())).await.is_err() {
                    break;
                }
            }
            let _ = tokio::time::timeout(Duration::from_secs(10), reader).await;
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
    stop.store(true, Ordering::Relaxed);
    bar.finish_and_clear();
    for task in tasks {
        let _ = task.await;
    }
    let cpu_s = CpuProbe::seconds_between(&cpu_start, &cpu.snapshot());
    let h = latencies.lock().map(|h| h.clone()).unwrap_or_else(|_| histogram());
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Ok(json!({
        "scenario": if rooms == 1 { "persist-hot-room" } else { "persist" },
        "rooms": room_ids.len(),
        "senders": senders,
        "window": window,
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
