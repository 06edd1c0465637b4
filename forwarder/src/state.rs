//! What every connection shares: the reloadable snapshot (config, routing
//! table, pools), the data planes, and the drain state.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio_util::sync::CancellationToken;

use crate::access_log::AccessLog;
use crate::config::{self, Config, Protocol};
use crate::dataplane::DataPlanes;
use crate::route::{self, RouteTarget, Router};
use crate::route_service::RouteServices;
use crate::sni::SniTable;
use crate::tls;
use crate::upstream::{Pool, Registry};

/// The reloadable part of the router: config, routing table and pools.
/// The table holds the config's routes and the routes learned from NATS.
pub struct Snapshot {
    pub config: Arc<Config>,
    pub router: Router,
    /// The config's pools (in its order), then one per learned route.
    pub pools: Vec<Arc<Pool>>,
    pools_by_name: Arc<HashMap<String, usize>>,
    /// Learned routes left out because a config route has the same host
    /// and path (the config's route wins).
    pub shadowed: usize,
    /// Each listener's TLS config (None: plain), in `config.listeners` order.
    tls: Arc<[Option<Arc<rustls::ServerConfig>>]>,
    /// `[route_services]`: the keys, derived once per config, and the
    /// services' pools (None: route services disabled).
    pub route_services: Option<Arc<RouteServices>>,
    /// Each passthrough listener's SNI routes (None: it does not route by
    /// SNI), in `config.listeners` order.
    sni: Arc<[Option<SniTable>]>,
    /// `[backend_tls]`'s client config (with its `ca`): the pools with
    /// `tls` but no `ca` of their own, and NATS endpoints with a `tls_port`.
    backend_tls: Option<Arc<rustls::ClientConfig>>,
}

/// What a snapshot builds per listener from its config: TLS configs and
/// SNI routes, in `config.listeners` order.
type ListenerTables = (Arc<[Option<Arc<rustls::ServerConfig>>]>, Arc<[Option<SniTable>]>);

/// A route learned at run time (from NATS): its URI (`host` or
/// `host/path`), the pool of its endpoints, its route service.
#[derive(Debug)]
pub struct LearnedRoute {
    pub uri: Arc<str>,
    pub pool: Arc<Pool>,
    pub route_service: Option<Arc<str>>,
}

impl Snapshot {
    /// The snapshot of `config`; its backends' state comes from (and its
    /// checks and idle connections are settled in) `registry`. Its TLS
    /// files (listeners', `[backend_tls]`, pools') are read first: a bad
    /// one fails it (naming the listener or pool and the file) before
    /// anything is adopted.
    pub fn new(config: Config, registry: &Arc<Registry>) -> Result<Snapshot, SnapshotError> {
        let tls = config
            .listeners
            .iter()
            .map(|l| {
                let built = l.tls.as_ref().map(|t| tls::server_config(t, l.protocol == Protocol::Http)).transpose();
                built.map_err(|source| SnapshotError::Tls { listener: l.name.clone(), source })
            })
            .collect::<Result<_, _>>()?;
        let sni = config.listeners.iter().map(SniTable::of).collect();
        let backend_tls = config
            .backend_tls
            .ca
            .as_ref()
            .map(|ca| tls::client::client_config(ca, &config.backend_tls))
            .transpose()
            .map_err(SnapshotError::BackendTls)?;
        let targets =
            config.pools.iter().map(|p| pool_tls(p, &config, backend_tls.as_ref())).collect::<Result<Vec<_>, _>>()?;
        let route_services = RouteServices::new(&config, registry).map_err(SnapshotError::RouteServices)?;
        registry.adopt(&config);
        let pools: Vec<Arc<Pool>> = config
            .pools
            .iter()
            .zip(targets)
            .map(|(p, tls)| Arc::new(Pool::new(p, &config.backends, registry, tls)))
            .collect();
        let pools_by_name = config.pools.iter().enumerate().map(|(i, p)| (p.name.clone(), i)).collect();
        let mut snapshot = Snapshot::assemble(Arc::new(config), pools, Arc::new(pools_by_name), (tls, sni), &[]);
        snapshot.route_services = route_services.map(Arc::new);
        snapshot.backend_tls = backend_tls;
        Ok(snapshot)
    }

    /// `[backend_tls]`'s client config, when it has a `ca`.
    pub fn backend_tls(&self) -> Option<&Arc<rustls::ClientConfig>> {
        self.backend_tls.as_ref()
    }

    /// This snapshot's config and pools with `learned` beside the config's
    /// routes (instead of the ones it had).
    pub fn with_learned(&self, learned: &[LearnedRoute]) -> Snapshot {
        let pools = self.pools[..self.config.pools.len()].to_vec();
        let listeners = (self.tls.clone(), self.sni.clone());
        let mut snapshot =
            Snapshot::assemble(self.config.clone(), pools, self.pools_by_name.clone(), listeners, learned);
        snapshot.route_services = self.route_services.clone();
        snapshot.backend_tls = self.backend_tls.clone();
        snapshot
    }

    fn assemble(
        config: Arc<Config>,
        mut pools: Vec<Arc<Pool>>,
        pools_by_name: Arc<HashMap<String, usize>>,
        (tls, sni): ListenerTables,
        learned: &[LearnedRoute],
    ) -> Snapshot {
        let first = pools.len();
        let learned_routes = learned.iter().enumerate().map(|(i, r)| {
            let (host, path) = route::split_uri(&r.uri);
            let target = RouteTarget { pool: first + i, name: r.uri.clone(), route_service: r.route_service.clone() };
            (host, path, target)
        });
        let (router, shadowed) = Router::build(route::file_routes(&config).chain(learned_routes));
        pools.extend(learned.iter().map(|r| r.pool.clone()));
        Snapshot { config, router, pools, pools_by_name, shadowed, tls, sni, route_services: None, backend_tls: None }
    }

