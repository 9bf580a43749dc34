//! Logs and traces, set up the same way by both services.
//!
//! - `RUST_LOG` filters (default `info`); `LOG_FORMAT=json` switches to one JSON object
//!   per line, carrying `trace_id`/`span_id` whenever the event happens inside a trace.
//! - Traces are exported over OTLP/gRPC when an endpoint is configured
//!   (`OTEL_EXPORTER_OTLP_ENDPOINT`), and not at all otherwise; `OTEL_TRACES_FILTER`
//!   (same syntax as `RUST_LOG`, default `info`) chooses which spans become traces. Export runs on the SDK's
//!   own thread from a bounded queue: a collector that is slow or down costs dropped spans,
//!   never a blocked request.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::trace::{SpanContext, TraceContextExt, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;
use tracing::dispatcher::WeakDispatch;
use tracing::{Dispatch, Subscriber};
use tracing_subscriber::fmt::format::{self, FormatEvent, FormatFields, Writer};
use tracing_subscriber::fmt::FmtContext;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::{fmt as tfmt, EnvFilter, Layer};

/// How long shutdown waits for the last spans to reach the collector.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(3);

/// Log and trace settings, shared by both services' `Config` (flattened into it).
#[derive(Debug, Clone, clap::Args)]
pub struct TelemetryConfig {
    /// `json` for one JSON object per log line (with `trace_id`), `text` for humans.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// OTLP/gRPC collector that receives traces, e.g. `http://otel-collector:4317`.
    /// Unset (or empty): traces are not exported.
    #[arg(long = "otlp-endpoint", env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
}

/// How log lines are written. (Variants carry no `///`: clap would list them in `--help`.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

impl TelemetryConfig {
    /// Rejects an endpoint the exporter could not use.
    pub fn validate(&self) -> Result<(), crate::config::ConfigError> {
        match self.endpoint() {
            Some(url) if !url.starts_with("http://") && !url.starts_with("https://") => {
                Err(crate::config::ConfigError::OtlpEndpoint(url.to_owned()))
            }
            _ => Ok(()),
        }
    }

    /// Installs logging and, when an endpoint is set, trace export for `service`.
    pub fn init(&self, service: &'static str) -> Result<Telemetry, TelemetryError> {
        init(service, self.log_format == LogFormat::Json, self.endpoint())
    }

    fn endpoint(&self) -> Option<&str> {
        self.otlp_endpoint.as_deref().map(str::trim).filter(|s| !s.is_empty())
    }
}

/// Trace export could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The exporter's reason is already part of the message, so it is not also a
    /// `source()`: the `Caused by:` chain printed at start-up would repeat it.
    #[error("cannot set up the OTLP exporter for {endpoint}: {cause}")]
    Exporter { endpoint: String, cause: opentelemetry_otlp::ExporterBuildError },
}

/// Keeps the trace pipeline alive; [`Telemetry::shutdown`] flushes it.
#[must_use = "dropping the handle does not flush buffered spans; call shutdown()"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// True when spans are exported.
    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Sends buffered spans, waiting at most a few seconds (a dead collector must not
    /// hold up a pod's termination).
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else { return };
        // The SDK's shutdown blocks its caller; keep it off the runtime's workers.
        let flushed = tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_TIMEOUT)).await;
        if let Ok(Err(err)) = flushed {
            tracing::warn!(%err, "trace export did not flush; the last spans are lost");
        }
    }
}

/// Installs the global subscriber: filter, log format and, when an endpoint is given,
/// the OpenTelemetry layer. Call it once, inside the Tokio runtime (the exporter's gRPC
/// channel lives there).
pub fn init(service: &'static str, json_logs: bool, otlp_endpoint: Option<&str>) -> Result<Telemetry, TelemetryError> {
    let provider = otlp_endpoint.map(|endpoint| tracer_provider(service, endpoint)).transpose()?;
    // Traces and logs are filtered apart: quiet logs (`RUST_LOG=warn`) must not empty the
    // traces, and tracing at info must not flood the logs.
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer().with_tracer(p.tracer(service)).with_filter(env_filter("OTEL_TRACES_FILTER"))
    });
    if provider.is_some() {
        // W3C `traceparent`/`tracestate` for any library that asks the global propagator.
        opentelemetry::global::set_text_map_propagator(opentelemetry_sdk::propagation::TraceContextPropagator::new());
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = tfmt::layer().with_target(true).with_ansi(ansi).with_writer(std::io::stderr);
    let dispatch_cell = DispatchCell::default();
    let logs = if json_logs {
        logs.json().event_format(WithTraceIds::new(dispatch_cell.clone())).boxed()
    } else {
        logs.boxed()
    };
    let dispatch =
        Dispatch::new(tracing_subscriber::registry().with(logs.with_filter(env_filter("RUST_LOG"))).with(otel));
    let _ = dispatch_cell.set(dispatch.downgrade());
    // A second init (tests starting several servers in one process) is harmless.
    let _ = tracing::dispatcher::set_global_default(dispatch);
    Ok(Telemetry { provider })
}

/// An `EnvFilter` from the variable `var`, defaulting to `info`.
fn env_filter(var: &str) -> EnvFilter {
    EnvFilter::builder().with_default_directive(tracing::Level::INFO.into()).with_env_var(var).from_env_lossy()
}

