//! What no other test in flight holds: free ports and unique names, so tests in parallel
//! threads and concurrent test processes never collide.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// A port that was free a moment ago, for a server a test is about to start.
///
/// Port 0 would hand out ports from the kernel's ephemeral range, where the many
/// outgoing connections of parallel tests also land, so a port could be taken before the
/// server binds it. These come from below that range (32768+ on Linux), each at most once
/// per test process, starting at a pid-derived offset so concurrent test processes rarely
/// probe the same ones.
pub fn free_port() -> u16 {
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let start = (u64::from(std::process::id()) * 7919 % u64::from(SPAN)) as u32;
    let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN)
}

/// `prefix` made unique: for databases, channel prefixes and temporary directories.
pub fn unique(prefix: &str) -> String {
    // Tests in one binary run in parallel threads and may read the same clock value: the
    // counter keeps their names apart, the clock keeps apart runs that reuse a pid.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    format!("{prefix}_{}_{n}_{}", std::process::id(), nanos % 1_000_000_000)
}
