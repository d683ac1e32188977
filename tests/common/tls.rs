//! Certificates made at test time (never committed): a CA per [`Pki`], server certificates
//! for 127.0.0.1 and `localhost`, client certificates with a subject of the test's choosing,
//! written as PEM files a bus can be pointed at.

use std::path::{Path, PathBuf};

use eventbus::config::TlsConfig;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct Pair {
    pub cert: String,
    pub key: String,
}

/// A test CA.
pub struct Pki {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    /// A new CA whose subject is `CN=<name>`.
    pub fn new(name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        params.distinguished_name = dn;
        Pki {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `127.0.0.1` and `localhost`.
    pub fn server(&self) -> Pair {
        let mut params =
            CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "eventbus");
        params.distinguished_name = dn;
        self.sign(params)
    }

    /// A client certificate with subject `CN=<cn>,O=<org>` (RFC 4514 order) and the DNS SAN
    /// `<cn>.example`.
    pub fn client(&self, cn: &str, org: &str) -> Pair {
        let mut params = CertificateParams::new(vec![format!("{cn}.example")]).unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, org);
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        self.sign(params)
    }

    fn sign(&self, params: CertificateParams) -> Pair {
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Pair {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}

/// The files of a bus's TLS in a temporary directory, rewritable in place for reload tests.
pub struct TlsFiles {
    pub dir: tempfile::TempDir,
}

impl TlsFiles {
    /// Writes the server certificate of `pki`, its key, and `client_ca` (if any) as
    /// `cert.pem`, `key.pem` and `client-ca.pem`.
    pub fn new(pki: &Pki, client_ca: Option<&Pki>) -> TlsFiles {
        let files = TlsFiles {
            dir: tempfile::tempdir().unwrap(),
        };
        files.write_server(&pki.server());
        if let Some(ca) = client_ca {
            std::fs::write(files.path("client-ca.pem"), ca.ca_pem()).unwrap();
        }
        files
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Replaces the certificate and key, each through a rename so the bus never reads half a
    /// file.
    pub fn write_server(&self, pair: &Pair) {
        replace(&self.path("cert.pem"), pair.cert.as_bytes());
        replace(&self.path("key.pem"), pair.key.as_bytes());
    }

    /// The bus's settings for these files.
    pub fn config(&self) -> TlsConfig {
        let client_ca = self.path("client-ca.pem");
        TlsConfig {
            cert: self.path("cert.pem"),
            key: self.path("key.pem"),
            client_ca: client_ca.exists().then_some(client_ca),
        }
    }
}

/// Writes `contents` to `path` through a temporary file and a rename.
pub fn replace(path: &Path, contents: &[u8]) {
    let temporary = path.with_extension("tmp");
    std::fs::write(&temporary, contents).unwrap();
    std::fs::rename(&temporary, path).unwrap();
}
