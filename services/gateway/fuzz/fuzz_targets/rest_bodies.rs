//! Every REST request body type through the gateway's own `Body` extractor (the one
//! the routes use): arbitrary bytes must never panic, and a refusal must be a 400 or
//! 413 whose body is the API's JSON error.
#![no_main]

use axum::body::Body as HttpBody;
use axum::extract::{FromRequest, Request};
use axum::response::IntoResponse;
use chat_gateway::protocol::client::{CreateRoom, DevTokenRequest, MarkRead, NotifyReq, PushReq, SendReq};
use chat_gateway::rest::Body;
use futures_util::FutureExt;
use libfuzzer_sys::fuzz_target;
use serde::de::DeserializeOwned;

fn extract<T: DeserializeOwned>(data: &[u8]) {
    let request = Request::builder()
        .method("POST")
        .header("content-type", "application/json")
        .body(HttpBody::from(data.to_vec()))
        .expect("a static request is valid");
    // The body is already in memory, so the extractor finishes without waiting.
    let outcome = Body::<T>::from_request(request, &()).now_or_never().expect("an in-memory body never waits");
    if let Err(refusal) = outcome {
        let response = refusal.into_response();
        let status = response.status().as_u16();
        assert!(status == 400 || status == 413, "unexpected status {status}");
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .now_or_never()
            .expect("an in-memory body never waits")
            .expect("a rendered error body is readable");
        let json: serde_json::Value = serde_json::from_slice(&bytes).expect("errors are JSON");
        assert!(json["error"]["code"].is_string(), "{json}");
    }
}

fuzz_target!(|data: &[u8]| {
    extract::<CreateRoom>(data);
    extract::<SendReq>(data);
    extract::<PushReq>(data);
    extract::<NotifyReq>(data);
    extract::<MarkRead>(data);
    extract::<DevTokenRequest>(data);
});