fn tracer_provider(service: &'static str, endpoint: &str) -> Result<SdkTracerProvider, TelemetryError> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|cause| TelemetryError::Exporter { endpoint: endpoint.to_owned(), cause })?;
    Ok(SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource(service)).build())
}

/// `service.name`, `service.version` and where the process runs. On Kubernetes the pod
/// name and namespace come from the downward API (`POD_NAME`, `POD_NAMESPACE`);
/// `OTEL_RESOURCE_ATTRIBUTES` and `OTEL_SERVICE_NAME` are honoured too.
fn resource(service: &'static str) -> Resource {
    let mut builder = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        builder = builder.with_service_name(service);
    }
    let pod = std::env::var("POD_NAME").ok();
    let instance = pod.clone().or_else(|| std::env::var("HOSTNAME").ok()).unwrap_or_else(|| service.to_owned());
    builder = builder.with_attributes([
        KeyValue::new("service.version", env!("CARGO_PKG_VERSION")),
        KeyValue::new("service.instance.id", format!("{instance}-{}", std::process::id())),
        KeyValue::new("process.pid", i64::from(std::process::id())),
    ]);
    if let Some(pod) = pod {
        builder = builder.with_attribute(KeyValue::new("k8s.pod.name", pod));
    }
    if let Ok(namespace) = std::env::var("POD_NAMESPACE") {
        builder = builder.with_attribute(KeyValue::new("k8s.namespace.name", namespace));
    }
    builder.build()
}

/// The span around one Redis `PUBLISH` of a fan-out envelope; its context travels inside
/// the envelope.
pub(crate) fn publish_span(channel: &str) -> tracing::Span {
    tracing::info_span!(
        "redis.publish",
        otel.kind = "producer",
        db.system = "redis",
        messaging.system = "redis",
        messaging.destination.name = channel,
    )
}

/// The subscriber, for the log formatter to reach the OpenTelemetry layer's span data: it
/// is built after the formatter, and while an event is being dispatched the thread's
/// current dispatcher is unavailable to it.
type DispatchCell = Arc<OnceLock<WeakDispatch>>;

/// The JSON event format with the current trace's ids added as top-level fields, so a log
/// pipeline can jump from a line to its trace.
struct WithTraceIds {
    json: format::Format<format::Json>,
    dispatch: DispatchCell,
}

impl WithTraceIds {
    fn new(dispatch: DispatchCell) -> Self {
        Self { json: tfmt::format().json().flatten_event(true), dispatch }
    }

    fn context_of(&self, id: &tracing::span::Id) -> Option<SpanContext> {
        let dispatch = self.dispatch.get()?.upgrade()?;
        let cx = tracing_opentelemetry::get_otel_context(id, &dispatch)?;
        let span = cx.span().span_context().clone();
        span.is_valid().then_some(span)
    }
}

impl<S, N> FormatEvent<S, N> for WithTraceIds
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> fmt::Result {
        let mut line = String::with_capacity(256);
        self.json.format_event(ctx, Writer::new(&mut line), event)?;
        let ids = ctx.lookup_current().and_then(|span| self.context_of(&span.id()));
        match (line.strip_prefix('{'), ids) {
            (Some(rest), Some(ids)) => {
                write!(writer, "{{\"trace_id\":\"{}\",\"span_id\":\"{}\",{rest}", ids.trace_id(), ids.span_id())
            }
            _ => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::*;

    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().map_err(|_| std::io::Error::other("poisoned"))?.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn an_unusable_otlp_endpoint_is_named_in_the_error() {
        let Err(err) = tracer_provider("test", "http://bad host") else { panic!("a URI with a space was accepted") };
        let message = err.to_string();
        assert!(message.starts_with("cannot set up the OTLP exporter for http://bad host: "), "{message}");
        assert!(std::error::Error::source(&err).is_none(), "the cause is in the message already");
    }

    #[test]
    fn json_lines_carry_the_trace_id_of_the_enclosing_span() {
        let provider = SdkTracerProvider::builder().build();
        let buffer = Buffer::default();
        let writer = buffer.clone();
        let cell = DispatchCell::default();
        let dispatch = Dispatch::new(
            tracing_subscriber::registry()
                .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
                .with(
                    tfmt::layer()
                        .json()
                        .event_format(WithTraceIds::new(cell.clone()))
                        .with_writer(move || writer.clone()),
                ),
        );
        cell.set(dispatch.downgrade()).unwrap();
        let trace_id = tracing::dispatcher::with_default(&dispatch, || {
            tracing::info!("outside any span");
            let span = tracing::info_span!("work");
            let _entered = span.enter();
            tracing::info!(answer = 42, "inside");
            span.context().span().span_context().trace_id().to_string()
        });
        let text = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0].get("trace_id").is_none(), "{text}");
        assert_eq!(lines[1]["trace_id"], trace_id.as_str(), "{text}");
        assert_eq!(lines[1]["answer"], 42, "{text}");
        assert_eq!(lines[1]["message"], "inside", "{text}");
        assert_eq!(trace_id.len(), 32);
    }
}
