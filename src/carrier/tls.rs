//! TLS under the HTTP carrier (cargo feature `tls`): rustls over ring.
//!
//! ```text
//!  agent:   TCP (maybe CONNECTed through a proxy) ─▶ ClientTls::connect ─▶ Link::Client
//!           verify: chain to the system's roots or to `ca_file`, name = station host (SNI),
//!                   then, if `tls_pin` is set, the leaf's SPKI SHA-256 must be one of the pins
//!  station: TCP accept ─▶ ServerTls::accept ─▶ Link::Server (cert and key reloaded on SIGHUP)
//! ```
//!
//! TLS adds reach (egress open only to 443, TLS-only balancers), not
//! trust: Noise inside still authenticates the station by its key and
//! seals every packet, so an inspecting proxy that holds a trusted CA still
//! learns and changes nothing. Verification is not relaxed for that
//! reason, though: a refused certificate is reported with why (expired,
//! another name, self-signed, an unknown issuer as an inspecting proxy
//! presents), so the operator can fix the path rather than guess.
//!
//! Not here: the proxy's CONNECT (`agent::egress`), HTTP (`conn`).

use std::io;
use std::path::{Path, PathBuf};
#[cfg(feature = "station")]
use std::sync::RwLock;
use std::sync::{Arc, Mutex};

use curve25519_dalek::MontgomeryPoint;
#[cfg(feature = "station")]
use futures_rustls::TlsAcceptor;
use futures_rustls::TlsConnector;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{
    ActiveKeyExchange, CryptoProvider, SharedSecret, SupportedKxGroup, WebPkiSupportedAlgorithms,
};
use rustls::pki_types::pem::PemObject;
#[cfg(feature = "station")]
use rustls::pki_types::PrivateKeyDer;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
#[cfg(feature = "station")]
use rustls::ServerConfig;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, NamedGroup, RootCertStore,
    SignatureScheme,
};
use smol::net::TcpStream;
use zeroize::Zeroize;

use super::link::Link;

/// Largest certificate or key file read: a chain of a few certificates is
/// a few KiB, a system CA bundle about 250 KiB.
const MAX_PEM_BYTES: u64 = 4 << 20;

/// A SHA-256 of a certificate's SubjectPublicKeyInfo, as `tls_pin` gives it
/// (the same value as curl's `--pinnedpubkey sha256//...`).
pub type SpkiPin = [u8; 32];

/// Why TLS could not be set up from the config (reported by `check`).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsSetupError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{path} holds no PEM certificate (-----BEGIN CERTIFICATE-----)")]
    NoCertificate { path: PathBuf },
    #[error("{path}: {reason}")]
    BadCertificate { path: PathBuf, reason: String },
    #[error("{path} holds no PEM private key (PKCS#8, RSA or EC)")]
    NoKey { path: PathBuf },
    #[error("no CA certificates found on this system (looked where SSL_CERT_FILE, SSL_CERT_DIR and the usual bundle paths point); give ca_file")]
    NoSystemRoots,
    #[error("the certificate and key do not go together, or are not usable: {0}")]
    Config(rustls::Error),
}

/// Why a TLS handshake with the station failed, in terms of what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("the station's TLS certificate has expired (or this device's clock is wrong)")]
    Expired,
    #[error("the TLS certificate is not for {host} (the name in the station URL)")]
    WrongName { host: String },
    #[error("the TLS certificate is self-signed; give it (or its CA) in ca_file, or pin it with tls_pin")]
    SelfSigned,
    #[error("the TLS certificate is not signed by a CA this agent trusts{}", if *.proxied {
        "; the proxy on the way may have replaced it (TLS inspection): give the proxy's CA in ca_file"
    } else {
        "; give its CA in ca_file"
    })]
    UnknownIssuer { proxied: bool },
    #[error("the TLS certificate's key (SPKI sha256 {found}) matches no tls_pin")]
    PinMismatch { found: String },
    #[error("TLS handshake failed: {0}")]
    Handshake(String),
}

/// A certificate verifier's own refusals, carried through rustls'
/// `CertificateError::Other` and turned into [`TlsError`] afterwards.
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("self-signed certificate")]
    SelfSigned,
    #[error("certificate key matches no pin")]
    Pin(SpkiPin),
}

