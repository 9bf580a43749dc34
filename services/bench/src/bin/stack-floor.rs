//! `stack-floor`: the least a server built on this project's chosen crates (tokio,
//! tokio-tungstenite, jsonwebtoken) costs, measured with the same load generator as the
//! peers. It speaks the peers' `seed-ws` protocol (`../shared/peers`: `?token=` JWT,
//! `join_room`, `send_message`, `new_message` to every member), one process, rooms in
//! memory: no persistence, no Redis, no second gateway, no limits, no metrics.
//!
//! It is written as such a server usually is: the upgrade straight on the TCP stream (no
//! HTTP server in between), one task per connection reading its socket, and a bounded
//! queue per member that a send fills with the frame, encoded once. The queue exists only
//! once the connection joins a room, so an idle connection holds nothing but its task and
//! its WebSocket. The gateway's figures set beside this one's say what the product adds on
//! top of its crates, and this one beside Bun's what the crates themselves cost.
//!
//! Not part of the product: a yardstick for `docs/benchmarks.md`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::StatusCode;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// Same allocator as the gateway, so that memory figures compare.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A member's queue: when it is full the member is too slow and the frame is dropped for
/// it alone, as the peers' servers do (they buffer without bound instead).
const QUEUE: usize = 1024;

#[derive(Parser)]
#[command(about = "The seed-ws protocol on tokio + tokio-tungstenite + jsonwebtoken, nothing else")]
struct Cli {
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    #[arg(long, env = "JWT_SECRET", default_value = "dev-secret", hide_env_values = true)]
    secret: String,
}

#[derive(Deserialize)]
struct Claims {
    sub: String,
    name: Option<String>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Command {
    JoinRoom {
        #[serde(rename = "roomId")]
        room_id: String,
    },
    SendMessage {
        #[serde(rename = "roomId")]
        room_id: String,
        content: String,
    },
    Ping,
}

/// Frames out, keys in the peers' order: the load generator finds them by their start.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Event<'a> {
    JoinedRoom {
        #[serde(rename = "roomId")]
        room_id: &'a str,
    },
    NewMessage {
        #[serde(rename = "roomId")]
        room_id: &'a str,
        message: Stored<'a>,
    },
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Stored<'a> {
    id: String,
    room_id: &'a str,
    content: &'a str,
    sender_id: &'a str,
    sender_name: &'a str,
    created_at: String,
}

struct Server {
    key: DecodingKey,
    validation: Validation,
    rooms: Mutex<HashMap<String, Vec<mpsc::Sender<Message>>>>,
    next_id: AtomicU64,
}

impl Server {
    fn verify(&self, request: &Request) -> Option<Claims> {
        let query = request.uri().query()?;
        let token = query.split('&').find_map(|pair| pair.strip_prefix("token="))?;
        jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).ok().map(|data| data.claims)
    }

    fn join(&self, room: String, member: mpsc::Sender<Message>) {
        let mut rooms = self.rooms.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let members = rooms.entry(room).or_default();
        members.retain(|m| !m.is_closed());
        members.push(member);
    }

    fn broadcast(&self, room: &str, sender: &Claims, content: &str) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let created_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let message = Stored {
            id: id.to_string(),
            room_id: room,
            content,
            sender_id: &sender.sub,
            sender_name: sender.name.as_deref().unwrap_or(&sender.sub),
            created_at,
        };
        let frame = serde_json::to_string(&Event::NewMessage { room_id: room, message }).unwrap_or_default();
        let frame = Message::Text(Utf8Bytes::from(frame));
        let rooms = self.rooms.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for member in rooms.get(room).into_iter().flatten() {
            // Full or gone: this member misses the frame; the others do not wait for it.
            let _ = member.try_send(frame.clone());
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let mut validation = Validation::new(Algorithm::HS256);
    validation.required_spec_claims.clear();
    let server = Arc::new(Server {
        key: DecodingKey::from_secret(cli.secret.as_bytes()),
        validation,
        rooms: Mutex::new(HashMap::new()),
        next_id: AtomicU64::new(1),
    });
    let listener = TcpListener::bind(cli.listen).await.with_context(|| format!("binding {}", cli.listen))?;
    eprintln!("stack-floor listening on http://{} pid={}", listener.local_addr()?, std::process::id());
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                tokio::spawn(connection(stream, server.clone()));
            }
            _ = tokio::signal::ctrl_c() => return Ok(()),
        }
    }
}

async fn connection(stream: TcpStream, server: Arc<Server>) {
    let mut user = None;
    // tungstenite's `Callback` fixes the error type: an HTTP response.
    #[allow(clippy::result_large_err)]
    let authenticate = |request: &Request, response: Response| match server.verify(request) {
        Some(claims) => {
            user = Some(claims);
            Ok(response)
        }
        None => {
            let mut refusal = ErrorResponse::new(Some("unauthorized".into()));
            *refusal.status_mut() = StatusCode::UNAUTHORIZED;
            Err(refusal)
        }
    };
    // The gateway's buffer sizes (services/gateway/src/ws.rs).
    let config = WebSocketConfig::default().read_buffer_size(512).write_buffer_size(16 * 1024);
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async_with_config(stream, authenticate, Some(config)).await else {
        return;
    };
    let Some(user) = user else { return };
    let mut queue: Option<mpsc::Receiver<Message>> = None;
    let mut member: Option<mpsc::Sender<Message>> = None;
    loop {
        let next_frame = async {
            match queue.as_mut() {
                Some(queue) => queue.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            incoming = ws.next() => {
                let Some(Ok(frame)) = incoming else { return };
                let Message::Text(text) = frame else { continue };
                let reply = match serde_json::from_str::<Command>(&text) {
                    Ok(Command::JoinRoom { room_id }) => {
                        let reply = serde_json::to_string(&Event::JoinedRoom { room_id: &room_id }).unwrap_or_default();
                        // One queue per connection, made at its first join: every room it
                        // joins feeds the same one.
                        let member = match &member {
                            Some(member) => member.clone(),
                            None => {
                                let (sender, receiver) = mpsc::channel(QUEUE);
                                queue = Some(receiver);
                                member.insert(sender).clone()
                            }
                        };
                        server.join(room_id, member);
                        Some(reply)
                    }
                    Ok(Command::SendMessage { room_id, content }) => {
                        server.broadcast(&room_id, &user, &content);
                        None
                    }
                    Ok(Command::Ping) => Some(r#"{"type":"pong"}"#.to_owned()),
                    Err(_) => Some(r#"{"type":"error","error":"bad request"}"#.to_owned()),
                };
                if let Some(reply) = reply {
                    if ws.send(Message::Text(reply.into())).await.is_err() { return; }
                }
            }
            Some(frame) = next_frame => {
                if ws.send(frame).await.is_err() { return; }
            }
        }
    }
}
