//! The gRPC port under mTLS: a TLS handshake with a client certificate that the
//! configured CA signed, before any HTTP/2. Only gateways hold one, so a pod that can
//! reach the port but is not a gateway gets nothing from it.

use std::sync::Arc;
use std::time::Duration;

use chat_common::tls::{TlsError, TlsFiles, TlsPem};
use futures_util::Stream;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A connection that has not finished its handshake by then is dropped: it holds a task
/// and a socket, and a real gateway needs milliseconds.
const HANDSHAKE_WITHIN: Duration = Duration::from_secs(10);

/// Handshaken connections waiting for the server to take them; handshakes wait when full.
const ACCEPTED: usize = 64;

/// Handshakes under way at once. More connections wait in the listen backlog: a flood of
/// half-open ones costs a bounded number of tasks, not one each.
const HANDSHAKES: usize = 256;

/// The server's TLS config from its certificate, its key and the client CA: TLS 1.2 and
/// 1.3, HTTP/2 only, a client certificate required.
pub fn server_config(files: &TlsFiles, pem: &TlsPem) -> Result<ServerConfig, TlsError> {
    let TlsFiles { cert, key, ca } = files;
    let (certs, private_key) = files.identity(pem)?;
    let mut roots = RootCertStore::empty();
    for c in ca.certificates(&pem.ca)? {
        roots.add(c).map_err(|e| ca.invalid(e))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| ca.invalid(e))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| cert.invalid(e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, private_key)
        .map_err(|e| key.invalid(e))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(config)
}

/// Connections accepted on `listener` that completed a handshake under the config
/// `configs` holds at the time, until `stop`. Refused ones are logged and dropped.
pub fn incoming(
    listener: TcpListener,
    configs: watch::Receiver<Arc<ServerConfig>>,
    stop: CancellationToken,
    tasks: &TaskTracker,
) -> impl Stream<Item = Result<TlsStream<TcpStream>, std::io::Error>> {
    let (accepted, taken) = mpsc::channel(ACCEPTED);
    let handshakes = tasks.clone();
    let slots = Arc::new(Semaphore::new(HANDSHAKES));
    tasks.spawn(async move {
        loop {
            let slot = tokio::select! {
                slot = slots.clone().acquire_owned() => match slot {
                    Ok(slot) => slot,
                    Err(_) => return,
                },
                _ = stop.cancelled() => return,
            };
            let (tcp, peer) = tokio::select! {
                conn = listener.accept() => match conn {
                    Ok(conn) => conn,
                    Err(err) => {
                        // Out of fds, say: pause rather than spin.
                        tracing::warn!(%err, "cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = stop.cancelled() => return,
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = TlsAcceptor::from(configs.borrow().clone());
            let accepted = accepted.clone();
            handshakes.spawn(async move {
                let handshake = tokio::time::timeout(HANDSHAKE_WITHIN, acceptor.accept(tcp)).await;
                drop(slot);
                match handshake {
                    // Gone: the server stopped taking connections.
                    Ok(Ok(tls)) => drop(accepted.send(Ok(tls)).await),
                    Ok(Err(err)) => tracing::warn!(%peer, %err, "TLS handshake refused"),
                    Err(_) => tracing::warn!(%peer, "TLS handshake not finished in time"),
                }
            });
        }
    });
    ReceiverStream::new(taken)
}
