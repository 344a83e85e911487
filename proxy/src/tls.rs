//! TLS on both sides, with rustls: the acceptor that serves Sluice's certificate to clients
//! (after an SSLRequest, or PostgreSQL 17's direct TLS with ALPN `postgresql`), the connector
//! that encrypts connections to the server with libpq's `sslmode` meanings, and the
//! `tls-server-end-point` channel-binding data (RFC 5929) SCRAM-SHA-256-PLUS needs on each hop.
//!
//! See <https://www.postgresql.org/docs/current/protocol-flow.html#PROTOCOL-FLOW-SSL> and
//! <https://www.postgresql.org/docs/current/libpq-ssl.html#LIBPQ-SSL-PROTECTION>.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use sha2::Digest;
use thiserror::Error;
use tokio::net::TcpStream;

use crate::config::{Config, ServerTls};
use crate::stream::Stream;

/// The ALPN protocol of PostgreSQL (required for direct TLS, offered toward servers).
pub const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// The first byte of a TLS handshake record: a direct-TLS client starts with it, where a
/// plaintext client's startup packet starts with a length far below 0x16000000.
pub const HANDSHAKE_RECORD: u8 = 0x16;

#[derive(Debug, Error)]
pub enum TlsError {
    #[error("`{key}`: cannot read {path}: {why}")]
    File {
        key: &'static str,
        path: PathBuf,
        why: String,
    },
    #[error("`{key}`: {path} holds no {what}")]
    Empty {
        key: &'static str,
        path: PathBuf,
        what: &'static str,
    },
    #[error("`{key}`: {why}")]
    Invalid { key: &'static str, why: String },
}

/// The crypto provider, in one place: aws-lc-rs, chosen by measurement (benches/RESULTS.md,
/// "TLS crypto provider": RSA handshakes about half the server-side CPU of ring's, bulk
/// encryption faster, small records at par). Key exchange prefers X25519, what libpq offers.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn read_certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_error = |why: String| TlsError::File {
        key,
        path: path.to_path_buf(),
        why,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            key,
            path: path.to_path_buf(),
            what: "PEM certificate",
        });
    }
    Ok(certs)
}

fn read_key(key: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    // The error never quotes the file: it holds a secret.
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        key,
        path: path.to_path_buf(),
        why: match e {
            rustls::pki_types::pem::Error::NoItemsFound => "no PEM private key found".into(),
            rustls::pki_types::pem::Error::Io(e) => e.to_string(),
            _ => "not a PEM private key".into(),
        },
    })
}

/// What Sluice serves to clients: the rustls acceptor and the channel-binding data of its
/// certificate. Rebuilt on RELOAD; sessions keep the one they were accepted with.
pub struct Acceptor {
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// `tls-server-end-point` data of the certificate served, if its signature algorithm has
    /// one (then SCRAM-SHA-256-PLUS is offered).
    pub end_point: Option<Arc<[u8]>>,
}

impl Acceptor {
    /// The acceptor for the configured certificate, or `None` when client TLS is off.
    pub fn load(cfg: &Config) -> Result<Option<Arc<Acceptor>>, TlsError> {
        let (Some(cert_file), Some(key_file)) =
            (&cfg.client_tls_cert_file, &cfg.client_tls_key_file)
        else {
            return Ok(None);
        };
        if cfg.client_tls_mode() == crate::config::ClientTls::Disable {
            return Ok(None);
        }
        let certs = read_certs("client_tls_cert_file", cert_file)?;
        let key = read_key("client_tls_key_file", key_file)?;
        let end_point = end_point_hash(&certs[0]).map(Arc::from);
        let mut config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid {
                key: "client_tls_cert_file",
                why: e.to_string(),
            })?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(|e| TlsError::Invalid {
                key: "client_tls_key_file",
                why: format!("the key does not fit the certificate or is unsupported: {e}"),
            })?;
        config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        // PostgreSQL clients do not resume sessions (libpq makes a new context per
        // connection): tickets would be bytes and work per handshake for nothing.
        config.send_tls13_tickets = 0;
        Ok(Some(Arc::new(Acceptor {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            end_point,
        })))
    }
}