/// The station's provider: rustls' ring provider whole (it loads the
/// station's private key).
#[cfg(feature = "station")]
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The agent's provider: ring's suites and key exchanges, but no private
/// key loading (the agent has no client certificate, and the key loader
/// links every signing algorithm) and no Ed25519 certificates (none in
/// the web PKI). 30 KiB less on armv7 (boards/README.md). X25519 is
/// [`X25519`], the curve25519-dalek that Noise uses, not ring's, and
/// nothing comes through ring's `default_provider`, whose groups would
/// link ring's X25519 again: 16 KiB less (docs/BENCHMARKS.md).
fn client_provider() -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        cipher_suites: rustls::crypto::ring::DEFAULT_CIPHER_SUITES.to_vec(),
        // ring's order (X25519 first, the one key share sent), with
        // curve25519-dalek's X25519 in place of ring's.
        kx_groups: vec![
            &X25519,
            rustls::crypto::ring::kx_group::SECP256R1,
            rustls::crypto::ring::kx_group::SECP384R1,
        ],
        signature_verification_algorithms: CLIENT_SIG_ALGS,
        secure_random: &SystemRandom,
        key_provider: &NoKeys,
    })
}

/// rustls' ring table of certificate signature algorithms, less Ed25519.
static CLIENT_SIG_ALGS: WebPkiSupportedAlgorithms = {
    use webpki::ring as alg;
    use SignatureScheme as S;
    WebPkiSupportedAlgorithms {
        all: &[
            alg::ECDSA_P256_SHA256,
            alg::ECDSA_P256_SHA384,
            alg::ECDSA_P384_SHA256,
            alg::ECDSA_P384_SHA384,
            alg::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
            alg::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
            alg::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
            alg::RSA_PKCS1_2048_8192_SHA256,
            alg::RSA_PKCS1_2048_8192_SHA384,
            alg::RSA_PKCS1_2048_8192_SHA512,
            alg::RSA_PKCS1_2048_8192_SHA256_ABSENT_PARAMS,
            alg::RSA_PKCS1_2048_8192_SHA384_ABSENT_PARAMS,
            alg::RSA_PKCS1_2048_8192_SHA512_ABSENT_PARAMS,
        ],
        mapping: &[
            (S::ECDSA_NISTP384_SHA384, &[alg::ECDSA_P384_SHA384, alg::ECDSA_P256_SHA384]),
            (S::ECDSA_NISTP256_SHA256, &[alg::ECDSA_P256_SHA256, alg::ECDSA_P384_SHA256]),
            (S::RSA_PSS_SHA512, &[alg::RSA_PSS_2048_8192_SHA512_LEGACY_KEY]),
            (S::RSA_PSS_SHA384, &[alg::RSA_PSS_2048_8192_SHA384_LEGACY_KEY]),
            (S::RSA_PSS_SHA256, &[alg::RSA_PSS_2048_8192_SHA256_LEGACY_KEY]),
            (S::RSA_PKCS1_SHA512, &[alg::RSA_PKCS1_2048_8192_SHA512]),
            (S::RSA_PKCS1_SHA384, &[alg::RSA_PKCS1_2048_8192_SHA384]),
            (S::RSA_PKCS1_SHA256, &[alg::RSA_PKCS1_2048_8192_SHA256]),
        ],
    }
};

/// The system's random generator (getrandom), as ring's is.
#[derive(Debug)]
struct SystemRandom;

impl rustls::crypto::SecureRandom for SystemRandom {
    fn fill(&self, buf: &mut [u8]) -> Result<(), rustls::crypto::GetRandomFailed> {
        getrandom::fill(buf).map_err(|_| rustls::crypto::GetRandomFailed)
    }
}

/// X25519 key exchange (RFC 7748) with curve25519-dalek, which the agent
/// links for Noise anyway, so that ring's X25519 is not linked as well.
/// Does what rustls' ring group does: a fresh secret from the system's
/// generator for each handshake, and a peer share that gives the all-zero
/// secret (a low-order point) refused.
#[derive(Debug)]
struct X25519;

