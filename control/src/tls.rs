//! rustls configuration for sessions. This module only builds configs; it never moves bytes.
//! The session driver wraps each tunnel socket in a `rustls::ServerConnection` or
//! `ClientConnection` built from these.
//!
//! Server side: the certificate comes from `tls_cert_file`/`tls_key_file`. When neither is
//! set, a self-signed certificate is generated once and kept in `state_dir`. Its fingerprint
//! stays stable across restarts, so clients can pin it.
//!
//! Client side, in order of precedence:
//! - `server_fingerprint`: the SHA-256 of the leaf certificate must match. Names, expiry and
//!   chains are not checked, because a pin says exactly which certificate to trust. Handshake
//!   signatures are still verified, so the peer must hold the certificate's private key.
//! - `ca_file`: the usual WebPKI verification against the roots in that file.
//! - neither: the usual WebPKI verification against the Mozilla roots (`webpki-roots`).
//!
//! Both sides use the ring provider explicitly (not a process-wide default, which another
//! crate could install differently), offer TLS 1.3 and 1.2, and use the ALPN protocol
//! [`ALPN`]. A peer that speaks something else fails the handshake instead of sending us
//! garbage frames.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, OtherError, RootCertStore, SignatureScheme};

use crate::config::{ClientConfig, Fingerprint, ServerConfig};

/// ALPN protocol id of warren's session protocol, version 1. Both sides offer it and nothing
/// else.
pub const ALPN: &[u8] = b"warren/1";

/// File names of the generated self-signed certificate and key inside `state_dir`.
pub const SELF_SIGNED_CERT_FILE: &str = "cert.pem";
/// See [`SELF_SIGNED_CERT_FILE`].
pub const SELF_SIGNED_KEY_FILE: &str = "key.pem";

/// Subject alternative name of the generated certificate. Clients pin it by fingerprint and
/// do not check names, so any fixed name works. This one says what the certificate is for.
const SELF_SIGNED_NAME: &str = "warren-self-signed";

const VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// Why a TLS configuration could not be built. Each variant names the file involved.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read.
    #[error("reading {}: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// A file is not valid PEM.
    #[error("reading {}: malformed PEM: {source}", path.display())]
    Pem {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        source: io::Error,
    },
    /// A certificate file holds no certificate.
    #[error("reading {}: no certificate found (expected a PEM CERTIFICATE block)", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// A key file holds no private key.
    #[error("reading {}: no private key found (expected a PEM PRIVATE KEY block)", path.display())]
    NoPrivateKey {
        /// The file.
        path: PathBuf,
    },
    /// rustls refused the certificate and key pair, e.g. because the key does not match the
    /// certificate or uses an unsupported algorithm.
    #[error("using certificate {} with key {}: {source}", cert.display(), key.display())]
    CertificateRejected {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls's reason.
        source: rustls::Error,
    },
    /// A CA file holds a certificate that cannot serve as a trust root.
    #[error("reading {}: certificate #{index} is not a usable trust root: {source}", path.display())]
    BadTrustRoot {
        /// The CA file.
        path: PathBuf,
        /// Position of the certificate in the file, starting at 1.
        index: usize,
        /// rustls's reason.
        source: rustls::Error,
    },
    /// Only one of the certificate and key files is set. Config parsing rejects this, so it
    /// only happens with a hand-built [`ServerConfig`].
    #[error("tls_cert_file and tls_key_file must be set together")]
    CertWithoutKey,
    /// Both a pin and a CA file are set. Config parsing rejects this, so it only happens with
    /// a hand-built [`ClientConfig`].
    #[error("server_fingerprint and ca_file cannot be combined")]
    PinAndCaFile,
    /// `state_dir` holds a certificate but no key. We refuse to overwrite the certificate
    /// that clients may have pinned.
    #[error(
        "{} exists but {} does not; restore the key, or delete the certificate to generate a \
         new pair (clients pinning the old fingerprint must then be updated)",
        cert.display(),
        key.display()
    )]
    IncompleteSelfSigned {
        /// The certificate that exists.
        cert: PathBuf,
        /// The key that is missing.
        key: PathBuf,
    },
    /// Creating `state_dir` or writing a generated file failed.
    #[error("writing {}: {source}", path.display())]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        source: io::Error,
    },
    /// Generating the self-signed certificate failed.
    #[error("generating the self-signed certificate: {0}")]
    Generate(#[from] rcgen::Error),
    /// The name to verify is not a DNS name or IP address.
    #[error("{name:?} is not a valid TLS server name (set client.server_name)")]
    ServerName {
        /// The offending name.
        name: String,
    },
    /// The provider does not support the protocol versions (cannot happen with ring, but the
    /// builder API is fallible).
    #[error("configuring TLS versions: {0}")]
    Versions(rustls::Error),
}

