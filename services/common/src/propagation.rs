//! W3C trace context across process boundaries: gRPC metadata between gateway and
//! message service, and a plain string map inside each Redis fan-out envelope.
//!
//! With trace export off, spans carry no OpenTelemetry context, so nothing is injected
//! and extraction finds nothing: the cost is a map lookup.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::codegen::http::HeaderMap;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The context of `span` as `traceparent`/`tracestate` entries; empty when the span is
/// not part of an exported trace.
pub fn to_map(span: &tracing::Span) -> HashMap<String, String> {
    let mut map = HashMap::new();
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut map);
    }
    map
}

/// Makes `span` a child of the context carried in `map`, if there is one. Call before
/// the span is first entered.
pub fn set_parent_from_map(span: &tracing::Span, map: &HashMap<String, String>) {
    if !map.is_empty() {
        set_parent(span, TraceContextPropagator::new().extract(map));
    }
}

/// Writes the context of `span` into outgoing gRPC metadata.
pub fn inject_metadata(span: &tracing::Span, metadata: &mut MetadataMap) {
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut MetadataInjector(metadata));
    }
}

/// Makes `span` a child of the context in incoming HTTP/2 (gRPC) headers, if any.
pub fn set_parent_from_headers(span: &tracing::Span, headers: &HeaderMap) {
    if headers.contains_key("traceparent") {
        set_parent(span, TraceContextPropagator::new().extract(&HeaderExtractor(headers)));
    }
}

/// Makes `span` — work done for several requests at once, in another task — a child of
/// the first request's span and linked to the others', so each request's trace shows it.
pub fn serve_batch<'a>(span: &tracing::Span, mut requests: impl Iterator<Item = &'a tracing::Span>) {
    if let Some(first) = requests.next() {
        set_parent(span, first.context());
    }
    for other in requests {
        let cx = other.context();
        let linked = cx.span().span_context().clone();
        if linked.is_valid() {
            span.add_link(linked);
        }
    }
}

fn set_parent(span: &tracing::Span, cx: opentelemetry::Context) {
    if cx.span().span_context().is_valid() {
        // Fails only when no OpenTelemetry layer is installed or the span already
        // started; either way the span simply stays a root.
        let _ = span.set_parent(cx);
    }
}

struct MetadataInjector<'a>(&'a mut MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (MetadataKey::from_bytes(key.as_bytes()), MetadataValue::try_from(value)) {
            self.0.insert(key, value);
        }
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::TracerProvider as _;
    use opentelemetry_sdk::trace::SdkTracerProvider;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    fn with_tracing<T>(f: impl FnOnce() -> T) -> T {
        let provider = SdkTracerProvider::builder().build();
        let subscriber =
            tracing_subscriber::registry().with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        tracing::subscriber::with_default(subscriber, f)
    }

    fn ids(span: &tracing::Span) -> (String, String) {
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        (sc.trace_id().to_string(), sc.span_id().to_string())
    }

    #[test]
    fn a_context_survives_the_map_round_trip() {
        with_tracing(|| {
            let sender = tracing::info_span!("send");
            let map = to_map(&sender);
            assert!(map["traceparent"].starts_with("00-"), "{map:?}");
            let receiver = tracing::info_span!("deliver");
            set_parent_from_map(&receiver, &map);
            let _entered = receiver.enter();
            let (trace, _) = ids(&sender);
            assert_eq!(ids(&receiver).0, trace);
            assert_ne!(ids(&receiver).1, ids(&sender).1);
        });
    }

    #[test]
    fn a_context_survives_grpc_metadata() {
        with_tracing(|| {
            let client = tracing::info_span!("client");
            let mut metadata = MetadataMap::new();
            inject_metadata(&client, &mut metadata);
            let headers = metadata.into_headers();
            let server = tracing::info_span!("server");
            set_parent_from_headers(&server, &headers);
            assert_eq!(ids(&server).0, ids(&client).0);
        });
    }

    #[test]
    fn without_an_opentelemetry_layer_nothing_is_injected() {
        let span = tracing::info_span!("untraced");
        assert!(to_map(&span).is_empty());
        let mut metadata = MetadataMap::new();
        inject_metadata(&span, &mut metadata);
        assert!(metadata.is_empty());
    }
}
