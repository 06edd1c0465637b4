//! The endpoints learned from NATS, by URI: registration, unregistration,
//! pruning, and the routes (one pool per URI) handed to the routing table.
//!
//! Owned by the NATS task alone (no lock). A refresh that changes nothing
//! but the time costs no rebuild; a URI whose endpoints changed gets a new
//! pool at the next [`Table::routes`], the others keep theirs (and their
//! balancer's position).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::message::{Endpoint, Registration};
use crate::config::Config;
use crate::state::LearnedRoute;
use crate::tls::client::{self, Target};
use crate::upstream::{AppInstance, Learned, Pool, Registry};

#[derive(Default)]
pub struct Table {
    uris: HashMap<Arc<str>, Uri>,
    endpoints: usize,
    /// Something changed since the last [`Table::routes`].
    dirty: bool,
    /// The config whose `[backends]` the cached pools were built with.
    config: Option<Arc<Config>>,
    /// Every endpoint address and how many URIs list it.
    addrs: HashMap<SocketAddr, usize>,
    /// Addresses that became endpoints, and ones that no longer are,
    /// since the last [`Table::routes`].
    added: HashSet<SocketAddr>,
    removed: HashSet<SocketAddr>,
}

/// What changed in the set of endpoint addresses since the last
/// [`Table::routes`] (for [`Registry::learn`]).
#[derive(Debug, Default)]
pub struct AddrChanges {
    pub added: Vec<SocketAddr>,
    pub removed: Vec<SocketAddr>,
}

#[derive(Default)]
struct Uri {
    endpoints: HashMap<SocketAddr, Slot>,
    /// Its pool as last built; None once its endpoints changed.
    pool: Option<Arc<Pool>>,
}

struct Slot {
    endpoint: Arc<Endpoint>,
    /// When it was last registered.
    seen: Instant,
}

/// One URI's endpoints, for `/routes`.
pub type View = Vec<(Arc<str>, Vec<Arc<Endpoint>>)>;

impl Table {
    /// Endpoints in the table (one per URI and address).
    pub fn len(&self) -> usize {
        self.endpoints
    }

    pub fn uris(&self) -> usize {
        self.uris.len()
    }

    /// Something changed since the last [`Table::routes`], or `config`
    /// is not the one its pools were built with (a reload).
    pub fn is_dirty(&self, config: &Arc<Config>) -> bool {
        self.dirty || !self.config.as_ref().is_some_and(|c| Arc::ptr_eq(c, config))
    }

    /// Adds or refreshes the registration's endpoint under each of its URIs.
    pub fn register(&mut self, reg: &Registration, now: Instant) {
        for uri in &reg.uris {
            let entry = self.uris.entry(uri.clone()).or_default();
            match entry.endpoints.get_mut(&reg.endpoint.addr) {
                Some(slot) => {
                    slot.seen = now;
                    if slot.endpoint != reg.endpoint {
                        slot.endpoint = reg.endpoint.clone();
                        entry.pool = None;
                        self.dirty = true;
                    }
                }
                None => {
                    entry.endpoints.insert(reg.endpoint.addr, Slot { endpoint: reg.endpoint.clone(), seen: now });
                    entry.pool = None;
                    self.endpoints += 1;
                    self.dirty = true;
                    self.addr_up(reg.endpoint.addr);
                }
            }
        }
    }

    fn addr_up(&mut self, addr: SocketAddr) {
        let refs = self.addrs.entry(addr).or_insert(0);
        *refs += 1;
        if *refs == 1 && !self.removed.remove(&addr) {
            self.added.insert(addr);
        }
    }

    fn addr_down(&mut self, addr: SocketAddr) {
        let Some(refs) = self.addrs.get_mut(&addr) else { return };
        *refs -= 1;
        if *refs == 0 {
            self.addrs.remove(&addr);
            if !self.added.remove(&addr) {
                self.removed.insert(addr);
            }
        }
    }