/// A ready server-side TLS configuration.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// Shared by every accepted session (rustls configs are meant to be shared).
    pub config: Arc<rustls::ServerConfig>,
    /// SHA-256 of the leaf certificate. The server logs it at startup so operators can copy
    /// it into `client.server_fingerprint`.
    pub fingerprint: Fingerprint,
    /// The certificate was generated (now or on an earlier start) rather than configured.
    pub self_signed: bool,
}

/// A ready client-side TLS configuration.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// Shared by every session the client opens.
    pub config: Arc<rustls::ClientConfig>,
    /// The name sent as SNI and, unless pinning, verified against the certificate.
    pub server_name: ServerName<'static>,
}

/// The server's certificate fingerprint did not match `client.server_fingerprint`. It
/// reaches the session driver inside `rustls::Error::InvalidCertificate(Other(..))`.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "server certificate fingerprint {actual} does not match the pinned server_fingerprint \
     {expected}"
)]
pub struct FingerprintMismatch {
    /// The pin from the config.
    pub expected: Fingerprint,
    /// The fingerprint of the certificate the server presented.
    pub actual: Fingerprint,
}

impl FingerprintMismatch {
    /// Finds a pin mismatch inside a handshake error, so the session driver can report it
    /// as the server's (or the operator's) fault rather than as a generic TLS failure.
    pub fn from_rustls(err: &rustls::Error) -> Option<&FingerprintMismatch> {
        match err {
            rustls::Error::InvalidCertificate(CertificateError::Other(other)) => {
                other.0.downcast_ref::<FingerprintMismatch>()
            }
            _ => None,
        }
    }
}

impl std::fmt::Debug for FingerprintMismatch {
    /// rustls shows the inner error of `CertificateError::Other` with `Debug`, so `Debug`
    /// prints the readable message too.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// ring's provider with AES-128-GCM first: a session moves every byte through the AEAD, and
/// AES-128 takes 10 rounds per block where AES-256 takes 14 (a TLS 1.3 mandatory suite, no
/// weaker in practice). The other suites stay, in ring's order, for peers that lack it.
fn provider() -> Arc<CryptoProvider> {
    let mut p = rustls::crypto::ring::default_provider();
    let first = rustls::crypto::ring::cipher_suite::TLS13_AES_128_GCM_SHA256;
    p.cipher_suites.retain(|s| s.suite() != first.suite());
    p.cipher_suites.insert(0, first);
    Arc::new(p)
}

/// Builds the server's TLS configuration from the configured files or, when neither is set,
/// from the self-signed pair in `state_dir` (generated on first use). Call it only when
/// `transport = "tls"`.
pub fn server_tls(cfg: &ServerConfig) -> Result<ServerTls, TlsError> {
    let (cert_path, key_path, self_signed) = match (&cfg.tls_cert_file, &cfg.tls_key_file) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone(), false),
        (None, None) => {
            let (cert, key) = ensure_self_signed(&cfg.state_dir)?;
            (cert, key, true)
        }
        _ => return Err(TlsError::CertWithoutKey),
    };
    let certs = read_certs(&cert_path)?;
    let key = read_key(&key_path)?;
    // `read_certs` never returns an empty chain.
    let fingerprint = certs
        .first()
        .map(|leaf| Fingerprint::of_der(leaf))
        .ok_or_else(|| TlsError::NoCertificate {
            path: cert_path.clone(),
        })?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(VERSIONS)
        .map_err(TlsError::Versions)?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|source| TlsError::CertificateRejected {
            cert: cert_path,
            key: key_path,
            source,
        })?;
    config.alpn_protocols = vec![ALPN.to_vec()];
    // The data plane may seal and open the records itself after the handshake
    // (`tuning.tls_own_records`, warren_compat::records).
    config.enable_secret_extraction = true;
    Ok(ServerTls {
        config: Arc::new(config),
        fingerprint,
        self_signed,
    })
}