/// How Sluice encrypts connections to the server.
pub struct Connector {
    pub mode: ServerTls,
    connector: Option<tokio_rustls::TlsConnector>,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Connector {
    pub fn load(cfg: &Config) -> Result<Arc<Connector>, TlsError> {
        if cfg.server_tls == ServerTls::Disable {
            return Ok(Arc::new(Connector {
                mode: ServerTls::Disable,
                connector: None,
            }));
        }
        let provider = provider();
        // libpq: with a root certificate file, `require` verifies like `verify-ca`.
        let check = match (cfg.server_tls, &cfg.server_tls_ca_file) {
            (ServerTls::VerifyFull, _) => Check::Full,
            (ServerTls::VerifyCa, _) | (ServerTls::Require, Some(_)) => Check::Chain,
            _ => Check::None,
        };
        let webpki = match (&cfg.server_tls_ca_file, check) {
            (Some(path), Check::Full | Check::Chain) => {
                let mut roots = rustls::RootCertStore::empty();
                for cert in read_certs("server_tls_ca_file", path)? {
                    roots.add(cert).map_err(|e| TlsError::Invalid {
                        key: "server_tls_ca_file",
                        why: e.to_string(),
                    })?;
                }
                let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider.clone(),
                )
                .build()
                .map_err(|e| TlsError::Invalid {
                    key: "server_tls_ca_file",
                    why: e.to_string(),
                })?;
                Some(verifier)
            }
            _ => None,
        };
        let verifier = Arc::new(Verifier {
            check,
            webpki,
            algorithms: provider.signature_verification_algorithms,
        });
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid {
                key: "server_tls",
                why: e.to_string(),
            })?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match (&cfg.server_tls_cert_file, &cfg.server_tls_key_file) {
            (Some(cert), Some(key)) => builder
                .with_client_auth_cert(
                    read_certs("server_tls_cert_file", cert)?,
                    read_key("server_tls_key_file", key)?,
                )
                .map_err(|e| TlsError::Invalid {
                    key: "server_tls_key_file",
                    why: format!("the key does not fit the certificate or is unsupported: {e}"),
                })?,
            _ => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        // PostgreSQL servers turn session resumption off.
        config.resumption = rustls::client::Resumption::disabled();
        Ok(Arc::new(Connector {
            mode: cfg.server_tls,
            connector: Some(tokio_rustls::TlsConnector::from(Arc::new(config))),
        }))
    }

    /// Whether the certificate is checked against the host name (only then does Sluice send a
    /// cleartext password or token).
    pub fn verifies_host(&self) -> bool {
        self.mode == ServerTls::VerifyFull
    }

    /// Runs the TLS handshake on a socket whose SSLRequest the server accepted.
    pub async fn connect(&self, host: &str, tcp: TcpStream) -> Result<Stream, HandshakeError> {
        let Some(connector) = &self.connector else {
            return Err(HandshakeError::Io("TLS is disabled".into()));
        };
        let name = match ServerName::try_from(host.to_string()) {
            Ok(n) => n,
            Err(_) if self.mode != ServerTls::VerifyFull => {
                // Any name will do when the host is not checked; an IP sends no SNI.
                ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into())
            }
            Err(_) => return Err(HandshakeError::Certificate(CertProblem::NotForHost)),
        };
        match connector.connect(name, tcp).await {
            Ok(s) => Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Client(s)))),
            Err(e) => Err(HandshakeError::from_io(&e)),
        }
    }
}

/// What a failed TLS handshake tells about the certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertProblem {
    UnknownIssuer,
    Expired,
    NotYetValid,
    NotForHost,
    Revoked,
    Other,
}

/// Why a TLS handshake failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// The peer's certificate is not acceptable.
    Certificate(CertProblem),
    /// The peer speaks TLS badly or not at all (alerts, garbage, no common parameters).
    Protocol(String),
    /// The connection failed or closed during the handshake.
    Io(String),
}

