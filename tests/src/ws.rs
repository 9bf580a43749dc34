//! The WebSocket test client: speaks protocol v1, matches replies to requests by id and
//! keeps frames that arrive meanwhile for later `event`/`recv` calls.

use std::collections::VecDeque;

use anyhow::{anyhow, bail, Result};
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::wait::WAIT;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A protocol-speaking WebSocket client.
pub struct WsClient {
    ws: Ws,
    /// Frames read while waiting for something else, in arrival order.
    pending: VecDeque<Value>,
    next_id: u64,
}

impl WsClient {
    /// Connects with `Authorization: Bearer` and returns the client and its first frame.
    pub async fn connect_bearer(url: &str, token: &str) -> Result<(Self, Value)> {
        let mut req = url.into_client_request()?;
        req.headers_mut().insert("Authorization", format!("Bearer {token}").parse()?);
        Self::connect_request(req).await
    }

    /// Connects with a prepared request and returns the client and its first frame.
    pub async fn connect_request<R: IntoClientRequest + Unpin>(req: R) -> Result<(Self, Value)> {
        let (ws, _) = tokio_tungstenite::connect_async(req).await?;
        let mut client = Self::from_stream(ws);
        let first = client.recv().await?;
        Ok((client, first))
    }

    /// Wraps an already upgraded socket (nothing read yet).
    pub fn from_stream(ws: Ws) -> Self {
        Self { ws, pending: VecDeque::new(), next_id: 1 }
    }

    /// Sends one JSON frame as text.
    pub async fn send(&mut self, frame: &Value) -> Result<()> {
        self.send_text(frame.to_string()).await
    }

    /// Sends raw text.
    pub async fn send_text(&mut self, text: String) -> Result<()> {
        self.ws.send(Message::Text(text.into())).await?;
        Ok(())
    }

    /// The next frame off the socket (ignoring pings), or an error on close or timeout.
    async fn read_frame(&mut self) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| anyhow!("no frame within {WAIT:?}"))?
                .ok_or_else(|| anyhow!("connection ended"))??;
            match msg {
                Message::Text(text) => return Ok(serde_json::from_str(&text)?),
                Message::Close(frame) => bail!("closed: {frame:?}"),
                _ => continue,
            }
        }
    }

    /// The next frame: buffered first, then off the socket.
    pub async fn recv(&mut self) -> Result<Value> {
        match self.pending.pop_front() {
            Some(v) => Ok(v),
            None => self.read_frame().await,
        }
    }

    /// The close frame's code once the server closes (frames before it are skipped).
    pub async fn closed(&mut self) -> Result<Option<u16>> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let msg =
                tokio::time::timeout_at(deadline, self.ws.next()).await.map_err(|_| anyhow!("not closed in time"))?;
            match msg {
                None | Some(Err(_)) => return Ok(None),
                Some(Ok(Message::Close(frame))) => return Ok(frame.map(|f| u16::from(f.code))),
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Sends `command` with a fresh id and returns the reply carrying that id; other
    /// frames that arrive meanwhile stay buffered for `recv`/`event`.
    pub async fn request(&mut self, mut command: Value) -> Result<Value> {
        let id = format!("r{}", self.next_id);
        self.next_id += 1;
        command["id"] = json!(id);
        self.send(&command).await?;
        loop {
            let frame = self.read_frame().await?;
            if frame["id"] == json!(id) {
                return Ok(frame);
            }
            self.pending.push_back(frame);
        }
    }

    /// Like `request`, but fails unless the reply is an `ack`.
    pub async fn ack(&mut self, command: Value) -> Result<Value> {
        let reply = self.request(command.clone()).await?;
        anyhow::ensure!(reply["type"] == "ack", "{command} → {reply}");
        Ok(reply)
    }

    /// Frames read while waiting for something else, not yet consumed.
    pub fn buffered(&self) -> impl Iterator<Item = &Value> {
        self.pending.iter()
    }

    /// Frames of `kind` buffered so far, removed from the buffer.
    pub fn take_buffered(&mut self, kind: &str) -> Vec<Value> {
        let (taken, kept): (Vec<Value>, Vec<Value>) = self.pending.drain(..).partition(|f| f["type"] == kind);
        self.pending = kept.into();
        taken
    }

    /// Creates a group room with `members` (besides this user); its id.
    pub async fn create_group(&mut self, members: &[&str]) -> Result<String> {
        self.create_room("group", members).await
    }

    /// Creates a room of `kind` (`group`, `direct`, `support`) with `members` (besides
    /// this user); its id. Fails unless the reply is an `ack`.
    pub async fn create_room(&mut self, kind: &str, members: &[&str]) -> Result<String> {
        let reply = self.ack(json!({"type": "create_room", "kind": kind, "members": members})).await?;
        reply["room"]["id"].as_str().map(str::to_owned).ok_or_else(|| anyhow!("no room id in {reply}"))
    }

    /// Closes the connection politely.
    pub async fn close(mut self) -> Result<()> {
        self.ws.close(None).await?;
        Ok(())
    }

    /// The next event of `kind`, from the buffer or the socket; other frames stay buffered.
    pub async fn event(&mut self, kind: &str) -> Result<Value> {
        if let Some(pos) = self.pending.iter().position(|f| f["type"] == kind) {
            return Ok(self.pending.remove(pos).unwrap_or_default());
        }
        loop {
            let frame = self.read_frame().await?;
            if frame["type"] == kind {
                return Ok(frame);
            }
            self.pending.push_back(frame);
        }
    }
}

/// A raw WebSocket client of `user` on gateway 0 whose socket receives into 4 KiB only,
/// joined to `room`: once it stops reading, the gateway's writes to it soon block.
pub async fn small_buffer_member(
    cluster: &crate::Cluster,
    user: &str,
    room: &str,
) -> Result<WebSocketStream<TcpStream>> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let tcp = socket.connect(cluster.gateways[0].parse()?).await?;
    let mut req = cluster.ws_url(0).into_client_request()?;
    req.headers_mut().insert("Authorization", format!("Bearer {}", crate::token(user)).parse()?);
    let (mut ws, _) = tokio_tungstenite::client_async(req, tcp).await?;
    ws.send(Message::Text(json!({"type": "join", "id": "j", "room": room}).to_string().into())).await?;
    tokio::time::timeout(WAIT, async {
        while let Some(frame) = ws.next().await {
            if let Message::Text(text) = frame? {
                let frame: Value = serde_json::from_str(&text)?;
                if frame["id"] == "j" {
                    anyhow::ensure!(frame["type"] == "ack", "{frame}");
                    return Ok(());
                }
            }
        }
        bail!("closed before the join's ack")
    })
    .await
    .map_err(|_| anyhow!("no join ack"))??;
    Ok(ws)
}