impl SupportedKxGroup for X25519 {
    fn start(&self) -> Result<Box<dyn ActiveKeyExchange>, rustls::Error> {
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret).map_err(|_| rustls::Error::FailedToGetRandomBytes)?;
        let public = MontgomeryPoint::mul_base_clamped(secret).to_bytes();
        Ok(Box::new(X25519Share { secret, public }))
    }

    fn name(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

/// One handshake's X25519 secret (wiped when dropped) and its share.
struct X25519Share {
    secret: [u8; 32],
    public: [u8; 32],
}

impl Drop for X25519Share {
    fn drop(&mut self) {
        self.secret.zeroize();
    }
}

impl ActiveKeyExchange for X25519Share {
    fn complete(self: Box<Self>, peer: &[u8]) -> Result<SharedSecret, rustls::Error> {
        let invalid = || rustls::Error::PeerMisbehaved(rustls::PeerMisbehaved::InvalidKeyShare);
        let peer: [u8; 32] = peer.try_into().map_err(|_| invalid())?;
        let mut shared = MontgomeryPoint(peer).mul_clamped(self.secret).to_bytes();
        let zero = shared.iter().fold(0u8, |any, byte| any | byte) == 0;
        let secret = SharedSecret::from(&shared[..]);
        shared.zeroize();
        if zero {
            return Err(invalid());
        }
        Ok(secret)
    }

    fn pub_key(&self) -> &[u8] {
        &self.public
    }

    fn group(&self) -> NamedGroup {
        NamedGroup::X25519
    }
}

/// The agent's key provider: it has no keys to load.
#[derive(Debug)]
struct NoKeys;

impl rustls::crypto::KeyProvider for NoKeys {
    fn load_private_key(
        &self,
        _key: rustls::pki_types::PrivateKeyDer<'static>,
    ) -> Result<Arc<dyn rustls::sign::SigningKey>, rustls::Error> {
        Err(rustls::Error::General("the agent loads no TLS private key".into()))
    }
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsSetupError> {
    use std::io::Read;
    let read_err =
        |e: io::Error| TlsSetupError::Read { path: path.to_owned(), reason: e.to_string() };
    let file = std::fs::File::open(path).map_err(read_err)?;
    let mut bytes = Vec::new();
    file.take(MAX_PEM_BYTES + 1).read_to_end(&mut bytes).map_err(read_err)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(TlsSetupError::Read {
            path: path.to_owned(),
            reason: format!("larger than {MAX_PEM_BYTES} bytes"),
        });
    }
    Ok(bytes)
}

/// Every certificate in a PEM file, at least one.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    let pem = read_pem(path)?;
    let certs =
        CertificateDer::pem_slice_iter(&pem).collect::<Result<Vec<_>, _>>().map_err(|e| {
            TlsSetupError::BadCertificate { path: path.to_owned(), reason: e.to_string() }
        })?;
    if certs.is_empty() {
        return Err(TlsSetupError::NoCertificate { path: path.to_owned() });
    }
    Ok(certs)
}

#[cfg(feature = "station")]
fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsSetupError> {
    let pem = read_pem(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsSetupError::NoKey { path: path.to_owned() })
}

/// Bundle files of the system's CA certificates, the first found is read
/// (openssl-probe's list for Linux, which rustls-native-certs used).
const SYSTEM_CA_FILES: &[&str] = &[
    "/etc/ssl/certs/ca-certificates.crt", // Debian, Ubuntu, Gentoo, Buildroot, Yocto
    "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem", // CentOS, RHEL 7+
    "/etc/pki/tls/certs/ca-bundle.crt",   // Fedora, RHEL 6
    "/etc/ssl/ca-bundle.pem",             // openSUSE
    "/etc/pki/tls/cacert.pem",            // OpenELEC
    "/etc/ssl/cert.pem",                  // Alpine
    "/opt/etc/ssl/certs/ca-certificates.crt", // Entware
    "/etc/ssl/certs/cacert.pem",          // OpenHarmony
];

/// Directories of CA certificates, one a file (OpenSSL's CApath), each
/// read when it exists.
const SYSTEM_CA_DIRS: &[&str] =
    &["/etc/ssl/certs", "/etc/pki/tls/certs", "/etc/security/certificates"];

