//! The client wire protocol (contract v1), and the only place its JSON is spelled:
//! what clients send (`client`), what the server sends over WebSocket (`server`), the
//! objects and REST bodies both share (`json`), how connections close (`close`), and
//! the one spelling of a server-issued id (`id`).

pub mod client;
pub mod close;
pub mod id;
pub mod json;
pub mod server;

pub use client::Command;
pub use close::{Close, Policy};
pub use id::Id;
