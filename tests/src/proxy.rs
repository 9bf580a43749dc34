//! A TCP proxy that can hold back what the server sends: it puts a delay exactly where a
//! test needs one (a reply in flight) without touching the processes on either side.

use std::sync::{Arc, Mutex};

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Forwards every connection on `addr` to a target; `hold_replies` stops the target's
/// bytes (buffering them) until `release`.
pub struct HoldingProxy {
    /// `host:port` to connect to instead of the target.
    pub addr: String,
    hold: watch::Sender<bool>,
    /// Everything the target sent while held, in order, across connections.
    held: Arc<Mutex<Vec<u8>>>,
    accept: JoinHandle<()>,
}

impl HoldingProxy {
    /// Listens on a free port and forwards to `target` (`host:port`).
    pub async fn start(target: &str) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let (hold, _) = watch::channel(false);
        let held = Arc::new(Mutex::new(Vec::new()));
        let (target, hold_tx, held_log) = (target.to_owned(), hold.clone(), held.clone());
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(&target).await else { continue };
                tokio::spawn(forward(client, server, hold_tx.subscribe(), held_log.clone()));
            }
        });
        Ok(Self { addr, hold, held, accept })
    }

    /// From now on, the target's bytes are kept back (requests still go through).
    pub fn hold_replies(&self) {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.hold.send_replace(true);
    }

    /// True once the bytes held back contain `needle`.
    pub fn held_contains(&self, needle: &[u8]) -> bool {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).windows(needle.len()).any(|w| w == needle)
    }

    /// Lets the held bytes through, in order, and everything after them.
    pub fn release(&self) {
        self.hold.send_replace(false);
    }
}

impl Drop for HoldingProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn forward(client: TcpStream, server: TcpStream, mut hold: watch::Receiver<bool>, log: Arc<Mutex<Vec<u8>>>) {
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();
    let upstream = tokio::spawn(async move { tokio::io::copy(&mut client_rd, &mut server_wr).await });
    let mut buf = vec![0u8; 16 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    loop {
        tokio::select! {
            read = server_rd.read(&mut buf) => {
                let n = match read {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if *hold.borrow() {
                    pending.extend_from_slice(&buf[..n]);
                    log.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(&buf[..n]);
                    continue;
                }
                if client_wr.write_all(&pending).await.is_err() || client_wr.write_all(&buf[..n]).await.is_err() {
                    break;
                }
                pending.clear();
            }
            changed = hold.changed() => {
                if changed.is_err() {
                    break;
                }
                if !*hold.borrow() && !pending.is_empty() {
                    if client_wr.write_all(&pending).await.is_err() {
                        break;
                    }
                    pending.clear();
                }
            }
        }
    }
    upstream.abort();
}
