//! `chatctl certs`: a development CA and the two leaf certificates that mutual TLS between
//! the gateways and the message service needs on the local cluster, where there is no
//! cert-manager to issue them.

use std::fmt;
use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use time::{Duration, OffsetDateTime};

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const MESSAGE_CERT: &str = "message.crt";
pub const MESSAGE_KEY: &str = "message.key";
pub const GATEWAY_CERT: &str = "gateway.crt";
pub const GATEWAY_KEY: &str = "gateway.key";

/// In write order. `ca.crt` is last because its presence is what makes a later run keep
/// the directory: a run cut short must not leave a directory that looks complete.
const FILES: [&str; 6] = [MESSAGE_KEY, MESSAGE_CERT, GATEWAY_KEY, GATEWAY_CERT, CA_KEY, CA_CERT];

const CA_NAME: &str = "chat local dev CA";
/// The message service's Service name in Kubernetes, so a gateway checks the same name
/// locally (MESSAGE_TLS_SERVER_NAME) as in the cluster.
const MESSAGE_NAME: &str = "chat-message";
const GATEWAY_NAME: &str = "chat-gateway";

/// Longest `--days`: far past any laptop's life, short of dates `time` cannot represent.
pub const MAX_DAYS: u32 = 3650;

/// Certificates may be checked by a process whose clock is a little behind the one that
/// made them (a container, a VM just resumed); without this they would start out invalid.
const CLOCK_SKEW: Duration = Duration::hours(1);

/// What `chatctl certs` was asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    pub dir: PathBuf,
    pub days: u32,
    pub force: bool,
}

/// What `chatctl certs` did.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Generated every file; their paths in write order.
    Written(Vec<PathBuf>),
    /// `ca.crt` was there and `--force` was not given: nothing was touched. `missing` names
    /// the other files that are not there, which only a hand-edited directory lacks.
    Kept { dir: PathBuf, missing: Vec<PathBuf> },
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Outcome::Written(paths) => {
                let lines: Vec<String> = paths.iter().map(|p| format!("wrote {}", p.display())).collect();
                f.write_str(&lines.join("\n"))
            }
            Outcome::Kept { dir, missing } => {
                write!(
                    f,
                    "{} exists: keeping the certificates in {} (--force makes new ones)",
                    dir.join(CA_CERT).display(),
                    dir.display()
                )?;
                for path in missing {
                    write!(f, "\nwarning: {} is missing: run again with --force", path.display())?;
                }
                Ok(())
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    #[error("--days must be 1 to {MAX_DAYS}, not {0}")]
    Days(u32),
    #[error("creating {}", .path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("checking {}", .path.display())]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("writing {}", .path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("generating the {what}")]
    Generate {
        what: &'static str,
        #[source]
        source: rcgen::Error,
    },
}

/// One file to write.
struct Output {
    name: &'static str,
    contents: String,
    private: bool,
}

/// Generates the CA and both leaves into `opts.dir`, unless a CA is already there and
/// `opts.force` is off: `make run` calls this on every start and must not replace the
/// certificates that running processes (or a trust store) already hold.
pub fn run(opts: &Options) -> Result<Outcome, CertsError> {
    if opts.days == 0 || opts.days > MAX_DAYS {
        return Err(CertsError::Days(opts.days));
    }
    if !opts.force && exists(&opts.dir.join(CA_CERT))? {
        let mut missing = Vec::new();
        for name in FILES {
            let path = opts.dir.join(name);
            if !exists(&path)? {
                missing.push(path);
            }
        }
        return Ok(Outcome::Kept { dir: opts.dir.clone(), missing });
    }
    // Generated before anything is written, so a failure leaves the directory as it was.
    let outputs = generate(OffsetDateTime::now_utc(), opts.days)?;
    create_dir(&opts.dir)?;
    let mut written = Vec::with_capacity(outputs.len());
    for output in &outputs {
        let path = opts.dir.join(output.name);
        write_replacing(&opts.dir, &path, output).map_err(|source| CertsError::Write { path: path.clone(), source })?;
        written.push(path);
    }
    Ok(Outcome::Written(written))
}

fn exists(path: &Path) -> Result<bool, CertsError> {
    path.try_exists().map_err(|source| CertsError::Inspect { path: path.to_owned(), source })
}

fn create_dir(dir: &Path) -> Result<(), CertsError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    // The directory holds private keys: nobody else needs to list it.
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir).map_err(|source| CertsError::CreateDir { path: dir.to_owned(), source })
}

