//! Reconnect: N clients in rooms while traffic flows; one gateway is killed; its clients
//! reconnect to the others and rejoin with `since_seq`. Reports the time until the last
//! one is back and the messages lost.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

use crate::client::{self, Target};
use crate::progress;

/// How long a follower may take, after traffic stops, to receive its room's last message
/// before the rest counts as lost.
const CATCH_UP: Duration = Duration::from_secs(15);

/// What the followers report back.
#[derive(Default)]
struct Shared {
    /// Milliseconds from the kill to each rejoin after it.
    recoveries: Mutex<Vec<f64>>,
    /// Followers whose connection dropped after the kill.
    dropped: AtomicU64,
    /// Followers currently connected and joined.
    joined: AtomicU64,
}

/// `rooms` × `members` followers over every gateway but the last; one sender per room on
/// the last gateway at `rate` messages/s in total; gateway process `kill_pid` is killed
/// after `warmup`.
pub async fn run(
    target: &Target,
    rooms: usize,
    members: usize,
    rate: f64,
    kill_pid: u32,
    warmup: Duration,
) -> Result<Value> {
    anyhow::ensure!(target.gateways.len() >= 2, "reconnect needs at least two gateways");
    let survivor = target.gateways.len() - 1;
    let shared = Arc::new(Shared::default());
    // `None` while traffic runs; then every room's last acknowledged seq, which each
    // follower reads up to (or gives up after CATCH_UP) before it reports.
    let (stop_tx, stop_rx) = watch::channel::<Option<Arc<Vec<i64>>>>(None);
    let kill_at: Arc<Mutex<Option<Instant>>> = Arc::new(Mutex::new(None));

    // Each room's sender is its owner, on the surviving gateway.
    let mut senders = Vec::new();
    let base = rooms * members;
    for r in 0..rooms {
        let mut ws = target.connect(base + r, survivor).await?;
        let others: Vec<String> = (0..members).map(|m| target.user(r * members + m)).collect();
        let reply =
            client::request(&mut ws, json!({"type": "create_room", "kind": "group", "members": others}), "c").await?;
        senders.push((reply["room"]["id"].as_str().unwrap_or_default().to_owned(), ws));
    }

    let bar = progress::bar((rooms * members) as u64, "followers joining");
    let mut followers = Vec::new();
    for (r, (room, _)) in senders.iter().enumerate() {
        for m in 0..members {
            let n = r * members + m;
            // Spread over every gateway but the survivor, so the killed one holds a share.
            let me = Follower { target: target.clone(), n, room: room.clone(), room_index: r, gateway: n % survivor };
            followers.push(tokio::spawn(follow(me, shared.clone(), stop_rx.clone(), kill_at.clone())));
        }
    }
    while shared.joined.load(Ordering::Relaxed) < (rooms * members) as u64 {
        bar.set_position(shared.joined.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bar.finish_and_clear();

    let per_sender = rate / rooms as f64;
    let acked = Arc::new(AtomicU64::new(0));
    let (stop_senders, senders_stop) = watch::channel(false);
    let mut sender_tasks = Vec::new();
    for (room, ws) in senders {
        let (mut stop, acked) = (senders_stop.clone(), acked.clone());
        sender_tasks.push(tokio::spawn(async move {
            let (mut sink, mut stream) = ws.split();
            let mut last_seq = 0i64;
            let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / per_sender.max(0.001)));
            loop {
                tokio::select! {
                    _ = ticker.tick() => {
                        let frame = format!(r#"{{"type":"send","id":"s","room":"{room}","text":"{}"}}"#, client::now_us());
                        if sink.send(Message::Text(frame.into())).await.is_err() { break; }
                    }
                    frame = stream.next() => match frame {
                        Some(Ok(Message::Text(text))) if text.starts_with(r#"{"type":"ack""#) => {
                            if let Some(seq) = serde_json::from_str::<Value>(&text).ok().and_then(|v| v["message"]["seq"].as_i64()) {
                                last_seq = last_seq.max(seq);
                                acked.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Some(Ok(_)) => {}
                        _ => break,
                    },
                    _ = stop.changed() => break,
                }
            }
            let _ = sink.close().await;
            last_seq
        }));
    }

    tokio::time::sleep(warmup).await;
    let killed = std::process::Command::new("kill").args(["-9", &kill_pid.to_string()]).status()?;
    anyhow::ensure!(killed.success(), "could not kill gateway pid {kill_pid}");
    let killed_at = Instant::now();
    if let Ok(mut k) = kill_at.lock() {
        *k = Some(killed_at);
    }
    // Wait until every follower is joined again (or 60 s), then let traffic run a little.
    let bar = progress::bar((rooms * members) as u64, "recovering");
    let deadline = killed_at + Duration::from_secs(60);
    tokio::time::sleep(Duration::from_millis(200)).await;
    while shared.joined.load(Ordering::Relaxed) < (rooms * members) as u64 && Instant::now() < deadline {
        bar.set_position(shared.joined.load(Ordering::Relaxed));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bar.finish_and_clear();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop_senders.send(true);
    let mut final_seqs = Vec::new();
    for task in sender_tasks {
        final_seqs.push(task.await.unwrap_or(0));
    }
    let _ = stop_tx.send(Some(Arc::new(final_seqs.clone())));
    let mut lost = 0i64;
    for (n, task) in followers.into_iter().enumerate() {
        let (last_seen, missing) = task.await.unwrap_or((0, 0));
        lost += missing + (final_seqs[n / members] - last_seen).max(0);
    }
    let mut recoveries = shared.recoveries.lock().map(|r| r.clone()).unwrap_or_default();
    recoveries.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        recoveries.get(((recoveries.len() as f64 * q) as usize).min(recoveries.len().saturating_sub(1))).copied()
    };
    Ok(json!({
        "scenario": "reconnect",
        "clients": rooms * members,
        "rooms": rooms,
        "rate": rate,
        "dropped": shared.dropped.load(Ordering::Relaxed),
        "recovered": recoveries.len(),
        "recovery_p50_ms": pick(0.5),
        "recovery_p99_ms": pick(0.99),
        "recovery_max_ms": recoveries.last().copied(),
        "messages_sent": acked.load(Ordering::Relaxed),
        "lost": lost,
    }))
}

/// Who a follower is and where it starts.
struct Follower {
    target: Target,
    n: usize,
    room: String,
    room_index: usize,
    gateway: usize,
}

/// One follower: joined to `room`, tracking seqs; after a drop, reconnects to the next
/// gateway and rejoins with `since_seq`. Returns (last seq seen, seqs skipped).
async fn follow(
    me: Follower,
    shared: Arc<Shared>,
    mut stop: watch::Receiver<Option<Arc<Vec<i64>>>>,
    kill_at: Arc<Mutex<Option<Instant>>>,
) -> (i64, i64) {
    let (target, room, n, mut gateway) = (&me.target, &me.room, me.n, me.gateway);
    let (mut last, mut missing) = (0i64, 0i64);
    let mut dropped_after_kill = false;
    loop {
        if stop.borrow().is_some() {
            break;
        }
        let Ok(ws) = target.connect(n, gateway).await else {
            gateway += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (mut sink, mut stream) = ws.split();
        let since = if last > 0 { format!(r#","since_seq":{last}"#) } else { String::new() };
        let join = format!(r#"{{"type":"join","id":"j","room":"{room}"{since}}}"#);
        if sink.send(Message::Text(join.into())).await.is_err() {
            gateway += 1;
            continue;
        }
        let mut joined = false;
        loop {
            let frame = tokio::select! {
                frame = stream.next() => frame,
                _ = stop.changed() => {
                    // Read on until this room's last message arrives (or give up).
                    let want = stop.borrow().as_ref().and_then(|f| f.get(me.room_index).copied()).unwrap_or(0);
                    let deadline = tokio::time::sleep(CATCH_UP);
                    tokio::pin!(deadline);
                    while last < want {
                        tokio::select! {
                            frame = stream.next() => match frame {
                                Some(Ok(Message::Text(text))) => track(&text, &mut last, &mut missing),
                                Some(Ok(_)) => {}
                                _ => break,
                            },
                            _ = &mut deadline => break,
                        }
                    }
                    let _ = sink.close().await;
                    return (last, missing);
                }
            };
            match frame {
                Some(Ok(Message::Text(text))) => {
                    if !joined && text.starts_with(r#"{"type":"ack""#) {
                        joined = true;
                        shared.joined.fetch_add(1, Ordering::Relaxed);
                        if dropped_after_kill {
                            if let Some(at) = kill_at.lock().ok().and_then(|k| *k) {
                                if let Ok(mut r) = shared.recoveries.lock() {
                                    r.push(at.elapsed().as_secs_f64() * 1000.0);
                                }
                            }
                        }
                    } else {
                        track(&text, &mut last, &mut missing);
                    }
                }
                Some(Ok(_)) => {}
                _ => break,
            }
        }
        if joined {
            shared.joined.fetch_sub(1, Ordering::Relaxed);
        }
        if !dropped_after_kill && kill_at.lock().ok().and_then(|k| *k).is_some() {
            dropped_after_kill = true;
            shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
        gateway += 1;
    }
    (last, missing)
}

fn track(text: &str, last: &mut i64, missing: &mut i64) {
    if let Some((seq, _)) = client::message_stamp(text) {
        if seq > *last {
            *missing += seq - *last - 1;
            *last = seq;
        }
    }
}
