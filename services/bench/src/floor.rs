//! The floor under every delivery: what one non-blocking `send()` of a frame costs on a
//! loopback TCP socket on this machine, the receiving side's kernel work and its `read`
//! included. Delivery costs are reported as multiples of it: no server can deliver a
//! frame to a socket for less.
//!
//! One sender thread writes frames to one socket at a fixed rate (in 1 ms batches, as a
//! server writes whatever is ready at each wake-up); one reader thread reads them as they
//! come. The CPU time of the whole process over the run, divided by the frames sent, is
//! the floor: it holds both syscalls, the loopback's softirq work, and the wake-ups.

use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use serde_json::{json, Value};

use crate::procstat::CpuProbe;

/// Sends `rate` frames of `frame_bytes` a second for `seconds`, and measures.
pub fn run(frame_bytes: usize, rate: u64, seconds: u64) -> Result<Value> {
    ensure!(frame_bytes > 0 && rate >= 1000 && seconds > 0, "frames of 1+ bytes, at 1000/s or more, for 1+ s");
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let sender = TcpStream::connect(listener.local_addr()?)?;
    let (mut receiver, _) = listener.accept()?;
    sender.set_nodelay(true)?;
    sender.set_nonblocking(true)?;
    let frames = rate * seconds;
    let expected = frames * frame_bytes as u64;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut got = 0u64;
        while got < expected {
            match receiver.read(&mut buf)? {
                0 => break,
                n => got += n as u64,
            }
        }
        Ok(got)
    });

    let frame = vec![b'x'; frame_bytes];
    let per_batch = rate / 1000;
    let probe = CpuProbe::new(vec![std::process::id()], Vec::new());
    let cpu_start = probe.snapshot();
    let started = Instant::now();
    let (mut sent, mut would_block) = (0u64, 0u64);
    let mut next = started;
    while sent < frames {
        for _ in 0..per_batch.min(frames - sent) {
            let mut written = 0;
            while written < frame.len() {
                match (&sender).write(&frame[written..]) {
                    Ok(n) => written += n,
                    // The reader fell behind: a real server would queue; count and retry.
                    Err(err) if err.kind() == ErrorKind::WouldBlock => {
                        would_block += 1;
                        std::thread::yield_now();
                    }
                    Err(err) => return Err(err.into()),
                }
            }
            sent += 1;
        }
        next += Duration::from_millis(1);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let received = reader.join().map_err(|_| anyhow::anyhow!("the reader panicked"))??;
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_seconds = CpuProbe::seconds_between(&cpu_start, &probe.snapshot());
    ensure!(received == expected, "received {received} of {expected} bytes");
    Ok(json!({
        "scenario": "floor",
        "frame_bytes": frame_bytes,
        "rate": rate,
        "frames": sent,
        "seconds": elapsed,
        "would_block": would_block,
        "cpu_seconds": cpu_seconds,
        "cpu_us_per_send": cpu_seconds * 1e6 / sent as f64,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_frame_sent_is_received_and_its_cost_measured() {
        let summary = run(300, 2000, 1).expect("a loopback socket works");
        assert_eq!(summary["frames"], 2000);
        assert!(summary["cpu_us_per_send"].as_f64().is_some_and(|us| us >= 0.0), "{summary}");
    }
}