    /// Removes the registration's endpoint from each of its URIs.
    pub fn unregister(&mut self, reg: &Registration) {
        for uri in &reg.uris {
            let Some(entry) = self.uris.get_mut(uri) else { continue };
            if entry.endpoints.remove(&reg.endpoint.addr).is_none() {
                continue;
            }
            entry.pool = None;
            if entry.endpoints.is_empty() {
                self.uris.remove(uri);
            }
            self.endpoints -= 1;
            self.dirty = true;
            self.addr_down(reg.endpoint.addr);
        }
    }

    /// Removes the endpoints not registered within their stale threshold
    /// (their own, when shorter than `threshold`, as gorouter takes it);
    /// returns how many.
    pub fn prune(&mut self, now: Instant, threshold: Duration) -> usize {
        let mut gone = Vec::new();
        self.uris.retain(|_, entry| {
            let before = gone.len();
            entry.endpoints.retain(|addr, slot| {
                let limit = slot.endpoint.stale_threshold.map_or(threshold, |own| own.min(threshold));
                let keep = now.saturating_duration_since(slot.seen) <= limit;
                if !keep {
                    gone.push(*addr);
                }
                keep
            });
            if gone.len() != before {
                entry.pool = None;
            }
            !entry.endpoints.is_empty()
        });
        let pruned = gone.len();
        for addr in gone {
            self.addr_down(addr);
        }
        self.endpoints -= pruned;
        self.dirty |= pruned > 0;
        pruned
    }

    /// Every endpoint counts as registered `now` (pruning resumes after
    /// NATS was unreachable: each gets a whole threshold to re-register).
    pub fn touch_all(&mut self, now: Instant) {
        for slot in self.uris.values_mut().flat_map(|e| e.endpoints.values_mut()) {
            slot.seen = now;
        }
    }

    /// The routes for the routing table, one per URI, and the endpoint
    /// addresses added and removed since the last call; pools of
    /// unchanged URIs are kept unless `config` is another one than last
    /// time (its `[backends]` may differ, and `backend_tls` with it: the
    /// client config of endpoints with a `tls_port`).
    pub fn routes(
        &mut self,
        config: &Arc<Config>,
        backend_tls: Option<&Arc<rustls::ClientConfig>>,
        registry: &Registry,
    ) -> (Arc<Vec<LearnedRoute>>, AddrChanges) {
        if !self.config.as_ref().is_some_and(|c| Arc::ptr_eq(c, config)) {
            self.config = Some(config.clone());
            for entry in self.uris.values_mut() {
                entry.pool = None;
            }
        }
        let settings = &config.backends;
        self.dirty = false;
        let mut routes = Vec::with_capacity(self.uris.len());
        for (uri, entry) in &mut self.uris {
            // The pool takes its balancing and route service from the
            // latest registration, as gorouter's pool does.
            let latest = entry.endpoints.values().max_by_key(|s| s.seen).map(|s| &s.endpoint);
            let latest = latest.expect("a URI in the table has endpoints");
            let pool = entry.pool.get_or_insert_with(|| {
                // A TLS endpoint is left out while it cannot be dialled (a
                // reload took `[backend_tls] ca` away).
                let mut endpoints: Vec<(SocketAddr, Option<Arc<Target>>, &Endpoint)> = entry
                    .endpoints
                    .iter()
                    .filter_map(|(addr, slot)| {
                        Some((*addr, tls_target(&slot.endpoint, backend_tls).ok()?, &*slot.endpoint))
                    })
                    .collect();
                endpoints.sort_by_key(|(addr, ..)| *addr);
                // Each backend is told the app instance it registered as.
                let instances = endpoints.iter().map(|(.., e)| Some(Arc::new(app_instance(e)))).collect();
                let endpoints = endpoints.into_iter().map(|(addr, tls, _)| (addr, tls));
                let pool = Pool::learned(uri, endpoints, latest.balance, settings, registry, Learned::Nats);
                Arc::new(pool.with_instances(instances))
            });
            routes.push(LearnedRoute {
                uri: uri.clone(),
                pool: pool.clone(),
                route_service: latest.route_service_url.clone(),
            });
        }
        let changes = AddrChanges { added: self.added.drain().collect(), removed: self.removed.drain().collect() };
        (Arc::new(routes), changes)
    }