/// The system's CA certificates, found as OpenSSL finds them:
/// `SSL_CERT_FILE` and `SSL_CERT_DIR` (`:`-separated) when either is set,
/// else the first of [`SYSTEM_CA_FILES`] and every one of
/// [`SYSTEM_CA_DIRS`] that exists. What rustls-native-certs did, read here
/// with the PEM parser rustls already links: 4 KiB less on armv7.
fn system_roots() -> Vec<CertificateDer<'static>> {
    use std::env;
    let file = env::var_os("SSL_CERT_FILE").map(PathBuf::from);
    let dirs: Vec<PathBuf> = env::var_os("SSL_CERT_DIR")
        .map(|dirs| env::split_paths(&dirs).filter(|p| !p.as_os_str().is_empty()).collect())
        .unwrap_or_default();
    if file.is_some() || !dirs.is_empty() {
        return certs_in(file.as_deref(), &dirs);
    }
    let file = SYSTEM_CA_FILES.iter().map(Path::new).find(|path| path.exists());
    let dirs: Vec<PathBuf> =
        SYSTEM_CA_DIRS.iter().map(PathBuf::from).filter(|path| path.exists()).collect();
    certs_in(file, &dirs)
}

/// The certificates in `file` and in the files of `dirs`, each
/// certificate once. A file is read once however many names lead to it
/// (the hash-named links of `c_rehash`, a link to the bundle); files that
/// cannot be read or hold no certificate are passed over, as an unusable
/// certificate in a system bundle is.
fn certs_in(file: Option<&Path>, dirs: &[PathBuf]) -> Vec<CertificateDer<'static>> {
    use std::os::unix::fs::MetadataExt;
    let mut seen: Vec<(u64, u64)> = Vec::new();
    let mut certs = Vec::new();
    let mut read = |path: &Path, certs: &mut Vec<CertificateDer<'static>>| {
        let Ok(meta) = std::fs::metadata(path) else { return };
        let id = (meta.dev(), meta.ino());
        if !meta.is_file() || seen.contains(&id) {
            return;
        }
        seen.push(id);
        let Ok(pem) = read_pem(path) else { return };
        for cert in CertificateDer::pem_slice_iter(&pem).flatten() {
            // A linear search: a few hundred certificates, once at start.
            if !certs.contains(&cert) {
                certs.push(cert);
            }
        }
    };
    if let Some(file) = file {
        read(file, &mut certs);
    }
    for dir in dirs {
        let Ok(entries) = std::fs::read_dir(dir) else { continue };
        for entry in entries.flatten() {
            read(&entry.path(), &mut certs);
        }
    }
    certs
}

/// The SHA-256 of a certificate's SubjectPublicKeyInfo.
pub fn spki_sha256(cert: &CertificateDer<'_>) -> Result<SpkiPin, rustls::Error> {
    let parsed = webpki::EndEntityCert::try_from(cert)
        .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
    let digest =
        ring::digest::digest(&ring::digest::SHA256, parsed.subject_public_key_info().as_ref());
    let mut pin = [0u8; 32];
    pin.copy_from_slice(digest.as_ref());
    Ok(pin)
}

/// The agent's TLS: roots, pins and session cache, made once, used for
/// every carrier connection.
pub struct ClientTls {
    connector: TlsConnector,
}

impl ClientTls {
    /// Trusts the certificates in `ca_file` if given (alone: a company CA
    /// for an inspecting proxy, or the station's own CA), else the system's
    /// CA bundle; with `pins`, the station's key must also be one of them.
    pub fn new(ca_file: Option<&Path>, pins: &[SpkiPin]) -> Result<ClientTls, TlsSetupError> {
        let mut roots = RootCertStore::empty();
        match ca_file {
            Some(path) => {
                for cert in load_certs(path)? {
                    roots.add(cert).map_err(|e| TlsSetupError::BadCertificate {
                        path: path.to_owned(),
                        reason: e.to_string(),
                    })?;
                }
            }
            None => {
                // Certificates the bundle holds but webpki cannot use are
                // skipped, as every TLS client does with a system bundle.
                roots.add_parsable_certificates(system_roots());
                if roots.is_empty() {
                    return Err(TlsSetupError::NoSystemRoots);
                }
            }
        }
        let provider = client_provider();
        let verifier = Verifier { roots, pins: pins.to_vec() };
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(TlsSetupError::Config)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        Ok(ClientTls { connector: TlsConnector::from(Arc::new(config)) })
    }

