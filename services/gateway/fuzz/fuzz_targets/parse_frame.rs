//! Client frame parsing, and the reply built from it, on arbitrary bytes: must never
//! panic, and each reply must be valid JSON.
#![no_main]

use chat_gateway::protocol::{client, server};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let reply = match client::parse(text) {
        Ok(frame) => server::ack(frame.id.as_deref()),
        Err(bad) => server::error(bad.id.as_deref(), &bad.error),
    };
    assert!(serde_json::from_str::<serde_json::Value>(&reply).is_ok(), "reply is not JSON: {reply}");
    let _ = client::peek_id(text);
});