    /// Every URI with its endpoints, sorted by URI and address.
    pub fn view(&self) -> View {
        let mut view: View = self
            .uris
            .iter()
            .map(|(uri, e)| {
                let mut eps: Vec<Arc<Endpoint>> = e.endpoints.values().map(|s| s.endpoint.clone()).collect();
                eps.sort_by_key(|e| e.addr);
                (uri.clone(), eps)
            })
            .collect();
        view.sort_by(|a, b| a.0.cmp(&b.0));
        view
    }
}

/// What `endpoint` registered itself as (gorouter's `ApplicationId`,
/// `PrivateInstanceId`, `PrivateInstanceIndex`).
fn app_instance(endpoint: &Endpoint) -> AppInstance {
    AppInstance::new(&endpoint.app, &endpoint.private_instance_id, &endpoint.private_instance_index)
}

/// How `endpoint` is dialled: plain, or (it registered a `tls_port`) with
/// `[backend_tls]`'s client config, verified against its
/// `server_cert_domain_san`. Err: why it cannot be taken (the `reason`
/// label of `upsplice_nats_endpoints_skipped_total`).
pub fn tls_target(
    endpoint: &Endpoint,
    backend_tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Option<Arc<Target>>, &'static str> {
    if !endpoint.tls {
        return Ok(None);
    }
    let config = backend_tls.ok_or("no_backend_tls_ca")?;
    let server_name = match endpoint.server_cert_domain_san.as_str() {
        "" => return Err("no_server_cert_domain_san"),
        san => client::server_name(san).map_err(|_| "bad_server_cert_domain_san")?,
    };
    Ok(Some(Arc::new(Target { config: config.clone(), server_name })))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reg(json: &str) -> Registration {
        super::super::message::parse(json.as_bytes()).unwrap()
    }

    #[tokio::test]
    async fn register_refresh_unregister_and_prune() {
        let registry = Registry::new();
        let config: Arc<Config> = Arc::new(toml::from_str("").unwrap());
        let mut t = Table::default();
        let now = Instant::now();
        let a = reg(r#"{"host":"10.0.0.1","port":1,"uris":["a.e.com","b.e.com/x"]}"#);
        let b = reg(r#"{"host":"10.0.0.2","port":1,"uris":["a.e.com"],"stale_threshold_in_seconds":10}"#);
        t.register(&a, now);
        t.register(&b, now);
        assert_eq!((t.len(), t.uris()), (3, 2));
        let (routes, changes) = t.routes(&config, None, &registry);
        assert_eq!((routes.len(), changes.added.len(), changes.removed.len()), (2, 2, 0));
        let pool_a = routes.iter().find(|r| &*r.uri == "a.e.com").unwrap().pool.clone();
        assert_eq!(pool_a.backends.len(), 2);
        // A refresh changes nothing but the time: no rebuild, same pool.
        t.register(&a, now + Duration::from_secs(20));
        assert!(!t.is_dirty(&config));
        let (routes, _) = t.routes(&config, None, &registry);
        assert!(Arc::ptr_eq(&routes.iter().find(|r| &*r.uri == "a.e.com").unwrap().pool, &pool_a));
        // b's own 10 s threshold is shorter than 120 s: pruned at 20 s; a was refreshed.
        assert_eq!(t.prune(now + Duration::from_secs(21), Duration::from_secs(120)), 1);
        assert_eq!(t.len(), 2);
        t.unregister(&a);
        assert_eq!((t.len(), t.uris()), (0, 0));
        assert!(t.is_dirty(&config));
        let (_, changes) = t.routes(&config, None, &registry);
        assert_eq!((changes.added.len(), changes.removed.len()), (0, 2));
    }
}
