//! Generated gRPC and protobuf types for `chat.v1`: the gateway ↔ message service
//! contract and the Redis fan-out envelope.

/// `chat.v1`: see `proto/chat/v1/*.proto`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("chat.v1");
}

impl v1::Envelope {
    /// An envelope for `event`, stamped with the publish time (for fan-out latency).
    /// Both services publish through this, so every envelope carries the same stamp.
    pub fn stamped(event: v1::envelope::Event) -> Self {
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        Self { trace_context: Default::default(), published_at_us: now_us, event: Some(event) }
    }

    /// The same envelope carrying a W3C trace context (`traceparent`, `tracestate`), so
    /// each gateway's delivery span joins the publisher's trace. Empty when untraced.
    pub fn traced(mut self, trace_context: std::collections::HashMap<String, String>) -> Self {
        self.trace_context = trace_context;
        self
    }
}