impl HandshakeError {
    pub fn from_io(e: &std::io::Error) -> HandshakeError {
        let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
            return HandshakeError::Io(e.to_string());
        };
        match tls {
            rustls::Error::InvalidCertificate(c) => HandshakeError::Certificate(match c {
                CertificateError::UnknownIssuer => CertProblem::UnknownIssuer,
                CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                    CertProblem::Expired
                }
                CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                    CertProblem::NotYetValid
                }
                CertificateError::NotValidForName
                | CertificateError::NotValidForNameContext { .. } => CertProblem::NotForHost,
                CertificateError::Revoked => CertProblem::Revoked,
                _ => CertProblem::Other,
            }),
            other => HandshakeError::Protocol(other.to_string()),
        }
    }

    /// Metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            HandshakeError::Certificate(CertProblem::UnknownIssuer) => "unknown_issuer",
            HandshakeError::Certificate(CertProblem::Expired) => "expired",
            HandshakeError::Certificate(CertProblem::NotYetValid) => "not_yet_valid",
            HandshakeError::Certificate(CertProblem::NotForHost) => "wrong_host",
            HandshakeError::Certificate(CertProblem::Revoked) => "revoked",
            HandshakeError::Certificate(CertProblem::Other) => "bad_certificate",
            HandshakeError::Protocol(_) => "protocol",
            HandshakeError::Io(_) => "io",
        }
    }

    /// What a client is told about a failed handshake with the server at `host`.
    pub fn describe(&self, host: &str) -> String {
        match self {
            HandshakeError::Certificate(p) => {
                let why = match p {
                    CertProblem::UnknownIssuer => {
                        "unknown issuer (not signed by a certificate authority in server_tls_ca_file)"
                            .to_string()
                    }
                    CertProblem::Expired => "expired".to_string(),
                    CertProblem::NotYetValid => "not valid yet".to_string(),
                    CertProblem::NotForHost => format!("not valid for host \"{host}\""),
                    CertProblem::Revoked => "revoked".to_string(),
                    CertProblem::Other => "invalid".to_string(),
                };
                format!("the server's certificate is not accepted: {why}")
            }
            HandshakeError::Protocol(why) => format!("TLS handshake with the server failed: {why}"),
            HandshakeError::Io(why) => {
                format!("connection to the server failed during the TLS handshake: {why}")
            }
        }
    }
}

/// How much of the server's certificate is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Check {
    /// `prefer` and `require` without a CA file: encryption only, as libpq.
    None,
    /// `verify-ca`: the chain, not the name.
    Chain,
    /// `verify-full`: the chain and the host name.
    Full,
}

#[derive(Debug)]
struct Verifier {
    check: Check,
    webpki: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    algorithms: rustls::crypto::WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(webpki) = self.webpki.as_ref().filter(|_| self.check != Check::None) else {
            return Ok(ServerCertVerified::assertion());
        };
        match webpki.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            // webpki checks the name only after the chain, so this error means the chain is
            // good: all `verify-ca` asks.
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if self.check == Check::Chain => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
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

/// Accepts a client's TLS handshake on `tcp`. `early` holds bytes already read from the
/// socket (the start of a direct-TLS ClientHello); they are fed to the TLS session first.
pub async fn accept(
    acceptor: &Acceptor,
    tcp: TcpStream,
    early: &[u8],
) -> Result<Stream, HandshakeError> {
    let mut fed = Ok(());
    let accept = acceptor.acceptor.accept_with(tcp, |session| {
        let mut rest = early;
        while !rest.is_empty() {
            match session.read_tls(&mut rest) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) => {
                    fed = Err(HandshakeError::Io(e.to_string()));
                    return;
                }
            }
            if let Err(e) = session.process_new_packets() {
                fed = Err(HandshakeError::Protocol(e.to_string()));
                return;
            }
        }
    });
    fed?;
    match accept.await {
        Ok(s) => Ok(Stream::Tls(Box::new(tokio_rustls::TlsStream::Server(s)))),
        Err(e) => Err(HandshakeError::from_io(&e)),
    }
}

/// The `tls-server-end-point` channel-binding data of a certificate (RFC 5929 section 4.1):
/// its hash with the hash function of its signature algorithm, SHA-256 for MD5 and SHA-1.
/// `None` for algorithms without one (RSASSA-PSS, Ed25519), for which PostgreSQL does not
/// bind either.
pub fn end_point_hash(cert: &[u8]) -> Option<Vec<u8>> {
    use x509_cert::der::asn1::ObjectIdentifier as Oid;
    use x509_cert::der::Decode;
    const SHA256: &[Oid] = &[
        Oid::new_unwrap("1.2.840.113549.1.1.4"), // md5WithRSAEncryption
        Oid::new_unwrap("1.2.840.113549.1.1.5"), // sha1WithRSAEncryption
        Oid::new_unwrap("1.2.840.113549.1.1.11"), // sha256WithRSAEncryption
        Oid::new_unwrap("1.2.840.10045.4.1"),    // ecdsa-with-SHA1
        Oid::new_unwrap("1.2.840.10045.4.3.2"),  // ecdsa-with-SHA256
    ];
    const SHA384: &[Oid] = &[
        Oid::new_unwrap("1.2.840.113549.1.1.12"), // sha384WithRSAEncryption
        Oid::new_unwrap("1.2.840.10045.4.3.3"),   // ecdsa-with-SHA384
    ];
    const SHA512: &[Oid] = &[
        Oid::new_unwrap("1.2.840.113549.1.1.13"), // sha512WithRSAEncryption
        Oid::new_unwrap("1.2.840.10045.4.3.4"),   // ecdsa-with-SHA512
    ];
    let parsed = x509_cert::Certificate::from_der(cert).ok()?;
    let oid = &parsed.signature_algorithm.oid;
    if SHA256.contains(oid) {
        Some(sha2::Sha256::digest(cert).to_vec())
    } else if SHA384.contains(oid) {
        Some(sha2::Sha384::digest(cert).to_vec())
    } else if SHA512.contains(oid) {
        Some(sha2::Sha512::digest(cert).to_vec())
    } else {
        None
    }
}

