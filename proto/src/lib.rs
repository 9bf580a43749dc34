//! Generated gRPC and protobuf types for `chat.v1`: the gateway ↔ message service
//! contract and the Redis fan-out envelope.
#![deny(rust_2018_idioms)]

/// `chat.v1`: see `proto/chat/v1/*.proto`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("chat.v1");
}