/// Writes to a temporary file and renames it over `path`, so a reader never sees half a
/// PEM file and a key is never, even briefly, readable by others (a replaced file's old,
/// wider mode does not carry over, since the rename brings a new inode).
fn write_replacing(dir: &Path, path: &Path, output: &Output) -> io::Result<()> {
    let tmp = dir.join(format!(".{}.tmp", output.name));
    // A leftover from a run that was killed: `create_new` below must create it afresh for
    // the mode to apply.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut options = OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, if output.private { 0o600 } else { 0o644 });
    let result = options.open(&tmp).and_then(|mut file| file.write_all(output.contents.as_bytes()));
    if let Err(e) = result.and_then(|()| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(())
}

/// The six PEM files, in write order, valid from `now` (less `CLOCK_SKEW`) for `days`.
fn generate(now: OffsetDateTime, days: u32) -> Result<Vec<Output>, CertsError> {
    let validity = Validity { not_before: now - CLOCK_SKEW, not_after: now + Duration::days(days.into()) };
    let generating = |what: &'static str| move |source| CertsError::Generate { what, source };

    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(generating("CA key"))?;
    let mut ca = validity.params(CA_NAME);
    // Path length 0: this CA signs the two leaves and nothing that could sign further.
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca, ca_key).map_err(generating("CA certificate"))?;

    let message_sans = vec![
        dns(MESSAGE_NAME).map_err(generating("message service certificate"))?,
        dns("localhost").map_err(generating("message service certificate"))?,
        SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
        SanType::IpAddress(IpAddr::V6(Ipv6Addr::LOCALHOST)),
    ];
    let (message_cert, message_key) =
        leaf(&validity, MESSAGE_NAME, message_sans, ExtendedKeyUsagePurpose::ServerAuth, &ca)
            .map_err(generating("message service certificate"))?;

    let gateway_sans = vec![dns(GATEWAY_NAME).map_err(generating("gateway certificate"))?];
    let (gateway_cert, gateway_key) =
        leaf(&validity, GATEWAY_NAME, gateway_sans, ExtendedKeyUsagePurpose::ClientAuth, &ca)
            .map_err(generating("gateway certificate"))?;

    let output = |name, contents, private| Output { name, contents, private };
    let outputs = vec![
        output(MESSAGE_KEY, message_key, true),
        output(MESSAGE_CERT, message_cert, false),
        output(GATEWAY_KEY, gateway_key, true),
        output(GATEWAY_CERT, gateway_cert, false),
        output(CA_KEY, ca.key().serialize_pem(), true),
        output(CA_CERT, ca.pem(), false),
    ];
    debug_assert!(outputs.iter().map(|o| o.name).eq(FILES));
    Ok(outputs)
}

struct Validity {
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
}

impl Validity {
    fn params(&self, common_name: &str) -> CertificateParams {
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(DnType::CommonName, common_name);
        params.distinguished_name = name;
        params.not_before = self.not_before;
        params.not_after = self.not_after;
        params
    }
}

fn dns(name: &str) -> Result<SanType, rcgen::Error> {
    Ok(SanType::DnsName(name.try_into()?))
}

