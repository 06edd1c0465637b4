//! The process-wide state of every backend address, kept across reloads:
//! a backend that stays in the config keeps its health, idle connections
//! and active count; one that leaves it has its idle connections closed
//! and its check stopped. Also the sweep that closes expired and dead idle
//! connections, and the active check tasks.

use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::backend::Backend;
use super::check;
use crate::config::{Check, Config, SendProxy};
use crate::metrics;

/// How often idle connections are swept: one whose backend closed it is
/// closed here within this, an expired one within this past its expiry.
const SWEEP_EVERY: Duration = Duration::from_millis(500);

/// Process-wide backend state keyed by address (health, idle connections,
/// active count), kept across reloads. Created once (`state::Shared`).
#[derive(Default)]
pub struct Registry {
    backends: Mutex<HashMap<SocketAddr, Arc<Backend>>>,
    checks: Mutex<HashMap<SocketAddr, Running>>,
    /// The (pool, backend) pairs whose series `/metrics` shows.
    series: Mutex<BTreeSet<(String, SocketAddr)>>,
}

/// A check task and what it checks with.
struct Running {
    check: Check,
    send_proxy: SendProxy,
    stop: CancellationToken,
}

impl Registry {
    /// A registry; inside a tokio runtime its sweep starts too (and ends
    /// when the registry is dropped).
    pub fn new() -> Arc<Registry> {
        let registry = Arc::new(Registry::default());
        if tokio::runtime::Handle::try_current().is_ok() {
            tokio::spawn(sweep(Arc::downgrade(&registry)));
        }
        registry
    }

