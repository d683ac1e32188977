//! TLS on the bus's listeners (gRPC and admin HTTP), with certificates that can be replaced
//! while the bus runs.
//!
//! - **What is loaded**: the server's certificate chain and private key (`--tls-cert`,
//!   `--tls-key`, PEM), and optionally a CA (`--tls-client-ca`, PEM) against which client
//!   certificates are verified (mutual TLS). A client without a certificate may still connect:
//!   whether it may do anything is for the authentication layer to decide from
//!   [`crate::accept::ConnectionInfo::peer_certificate`]; a certificate that is presented must
//!   verify, or the handshake fails.
//! - **Reload without a restart**: every handshake takes the [`rustls::ServerConfig`] in force
//!   at that moment from [`ReloadableTls`] (an `Arc` swapped under a lock held only to clone
//!   it), so a reload changes what new connections see and leaves open ones as they are. Reloads
//!   happen on SIGHUP and when one of the files changes. A set of files that does not load (a
//!   half-written file, a key that does not match the certificate) is logged and the old
//!   certificates stay.
//! - **Why polling for changes**: the watcher compares each file's modification time and length
//!   once a second instead of using inotify (the `notify` crate). Three `stat` calls a second
//!   cost nothing, need no dependency, and see every way files get replaced, including the
//!   symlink swap Kubernetes does for mounted secrets, which inotify watches on the files
//!   themselves miss.
//! - **The handshake itself** is driven by [`crate::accept::Incoming`], in its own future per
//!   connection, under the connection limit and the handshake deadline.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tracing::{info, warn};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate, X509Name};

use crate::accept::PeerCertificate;
use crate::config::TlsConfig;

/// How often the watcher looks at the files' modification times.
pub const POLL_EVERY: Duration = Duration::from_secs(1);

/// Why a set of TLS files cannot be used; each names the flag of the file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file cannot be read.
    #[error("{flag}: cannot read {path}: {source}")]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    /// The file was read but holds no usable PEM of the kind the flag needs.
    #[error("{flag}: {path}: {why}")]
    Invalid {
        flag: &'static str,
        path: PathBuf,
        why: String,
    },
}

/// Which protocol the listener speaks, announced through ALPN: gRPC clients (Python's and
/// Node's grpc libraries) refuse a TLS server that does not select `h2`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alpn {
    /// HTTP/2, for the gRPC listener.
    Grpc,
    /// HTTP/1.1, for the admin listener.
    Http1,
}

/// The rustls configurations built from one set of files, one per listener kind.
#[derive(Debug)]
struct Loaded {
    grpc: Arc<rustls::ServerConfig>,
    http1: Arc<rustls::ServerConfig>,
}

/// The server's TLS settings, replaceable while it runs. Cheap to clone (an `Arc`); every clone
/// sees every reload.
#[derive(Debug, Clone)]
pub struct ReloadableTls {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    files: TlsConfig,
    /// A std lock is enough: it is held only to clone or replace an `Arc`, never across await.
    current: RwLock<Arc<Loaded>>,
    /// The files' (modification time, length) when last looked at, for the watcher.
    stamps: Mutex<Vec<Option<(SystemTime, u64)>>>,
}

impl ReloadableTls {
    /// Loads `files`.
    ///
    /// # Errors
    /// [`TlsError`] naming the flag whose file is missing or bad, or `--tls-key` when the key
    /// does not fit the certificate.
    pub fn open(files: &TlsConfig) -> Result<ReloadableTls, TlsError> {
        let loaded = load(files)?;
        Ok(ReloadableTls {
            shared: Arc::new(Shared {
                files: files.clone(),
                current: RwLock::new(Arc::new(loaded)),
                stamps: Mutex::new(stamps(files)),
            }),
        })
    }

    /// Whether client certificates are asked for and verified (`--tls-client-ca`).
    pub fn mutual(&self) -> bool {
        self.shared.files.client_ca.is_some()
    }