/// Builds the client's TLS configuration: a pinned fingerprint, CA roots from `ca_file`, or
/// the Mozilla roots. Call it only when `transport = "tls"`.
pub fn client_tls(cfg: &ClientConfig) -> Result<ClientTls, TlsError> {
    let name = cfg.tls_server_name().to_owned();
    let server_name =
        ServerName::try_from(name.clone()).map_err(|_| TlsError::ServerName { name })?;
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(VERSIONS)
        .map_err(TlsError::Versions)?;
    let mut config = match (&cfg.server_fingerprint, &cfg.ca_file) {
        (Some(_), Some(_)) => return Err(TlsError::PinAndCaFile),
        (Some(pin), None) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedServerVerifier {
                pin: *pin,
                algorithms: provider.signature_verification_algorithms,
            }))
            .with_no_client_auth(),
        (None, Some(ca_file)) => builder
            .with_root_certificates(read_roots(ca_file)?)
            .with_no_client_auth(),
        (None, None) => {
            let roots = RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    config.alpn_protocols = vec![ALPN.to_vec()];
    config.enable_secret_extraction = true;
    Ok(ClientTls {
        config: Arc::new(config),
        server_name,
    })
}

/// Accepts exactly one leaf certificate, identified by its SHA-256.
#[derive(Debug)]
struct PinnedServerVerifier {
    pin: Fingerprint,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for PinnedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        // Names and validity dates are deliberately ignored: the pin names one certificate,
        // and a self-signed one is typically valid "forever" for a fixed placeholder name.
        let actual = Fingerprint::of_der(end_entity);
        if constant_time_eq(&actual.0, &self.pin.0) {
            Ok(ServerCertVerified::assertion())
        } else {
            let mismatch = FingerprintMismatch {
                expected: self.pin,
                actual,
            };
            Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(mismatch)),
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // This proves the peer holds the pinned certificate's private key. Without it,
        // anyone could replay the (public) certificate.
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Compares without an early exit, so timing does not reveal how many leading bytes of a
/// forged certificate's hash matched the pin.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_owned(),
        source,
    })
}

/// All certificates in a PEM file, in file order (leaf first for a chain). Never empty.
fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in a PEM file.
fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read_file(path)?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .map_err(|source| TlsError::Pem {
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| TlsError::NoPrivateKey {
            path: path.to_owned(),
        })
}

fn read_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for (i, cert) in read_certs(path)?.into_iter().enumerate() {
        roots.add(cert).map_err(|source| TlsError::BadTrustRoot {
            path: path.to_owned(),
            index: i + 1,
            source,
        })?;
    }
    Ok(roots)
}

/// Returns the paths of the self-signed pair in `state_dir`, generating it first if needed.
fn ensure_self_signed(state_dir: &Path) -> Result<(PathBuf, PathBuf), TlsError> {
    let cert_path = state_dir.join(SELF_SIGNED_CERT_FILE);
    let key_path = state_dir.join(SELF_SIGNED_KEY_FILE);
    let exists = |path: &Path| {
        path.try_exists().map_err(|source| TlsError::Read {
            path: path.to_owned(),
            source,
        })
    };
    match (exists(&cert_path)?, exists(&key_path)?) {
        (true, true) => return Ok((cert_path, key_path)),
        (true, false) => {
            return Err(TlsError::IncompleteSelfSigned {
                cert: cert_path,
                key: key_path,
            })
        }
        // A key without a certificate is left over from an interrupted generation (the key is
        // renamed into place first). No client can have pinned it, so generate afresh.
        (false, _) => {}
    }

    create_private_dir(state_dir)?;
    let mut params = rcgen::CertificateParams::new(vec![SELF_SIGNED_NAME.to_owned()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, SELF_SIGNED_NAME);
    let key_pair = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key_pair)?;
    // Key first, certificate last: the certificate's presence marks a complete pair.
    write_atomically(&key_path, key_pair.serialize_pem().as_bytes(), 0o600)?;
    write_atomically(&cert_path, cert.pem().as_bytes(), 0o644)?;
    tracing::info!(
        cert = %cert_path.display(),
        fingerprint = %Fingerprint::of_der(cert.der()),
        "generated a self-signed TLS certificate; pin it with client.server_fingerprint"
    );
    Ok((cert_path, key_path))
}

/// Creates `dir` (and parents). A newly created directory gets mode 0700 on unix, because it
/// will hold a private key.
fn create_private_dir(dir: &Path) -> Result<(), TlsError> {
    let mut builder = fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(|source| TlsError::Write {
        path: dir.to_owned(),
        source,
    })
}