    /// The state of `addr` (new, in service, if unknown).
    pub fn backend(&self, addr: SocketAddr) -> Arc<Backend> {
        self.lock().entry(addr).or_insert_with(|| Arc::new(Backend::new(addr))).clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, Arc<Backend>>> {
        self.backends.lock().expect("registry lock")
    }

    /// Takes a (new or reloaded) config on: which pools list each backend,
    /// backends that left are retired, checks started and stopped, and
    /// `/metrics` series for the (pool, backend) pairs of this config only.
    pub fn adopt(&self, config: &Config) {
        let mut pools_of: HashMap<SocketAddr, Vec<String>> = HashMap::new();
        let mut checks: HashMap<SocketAddr, (String, Check, SendProxy)> = HashMap::new();
        for pool in &config.pools {
            for &addr in pool.backends.iter() {
                pools_of.entry(addr).or_default().push(pool.name.clone());
                if let Some(check) = &pool.check {
                    match checks.get(&addr) {
                        Some((first, other, _)) if other != check => tracing::warn!(
                            backend = %addr,
                            "pools {first:?} and {:?} check this backend differently; {first:?}'s check is used",
                            pool.name
                        ),
                        Some(_) => {}
                        None => {
                            checks.insert(addr, (pool.name.clone(), check.clone(), pool.send_proxy));
                        }
                    }
                }
            }
        }
        let series: BTreeSet<(String, SocketAddr)> =
            pools_of.iter().flat_map(|(addr, pools)| pools.iter().map(|p| (p.clone(), *addr))).collect();
        {
            let mut old = self.series.lock().expect("registry series lock");
            for (pool, addr) in old.difference(&series) {
                metrics::forget_backend(pool, *addr);
            }
            *old = series;
        }
        let known: Vec<Arc<Backend>> = self.lock().values().cloned().collect();
        for backend in known {
            if !pools_of.contains_key(&backend.addr) && !backend.is_retired() && !backend.is_learned() {
                tracing::info!(backend = %backend.addr, "backend left the config: its idle connections are closed");
                backend.set_pools(Vec::new());
            }
        }
        for (addr, pools) in pools_of {
            self.backend(addr).set_pools(pools);
        }
        if config.backends.max_idle_per_backend == 0 {
            for backend in self.lock().values() {
                backend.idle.clear();
            }
        }
        self.run_checks(checks);
    }

    /// Takes the changes to the endpoints of the routes learned from NATS
    /// on: an `added` one is not retired while it is an endpoint; a
    /// `removed` one that no pool of the config lists is.
    pub fn learn(&self, added: &[SocketAddr], removed: &[SocketAddr]) {
        let mut backends = self.lock();
        for addr in removed {
            if let Some(backend) = backends.get(addr) {
                backend.set_learned(false);
            }
        }
        for &addr in added {
            backends.entry(addr).or_insert_with(|| Arc::new(Backend::new(addr))).set_learned(true);
        }
    }

    /// Starts a task per newly checked backend (or changed check), stops
    /// the ones no longer wanted.
    fn run_checks(&self, wanted: HashMap<SocketAddr, (String, Check, SendProxy)>) {
        let runtime = tokio::runtime::Handle::try_current().is_ok();
        let mut running = self.checks.lock().expect("registry checks lock");
        running.retain(|addr, task| {
            let keep = wanted
                .get(addr)
                .is_some_and(|(_, check, send_proxy)| *check == task.check && *send_proxy == task.send_proxy);
            if !keep {
                task.stop.cancel();
                if !wanted.contains_key(addr) {
                    self.backend(*addr).unchecked();
                }
            }
            keep
        });
        for (addr, (pool, check, send_proxy)) in wanted {
            if running.contains_key(&addr) || !runtime {
                continue;
            }
            let stop = CancellationToken::new();
            check::spawn(self.backend(addr), pool, check.clone(), send_proxy, stop.clone());
            running.insert(addr, Running { check, send_proxy, stop });
        }
    }

    /// Closes expired and dead idle connections; forgets retired backends
    /// nothing refers to any more. Returns how many connections it closed.
    fn sweep_once(&self, now: Instant) -> usize {
        let mut backends = self.lock();
        backends.retain(|_, b| !(b.is_retired() && Arc::strong_count(b) == 1));
        backends.values().map(|b| b.idle.sweep(now)).sum()
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        for task in self.checks.get_mut().map(|c| c.values()).into_iter().flatten() {
            task.stop.cancel();
        }
    }
}

async fn sweep(registry: Weak<Registry>) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(registry) = registry.upgrade() else { return };
        let closed = registry.sweep_once(Instant::now());
        if closed > 0 {
            tracing::trace!(closed, "idle backend connections closed by the sweep");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(toml: &str) -> Config {
        toml::from_str(toml).unwrap()
    }

    #[tokio::test]
    async fn a_backend_that_stays_keeps_its_state_and_one_that_leaves_is_retired() {
        let registry = Registry::new();
        let one = "[[pool]]\nname = \"p\"\nbackends = [\"127.0.0.1:9001\", \"127.0.0.1:9002\"]\n";
        registry.adopt(&config(one));
        let kept = registry.backend("127.0.0.1:9001".parse().unwrap());
        let _busy = kept.lease();
        registry.adopt(&config("[[pool]]\nname = \"p\"\nbackends = [\"127.0.0.1:9001\"]\n"));
        let again = registry.backend("127.0.0.1:9001".parse().unwrap());
        assert!(Arc::ptr_eq(&kept, &again));
        assert_eq!(again.active(), 1);
        assert!(!again.is_retired());
        let gone = registry.backend("127.0.0.1:9002".parse().unwrap());
        assert!(gone.is_retired());
        drop(gone);
        registry.sweep_once(Instant::now());
        assert!(!registry.lock().contains_key(&"127.0.0.1:9002".parse().unwrap()), "forgotten once unused");
    }

    #[tokio::test]
    async fn the_sweep_closes_idle_connections_that_expired_or_that_the_backend_closed() {
        let registry = Registry::new();
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let backend = registry.backend(l.local_addr().unwrap());
        let connect = || async {
            let c = tokio::net::TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
            (c, l.accept().await.unwrap().0)
        };
        let (closed, closed_peer) = connect().await;
        let (expiring, _expiring_peer) = connect().await;
        let (kept, _kept_peer) = connect().await;
        let now = Instant::now();
        backend.idle.put(closed.into(), None, None, now + Duration::from_secs(60), 8).unwrap();
        backend.idle.put(expiring.into(), None, None, now + Duration::from_millis(100), 8).unwrap();
        backend.idle.put(kept.into(), None, None, now + Duration::from_secs(60), 8).unwrap();
        // The backend closes one (it would sit in CLOSE_WAIT here).
        drop(closed_peer);
        tokio::time::sleep(SWEEP_EVERY * 2 + Duration::from_millis(100)).await;
        assert_eq!(backend.idle.len(), 1, "only the live, unexpired one is left");
    }
}