    /// The files this was loaded from.
    pub fn files(&self) -> &TlsConfig {
        &self.shared.files
    }

    /// An acceptor with the configuration in force now, for one handshake.
    pub fn acceptor(&self, alpn: Alpn) -> tokio_rustls::TlsAcceptor {
        let current = self
            .shared
            .current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone();
        tokio_rustls::TlsAcceptor::from(match alpn {
            Alpn::Grpc => current.grpc.clone(),
            Alpn::Http1 => current.http1.clone(),
        })
    }

    /// Loads the files again and, if they load, uses them for new handshakes.
    ///
    /// # Errors
    /// As [`ReloadableTls::open`]; the certificates in force stay.
    pub fn reload(&self) -> Result<(), TlsError> {
        let loaded = load(&self.shared.files)?;
        *self
            .shared
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Arc::new(loaded);
        Ok(())
    }

    /// Reloads (logging the outcome) on SIGHUP and whenever one of the files' modification
    /// time or length changes, until `stop` resolves.
    pub fn spawn_watcher(&self, stop: impl std::future::Future<Output = ()> + Send + 'static) {
        let tls = self.clone();
        tokio::spawn(async move {
            tokio::pin!(stop);
            let mut hangup = hangup_signal();
            let mut ticks = tokio::time::interval(POLL_EVERY);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                let why = tokio::select! {
                    _ = &mut stop => return,
                    _ = recv_hangup(&mut hangup) => "SIGHUP",
                    _ = ticks.tick() => {
                        if !tls.files_changed() {
                            continue;
                        }
                        "a file changed"
                    }
                };
                match tls.reload() {
                    Ok(()) => info!(why, "TLS certificates reloaded"),
                    Err(error) => warn!(
                        why,
                        %error,
                        "TLS certificates not reloaded; keeping the ones in force"
                    ),
                }
            }
        });
    }

    /// Whether a file's modification time or length differs from when last looked at.
    fn files_changed(&self) -> bool {
        let now = stamps(&self.shared.files);
        let mut last = self
            .shared
            .stamps
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let changed = *last != now;
        *last = now;
        changed
    }
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = ();

#[cfg(unix)]
fn hangup_signal() -> Hangup {
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(signal) => Some(signal),
        Err(error) => {
            warn!(%error, "cannot listen for SIGHUP; TLS files are reloaded when they change");
            None
        }
    }
}

#[cfg(unix)]
async fn recv_hangup(hangup: &mut Hangup) {
    if let Some(signal) = hangup {
        if signal.recv().await.is_some() {
            return;
        }
    }
    std::future::pending().await
}

#[cfg(not(unix))]
fn hangup_signal() -> Hangup {}

#[cfg(not(unix))]
async fn recv_hangup(_: &mut Hangup) {
    std::future::pending().await
}

fn stamps(files: &TlsConfig) -> Vec<Option<(SystemTime, u64)>> {
    [
        Some(&files.cert),
        Some(&files.key),
        files.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|path| {
        std::fs::metadata(path).ok().map(|meta| {
            (
                meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                meta.len(),
            )
        })
    })
    .collect()
}

fn read(flag: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        flag,
        path: path.to_owned(),
        source,
    })
}

fn invalid(flag: &'static str, path: &Path, why: impl Into<String>) -> TlsError {
    TlsError::Invalid {
        flag,
        path: path.to_owned(),
        why: why.into(),
    }
}

