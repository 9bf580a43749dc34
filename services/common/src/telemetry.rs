//! Logging set-up shared by both services: `RUST_LOG` filters, `LOG_FORMAT=json`
//! switches to one JSON object per line for log pipelines.

use tracing_subscriber::{fmt, EnvFilter};

/// Installs the global tracing subscriber. `json` selects JSON lines; otherwise
/// human-readable text. The filter comes from `RUST_LOG`, defaulting to `info`.
pub fn init_logging(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = fmt().with_env_filter(filter).with_target(true).with_ansi(ansi).with_writer(std::io::stderr);
    // A second init (tests starting several servers in one process) is harmless.
    let _ = if json { builder.json().flatten_event(true).try_init() } else { builder.try_init() };
}
