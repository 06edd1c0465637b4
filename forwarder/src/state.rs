//! What every connection shares: the reloadable snapshot (config, routing
//! table, pools), the data planes, and the drain state.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use tokio_util::sync::CancellationToken;

use crate::access_log::AccessLog;
use crate::config::{self, Config, Protocol};
use crate::dataplane::DataPlanes;
use crate::route::{RouteTarget, Router};
use crate::route_service::RouteServices;
use crate::sni::SniTable;
use crate::tls;
use crate::upstream::{Pool, Registry};

/// The reloadable part of the router: config, routing table and pools.
/// The table holds the config's routes and the routes learned from NATS.
pub struct Snapshot {
    pub config: Arc<Config>,
    /// The config's routes and the learned ones (persistent: a change
    /// from NATS shares the rest of the table with the one before).
    pub router: Router,
    /// The config's pools, by name (a learned route carries its own).
    pools_by_name: Arc<HashMap<String, Arc<Pool>>>,
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

/// One change to the routes learned at run time (from NATS): a URI
/// (`host` or `host/path`) and its route — named by the URI, the pool of
/// its endpoints, its route service — new or in place of the one it had
/// (Some), or gone (None).
pub type LearnedChange = (Arc<str>, Option<RouteTarget>);

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
        let router = Router::new(&config, &pools);
        let pools_by_name = config.pools.iter().zip(pools).map(|(p, pool)| (p.name.clone(), pool)).collect();
        Ok(Snapshot {
            config: Arc::new(config),
            router,
            pools_by_name: Arc::new(pools_by_name),
            tls,
            sni,
            route_services: route_services.map(Arc::new),
            backend_tls,
        })
    }

    /// `[backend_tls]`'s client config, when it has a `ca`.
    pub fn backend_tls(&self) -> Option<&Arc<rustls::ClientConfig>> {
        self.backend_tls.as_ref()
    }

    /// This snapshot with `router` in place of its routing table.
    fn with_router(&self, router: Router) -> Snapshot {
        Snapshot {
            config: self.config.clone(),
            router,
            pools_by_name: self.pools_by_name.clone(),
            tls: self.tls.clone(),
            sni: self.sni.clone(),
            route_services: self.route_services.clone(),
            backend_tls: self.backend_tls.clone(),
        }
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
        self.pools_by_name.get(name)
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
    /// Held while a snapshot is built from the one in place and put in
    /// its place (a reload, a change of learned routes; never by a lookup).
    update: Mutex<()>,
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
            update: Mutex::default(),
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
    /// one keep it until they end. The learned routes stay.
    pub fn replace(&self, snapshot: Snapshot) {
        let _update = self.update.lock().expect("snapshot update lock");
        let router = self.snapshot().router.with_file_routes(snapshot.router.clone());
        *self.snapshot.write().expect("snapshot lock") = Arc::new(snapshot.with_router(router));
    }

    /// Applies `changes` to the routes learned from NATS, beside the
    /// config's: each costs what it touches, not the whole table. Returns
    /// how many routes are shadowed now (by a config route or an earlier
    /// learned one with the same host and path). Requests that started
    /// before keep the table they started with.
    pub fn learn(&self, changes: impl IntoIterator<Item = LearnedChange>) -> usize {
        let _update = self.update.lock().expect("snapshot update lock");
        let snapshot = self.snapshot();
        let mut router = snapshot.router.clone();
        for (uri, target) in changes {
            router.learn(&uri, target);
        }
        let shadowed = router.shadowed();
        *self.snapshot.write().expect("snapshot lock") = Arc::new(snapshot.with_router(router));
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