/// Every certificate in the PEM file `path`; at least one.
fn certificates(flag: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(flag, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| invalid(flag, path, format!("bad PEM: {error}")))?;
    if certs.is_empty() {
        return Err(invalid(flag, path, "no CERTIFICATE in the PEM file"));
    }
    Ok(certs)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn load(files: &TlsConfig) -> Result<Loaded, TlsError> {
    let chain = certificates("--tls-cert", &files.cert)?;
    let key_pem = read("--tls-key", &files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem)
        .map_err(|error| invalid("--tls-key", &files.key, format!("no private key: {error}")))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|error| invalid("--tls-cert", &files.cert, error.to_string()))?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates("--tls-client-ca", ca)? {
                roots.add(cert).map_err(|error| {
                    invalid(
                        "--tls-client-ca",
                        ca,
                        format!("not a CA certificate: {error}"),
                    )
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.into(), provider())
                // Auth is decided later, from the certificate if any: no certificate is let in,
                // a bad one is not.
                .allow_unauthenticated()
                .build()
                .map_err(|error| invalid("--tls-client-ca", ca, error.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(chain, key)
        .map_err(|error| invalid("--tls-key", &files.key, error.to_string()))?;
    let with_alpn = |protocol: &[u8]| {
        let mut config = config.clone();
        config.alpn_protocols = vec![protocol.to_vec()];
        Arc::new(config)
    };
    Ok(Loaded {
        grpc: with_alpn(b"h2"),
        http1: with_alpn(b"http/1.1"),
    })
}

/// The client's certificate on a finished handshake, if it presented one (rustls has verified
/// it against `--tls-client-ca` by then). `None` also for a certificate whose DER cannot be
/// parsed, which verification would have refused.
pub fn peer_certificate(connection: &rustls::ServerConnection) -> Option<PeerCertificate> {
    let der = connection.peer_certificates()?.first()?;
    let (_, cert) = X509Certificate::from_der(der.as_ref()).ok()?;
    let mut subject_alt_names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(dns) => subject_alt_names.push((*dns).to_owned()),
                GeneralName::URI(uri) => subject_alt_names.push((*uri).to_owned()),
                _ => {}
            }
        }
    }
    Some(PeerCertificate {
        subject: rfc4514(cert.subject()),
        subject_alt_names,
    })
}

/// `name` as RFC 4514 writes it: RDNs last-to-first, `,` between them, `+` within one,
/// the short names the RFC lists, the dotted OID for other types, values escaped.
pub fn rfc4514(name: &X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let rdns: Vec<String> = name
        .iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(|attr| {
                    let oid = attr.attr_type();
                    let short = x509_parser::objects::oid2abbrev(oid, registry)
                        .ok()
                        .map(|abbrev| match abbrev {
                            "street" => "STREET",
                            "UID" | "uid" => "UID",
                            other => other,
                        })
                        .filter(|abbrev| {
                            ["CN", "L", "ST", "O", "OU", "C", "STREET", "DC", "UID"]
                                .contains(abbrev)
                        });
                    let kind = short.map_or_else(|| oid.to_id_string(), str::to_owned);
                    let value = match attr.as_str() {
                        Ok(text) => escape(text),
                        // Not a string type: `#` and the hex of the value's content bytes.
                        Err(_) => {
                            let hex: String = attr
                                .attr_value()
                                .data
                                .iter()
                                .map(|byte| format!("{byte:02x}"))
                                .collect();
                            format!("#{hex}")
                        }
                    };
                    format!("{kind}={value}")
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

/// RFC 4514 section 2.4 escaping of an attribute value.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (index, c) in value.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '#' if index == 0 => out.push_str("\\#"),
            ' ' if index == 0 || index == last => out.push_str("\\ "),
            '\0' => out.push_str("\\00"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_are_written_as_rfc_4514_has_them() {
        let mut params = rcgen::CertificateParams::new(vec!["order.example".into()]).unwrap();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CountryName, "DE");
        dn.push(rcgen::DnType::OrganizationName, "Acme, Inc.");
        dn.push(rcgen::DnType::CommonName, "order-service");
        params.distinguished_name = dn;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (_, parsed) = X509Certificate::from_der(cert.der()).unwrap();
        assert_eq!(
            rfc4514(parsed.subject()),
            "CN=order-service,O=Acme\\, Inc.,C=DE"
        );
        assert_eq!(escape(" #a "), "\\ #a\\ ");
        assert_eq!(escape("#a"), "\\#a");
    }
}
