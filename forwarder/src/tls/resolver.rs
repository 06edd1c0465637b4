//! The certificate a ClientHello gets: the one whose SAN names match its
//! SNI — an exact name before a wildcard (`*.example.com` matches one
//! label) — or the first configured when none matches or there is no SNI.

use std::collections::HashMap;
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::{info, material, TlsError};
use crate::config::CertKey;

#[derive(Debug)]
pub struct SniResolver {
    /// In configured order; the first is the default.
    keys: Vec<Arc<CertifiedKey>>,
    /// Exact names (lowercase) → index in `keys`; the first cert naming one wins.
    exact: HashMap<String, usize>,
    /// Wildcard suffixes (`.example.com`, lowercase) → index in `keys`.
    wildcard: HashMap<String, usize>,
}

impl SniResolver {
    /// Reads every certificate and key; each must go together.
    pub fn load(certs: &[CertKey], provider: &CryptoProvider) -> Result<SniResolver, TlsError> {
        let mut resolver = SniResolver { keys: Vec::new(), exact: HashMap::new(), wildcard: HashMap::new() };
        for (i, ck) in certs.iter().enumerate() {
            let chain = material::certs(&ck.cert)?;
            let names = info::CertInfo::parse(&ck.cert, &chain[0])?.names;
            let key = material::key(&ck.key)?;
            let pair = |problem: String| TlsError::Pair { cert: ck.cert.clone(), key: ck.key.clone(), problem };
            let mut certified = CertifiedKey::from_der(chain, key, provider).map_err(|e| pair(e.to_string()))?;
            certified.ocsp = ocsp_staple(&ck.cert)?;
            resolver.keys.push(Arc::new(certified));
            for name in names {
                let name = name.to_ascii_lowercase();
                match name.strip_prefix('*') {
                    Some(suffix) if suffix.starts_with('.') => resolver.wildcard.entry(suffix.to_string()),
                    _ => resolver.exact.entry(name),
                }
                .or_insert(i);
            }
        }
        Ok(resolver)
    }

    /// The index of the certificate for `sni` (0: the default).
    fn pick(&self, sni: Option<&str>) -> usize {
        let Some(sni) = sni.map(str::to_ascii_lowercase) else { return 0 };
        if let Some(&i) = self.exact.get(&sni) {
            return i;
        }
        sni.find('.').and_then(|dot| self.wildcard.get(&sni[dot..])).copied().unwrap_or(0)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.keys.get(self.pick(hello.server_name())).cloned()
    }
}

/// The OCSP response stapled to a certificate: `<cert>.ocsp` (DER) beside it, if there.
fn ocsp_staple(cert: &std::path::Path) -> Result<Option<Vec<u8>>, TlsError> {
    let mut path = cert.as_os_str().to_owned();
    path.push(".ocsp");
    match std::fs::read(&path) {
        Ok(der) => Ok(Some(der)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(TlsError::File { path: path.into(), problem: e.to_string() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_beats_wildcard_and_the_first_is_the_default() {
        let r = SniResolver {
            keys: Vec::new(),
            exact: [("api.example.com".to_string(), 2)].into(),
            wildcard: [(".example.com".to_string(), 1)].into(),
        };
        assert_eq!(r.pick(Some("API.example.com")), 2);
        assert_eq!(r.pick(Some("www.example.com")), 1);
        assert_eq!(r.pick(Some("a.b.example.com")), 0, "a wildcard matches one label");
        assert_eq!(r.pick(Some("other.org")), 0);
        assert_eq!(r.pick(None), 0);
    }
}
