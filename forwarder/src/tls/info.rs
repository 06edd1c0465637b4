//! What a certificate says about itself that operators need: its names
//! (SAN DNS names) and when it expires.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::TlsError;

#[derive(Debug, Clone)]
pub struct CertInfo {
    /// SAN DNS names, as written (`*.example.com` included).
    pub names: Vec<String>,
    /// notAfter.
    pub expires: SystemTime,
}

impl CertInfo {
    /// Reads the leaf certificate of the file at `path`.
    pub fn parse(path: &Path, der: &CertificateDer<'_>) -> Result<CertInfo, TlsError> {
        let bad = |problem: String| TlsError::File { path: path.to_path_buf(), problem };
        let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| bad(format!("bad certificate: {e}")))?;
        let san = cert.subject_alternative_name().map_err(|e| bad(format!("bad subjectAltName: {e}")))?;
        let names: Vec<String> = san
            .map(|san| {
                san.value
                    .general_names
                    .iter()
                    .filter_map(|n| match n {
                        GeneralName::DNSName(name) => Some(name.to_string()),
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default();
        let not_after = cert.validity().not_after.timestamp();
        let expires = UNIX_EPOCH + Duration::from_secs(u64::try_from(not_after).unwrap_or(0));
        Ok(CertInfo { names, expires })
    }

    /// Reads the leaf of the PEM file at `path`.
    pub fn load(path: &Path) -> Result<CertInfo, TlsError> {
        let chain = super::material::certs(path)?;
        CertInfo::parse(path, &chain[0])
    }

    /// Time left until it expires (zero once it has).
    pub fn remaining(&self) -> Duration {
        self.expires.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO)
    }
}
