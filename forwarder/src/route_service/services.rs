//! Where route services are: each URL's host resolved and dialled as a
//! pool of its own (TLS for https, verified against the system's trust
//! store and `[route_services] ca`), kept for a while and resolved again.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::{BackendSettings, Balance};
use crate::tls::client::Target;
use crate::upstream::{Learned, Pool, Registry};

/// How long a resolved route service is used before its host is resolved
/// again (a DNS change reaches the router within this).
const RESOLVE_EVERY: Duration = Duration::from_secs(30);

/// The route services of one snapshot.
pub struct Services {
    /// The client config for https services (system store and `ca`).
    tls: Arc<rustls::ClientConfig>,
    settings: BackendSettings,
    registry: Arc<Registry>,
    cache: Mutex<HashMap<String, Cached>>,
}

struct Cached {
    service: Arc<Service>,
    until: Instant,
}

/// One route service, ready to be sent a request.
#[derive(Debug)]
pub struct Service {
    /// Its addresses, as a pool (passive health, connection reuse).
    pub pool: Arc<Pool>,
    /// The request target: the URL's path and query.
    pub target: String,
    /// The Host header: the URL's host, with its port if it names one.
    pub host: String,
}

/// Why a route service cannot be reached.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("route service URL {url:?}: {problem}")]
    Url { url: String, problem: String },
    #[error("route service {url:?}: {host:?} does not resolve: {error}")]
    Resolve { url: String, host: String, error: std::io::Error },
}

impl Services {
    pub fn new(tls: Arc<rustls::ClientConfig>, settings: BackendSettings, registry: Arc<Registry>) -> Services {
        Services { tls, settings, registry, cache: Mutex::default() }
    }

    /// The service at `url`, resolved now or within [`RESOLVE_EVERY`].
    pub async fn get(&self, url: &str) -> Result<Arc<Service>, ServiceError> {
        let now = Instant::now();
        if let Some(c) = self.cache.lock().expect("route services lock").get(url).filter(|c| c.until > now) {
            return Ok(c.service.clone());
        }
        let bad = |problem: &str| ServiceError::Url { url: url.to_string(), problem: problem.to_string() };
        let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
        let https = match parsed.scheme() {
            "https" => true,
            "http" => false,
            _ => return Err(bad("not an http(s) URL")),
        };
        let host = parsed.host_str().ok_or_else(|| bad("no host"))?;
        let port = parsed.port_or_known_default().ok_or_else(|| bad("no port"))?;
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare, port))
            .await
            .map_err(|error| ServiceError::Resolve { url: url.to_string(), host: host.to_string(), error })?
            .collect();
        addrs.dedup();
        let tls = match https {
            true => {
                let server_name = crate::tls::client::server_name(bare).map_err(|e| bad(&e.to_string()))?;
                Some(Arc::new(Target { config: self.tls.clone(), server_name }))
            }
            false => None,
        };
        let endpoints = addrs.iter().map(|&a| (a, tls.clone()));
        let pool =
            Pool::learned(url, endpoints, Balance::RoundRobin, &self.settings, &self.registry, Learned::RouteService);
        let target = match parsed.query() {
            Some(q) => format!("{}?{q}", parsed.path()),
            None => parsed.path().to_string(),
        };
        let host = match parsed.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.to_string(),
        };
        let service = Arc::new(Service { pool: Arc::new(pool), target, host });
        let cached = Cached { service: service.clone(), until: now + RESOLVE_EVERY };
        self.cache.lock().expect("route services lock").insert(url.to_string(), cached);
        Ok(service)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services() -> Services {
        let config = crate::tls::client::route_service_config(None).or_else(|_| {
            // A machine without a system trust store: any CA will do here.
            let dir = tempfile::tempdir().unwrap();
            let made = rcgen::generate_simple_self_signed(vec!["rs.test".to_string()]).unwrap();
            std::fs::write(dir.path().join("ca.pem"), made.cert.pem()).unwrap();
            crate::tls::client::route_service_config(Some(&dir.path().join("ca.pem")))
        });
        Services::new(config.unwrap(), BackendSettings::default(), Registry::new())
    }

    #[tokio::test]
    async fn a_url_becomes_a_pool_its_target_and_its_host() {
        let s = services();
        let a = s.get("https://127.0.0.1:8443/auth/check?app=1&x=%20").await.unwrap();
        assert_eq!((a.target.as_str(), a.host.as_str()), ("/auth/check?app=1&x=%20", "127.0.0.1:8443"));
        assert_eq!(a.pool.backends.len(), 1);
        assert_eq!(a.pool.backends[0].addr, "127.0.0.1:8443".parse().unwrap());
        // Cached: the same pool (its health, its idle connections) serves the next request.
        let again = s.get("https://127.0.0.1:8443/auth/check?app=1&x=%20").await.unwrap();
        assert!(Arc::ptr_eq(&a.pool, &again.pool));
        let b = s.get("https://[::1]/").await.unwrap();
        assert_eq!((b.target.as_str(), b.host.as_str()), ("/", "[::1]"));
        assert_eq!(b.pool.backends[0].addr, "[::1]:443".parse().unwrap());
        let plain = s.get("http://localhost:8080").await.unwrap();
        assert_eq!(plain.target, "/");
        assert!(plain.pool.backends.iter().all(|b| b.addr.ip().is_loopback()));
    }

    #[tokio::test]
    async fn bad_urls_and_unknown_hosts_say_what_is_wrong() {
        let s = services();
        let e = s.get("ftp://127.0.0.1/").await.unwrap_err().to_string();
        assert!(e.contains("not an http(s) URL"), "{e}");
        let e = s.get("not a url").await.unwrap_err().to_string();
        assert!(e.contains("route service URL \"not a url\""), "{e}");
        let e = s.get("https://no-such-host.invalid/").await.unwrap_err().to_string();
        assert!(e.contains("does not resolve"), "{e}");
    }
}