/// The channel-binding data of the server a TLS stream is connected to.
pub fn peer_end_point(stream: &Stream) -> Option<Vec<u8>> {
    let Stream::Tls(tls) = stream else {
        return None;
    };
    let certs = tls.get_ref().1.peer_certificates()?;
    end_point_hash(certs.first()?)
}

/// The TLS settings in force: rebuilt from the configuration at start-up and on RELOAD, so a
/// certificate replaced on disk is served to the next client while sessions go on.
#[derive(Clone)]
pub struct TlsState {
    pub acceptor: Option<Arc<Acceptor>>,
    pub connector: Arc<Connector>,
}

impl TlsState {
    pub fn load(cfg: &Config) -> Result<TlsState, TlsError> {
        Ok(TlsState {
            acceptor: Acceptor::load(cfg)?,
            connector: Connector::load(cfg)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(alg).expect("key");
        let params = rcgen::CertificateParams::new(vec!["localhost".into()]).expect("params");
        params.self_signed(&key).expect("cert").der().to_vec()
    }

    #[test]
    fn end_point_hash_follows_the_signature_algorithm() {
        // RFC 5929 4.1: the certificate's own signature hash (SHA-256 for ECDSA-SHA256,
        // SHA-384 for ECDSA-SHA384), over the whole DER certificate.
        let p256 = cert(&rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(
            end_point_hash(&p256),
            Some(sha2::Sha256::digest(&p256).to_vec())
        );
        let p384 = cert(&rcgen::PKCS_ECDSA_P384_SHA384);
        assert_eq!(
            end_point_hash(&p384),
            Some(sha2::Sha384::digest(&p384).to_vec())
        );
        // Ed25519 has no hash of its own: no binding, as in PostgreSQL.
        assert_eq!(end_point_hash(&cert(&rcgen::PKCS_ED25519)), None);
        assert_eq!(end_point_hash(b"not a certificate"), None);
    }

    #[test]
    fn handshake_errors_name_the_certificate_problem() {
        let io = |e: rustls::Error| std::io::Error::new(std::io::ErrorKind::InvalidData, e);
        let cases = [
            (
                CertificateError::UnknownIssuer,
                "unknown_issuer",
                "unknown issuer",
            ),
            (CertificateError::Expired, "expired", "expired"),
            (
                CertificateError::NotValidForName,
                "wrong_host",
                "not valid for host \"db.example\"",
            ),
        ];
        for (cert, reason, text) in cases {
            let e = HandshakeError::from_io(&io(rustls::Error::InvalidCertificate(cert)));
            assert_eq!(e.reason(), reason);
            let said = e.describe("db.example");
            assert!(said.starts_with("the server's certificate"), "{said}");
            assert!(said.contains(text), "{said}");
        }
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(HandshakeError::from_io(&reset).reason(), "io");
    }

    #[test]
    fn missing_files_are_named() {
        let cfg = Config {
            client_tls_cert_file: Some("/nonexistent/cert.pem".into()),
            client_tls_key_file: Some("/nonexistent/key.pem".into()),
            ..Config::default()
        };
        let err = Acceptor::load(&cfg).err().expect("error").to_string();
        assert!(
            err.contains("client_tls_cert_file") && err.contains("/nonexistent/cert.pem"),
            "{err}"
        );
        let none = Config::default();
        assert!(Acceptor::load(&none).expect("no TLS").is_none());
        assert_eq!(
            Connector::load(&none).expect("prefer").mode,
            ServerTls::Prefer
        );
    }
}
