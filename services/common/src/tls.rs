//! The PEM files of mTLS between gateways and the message service, read at start and
//! re-read when they change: cert-manager renews certificates into the mounted Secret,
//! and nothing restarts for it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often the files are compared with what was last read. Renewals come days ahead
/// of expiry; reading three small files this often costs nothing.
pub const RELOAD_EVERY: Duration = Duration::from_secs(5);

/// A TLS file or certificate that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {setting} {}: {cause}", path.display())]
    Read { setting: &'static str, path: PathBuf, cause: std::io::Error },
    #[error("{setting} {} holds no {what}", path.display())]
    Empty { setting: &'static str, path: PathBuf, what: &'static str },
    #[error("{setting} {}: {cause}", path.display())]
    Invalid { setting: &'static str, path: PathBuf, cause: String },
}

/// Some of the three TLS settings set, not all.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}, {} and {} go together: set all three (mTLS) or none", .0[0], .0[1], .0[2])]
pub struct PartialTls([&'static str; 3]);

/// One file, named by the setting that names it (for error messages).
#[derive(Debug, Clone)]
pub struct PemFile {
    pub setting: &'static str,
    pub path: PathBuf,
}

impl PemFile {
    pub fn new(setting: &'static str, path: PathBuf) -> Self {
        Self { setting, path }
    }

    /// The file's bytes.
    pub fn read(&self) -> Result<Vec<u8>, TlsError> {
        std::fs::read(&self.path).map_err(|cause| TlsError::Read {
            setting: self.setting,
            path: self.path.clone(),
            cause,
        })
    }

    /// The certificates in the file; at least one.
    pub fn certificates(&self, pem: &[u8]) -> Result<Vec<rustls::pki_types::CertificateDer<'static>>, TlsError> {
        use rustls::pki_types::pem::PemObject;
        let certs = rustls::pki_types::CertificateDer::pem_slice_iter(pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| self.invalid(e))?;
        if certs.is_empty() {
            return Err(TlsError::Empty { setting: self.setting, path: self.path.clone(), what: "certificate" });
        }
        Ok(certs)
    }

    /// The private key in the file.
    pub fn private_key(&self, pem: &[u8]) -> Result<rustls::pki_types::PrivateKeyDer<'static>, TlsError> {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::PrivateKeyDer::from_pem_slice(pem).map_err(|e| self.invalid(e))
    }

    /// An error about this file.
    pub fn invalid(&self, cause: impl std::fmt::Display) -> TlsError {
        TlsError::Invalid { setting: self.setting, path: self.path.clone(), cause: cause.to_string() }
    }
}

/// A certificate, its key, and the CA that the other side's certificate must chain to:
/// what each end of the hop is configured with.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PemFile,
    pub key: PemFile,
    pub ca: PemFile,
}

/// The contents of [`TlsFiles`], as read at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsPem {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    pub ca: Vec<u8>,
}

impl TlsFiles {
    /// The three settings, when all are set; `Err` when only some are (a half-done mTLS
    /// set-up must not silently run in plaintext).
    pub fn from_settings(
        cert: (&'static str, &Option<PathBuf>),
        key: (&'static str, &Option<PathBuf>),
        ca: (&'static str, &Option<PathBuf>),
    ) -> Result<Option<Self>, PartialTls> {
        match (cert.1, key.1, ca.1) {
            (Some(c), Some(k), Some(a)) => Ok(Some(Self {
                cert: PemFile::new(cert.0, c.clone()),
                key: PemFile::new(key.0, k.clone()),
                ca: PemFile::new(ca.0, a.clone()),
            })),
            (None, None, None) => Ok(None),
            _ => Err(PartialTls([cert.0, key.0, ca.0])),
        }
    }

    /// Reads all three.
    pub fn read(&self) -> Result<TlsPem, TlsError> {
        Ok(TlsPem { cert: self.cert.read()?, key: self.key.read()?, ca: self.ca.read()? })
    }

    /// The certificate chain and its private key, checked to belong together: a renewal
    /// that replaced one file but not yet the other must not be taken up.
    #[allow(clippy::type_complexity)]
    pub fn identity(
        &self,
        pem: &TlsPem,
    ) -> Result<(Vec<rustls::pki_types::CertificateDer<'static>>, rustls::pki_types::PrivateKeyDer<'static>), TlsError>
    {
        let certs = self.cert.certificates(&pem.cert)?;
        let key = self.key.private_key(&pem.key)?;
        let provider = rustls::crypto::ring::default_provider();
        let signing = provider.key_provider.load_private_key(key.clone_key()).map_err(|e| self.key.invalid(e))?;
        rustls::sign::CertifiedKey::new(certs.clone(), signing)
            .keys_match()
            .map_err(|e| self.key.invalid(format!("{e} (is it the key of {}?)", self.cert.path.display())))?;
        Ok((certs, key))
    }

    /// The paths, for logs.
    fn paths(&self) -> [&std::path::Path; 3] {
        [&self.cert.path, &self.key.path, &self.ca.path]
    }
}

/// `files` made into a `T` by `build`, now and again each time their contents change,
/// until `shutdown`. A change that does not build (a half-written file, a key that does
/// not match) is logged and the last good `T` kept; only the first must build.
pub fn watch<T, F>(
    files: TlsFiles,
    build: F,
    shutdown: CancellationToken,
    tasks: &TaskTracker,
) -> Result<watch::Receiver<Arc<T>>, TlsError>
where
    T: Send + Sync + 'static,
    F: Fn(&TlsFiles, &TlsPem) -> Result<T, TlsError> + Send + 'static,
{
    let mut last = files.read()?;
    let (tx, rx) = watch::channel(Arc::new(build(&files, &last)?));
    tasks.spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(RELOAD_EVERY) => {}
                _ = shutdown.cancelled() => return,
            }
            let now = match files.read() {
                Ok(now) if now != last => now,
                Ok(_) => continue,
                Err(err) => {
                    tracing::warn!(%err, "TLS files unreadable; keeping the ones in use");
                    continue;
                }
            };
            match build(&files, &now) {
                Ok(config) => {
                    tracing::info!(files = ?files.paths(), "TLS files changed; reloaded");
                    last = now;
                    if tx.send(Arc::new(config)).is_err() {
                        return;
                    }
                }
                Err(err) => {
                    tracing::warn!(%err, "changed TLS files do not make a valid config; keeping the one in use")
                }
            }
        }
    });
    Ok(rx)
}
