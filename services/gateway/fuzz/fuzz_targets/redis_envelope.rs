//! What the gateway does with a Redis pub/sub payload (`fanout::dispatch`): decode the
//! protobuf envelope and render its event as a client frame. Arbitrary bytes on a
//! channel must never panic, and every frame rendered must be valid JSON.
#![no_main]

use chat_gateway::protocol::server;
use chat_proto::v1::Envelope;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(envelope) = Envelope::decode(data) else { return };
    let Some(event) = envelope.event else { return };
    if let Some(frame) = server::event_frame(&event) {
        assert!(serde_json::from_str::<serde_json::Value>(&frame).is_ok(), "frame is not JSON: {frame}");
    }
});
