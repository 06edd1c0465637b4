//! What every connection shares: the reloadable snapshot (config, routing
//! table, pools), the data planes, and the drain state.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tokio_util::sync::CancellationToken;

use crate::access_log::AccessLog;
use crate::config::{self, Config};
use crate::dataplane::DataPlanes;
use crate::route::Router;
use crate::upstream::{Pool, Registry};

/// The reloadable part of the router: config, routing table and pools.
pub struct Snapshot {
    pub config: Config,
    pub router: Router,
    pub pools: Vec<Arc<Pool>>,
    pools_by_name: HashMap<String, usize>,
}

impl Snapshot {
    /// The snapshot of `config`; its backends' state comes from (and its
    /// checks and idle connections are settled in) `registry`.
    pub fn new(config: Config, registry: &Registry) -> Snapshot {
        registry.adopt(&config);
        let pools: Vec<Arc<Pool>> =
            config.pools.iter().map(|p| Arc::new(Pool::new(p, &config.backends, registry))).collect();
        let pools_by_name = config.pools.iter().enumerate().map(|(i, p)| (p.name.clone(), i)).collect();
        Snapshot { router: Router::new(&config), pools, pools_by_name, config }
    }

    /// The settings of the listener called `name` (listeners never change on reload).
    pub fn listener(&self, name: &str) -> &config::Listener {
        self.config.listeners.iter().find(|l| l.name == name).expect("listeners are fixed for the process's life")
    }

    pub fn pool_named(&self, name: &str) -> Option<&Arc<Pool>> {
        self.pools_by_name.get(name).map(|&i| &self.pools[i])
    }
}

/// State shared by every connection.
pub struct Shared {
    snapshot: RwLock<Arc<Snapshot>>,
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
    pub fn new(config: Config, planes: Arc<DataPlanes>, access_log: AccessLog) -> Shared {
        let registry = Registry::new();
        Shared {
            access_log,
            snapshot: RwLock::new(Arc::new(Snapshot::new(config, &registry))),
            registry,
            planes,
            drain: CancellationToken::new(),
            draining: CancellationToken::new(),
            active: AtomicUsize::new(0),
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot.read().expect("snapshot lock").clone()
    }

    /// Puts a new snapshot in place (SIGHUP); connections that hold the old
    /// one keep it until they end.
    pub fn replace(&self, snapshot: Snapshot) {
        *self.snapshot.write().expect("snapshot lock") = Arc::new(snapshot);
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