/// Writes through a temporary file and a rename, so a crash never leaves a truncated PEM.
/// The temporary file is created with `mode` (on unix), so the key is never readable by
/// others, not even briefly.
fn write_atomically(path: &Path, contents: &[u8], mode: u32) -> Result<(), TlsError> {
    let tmp = path.with_extension("pem.tmp");
    let write_error = |source| TlsError::Write {
        path: tmp.clone(),
        source,
    };
    // A stale temporary file could have wider permissions; `mode` only applies on creation.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(write_error(e)),
        _ => {}
    }
    let mut options = fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(mode);
    }
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options.open(&tmp).map_err(write_error)?;
    file.write_all(contents).map_err(write_error)?;
    file.sync_all().map_err(write_error)?;
    drop(file);
    fs::rename(&tmp, path).map_err(|source| TlsError::Write {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_config;
    use rustls::{ClientConnection, ServerConnection};

    /// A fresh directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let mut nonce = [0u8; 8];
            getrandom::getrandom(&mut nonce).unwrap();
            let name = format!(
                "warren-tls-{tag}-{}-{:016x}",
                std::process::id(),
                u64::from_le_bytes(nonce)
            );
            TempDir(std::env::temp_dir().join(name))
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn server_config(extra: &str) -> ServerConfig {
        let text = format!(
            "[server]\nbind_addr = \"127.0.0.1:0\"\n{extra}\n[server.clients.a]\ntoken = \"t\"\n"
        );
        parse_config(&text).unwrap().server.unwrap()
    }

    fn client_config(extra: &str) -> ClientConfig {
        let text = format!(
            "[client]\nserver_addr = \"localhost:7000\"\nname = \"a\"\ntoken = \"t\"\n{extra}\n\
             [client.services.s]\nlocal_addr = \"127.0.0.1:1\"\n"
        );
        parse_config(&text).unwrap().client.unwrap()
    }

    fn toml_path(path: &Path) -> String {
        format!("{:?}", path.display().to_string())
    }

    /// Which side failed an in-memory handshake.
    #[derive(Debug)]
    #[allow(dead_code)] // the errors are read through `Debug` in assertion messages
    enum HandshakeFailure {
        Client(rustls::Error),
        Server(rustls::Error),
    }

    /// Shuttles TLS records between the two ends through byte buffers until both finish.
    fn handshake(
        client: &mut ClientConnection,
        server: &mut ServerConnection,
    ) -> Result<(), HandshakeFailure> {
        for _ in 0..32 {
            let mut to_server = Vec::new();
            while client.wants_write() {
                client.write_tls(&mut to_server).unwrap();
            }
            let mut input = to_server.as_slice();
            while !input.is_empty() {
                server.read_tls(&mut input).unwrap();
                server
                    .process_new_packets()
                    .map_err(HandshakeFailure::Server)?;
            }
            let mut to_client = Vec::new();
            while server.wants_write() {
                server.write_tls(&mut to_client).unwrap();
            }
            let mut input = to_client.as_slice();
            while !input.is_empty() {
                client.read_tls(&mut input).unwrap();
                client
                    .process_new_packets()
                    .map_err(HandshakeFailure::Client)?;
            }
            if !client.is_handshaking() && !server.is_handshaking() {
                return Ok(());
            }
        }
        panic!("handshake did not finish");
    }

    fn connect(server: &ServerTls, client: &ClientTls) -> Result<(), HandshakeFailure> {
        let mut s = ServerConnection::new(server.config.clone()).unwrap();
        let mut c =
            ClientConnection::new(client.config.clone(), client.server_name.clone()).unwrap();
        handshake(&mut c, &mut s)?;
        assert_eq!(c.alpn_protocol(), Some(ALPN));
        assert_eq!(s.alpn_protocol(), Some(ALPN));
        Ok(())
    }

    #[test]
    fn self_signed_certificate_is_generated_once_and_reused() {
        let dir = TempDir::new("reuse");
        let state = dir.0.join("nested").join("state");
        let cfg = server_config(&format!("state_dir = {}", toml_path(&state)));
        let first = server_tls(&cfg).unwrap();
        assert!(first.self_signed);
        assert!(state.join(SELF_SIGNED_CERT_FILE).is_file());
        assert!(state.join(SELF_SIGNED_KEY_FILE).is_file());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(state.join(SELF_SIGNED_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            let mode = fs::metadata(&state).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "state dir is private: {mode:o}");
        }
        let second = server_tls(&cfg).unwrap();
        assert_eq!(first.fingerprint, second.fingerprint);
        assert!(second.self_signed);
    }

    #[test]
    fn missing_self_signed_key_is_an_error_not_a_silent_regeneration() {
        let dir = TempDir::new("incomplete");
        let cfg = server_config(&format!("state_dir = {}", toml_path(&dir.0)));
        server_tls(&cfg).unwrap();
        fs::remove_file(dir.0.join(SELF_SIGNED_KEY_FILE)).unwrap();
        let err = server_tls(&cfg).unwrap_err();
        assert!(
            matches!(err, TlsError::IncompleteSelfSigned { .. }),
            "{err}"
        );
    }

    #[test]
    fn handshake_succeeds_with_the_right_pin_and_fails_with_a_wrong_one() {
        let dir = TempDir::new("pin");
        let server = server_tls(&server_config(&format!(
            "state_dir = {}",
            toml_path(&dir.0)
        )))
        .unwrap();

        let good = client_tls(&client_config(&format!(
            "server_fingerprint = \"{}\"",
            server.fingerprint
        )))
        .unwrap();
        connect(&server, &good).unwrap();

        let wrong = Fingerprint([0xAB; 32]);
        let bad = client_tls(&client_config(&format!("server_fingerprint = \"{wrong}\""))).unwrap();
        match connect(&server, &bad) {
            Err(HandshakeFailure::Client(e)) => {
                let message = e.to_string();
                assert!(message.contains(&wrong.to_string()), "{message}");
                assert!(
                    message.contains(&server.fingerprint.to_string()),
                    "{message}"
                );
            }
            other => panic!("expected the client to reject the server, got {other:?}"),
        }
    }

    #[test]
    fn handshake_succeeds_with_a_ca_issued_certificate_and_ca_file() {
        let dir = TempDir::new("ca");
        fs::create_dir_all(&dir.0).unwrap();
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "warren test CA");
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["tunnel.test".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &ca, &ca_key)
            .unwrap();
        let (ca_file, cert_file, key_file) = (
            dir.0.join("ca.pem"),
            dir.0.join("cert.pem"),
            dir.0.join("key.pem"),
        );
        fs::write(&ca_file, ca.pem()).unwrap();
        fs::write(&cert_file, format!("{}{}", leaf.pem(), ca.pem())).unwrap();
        fs::write(&key_file, leaf_key.serialize_pem()).unwrap();

        let server = server_tls(&server_config(&format!(
            "tls_cert_file = {}\ntls_key_file = {}",
            toml_path(&cert_file),
            toml_path(&key_file)
        )))
        .unwrap();
        assert!(!server.self_signed);
        assert_eq!(server.fingerprint, Fingerprint::of_der(leaf.der()));

        let client = client_tls(&client_config(&format!(
            "ca_file = {}\nserver_name = \"tunnel.test\"",
            toml_path(&ca_file)
        )))
        .unwrap();
        connect(&server, &client).unwrap();

        // The same CA, but a name the certificate does not carry: WebPKI rules apply.
        let client = client_tls(&client_config(&format!(
            "ca_file = {}\nserver_name = \"other.test\"",
            toml_path(&ca_file)
        )))
        .unwrap();
        assert!(matches!(
            connect(&server, &client),
            Err(HandshakeFailure::Client(_))
        ));
    }

    #[test]
    fn file_errors_name_the_file_and_the_problem() {
        let dir = TempDir::new("errors");
        fs::create_dir_all(&dir.0).unwrap();
        let cert_file = dir.0.join("cert.pem");
        let key_file = dir.0.join("key.pem");
        fs::write(&cert_file, "not pem at all\n").unwrap();
        fs::write(&key_file, "").unwrap();
        let cfg = server_config(&format!(
            "tls_cert_file = {}\ntls_key_file = {}",
            toml_path(&cert_file),
            toml_path(&key_file)
        ));
        assert_eq!(
            server_tls(&cfg).unwrap_err().to_string(),
            format!(
                "reading {}: no certificate found (expected a PEM CERTIFICATE block)",
                cert_file.display()
            )
        );

        let ca = rcgen::generate_simple_self_signed(vec!["x.test".to_owned()]).unwrap();
        fs::write(&cert_file, ca.cert.pem()).unwrap();
        assert_eq!(
            server_tls(&cfg).unwrap_err().to_string(),
            format!(
                "reading {}: no private key found (expected a PEM PRIVATE KEY block)",
                key_file.display()
            )
        );

        fs::remove_file(&key_file).unwrap();
        let message = server_tls(&cfg).unwrap_err().to_string();
        assert!(
            message.starts_with(&format!("reading {}: ", key_file.display())),
            "{message}"
        );

        // A key that does not belong to the certificate.
        let other = rcgen::KeyPair::generate().unwrap();
        fs::write(&key_file, other.serialize_pem()).unwrap();
        let err = server_tls(&cfg).unwrap_err();
        assert!(matches!(err, TlsError::CertificateRejected { .. }), "{err}");
    }

    #[test]
    fn client_defaults_to_webpki_roots_and_the_host_of_server_addr() {
        let client = client_tls(&client_config("")).unwrap();
        assert_eq!(
            client.server_name,
            ServerName::try_from("localhost").unwrap()
        );
        assert_eq!(client.config.alpn_protocols, vec![ALPN.to_vec()]);
    }
}