    /// TLS over `tcp` to `host` (sent as SNI, and the name the certificate
    /// must carry). `proxied`: `tcp` is a CONNECT tunnel, which changes
    /// what an unknown issuer most likely means.
    pub async fn connect(
        &self,
        host: &str,
        tcp: TcpStream,
        proxied: bool,
    ) -> Result<Link, TlsError> {
        let name = ServerName::try_from(host.to_owned()).map_err(|e| {
            TlsError::Handshake(format!("{host:?} is not a valid TLS server name: {e}"))
        })?;
        match self.connector.connect(name, tcp).await {
            Ok(stream) => Ok(Link::Client(Arc::new(Mutex::new(stream)))),
            Err(e) => Err(explain(&e, host, proxied)),
        }
    }
}

/// Turns a failed handshake's error into what the user should know.
fn explain(error: &io::Error, host: &str, proxied: bool) -> TlsError {
    let Some(tls) = error.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) else {
        return TlsError::Handshake(error.to_string());
    };
    match tls {
        rustls::Error::InvalidCertificate(why) => match why {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                TlsError::Expired
            }
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                TlsError::WrongName { host: host.to_owned() }
            }
            CertificateError::UnknownIssuer => TlsError::UnknownIssuer { proxied },
            CertificateError::Other(other) => match other.0.downcast_ref::<Refusal>() {
                Some(Refusal::SelfSigned) => TlsError::SelfSigned,
                Some(Refusal::Pin(found)) => TlsError::PinMismatch { found: pin_text(found) },
                None => TlsError::Handshake(tls.to_string()),
            },
            _ => TlsError::Handshake(tls.to_string()),
        },
        other => TlsError::Handshake(other.to_string()),
    }
}

/// A pin as `tls_pin` takes it: base64 of the SHA-256.
pub fn pin_text(pin: &SpkiPin) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(pin)
}

/// webpki's verification, then the pins; and a self-signed certificate
/// told apart from one of an unknown CA.
///
/// rustls' own `WebPkiServerVerifier` does the same first step through
/// the same functions, but links webpki's CRL parsing and revocation
/// checks whether or not any CRL is given (16 KiB on armv7); the
/// agent takes no CRLs, so it calls the steps itself.
#[derive(Debug)]
struct Verifier {
    roots: RootCertStore,
    pins: Vec<SpkiPin>,
}

impl Verifier {
    /// The chain to one of `roots` and the name, as rustls'
    /// `WebPkiServerVerifier` checks them with no CRLs.
    fn webpki(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        now: UnixTime,
    ) -> Result<(), rustls::Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            CLIENT_SIG_ALGS.all,
        )?;
        rustls::client::verify_server_name(&cert, server_name)
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verdict = self.webpki(end_entity, intermediates, server_name, now);
        // A self-signed certificate nothing vouches for fails as an
        // unknown issuer, or, depending on what webpki tried first, as an
        // unsupported algorithm or a CA used as an end entity: all mean
        // the same to the user. Its dates and name are reported as such.
        if let Err(rustls::Error::InvalidCertificate(why)) = &verdict {
            let dated_or_named = matches!(
                why,
                CertificateError::Expired
                    | CertificateError::ExpiredContext { .. }
                    | CertificateError::NotValidYet
                    | CertificateError::NotValidYetContext { .. }
                    | CertificateError::NotValidForName
                    | CertificateError::NotValidForNameContext { .. }
            );
            if !dated_or_named && intermediates.is_empty() && is_self_signed(end_entity) {
                return Err(refusal(Refusal::SelfSigned));
            }
        }
        verdict?;
        if !self.pins.is_empty() {
            let found = spki_sha256(end_entity)?;
            if !self.pins.contains(&found) {
                return Err(refusal(Refusal::Pin(found)));
            }
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        #[cfg(feature = "tls12")]
        return rustls::crypto::verify_tls12_signature(message, cert, dss, &CLIENT_SIG_ALGS);
        // Without `tls12` rustls speaks only TLS 1.3 and never asks for
        // this; refusing keeps the unused check out of the binary.
        #[cfg(not(feature = "tls12"))]
        {
            let _ = (message, cert, dss);
            Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
        }
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &CLIENT_SIG_ALGS)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        CLIENT_SIG_ALGS.supported_schemes()
    }
}

fn refusal(why: Refusal) -> rustls::Error {
    rustls::Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(why))))
}

fn is_self_signed(cert: &CertificateDer<'_>) -> bool {
    webpki::EndEntityCert::try_from(cert).is_ok_and(|parsed| parsed.subject() == parsed.issuer())
}

