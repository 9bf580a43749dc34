//! CPU time and memory of the processes under test, read from `/proc`.

use std::collections::HashMap;

/// The processes whose CPU time is charged to a run: fixed pids plus every process whose
/// name matches (resolved at each snapshot, so Postgres backends started during a run
/// count too).
#[derive(Debug, Clone, Default)]
pub struct CpuProbe {
    pids: Vec<u32>,
    names: Vec<String>,
}

/// CPU ticks (user + system) per pid at one moment.
pub type Snapshot = HashMap<u32, u64>;

impl CpuProbe {
    pub fn new(pids: Vec<u32>, names: Vec<String>) -> Self {
        Self { pids, names }
    }

    /// True when there is nothing to measure.
    pub fn is_empty(&self) -> bool {
        self.pids.is_empty() && self.names.is_empty()
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut pids = self.pids.clone();
        for name in &self.names {
            pids.extend(pids_named(name));
        }
        pids.into_iter().filter_map(|pid| cpu_ticks(pid).map(|t| (pid, t))).collect()
    }

    /// CPU seconds spent between two snapshots; a process absent at the start started
    /// during the run and is charged all its time.
    pub fn seconds_between(start: &Snapshot, end: &Snapshot) -> f64 {
        let ticks: u64 = end.iter().map(|(pid, t)| t.saturating_sub(start.get(pid).copied().unwrap_or(0))).sum();
        ticks as f64 / clock_ticks_per_second()
    }
}

/// utime + stime of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces; fields resume after its closing parenthesis.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the name: state is field 3 of stat(5), utime 14 and stime 15.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// Every pid whose `comm` is `name`.
pub fn pids_named(name: &str) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name))
        .collect()
}

/// Resident set size of `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS for pid {pid}"))?;
    Ok(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let me = std::process::id();
        let probe = CpuProbe::new(vec![me], vec![]);
        let start = probe.snapshot();
        assert!(start.contains_key(&me));
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        let end = probe.snapshot();
        assert!(CpuProbe::seconds_between(&start, &end) > 0.0);
        assert!(rss_bytes(me).unwrap() > 1024 * 1024);
    }
}
