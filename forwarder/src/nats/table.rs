//! The endpoints learned from NATS, by URI: registration, unregistration,
//! pruning, and the routes (one pool per URI) handed to the routing table.
//!
//! Owned by the NATS task alone (no lock). A refresh that changes nothing
//! but the time costs no rebuild; a URI whose endpoints changed gets a new
//! pool at the next [`Table::changes`], the others keep theirs (and their
//! balancer's position): what goes to the routing table is what changed,
//! never the whole table.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::message::{Endpoint, Registration};
use crate::config::Config;
use crate::route::RouteTarget;
use crate::state::LearnedChange;
use crate::tls::client::{self, Target};
use crate::upstream::{Learned, Pool, Registry};

#[derive(Default)]
pub struct Table {
    uris: HashMap<Arc<str>, Uri>,
    endpoints: usize,
    /// URIs whose endpoints changed since the last [`Table::changes`].
    changed: HashSet<Arc<str>>,
    /// The config whose `[backends]` the pools handed over were built with.
    config: Option<Arc<Config>>,
    /// Every endpoint address and how many URIs list it.
    addrs: HashMap<SocketAddr, usize>,
    /// Addresses that became endpoints, and ones that no longer are,
    /// since the last [`Table::changes`].
    added: HashSet<SocketAddr>,
    removed: HashSet<SocketAddr>,
}

/// What changed in the set of endpoint addresses since the last
/// [`Table::changes`] (for [`Registry::learn`]).
#[derive(Debug, Default)]
pub struct AddrChanges {
    pub added: Vec<SocketAddr>,
    pub removed: Vec<SocketAddr>,
}