/// The station's TLS: its certificate and key, replaced whole on reload.
/// Only in builds with the station: an agent-only build links no TLS
/// server (about a tenth of its size).
#[cfg(feature = "station")]
pub struct ServerTls {
    files: (PathBuf, PathBuf),
    current: RwLock<TlsAcceptor>,
}

#[cfg(feature = "station")]
impl ServerTls {
    /// Loads `cert_file` (the chain, leaf first) and `key_file`.
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<ServerTls, TlsSetupError> {
        let acceptor = acceptor(cert_file, key_file)?;
        Ok(ServerTls {
            files: (cert_file.to_owned(), key_file.to_owned()),
            current: RwLock::new(acceptor),
        })
    }

    /// Reads the files again (a renewed certificate): new connections get
    /// the new one, open ones keep theirs. On error the old one stays.
    pub fn reload(&self) -> Result<(), TlsSetupError> {
        let fresh = acceptor(&self.files.0, &self.files.1)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = fresh;
        Ok(())
    }

    /// Whether these are the files `cert_file` and `key_file` name.
    #[must_use]
    pub fn same_files(&self, cert_file: &Path, key_file: &Path) -> bool {
        self.files.0 == cert_file && self.files.1 == key_file
    }

    /// The TLS handshake of an accepted connection (the caller bounds it
    /// in time).
    pub async fn accept(&self, tcp: TcpStream) -> io::Result<Link> {
        let acceptor = self.current.read().unwrap_or_else(|p| p.into_inner()).clone();
        let stream = acceptor.accept(tcp).await?;
        Ok(Link::Server(Arc::new(Mutex::new(stream))))
    }
}

#[cfg(feature = "station")]
fn acceptor(cert_file: &Path, key_file: &Path) -> Result<TlsAcceptor, TlsSetupError> {
    let certs = load_certs(cert_file)?;
    let key = load_key(key_file)?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsSetupError::Config)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(TlsSetupError::Config)?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pem(der: &[u8]) -> String {
        use base64::Engine;
        let body = base64::engine::general_purpose::STANDARD.encode(der);
        format!("-----BEGIN CERTIFICATE-----\n{body}\n-----END CERTIFICATE-----\n")
    }

    fn hex(text: &str) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }

    /// RFC 7748, section 6.1 (Alice's key, Bob's share); and the all-zero
    /// secret of a low-order share refused.
    #[test]
    fn x25519_agrees_with_rfc_7748() {
        let alice = hex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a");
        let share = X25519Share {
            secret: alice,
            public: MontgomeryPoint::mul_base_clamped(alice).to_bytes(),
        };
        assert_eq!(
            share.pub_key(),
            hex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
        );
        let bob = hex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f");
        let shared = Box::new(share).complete(&bob).unwrap();
        assert_eq!(
            shared.secret_bytes(),
            hex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
        );
        let fresh = X25519.start().unwrap();
        assert!(fresh.complete(&[0u8; 32]).is_err());
        assert!(X25519.start().unwrap().complete(&[9u8; 31]).is_err());
    }

    /// A bundle, a c_rehash-style directory of links and copies: each
    /// certificate once, files that are not certificates passed over.
    #[test]
    fn system_certificates_are_read_once_each() {
        let dir = std::env::temp_dir().join(format!("postern-certs-in-{}", std::process::id()));
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs).unwrap();
        let bundle = dir.join("bundle.crt");
        std::fs::write(&bundle, pem(b"one") + "junk\n" + &pem(b"two")).unwrap();
        std::fs::write(certs.join("three.pem"), pem(b"three")).unwrap();
        std::fs::write(certs.join("copy-of-two.pem"), pem(b"two")).unwrap();
        std::fs::write(certs.join("README"), "not a certificate\n").unwrap();
        std::os::unix::fs::symlink("three.pem", certs.join("0123abcd.0")).unwrap();
        std::os::unix::fs::symlink(&bundle, certs.join("ca-certificates.crt")).unwrap();
        std::os::unix::fs::symlink("gone.pem", certs.join("89abcdef.0")).unwrap();

        let mut found: Vec<Vec<u8>> =
            certs_in(Some(&bundle), &[certs]).iter().map(|c| c.to_vec()).collect();
        found.sort();
        assert_eq!(found, [b"one".to_vec(), b"three".to_vec(), b"two".to_vec()]);
        assert!(certs_in(None, &[dir.join("missing")]).is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
