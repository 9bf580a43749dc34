//! A webhook receiver for tests: an HTTP/1.1 server on a free port that records every
//! request and answers each with the status its policy picks (keep-alive, as a real
//! receiver behind a load balancer would).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

/// One request as received, and the status it was answered with.
#[derive(Debug, Clone)]
pub struct Received {
    /// Header names lower-cased.
    pub headers: HashMap<String, String>,
    pub body: String,
    pub status: u16,
}

/// Picks the status of the `n`th request (from 0).
pub type Policy = Box<dyn Fn(usize) -> u16 + Send + Sync>;

/// The receiver; stops when dropped.
pub struct WebhookReceiver {
    pub url: String,
    received: Arc<Mutex<Vec<Received>>>,
    task: tokio::task::JoinHandle<()>,
}

impl WebhookReceiver {
    /// Listens on a free loopback port, answering as `policy` says.
    pub async fn start(policy: Policy) -> Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hooks", listener.local_addr()?);
        let received = Arc::new(Mutex::new(Vec::new()));
        let (log, policy) = (received.clone(), Arc::new(policy));
        let task = tokio::spawn(async move {
            while let Ok((conn, _)) = listener.accept().await {
                let (log, policy) = (log.clone(), policy.clone());
                tokio::spawn(async move {
                    let _ = serve(conn, log, policy).await;
                });
            }
        });
        Ok(Self { url, received, task })
    }

    /// Every request so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(conn: tokio::net::TcpStream, log: Arc<Mutex<Vec<Received>>>, policy: Arc<Policy>) -> Result<()> {
    let mut conn = BufReader::new(conn);
    loop {
        let mut line = String::new();
        if conn.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let mut headers = HashMap::new();
        loop {
            let mut header = String::new();
            conn.read_line(&mut header).await?;
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
            }
        }
        let length: usize = headers.get("content-length").map(|v| v.parse()).transpose()?.unwrap_or(0);
        let mut body = vec![0; length];
        conn.read_exact(&mut body).await.context("reading the body")?;
        let status = {
            let mut log = log.lock().unwrap_or_else(|p| p.into_inner());
            let status = policy(log.len());
            log.push(Received { headers, body: String::from_utf8_lossy(&body).into_owned(), status });
            status
        };
        let reply = format!("HTTP/1.1 {status} Test\r\ncontent-length: 0\r\n\r\n");
        conn.get_mut().write_all(reply.as_bytes()).await?;
    }
}
