//! TLS to backends (rustls client side): the client config of a pool with
//! `tls` and the node-wide one `[backend_tls]` gives NATS endpoints with a
//! `tls_port`, built when a config is loaded (at start and on SIGHUP), and
//! what a failed handshake or verification comes to (gorouter's answers).

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{AlertDescription, CertificateError, ClientConfig};

use super::{material, provider, TlsError};
use crate::config::BackendTls;

/// How a backend connection's TLS is set up: the client config (CAs,
/// client certificate) and the name its certificate must carry, sent as SNI.
#[derive(Debug)]
pub struct Target {
    pub config: Arc<ClientConfig>,
    pub server_name: ServerName<'static>,
}

impl Target {
    /// Whether a connection made for `other` may serve this target: the
    /// same config (its CAs and client certificate) and the same name.
    /// Idle connections are only reused when it holds.
    pub fn same_as(&self, other: &Target) -> bool {
        Arc::ptr_eq(&self.config, &other.config) && self.server_name == other.server_name
    }
}

/// The name a backend's certificate must carry, as rustls takes it.
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_string())
        .map_err(|e| TlsError::Setting { field: "tls.server_name", problem: format!("{name:?}: {e}") })
}

/// The client config for backends whose certificates chain to `ca`,
/// presenting `[backend_tls]` cert_chain/private_key when they are set.
/// ALPN offers `http/1.1` only (what the router speaks to a backend).
pub fn client_config(ca: &Path, node: &BackendTls) -> Result<Arc<ClientConfig>, TlsError> {
    let roots = material::roots(ca)?;
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setting { field: "backend_tls", problem: e.to_string() })?
        .with_root_certificates(roots);
    let mut config = match (&node.cert_chain, &node.private_key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(material::certs(cert)?, material::key(key)?)
            .map_err(|e| TlsError::Pair { cert: cert.clone(), key: key.clone(), problem: e.to_string() })?,
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// The client config for route services: their certificates may chain
/// to the system's trust store (route services are often public https
/// endpoints) or to `ca`; no client certificate. The system store is read
/// once per process (certificates it cannot parse are skipped).
pub fn route_service_config(ca: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    static SYSTEM: std::sync::OnceLock<Vec<rustls::pki_types::CertificateDer<'static>>> = std::sync::OnceLock::new();
    let system = SYSTEM.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        if !found.errors.is_empty() {
            tracing::debug!("system trust store: {} certificates, errors: {:?}", found.certs.len(), found.errors);
        }
        found.certs
    });
    let mut roots = match ca {
        Some(ca) => material::roots(ca)?,
        None => rustls::RootCertStore::empty(),
    };
    let (added, _ignored) = roots.add_parsable_certificates(system.iter().cloned());
    if roots.is_empty() {
        return Err(TlsError::Setting {
            field: "route_services.ca",
            problem: format!("no trust anchors: the system store has none ({added} usable) and no ca is set"),
        });
    }
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Setting { field: "route_services", problem: e.to_string() })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Why TLS to a backend failed, as gorouter answers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The handshake failed (not TLS, garbage, no common protocol): 525.
    Handshake,
    /// The backend's certificate does not chain to the CA, or has expired: 526.
    Untrusted,
    /// The backend's certificate does not carry the expected name: 503.
    NameMismatch,
    /// The backend refused the router's client certificate (or its lack): 496.
    CertificateRefused,
}

impl Failure {
    /// What a failed handshake comes to: any error of the handshake is a
    /// [`Failure::Handshake`] unless it says more.
    pub fn of_handshake(e: &io::Error) -> Failure {
        Failure::of_alert(e).or_else(|| certificate(e)).unwrap_or(Failure::Handshake)
    }

    /// An alert about the router's client certificate, read after the
    /// handshake: in TLS 1.3 the backend checks it after the client has
    /// finished, so its refusal arrives with the first read.
    pub fn of_alert(e: &io::Error) -> Option<Failure> {
        use AlertDescription as A;
        match rustls_error(e)? {
            rustls::Error::AlertReceived(
                A::BadCertificate
                | A::CertificateRequired
                | A::UnknownCA
                | A::CertificateUnknown
                | A::CertificateExpired
                | A::CertificateRevoked
                | A::UnsupportedCertificate
                | A::AccessDenied,
            ) => Some(Failure::CertificateRefused),
            _ => None,
        }
    }
}

fn rustls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>())
}

fn certificate(e: &io::Error) -> Option<Failure> {
    use CertificateError as C;
    match rustls_error(e)? {
        rustls::Error::InvalidCertificate(C::NotValidForName | C::NotValidForNameContext { .. }) => {
            Some(Failure::NameMismatch)
        }
        rustls::Error::InvalidCertificate(_) => Some(Failure::Untrusted),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wrapped(e: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn failures_map_to_gorouter_classes() {
        let name = wrapped(rustls::Error::InvalidCertificate(CertificateError::NotValidForName));
        assert_eq!(Failure::of_handshake(&name), Failure::NameMismatch);
        let issuer = wrapped(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer));
        assert_eq!(Failure::of_handshake(&issuer), Failure::Untrusted);
        let expired = wrapped(rustls::Error::InvalidCertificate(CertificateError::Expired));
        assert_eq!(Failure::of_handshake(&expired), Failure::Untrusted);
        let refused = wrapped(rustls::Error::AlertReceived(AlertDescription::CertificateRequired));
        assert_eq!(Failure::of_handshake(&refused), Failure::CertificateRefused);
        assert_eq!(Failure::of_alert(&refused), Some(Failure::CertificateRefused));
        let garbage = wrapped(rustls::Error::InvalidMessage(rustls::InvalidMessage::InvalidContentType));
        assert_eq!(Failure::of_handshake(&garbage), Failure::Handshake);
        assert_eq!(Failure::of_alert(&garbage), None);
        let eof = io::Error::from(io::ErrorKind::UnexpectedEof);
        assert_eq!((Failure::of_handshake(&eof), Failure::of_alert(&eof)), (Failure::Handshake, None));
    }
}
