//! Client frame parsing, and the reply built from it, on arbitrary bytes: must never
//! panic, and each reply must be valid JSON.
#![no_main]

use chat_gateway::protocol;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let reply = match protocol::parse(text) {
        Ok(frame) => protocol::ack(frame.id.as_deref(), protocol::Empty {}),
        Err(bad) => protocol::error(bad.id.as_deref(), &bad.error),
    };
    assert!(serde_json::from_str::<serde_json::Value>(&reply).is_ok(), "reply is not JSON: {reply}");
    let _ = protocol::peek_id(text);
});
