//! TLS with rustls: each TLS listener's `rustls::ServerConfig`, built
//! from its `[listener.tls]`, and the client configs for TLS to backends
//! ([`client`]), when a config is loaded (at start and on SIGHUP). The
//! files are read then; a bad one is an error that names it, and the
//! running material stays.
//!
//! * [`material`]: certificate chains, keys and CAs read from PEM files;
//! * [`client`]: TLS to backends, the client side (pool `tls`, `[backend_tls]`);
//! * [`resolver`]: the certificate a ClientHello gets, by its SNI;
//! * [`info`]: what `upsplice check` shows of a certificate (names, expiry);
//! * [`ktls`]: handing an established session to the kernel (kTLS);
//! * [`records`]: where a TLS connection's reads stand in its records;
//! * [`tickets`]: session ticket keys shared by a fleet (`ticket_keys`).

pub mod client;
pub mod info;
pub mod ktls;
pub mod material;
pub mod records;
pub mod resolver;
pub mod tickets;

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ProducesTickets, WebPkiClientVerifier};
use rustls::ServerConfig;

use crate::config::{ClientCertMode, ListenerTls, TlsVersion};

pub use material::ClientCert;

/// Why a listener's TLS material could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds nothing usable.
    #[error("{}: {problem}", path.display())]
    File { path: PathBuf, problem: String },
    /// A certificate and its key do not go together, or rustls refused them.
    #[error("{} with {}: {problem}", cert.display(), key.display())]
    Pair { cert: PathBuf, key: PathBuf, problem: String },
    /// A setting rustls cannot use.
    #[error("{field}: {problem}")]
    Setting { field: &'static str, problem: String },
}

/// The crypto provider every TLS config of the router uses (ring).
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    // Deprecated since 0.23.48 for lacking post-quantum key exchange, which
    // only the aws-lc-rs provider has; the router builds on ring (no C
    // toolchain, no aws-lc) until that changes.
    //
    // Key exchange: X25519 first, then P-256, then P-384, as browsers,
    // curl and OpenSSL order them (ring's default puts P-384 first, about
    // ten times X25519's cost per handshake for whichever side computes
    // it: every TLS connection the router opens to a backend paid it).
    #[allow(deprecated)]
    PROVIDER
        .get_or_init(|| {
            use rustls::crypto::ring::kx_group::{SECP256R1, SECP384R1, X25519};
            let mut p = rustls::crypto::ring::default_provider();
            p.kx_groups = vec![X25519, SECP256R1, SECP384R1];
            Arc::new(p)
        })
        .clone()
}

/// The listener's ticket encrypter: the keys of its `ticket_keys` file
/// (read at every load, so a SIGHUP rotates them), or without one the
/// process's own, which rotates itself and survives reloads.
fn ticketer(tls: &ListenerTls) -> Result<Arc<dyn ProducesTickets>, TlsError> {
    if let Some(path) = &tls.ticket_keys {
        return Ok(Arc::new(tickets::SharedTicketer::load(path)?));
    }
    static TICKETER: OnceLock<Arc<dyn ProducesTickets>> = OnceLock::new();
    if let Some(t) = TICKETER.get() {
        return Ok(t.clone());
    }
    let made = rustls::crypto::ring::Ticketer::new()
        .map_err(|e| TlsError::Setting { field: "tls", problem: format!("session tickets: {e}") })?;
    Ok(TICKETER.get_or_init(|| made).clone())
}

/// The server config of a listener with `[listener.tls]`. `http`: the
/// listener speaks HTTP/1.1 inside, the only ALPN protocol offered (a
/// client that offers only `h2` gets the `no_application_protocol` alert).
pub fn server_config(tls: &ListenerTls, http: bool) -> Result<Arc<ServerConfig>, TlsError> {
    let base = provider();
    let provider = Arc::new(CryptoProvider { cipher_suites: cipher_suites(tls, &base)?, ..(*base).clone() });
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::V1_2 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::V1_3 => &[&rustls::version::TLS13],
    };
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| TlsError::Setting { field: "tls.cipher_suites", problem: e.to_string() })?;
    let builder = match &tls.client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let roots = material::roots(ca)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
            let verifier = match tls.client_cert {
                ClientCertMode::Request => verifier.allow_unauthenticated(),
                ClientCertMode::Require => verifier,
            };
            let verifier = verifier.build().map_err(|e| TlsError::File { path: ca.clone(), problem: e.to_string() })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let resolver = resolver::SniResolver::load(&tls.certs, &provider)?;
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    if http {
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
    }
    config.max_early_data_size = 0;
    config.ticketer = ticketer(tls)?;
    // A tunnel's keys may go to the kernel (kTLS, `data_plane.ktls`); the
    // flag only lets rustls hand over what it already holds.
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// The cipher suites `cipher_suites` names, from rustls's (safe) set; all
/// of them when none are named.
fn cipher_suites(tls: &ListenerTls, provider: &CryptoProvider) -> Result<Vec<rustls::SupportedCipherSuite>, TlsError> {
    let Some(names) = &tls.cipher_suites else { return Ok(provider.cipher_suites.clone()) };
    let name = |s: &rustls::SupportedCipherSuite| format!("{:?}", s.suite());
    names
        .iter()
        .map(|wanted| {
            provider.cipher_suites.iter().find(|s| name(s).eq_ignore_ascii_case(wanted)).copied().ok_or_else(|| {
                let known: Vec<String> = provider.cipher_suites.iter().map(name).collect();
                TlsError::Setting {
                    field: "tls.cipher_suites",
                    problem: format!("unknown cipher suite {wanted:?} (rustls offers {})", known.join(", ")),
                }
            })
        })
        .collect()
}