/// One URI's endpoints by address.
type Uri = HashMap<SocketAddr, Slot>;

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

    /// Something changed since the last [`Table::changes`], or `config`
    /// is not the one its pools were built with (a reload).
    pub fn is_dirty(&self, config: &Arc<Config>) -> bool {
        !self.changed.is_empty() || !self.config.as_ref().is_some_and(|c| Arc::ptr_eq(c, config))
    }

    /// Adds or refreshes the registration's endpoint under each of its URIs.
    pub fn register(&mut self, reg: &Registration, now: Instant) {
        for uri in &reg.uris {
            let endpoints = self.uris.entry(uri.clone()).or_default();
            match endpoints.get_mut(&reg.endpoint.addr) {
                Some(slot) => {
                    slot.seen = now;
                    if slot.endpoint != reg.endpoint {
                        slot.endpoint = reg.endpoint.clone();
                        self.changed.insert(uri.clone());
                    }
                }
                None => {
                    endpoints.insert(reg.endpoint.addr, Slot { endpoint: reg.endpoint.clone(), seen: now });
                    self.endpoints += 1;
                    self.changed.insert(uri.clone());
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
            let Some(endpoints) = self.uris.get_mut(uri) else { continue };
            if endpoints.remove(&reg.endpoint.addr).is_none() {
                continue;
            }
            if endpoints.is_empty() {
                self.uris.remove(uri);
            }
            self.endpoints -= 1;
            self.changed.insert(uri.clone());
            self.addr_down(reg.endpoint.addr);
        }
    }

    /// Removes the endpoints not registered within their stale threshold
    /// (their own, when shorter than `threshold`, as gorouter takes it);
    /// returns how many.
    pub fn prune(&mut self, now: Instant, threshold: Duration) -> usize {
        let mut gone = Vec::new();
        let changed = &mut self.changed;
        self.uris.retain(|uri, endpoints| {
            let before = gone.len();
            endpoints.retain(|addr, slot| {
                let limit = slot.endpoint.stale_threshold.map_or(threshold, |own| own.min(threshold));
                let keep = now.saturating_duration_since(slot.seen) <= limit;
                if !keep {
                    gone.push(*addr);
                }
                keep
            });
            if gone.len() != before {
                changed.insert(uri.clone());
            }
            !endpoints.is_empty()
        });
        let pruned = gone.len();
        for addr in gone {
            self.addr_down(addr);
        }
        self.endpoints -= pruned;
        pruned
    }

    /// Every endpoint counts as registered `now` (pruning resumes after
    /// NATS was unreachable: each gets a whole threshold to re-register).
    pub fn touch_all(&mut self, now: Instant) {
        for slot in self.uris.values_mut().flat_map(|e| e.values_mut()) {
            slot.seen = now;
        }
    }

    /// What changed for the routing table since the last call: each
    /// changed URI's route (its new pool), or None for a URI gone; and
    /// the endpoint addresses added and removed. Every URI's pool is
    /// built anew when `config` is another one than last time (its
    /// `[backends]` may differ, and `backend_tls` with it: the client
    /// config of endpoints with a `tls_port`).
    pub fn changes(
        &mut self,
        config: &Arc<Config>,
        backend_tls: Option<&Arc<rustls::ClientConfig>>,
        registry: &Registry,
    ) -> (Vec<LearnedChange>, AddrChanges) {
        if !self.config.as_ref().is_some_and(|c| Arc::ptr_eq(c, config)) {
            self.config = Some(config.clone());
            self.changed.extend(self.uris.keys().cloned());
        }
        let uris = &self.uris;
        let changes = self
            .changed
            .drain()
            .map(|uri| {
                let route =
                    uris.get(&uri).map(|endpoints| learned_route(&uri, endpoints, config, backend_tls, registry));
                (uri, route)
            })
            .collect();
        let addrs = AddrChanges { added: self.added.drain().collect(), removed: self.removed.drain().collect() };
        (changes, addrs)
    }

    /// Every URI with its endpoints, sorted by URI and address.
    pub fn view(&self) -> View {
        let mut view: View = self
            .uris
            .iter()
            .map(|(uri, e)| {
                let mut eps: Vec<Arc<Endpoint>> = e.values().map(|s| s.endpoint.clone()).collect();
                eps.sort_by_key(|e| e.addr);
                (uri.clone(), eps)
            })
            .collect();
        view.sort_by(|a, b| a.0.cmp(&b.0));
        view
    }
}

/// The route of `uri` with `endpoints`: a new pool of them (`config`'s
/// `[backends]`), its balancing and route service from the latest
/// registration, as gorouter's pool takes them.
fn learned_route(
    uri: &Arc<str>,
    endpoints: &Uri,
    config: &Config,
    backend_tls: Option<&Arc<rustls::ClientConfig>>,
    registry: &Registry,
) -> RouteTarget {
    let latest = endpoints.values().max_by_key(|s| s.seen).map(|s| &s.endpoint);
    let latest = latest.expect("a URI in the table has endpoints");
    // A TLS endpoint is left out while it cannot be dialled (a reload
    // took `[backend_tls] ca` away).
    let mut taken: Vec<(SocketAddr, Option<Arc<Target>>, &Endpoint)> = endpoints
        .iter()
        .filter_map(|(addr, slot)| Some((*addr, tls_target(&slot.endpoint, backend_tls).ok()?, &*slot.endpoint)))
        .collect();
    taken.sort_by_key(|(addr, ..)| *addr);
    // Each backend is told the app instance it registered as.
    let instances = taken.iter().map(|(.., e)| Some(e.instance.clone())).collect();
    let taken = taken.into_iter().map(|(addr, tls, _)| (addr, tls));
    let pool = Pool::learned(uri, taken, latest.balance, &config.backends, registry, Learned::Nats);
    RouteTarget {
        name: uri.clone(),
        pool: Arc::new(pool.with_instances(instances)),
        route_service: latest.route_service_url.clone(),
    }
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
        let (routes, addrs) = t.changes(&config, None, &registry);
        assert_eq!((routes.len(), addrs.added.len(), addrs.removed.len()), (2, 2, 0));
        let route = |routes: &[LearnedChange], uri: &str| {
            routes.iter().find(|(u, _)| &**u == uri).map(|(_, r)| r.as_ref().map(|r| r.pool.backends.len()))
        };
        assert_eq!(route(&routes, "a.e.com"), Some(Some(2)));
        // A refresh changes nothing but the time: nothing to hand over.
        t.register(&a, now + Duration::from_secs(20));
        assert!(!t.is_dirty(&config));
        assert!(t.changes(&config, None, &registry).0.is_empty());
        // b's own 10 s threshold is shorter than 120 s: pruned at 20 s; a was
        // refreshed. Only a.e.com changed; b.e.com/x is not handed over again.
        assert_eq!(t.prune(now + Duration::from_secs(21), Duration::from_secs(120)), 1);
        assert_eq!(t.len(), 2);
        let (routes, addrs) = t.changes(&config, None, &registry);
        assert_eq!((routes.len(), route(&routes, "a.e.com")), (1, Some(Some(1))));
        assert_eq!((addrs.added.len(), addrs.removed.len()), (0, 1));
        // A reload (another config) rebuilds every URI's pool.
        let reloaded: Arc<Config> = Arc::new(toml::from_str("").unwrap());
        assert!(t.is_dirty(&reloaded));
        assert_eq!(t.changes(&reloaded, None, &registry).0.len(), 2);
        t.unregister(&a);
        assert_eq!((t.len(), t.uris()), (0, 0));
        assert!(t.is_dirty(&reloaded));
        let (routes, addrs) = t.changes(&reloaded, None, &registry);
        assert_eq!((route(&routes, "a.e.com"), route(&routes, "b.e.com/x")), (Some(None), Some(None)));
        assert_eq!((addrs.added.len(), addrs.removed.len()), (0, 1));
    }
}