/// An end-entity certificate for one purpose, signed by `ca`: (certificate, key) as PEM.
fn leaf(
    validity: &Validity,
    common_name: &str,
    sans: Vec<SanType>,
    purpose: ExtendedKeyUsagePurpose,
    ca: &Issuer<'_, KeyPair>,
) -> Result<(String, String), rcgen::Error> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = validity.params(common_name);
    params.subject_alt_names = sans;
    params.is_ca = IsCa::ExplicitNoCa;
    // ECDSA keys sign the handshake; they never encipher keys.
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![purpose];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, ca)?;
    Ok((cert.pem(), key.serialize_pem()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
    use webpki::{anchor_from_trusted_cert, EndEntityCert, KeyUsage, ALL_VERIFICATION_ALGS};

    fn opts(dir: &Path, force: bool) -> Options {
        Options { dir: dir.to_owned(), days: 30, force }
    }

    fn cert(dir: &Path, name: &str) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(dir.join(name)).expect("a PEM certificate")
    }

    fn contents(dir: &Path) -> Vec<Vec<u8>> {
        FILES.iter().map(|name| fs::read(dir.join(name)).expect("readable")).collect()
    }

    /// Verifies `leaf` against `ca` as rustls does for a peer certificate with `usage`.
    fn verify(ca: &CertificateDer<'_>, leaf: &CertificateDer<'_>, usage: KeyUsage) -> Result<(), webpki::Error> {
        let anchor = anchor_from_trusted_cert(ca)?;
        let leaf = EndEntityCert::try_from(leaf)?;
        leaf.verify_for_usage(ALL_VERIFICATION_ALGS, &[anchor], &[], UnixTime::now(), usage, None, None).map(|_| ())
    }

    #[test]
    fn the_message_certificate_is_a_server_certificate_for_its_names_under_the_ca() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("nested/dev-tls");
        let outcome = run(&opts(&dir, false))?;
        assert_eq!(outcome, Outcome::Written(FILES.iter().map(|n| dir.join(n)).collect()));

        let (ca, message) = (cert(&dir, CA_CERT), cert(&dir, MESSAGE_CERT));
        verify(&ca, &message, KeyUsage::server_auth())?;
        let end_entity = EndEntityCert::try_from(&message)?;
        for name in ["chat-message", "localhost", "127.0.0.1", "::1"] {
            end_entity.verify_is_valid_for_subject_name(&ServerName::try_from(name)?)?;
        }
        assert!(end_entity.verify_is_valid_for_subject_name(&ServerName::try_from("chat-gateway")?).is_err());
        // serverAuth only: a gateway could not present it as a client.
        assert!(verify(&ca, &message, KeyUsage::client_auth()).is_err());
        Ok(())
    }

    #[test]
    fn the_gateway_certificate_is_a_client_certificate_under_the_ca_only() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        run(&opts(tmp.path(), false))?;
        let (ca, gateway) = (cert(tmp.path(), CA_CERT), cert(tmp.path(), GATEWAY_CERT));
        verify(&ca, &gateway, KeyUsage::client_auth())?;
        assert!(verify(&ca, &gateway, KeyUsage::server_auth()).is_err());

        // Another run's CA (another developer's, say) does not vouch for it.
        let other = tempfile::tempdir()?;
        run(&opts(other.path(), false))?;
        assert!(verify(&cert(other.path(), CA_CERT), &gateway, KeyUsage::client_auth()).is_err());
        Ok(())
    }

    #[test]
    fn each_key_matches_its_certificate() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        run(&opts(tmp.path(), false))?;
        for (cert_name, key_name) in [(CA_CERT, CA_KEY), (MESSAGE_CERT, MESSAGE_KEY), (GATEWAY_CERT, GATEWAY_KEY)] {
            let key = KeyPair::from_pem(&fs::read_to_string(tmp.path().join(key_name))?)?;
            let der = cert(tmp.path(), cert_name);
            assert!(
                der.windows(key.public_key_raw().len()).any(|w| w == key.public_key_raw()),
                "{cert_name} does not carry the public key of {key_name}"
            );
        }
        Ok(())
    }

    #[test]
    fn a_second_run_keeps_the_files_and_force_replaces_them() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        run(&opts(tmp.path(), false))?;
        let first = contents(tmp.path());

        let kept = run(&opts(tmp.path(), false))?;
        assert_eq!(kept, Outcome::Kept { dir: tmp.path().to_owned(), missing: vec![] });
        assert!(kept.to_string().contains("--force"), "{kept}");
        assert_eq!(contents(tmp.path()), first);

        run(&opts(tmp.path(), true))?;
        let forced = contents(tmp.path());
        for (name, (before, after)) in FILES.iter().zip(first.iter().zip(&forced)) {
            assert_ne!(before, after, "{name} was not regenerated");
        }
        verify(&cert(tmp.path(), CA_CERT), &cert(tmp.path(), MESSAGE_CERT), KeyUsage::server_auth())?;
        Ok(())
    }

    #[test]
    fn a_kept_directory_with_files_missing_says_which() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        run(&opts(tmp.path(), false))?;
        fs::remove_file(tmp.path().join(GATEWAY_KEY))?;
        let kept = run(&opts(tmp.path(), false))?;
        assert_eq!(kept, Outcome::Kept { dir: tmp.path().to_owned(), missing: vec![tmp.path().join(GATEWAY_KEY)] });
        assert!(kept.to_string().contains("gateway.key is missing"), "{kept}");
        assert!(!tmp.path().join(GATEWAY_KEY).exists());
        Ok(())
    }

    #[cfg(unix)]
    #[test]
    fn keys_are_readable_by_their_owner_only_even_over_wider_files() -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let tmp = tempfile::tempdir()?;
        fs::write(tmp.path().join(CA_KEY), "old")?;
        fs::set_permissions(tmp.path().join(CA_KEY), fs::Permissions::from_mode(0o644))?;
        run(&opts(tmp.path(), true))?;
        let mode = |name: &str| -> anyhow::Result<u32> {
            Ok(fs::metadata(tmp.path().join(name))?.permissions().mode() & 0o777)
        };
        for key in [CA_KEY, MESSAGE_KEY, GATEWAY_KEY] {
            assert_eq!(mode(key)?, 0o600, "{key}");
        }
        assert_eq!(mode(CA_CERT)?, 0o644);
        let leftovers: Vec<_> =
            fs::read_dir(tmp.path())?.map(|e| e.map(|e| e.file_name())).collect::<Result<_, _>>()?;
        assert_eq!(leftovers.len(), FILES.len(), "temporary files left behind: {leftovers:?}");
        Ok(())
    }

    #[test]
    fn out_of_range_days_are_refused_before_anything_is_written() -> anyhow::Result<()> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().join("certs");
        for days in [0, MAX_DAYS + 1] {
            let err = run(&Options { dir: dir.clone(), days, force: false }).map(|_| ()).unwrap_err();
            assert!(matches!(err, CertsError::Days(d) if d == days), "{err}");
        }
        assert!(!dir.exists());
        Ok(())
    }
}
