//! One backend address as the whole process sees it: the connections open
//! to it, its health, its idle connections. Kept by the [`Registry`]
//! across reloads while the address stays in the config.
//!
//! [`Registry`]: super::Registry

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::health::{Admit, Backoff, Failed, Health};
use super::idle::IdleList;
use crate::metrics;

#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    /// Connections in use now (requests, tunnels); idle ones are not.
    active: AtomicUsize,
    health: Mutex<Health>,
    pub(super) idle: IdleList,
    /// The pools that list it in the running config (the metrics' labels).
    pools: Mutex<Vec<String>>,
    /// Gone from the running config: its connections are not kept idle.
    retired: AtomicBool,
    /// An endpoint of a route learned from NATS: not retired while it is,
    /// whatever the config lists.
    learned: AtomicBool,
}

/// Holds a backend's active count up while a connection to it is in use.
#[derive(Debug)]
pub struct BackendGuard(Arc<Backend>);

impl BackendGuard {
    pub fn addr(&self) -> SocketAddr {
        self.0.addr
    }

    pub(super) fn backend(&self) -> &Arc<Backend> {
        &self.0
    }
}

impl Drop for BackendGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Backend {
    pub(super) fn new(addr: SocketAddr) -> Backend {
        Backend {
            addr,
            active: AtomicUsize::new(0),
            health: Mutex::default(),
            idle: IdleList::default(),
            pools: Mutex::default(),
            retired: AtomicBool::new(false),
            learned: AtomicBool::new(false),
        }
    }

    /// Connections in use now (least_conn balances on it).
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    fn health(&self) -> MutexGuard<'_, Health> {
        self.health.lock().expect("backend health lock")
    }

    /// Not in back-off and not held down by the active check.
    pub fn in_service(&self) -> bool {
        self.health().in_service()
    }

    /// Counts one more connection in use, unless `max_conns` (0: no cap)
    /// are open already, idle ones included: then the oldest idle one is
    /// closed to make room, and without one None.
    pub(super) fn reserve(self: &Arc<Self>, max_conns: usize) -> Option<BackendGuard> {
        if max_conns == 0 {
            return Some(self.lease());
        }
        loop {
            let active = self.active.load(Ordering::Acquire);
            if active + self.idle.len() >= max_conns {
                if active < max_conns && self.idle.evict_oldest() {
                    continue;
                }
                return None;
            }
            if self.active.compare_exchange(active, active + 1, Ordering::AcqRel, Ordering::Acquire).is_ok() {
                return Some(BackendGuard(self.clone()));
            }
        }
    }

    /// Counts a connection in use without a cap check (an idle one taken
    /// back into use was within the cap already).
    pub(super) fn lease(self: &Arc<Self>) -> BackendGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        BackendGuard(self.clone())
    }

    pub(super) fn admit(&self, now: Instant, backoff: Backoff) -> Admit {
        self.health().admit(now, backoff)
    }

    /// A request failed on it (connect refused or timed out, reset, no
    /// response in time): back-off starts or grows. Logged once per
    /// change of state, not per request.
    pub(super) fn failed(&self, pool: &str, why: &str, backoff: Backoff) {
        let now = Instant::now();
        let failed = self.health().passive.failed(now, backoff);
        metrics::backend_failure(pool, self.addr);
        match failed {
            Failed::WentOut(period) => {
                tracing::warn!(pool, backend = %self.addr, "backend out of service for {period:?}: {why}");
                self.publish();
            }
            Failed::StillOut(period) => {
                tracing::debug!(pool, backend = %self.addr, "backend still failing, out for {period:?}: {why}")
            }
        }
    }

    /// A request got a response head from it: its failure streak ends.
    pub(super) fn succeeded(&self, pool: &str) {
        let back = self.health().passive.succeeded();
        if back {
            tracing::info!(pool, backend = %self.addr, "backend back in service: a request succeeded");
            self.publish();
        }
    }

    /// One result of the active check.
    pub(super) fn checked(&self, pool: &str, result: Result<(), String>, rise: u32, fall: u32) {
        let flipped = self.health().active.record(result.is_ok(), rise, fall);
        match (flipped, result) {
            (Some(false), Err(why)) => {
                tracing::warn!(pool, backend = %self.addr, "backend out of service: health check failed {fall} times: {why}");
                self.publish();
            }
            (Some(true), _) => {
                tracing::info!(pool, backend = %self.addr, "backend back in service: health check passed {rise} times");
                self.publish();
            }
            (_, Err(why)) => tracing::debug!(pool, backend = %self.addr, "health check failed: {why}"),
            _ => {}
        }
    }

    /// Its check was removed from the config: it is no longer held down.
    pub(super) fn unchecked(&self) {
        if self.health().active.reset() {
            tracing::info!(backend = %self.addr, "backend back in service: its health check was removed");
            self.publish();
        }
    }

    pub(super) fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    pub(super) fn is_learned(&self) -> bool {
        self.learned.load(Ordering::Acquire)
    }

    /// Which pools list it now (none: it left the config, and it is
    /// retired unless it is a NATS endpoint).
    pub(super) fn set_pools(&self, pools: Vec<String>) {
        *self.pools.lock().expect("backend pools lock") = pools;
        self.update_retired();
        self.publish();
    }

    /// Whether a route learned from NATS has it as an endpoint now.
    pub(super) fn set_learned(&self, learned: bool) {
        if self.learned.swap(learned, Ordering::AcqRel) != learned {
            self.update_retired();
        }
    }

    /// Retired: listed by no pool of the config and no NATS route; its
    /// idle connections are closed.
    fn update_retired(&self) {
        let retired = self.pools.lock().expect("backend pools lock").is_empty() && !self.is_learned();
        self.retired.store(retired, Ordering::Release);
        if retired {
            self.idle.clear();
        }
    }

    /// Sets `upsplice_backend_up` for every pool that lists it.
    fn publish(&self) {
        let up = self.in_service();
        for pool in self.pools.lock().expect("backend pools lock").iter() {
            metrics::backend_up(pool, self.addr, up);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    fn backend() -> Arc<Backend> {
        Arc::new(Backend::new("127.0.0.1:9".parse().unwrap()))
    }

    #[test]
    fn max_conns_caps_connections_in_use() {
        let b = backend();
        let g1 = b.reserve(2).unwrap();
        let _g2 = b.reserve(2).unwrap();
        assert!(b.reserve(2).is_none());
        drop(g1);
        assert_eq!(b.active(), 1);
        let _g3 = b.reserve(2).unwrap();
        assert!(b.reserve(2).is_none());
        // 0: no cap.
        let many: Vec<_> = (0..100).map(|_| b.reserve(0).unwrap()).collect();
        assert_eq!(b.active(), 102);
        drop(many);
        assert_eq!(b.active(), 2);
    }

    #[tokio::test]
    async fn idle_connections_count_for_the_cap_but_make_room() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let b = backend();
        let later = Instant::now() + Duration::from_secs(60);
        let idle = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let _peer = l.accept().await.unwrap();
        b.idle.put(idle.into(), None, None, later, 4).unwrap();
        let _busy = b.reserve(2).unwrap();
        // One busy + one idle = the cap of 2: the idle one is closed for the new one.
        let _second = b.reserve(2).unwrap();
        assert!(b.idle.is_empty());
        assert!(b.reserve(2).is_none());
    }
}
