//! TLS with rustls (ring, TLS 1.2 and 1.3): the generator's client side
//! (`--tls` or a `wss://` / `https://` URL, `--ca FILE` or `--insecure`,
//! `--sni NAME`) and the echo backend's server side (`--tls-cert`,
//! `--tls-key`).
//!
//! By default every client connection makes a full handshake: session
//! resumption is off, so a run measures what a new client costs the target
//! and the handshake time is comparable between connections. With
//! `--resume` the run's connections share one session store, so each new
//! connection offers a ticket an earlier one received; whether the server
//! took it is read from the finished handshake ([`resumed`]), never assumed.

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, HandshakeKind, RootCertStore, ServerConfig, SignatureScheme};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::net::TcpStream;

/// A TLS setting that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{path}: {source}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: rustls::pki_types::pem::Error,
    },
    /// A certificate file without certificates.
    #[error("{0}: no certificate in it (expected PEM \"BEGIN CERTIFICATE\" blocks)")]
    NoCertificate(PathBuf),
    /// A CA certificate rustls cannot use as a trust anchor.
    #[error("{path}: not usable as a CA certificate: {source}")]
    Anchor {
        /// The file.
        path: PathBuf,
        /// Why.
        source: rustls::Error,
    },
    /// `--sni` or the Host header's name is neither a DNS name nor an IP address.
    #[error("{0:?} is not a valid TLS server name (a DNS name or an IP address)")]
    ServerName(String),
    /// rustls refused the configuration (e.g. a key that does not match its certificate).
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// How the client checks the server's certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verify {
    /// Against the CA certificates in this PEM file, for the server name.
    Ca(PathBuf),
    /// Not at all (`--insecure`): only the handshake's signatures are checked.
    Insecure,
}

/// The client side: one configuration for every connection of a run.
#[derive(Clone)]
pub struct Client {
    connector: tokio_rustls::TlsConnector,
    name: ServerName<'static>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("name", &self.name).finish_non_exhaustive()
    }
}

/// A client connection after its handshake.
pub type ClientStream = tokio_rustls::client::TlsStream<TcpStream>;

impl Client {
    /// A client that sends (and verifies) `server_name`, offers the ALPN
    /// protocols `alpn` (none: no ALPN extension) and, with `resume`,
    /// offers the sessions its earlier connections received.
    pub fn new(verify: &Verify, server_name: &str, alpn: &[&[u8]], resume: bool) -> Result<Client, TlsError> {
        let name =
            ServerName::try_from(server_name.to_string()).map_err(|_| TlsError::ServerName(server_name.to_string()))?;
        // ring, TLS 1.2 and 1.3, key exchange groups in a browser's order.
        let builder = ClientConfig::builder_with_provider(client_provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports TLS 1.2 and 1.3");
        let mut config = match verify {
            Verify::Ca(path) => {
                let mut roots = RootCertStore::empty();
                for cert in read_certs(path)? {
                    roots.add(cert).map_err(|source| TlsError::Anchor { path: path.clone(), source })?;
                }
                builder.with_root_certificates(roots).with_no_client_auth()
            }
            Verify::Insecure => {
                let provider = builder.crypto_provider().clone();
                builder.dangerous().with_custom_certificate_verifier(Arc::new(NoVerify(provider))).with_no_client_auth()
            }
        };
        config.resumption = if resume {
            // One store for the whole run: each connection takes a ticket an
            // earlier one received (TLS 1.3 tickets are used once; servers
            // send new ones on every handshake).
            Resumption::in_memory_sessions(SESSION_CACHE)
        } else {
            Resumption::disabled()
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Client { connector: tokio_rustls::TlsConnector::from(Arc::new(config)), name })
    }

    /// Performs the handshake on a connected socket. The error names what
    /// failed (e.g. `invalid peer certificate: UnknownIssuer`).
    pub async fn handshake(&self, sock: TcpStream) -> std::io::Result<ClientStream> {
        self.connector.connect(self.name.clone(), sock).await
    }
}

/// The client's crypto: ring, with the key exchange groups offered in the
/// order browsers, curl and OpenSSL offer them (X25519 first). rustls
/// 0.23.48's ring provider puts P-384 first, and a TLS 1.3 server takes the
/// client's first group it supports: every handshake would then pay for a
/// P-384 exchange (about 10 times X25519's CPU), which real clients never
/// ask for.
fn client_provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::kx_group::{SECP256R1, SECP384R1, X25519};
    // Deprecated since 0.23.48 for lacking post-quantum key exchange, which
    // only the aws-lc-rs provider has; the generator stays on ring.
    #[allow(deprecated)]
    let base = rustls::crypto::ring::default_provider();
    Arc::new(CryptoProvider { kx_groups: vec![X25519, SECP256R1, SECP384R1], ..base })
}

/// Sessions the `--resume` store keeps (one server name per run; rustls
/// keeps at most 8 TLS 1.3 tickets per name on top).
const SESSION_CACHE: usize = 256;

/// Whether the finished handshake of `stream` resumed a session.
pub fn resumed(stream: &ClientStream) -> bool {
    stream.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed)
}

/// The echo backend's TLS: the certificate chain and key from PEM files.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs(cert)?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|source| TlsError::Pem { path: key.to_path_buf(), source })?;
    let config = ServerConfig::builder().with_no_client_auth().with_single_cert(certs, key)?;
    Ok(Arc::new(config))
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |source| TlsError::Pem { path: path.to_path_buf(), source };
    let certs = CertificateDer::pem_file_iter(path).map_err(pem)?.collect::<Result<Vec<_>, _>>().map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate(path.to_path_buf()));
    }
    Ok(certs)
}

/// `--insecure`: any certificate for any name is accepted; the handshake
/// signatures are still verified, so the key exchange is what it would be.
#[derive(Debug)]
struct NoVerify(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_files_and_names_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = Client::new(&Verify::Ca(missing.clone()), "a.example", &[], false).unwrap_err();
        assert!(e.to_string().contains("missing.pem"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not pem\n").unwrap();
        let e = Client::new(&Verify::Ca(empty), "a.example", &[], false).unwrap_err();
        assert!(e.to_string().contains("no certificate"), "{e}");
        let e = Client::new(&Verify::Insecure, "bad name!", &[], false).unwrap_err();
        assert!(matches!(e, TlsError::ServerName(_)), "{e}");
        assert!(Client::new(&Verify::Insecure, "127.0.0.1", &[], true).is_ok());
    }

    #[test]
    fn the_client_offers_x25519_first() {
        let groups: Vec<_> = client_provider().kx_groups.iter().map(|g| g.name()).collect();
        assert_eq!(groups, [rustls::NamedGroup::X25519, rustls::NamedGroup::secp256r1, rustls::NamedGroup::secp384r1]);
    }
}
