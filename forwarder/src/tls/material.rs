//! PEM files read into what rustls takes: certificate chains, private keys
//! and CA bundles, each error naming the file.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::RootCertStore;

use super::TlsError;

fn file_error(path: &Path, problem: impl ToString) -> TlsError {
    TlsError::File { path: path.to_path_buf(), problem: problem.to_string() }
}

/// A PEM file's certificates (leaf first), at least one.
pub fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no CERTIFICATE in it"));
    }
    Ok(certs)
}

/// A PEM file's private key (PKCS#8, PKCS#1 or SEC1).
pub fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(path, e))
}

/// A CA bundle: every certificate in it is a trust anchor.
pub fn roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certs(path)? {
        roots.add(cert).map_err(|e| file_error(path, format!("not a usable CA certificate: {e}")))?;
    }
    Ok(roots)
}

/// The certificate a client presented on an mTLS connection: its leaf, DER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert(pub bytes::Bytes);

impl ClientCert {
    /// The leaf of a verified client chain, if the client sent one.
    pub fn of(conn: &rustls::ServerConnection) -> Option<ClientCert> {
        conn.peer_certificates()
            .and_then(|chain| chain.first())
            .map(|leaf| ClientCert(bytes::Bytes::copy_from_slice(leaf.as_ref())))
    }
}