    /// The TLS config of the listener called `name`, if it terminates TLS.
    pub fn listener_tls(&self, name: &str) -> Option<&Arc<rustls::ServerConfig>> {
        let i = self.config.listeners.iter().position(|l| l.name == name)?;
        self.tls[i].as_ref()
    }

    /// The SNI routes of the listener called `name`, if it routes by SNI.
    pub fn listener_sni(&self, name: &str) -> Option<&SniTable> {
        let i = self.config.listeners.iter().position(|l| l.name == name)?;
        self.sni[i].as_ref()
    }

    /// The settings of the listener called `name` (listeners never change on reload).
    pub fn listener(&self, name: &str) -> &config::Listener {
        self.config.listeners.iter().find(|l| l.name == name).expect("listeners are fixed for the process's life")
    }

    pub fn pool_named(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools_by_name.get(name).map(|&i| &self.pools[i])
    }
}

/// How the backends of pool `p` are dialled: with its `tls`, verified
/// against its `ca` (else `[backend_tls]`'s, whose config it then shares).
fn pool_tls(
    p: &config::Pool,
    config: &Config,
    backend_tls: Option<&Arc<rustls::ClientConfig>>,
) -> Result<Option<Arc<tls::client::Target>>, SnapshotError> {
    let Some(t) = &p.tls else { return Ok(None) };
    let failed = |source| SnapshotError::PoolTls { pool: p.name.clone(), source };
    let client = match (&t.ca, backend_tls) {
        (Some(ca), _) => tls::client::client_config(ca, &config.backend_tls).map_err(failed)?,
        (None, Some(node)) => node.clone(),
        (None, None) => {
            return Err(failed(tls::TlsError::Setting {
                field: "tls.ca",
                problem: "required unless [backend_tls] ca is set".into(),
            }))
        }
    };
    let server_name = tls::client::server_name(&t.server_name).map_err(failed)?;
    Ok(Some(Arc::new(tls::client::Target { config: client, server_name })))
}

/// Why a config cannot become a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("listener {listener:?}: {source}")]
    Tls {
        listener: String,
        #[source]
        source: tls::TlsError,
    },
    #[error("[backend_tls]: {0}")]
    BackendTls(#[source] tls::TlsError),
    #[error("[route_services]: {0}")]
    RouteServices(#[source] tls::TlsError),
    #[error("pool {pool:?} tls: {source}")]
    PoolTls {
        pool: String,
        #[source]
        source: tls::TlsError,
    },
}

/// State shared by every connection.
pub struct Shared {
    snapshot: RwLock<Arc<Snapshot>>,
    /// The routes learned from NATS now: every new snapshot takes them.
    /// Held while a snapshot is built and put in place (never by a lookup).
    learned: Mutex<Arc<Vec<LearnedRoute>>>,
    pub planes: Arc<DataPlanes>,
    /// Every backend's health, idle connections and active count, across reloads.
    pub registry: Arc<Registry>,
    /// Fires at the drain deadline: every tunnel closes.
    pub drain: CancellationToken,
    /// Fires when the drain starts (SIGTERM, SIGUSR1): `/healthz` answers
    /// 503, idle keep-alive connections close, responses in flight say
    /// `Connection: close`.
    pub draining: CancellationToken,
    /// Connections open now, all listeners together.
    active: AtomicUsize,
    /// Where each connection's record goes when it ends.
    pub access_log: AccessLog,
}

impl Shared {
    pub fn new(config: Config, planes: Arc<DataPlanes>, access_log: AccessLog) -> Result<Shared, SnapshotError> {
        let registry = Registry::new();
        let snapshot = Snapshot::new(config, &registry)?;
        Ok(Shared {
            access_log,
            snapshot: RwLock::new(Arc::new(snapshot)),
            learned: Mutex::default(),
            registry,
            planes,
            drain: CancellationToken::new(),
            draining: CancellationToken::new(),
            active: AtomicUsize::new(0),
        })
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().expect("snapshot lock").clone()
    }

    /// Puts a new snapshot in place (SIGHUP); connections that hold the old
    /// one keep it until they end.
    /// The learned routes stay.
    pub fn replace(&self, snapshot: Snapshot) {
        let learned = self.learned.lock().expect("learned routes lock");
        let snapshot = if learned.is_empty() { snapshot } else { snapshot.with_learned(&learned) };
        *self.snapshot.write().expect("snapshot lock") = Arc::new(snapshot);
    }

    /// Puts the routes learned from NATS in place of the ones before,
    /// beside the config's; returns how many the config's routes shadow.
    /// Requests that started before keep the table they started with.
    pub fn learn(&self, routes: Arc<Vec<LearnedRoute>>) -> usize {
        let mut learned = self.learned.lock().expect("learned routes lock");
        let next = self.snapshot().with_learned(&routes);
        let shadowed = next.shadowed;
        *self.snapshot.write().expect("snapshot lock") = Arc::new(next);
        *learned = routes;
        shadowed
    }

    /// Counts one more connection, unless `max` are open already.
    pub fn admit(self: &Arc<Self>, max: usize) -> Option<ActiveGuard> {
        if self.active.fetch_add(1, Ordering::Relaxed) >= max {
            self.active.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(ActiveGuard(self.clone()))
    }

    /// Connections open now.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

/// Counts a connection in `Shared::active` while it lives.
pub struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}
