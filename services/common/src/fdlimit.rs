//! The open-file limit. Every socket is a file descriptor, and a container starts with
//! a soft limit of 1024: a pod spec has no ulimit field, and containerd 2.x no longer
//! raises it. That would cap a gateway at about a thousand connections whatever its
//! memory. Both services raise the soft limit to the hard one at start, log both, and
//! export both with the descriptors open now.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};

/// Where the kernel caps an unlimited hard limit (`fs.nr_open`'s default).
const NR_OPEN_DEFAULT: u64 = 1 << 20;

/// `RLIMIT_NOFILE`; `None` is unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FdLimits {
    pub soft: Option<u64>,
    pub hard: Option<u64>,
}

impl FdLimits {
    /// This process's limits now.
    pub fn current() -> Self {
        let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
        Self { soft: current, hard: maximum }
    }
}

/// Raises the soft limit to the hard limit (to `fs.nr_open`'s default when the hard
/// limit is unlimited, which Linux does not accept as a soft one). The limits before,
/// and the error if the raise failed.
pub fn raise() -> (FdLimits, Result<FdLimits, std::io::Error>) {
    let before = FdLimits::current();
    if before.soft == before.hard {
        return (before, Ok(before));
    }
    let target = before.hard.unwrap_or(NR_OPEN_DEFAULT);
    let raised = setrlimit(Resource::Nofile, Rlimit { current: Some(target), maximum: before.hard })
        .map(|()| FdLimits::current())
        .map_err(std::io::Error::from);
    (before, raised)
}

/// Raises the limit and says so in the log: the first thing to check when a pod holds
/// fewer connections than its memory allows.
pub fn raise_and_log() {
    let shown = |limit: Option<u64>| limit.map_or_else(|| "unlimited".to_owned(), |n| n.to_string());
    match raise() {
        (before, Ok(now)) => tracing::info!(
            soft = %shown(now.soft),
            hard = %shown(now.hard),
            soft_at_start = %shown(before.soft),
            "open-file limit"
        ),
        (before, Err(err)) => tracing::warn!(
            %err,
            soft = %shown(before.soft),
            hard = %shown(before.hard),
            "could not raise the open-file limit; each connection takes one"
        ),
    }
}

/// Descriptors this process has open now; `None` where `/proc` is not there.
pub fn open_fds() -> Option<u64> {
    // Reading the directory opens one more descriptor, which it lists too.
    let entries = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    Some(entries.saturating_sub(1))
}

/// `max_fds`, `max_fds_hard` and `open_fds`, read at each scrape (under the registry's
/// prefix, e.g. `chat_gateway_open_fds`).
#[derive(Debug, Default)]
pub struct FdMetrics;

impl Collector for FdMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        let limits = FdLimits::current();
        let as_gauge = |limit: Option<u64>| limit.map_or(f64::INFINITY, |n| n as f64);
        gauge(&mut encoder, "max_fds", "Soft limit on open file descriptors", as_gauge(limits.soft))?;
        gauge(&mut encoder, "max_fds_hard", "Hard limit on open file descriptors", as_gauge(limits.hard))?;
        if let Some(open) = open_fds() {
            gauge(&mut encoder, "open_fds", "Open file descriptors", open as f64)?;
        }
        Ok(())
    }
}

fn gauge(encoder: &mut DescriptorEncoder<'_>, name: &str, help: &str, value: f64) -> Result<(), fmt::Error> {
    let gauge = ConstGauge::new(value);
    gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    /// The limits are the process's: tests that change or read them take turns.
    static LIMITS: Mutex<()> = Mutex::new(());

    #[test]
    fn raising_lifts_the_soft_limit_to_the_hard_one() {
        let _turn = LIMITS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let hard = FdLimits::current().hard;
        let low = hard.map_or(1024, |h| h.min(1024));
        setrlimit(Resource::Nofile, Rlimit { current: Some(low), maximum: hard }).expect("lowering is allowed");
        let (before, now) = raise();
        assert_eq!(before.soft, Some(low));
        let now = now.expect("raising to the hard limit is always allowed");
        assert_eq!(now.hard, hard, "the hard limit is left alone");
        assert_eq!(now.soft, Some(hard.unwrap_or(NR_OPEN_DEFAULT)));
        assert!(open_fds().is_some_and(|n| n >= 3), "stdin, stdout and stderr at least");
    }

    #[test]
    fn the_metrics_show_the_limits_and_the_open_descriptors() {
        let _turn = LIMITS.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut registry = prometheus_client::registry::Registry::with_prefix("svc");
        registry.register_collector(Box::new(FdMetrics));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        let limits = FdLimits::current();
        let shown = |limit: Option<u64>| limit.map_or("+Inf".to_owned(), |n| format!("{}.0", n));
        assert!(text.contains(&format!("svc_max_fds {}\n", shown(limits.soft))), "{text}");
        assert!(text.contains(&format!("svc_max_fds_hard {}\n", shown(limits.hard))), "{text}");
        assert!(text.contains("svc_open_fds "), "{text}");
    }
}
