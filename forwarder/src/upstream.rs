//! Backend pools: balancing, connection reuse, passive and active health,
//! and the per-backend connection cap.
//!
//! A request asks its [`Pool`] for an [`Upstream`]: an idle keep-alive
//! connection when reuse is allowed and one is alive, else a new one to
//! the balancer's pick among the backends in service. A backend that
//! refuses, resets or times out is skipped for a back-off period that
//! doubles while it keeps failing; after it one request probes it. An
//! optional active check (`[pool.check]`) holds a backend out while it
//! fails. The per-address state lives in the [`Registry`], which outlives
//! reloads.
//!
//! - `health`: the state machines (back-off, probe, rise/fall), no I/O;
//! - `idle`: a backend's idle connections (liveness peek, expiry, cap);
//! - `backend`: one address's state, its active count and guard;
//! - `check`: the active check tasks;
//! - `registry`: every address's state across reloads, the idle sweep;
//! - `stream`: a backend connection, plain or TLS, and its connect.

mod backend;
mod check;
mod health;
mod idle;
mod registry;
mod stream;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

pub use self::backend::{Backend, BackendGuard};
use self::health::{Admit, Backoff};
pub use self::registry::Registry;
pub use self::stream::{BackendStream, TlsBackend};
use crate::config::{self, BackendSettings, Balance, SendProxy};
use crate::socket::LocalAddr;
use crate::tls::client::{Failure, Target};

/// A pool of backends, shared by all connections routed to it while its
/// snapshot is in force.
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub backends: Vec<Arc<Backend>>,
    /// How each backend (same index) is dialled with TLS; empty: none is.
    tls: Vec<Option<Arc<Target>>>,
    /// The app instance each backend (same index) registered as; empty:
    /// none did (a pool from the file, a route service's).
    instances: Vec<Option<Arc<AppInstance>>>,
    balance: Balance,
    next: AtomicUsize,
    ctx: Arc<PoolContext>,
}

/// What an [`Upstream`] needs of its pool after `connect`.
#[derive(Debug)]
struct PoolContext {
    name: String,
    /// `[backends]` as configured in this pool's snapshot.
    settings: BackendSettings,
    backoff: Backoff,
    reused: Counter,
    /// `send_proxy`: its connections describe one client each, never reused.
    send_proxy: SendProxy,
}

/// What an endpoint learned from NATS registered about itself (`app`,
/// `private_instance_id`, `private_instance_index`): the request headers
/// gorouter sets towards it and the access log's app fields. Control
/// characters are removed: the values go into header lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppInstance {
    pub app_id: Arc<str>,
    pub instance_id: Arc<str>,
    pub instance_index: Arc<str>,
}

impl AppInstance {
    pub fn new(app_id: &str, instance_id: &str, instance_index: &str) -> AppInstance {
        let clean = |v: &str| -> Arc<str> { v.chars().filter(|c| !c.is_control()).collect::<String>().trim().into() };
        AppInstance { app_id: clean(app_id), instance_id: clean(instance_id), instance_index: clean(instance_index) }
    }
}

/// How one request wants its backend connection.
#[derive(Debug, Clone, Copy)]
pub struct ConnectOpts {
    /// For a new connection's connect.
    pub timeout: Duration,
    /// `limits.tcp_user_timeout`, for a new connection.
    pub user_timeout: Option<Duration>,
    /// An idle keep-alive connection may serve it (a plain request to a
    /// pool that sends no PROXY header).
    pub reuse: bool,
    /// The client and the address it connected to, for the PROXY header
    /// of a pool with `send_proxy` (a new connection each time: the header
    /// describes one client connection).
    pub client: Option<(SocketAddr, LocalAddr)>,
    /// Only this backend (an index from [`Pool::find_instance`]): a request
    /// with `X-CF-APP-INSTANCE` goes to that app instance or to none.
    pub only: Option<usize>,
}

/// A backend connection for one request. Dropping it closes the
/// connection with no effect on the backend's health.
#[derive(Debug)]
pub struct Upstream {
    pub stream: BackendStream,
    /// It served an earlier request: if it turns out closed before any
    /// response byte, drop it (the backend may have closed it idle) and
    /// retry on a fresh one rather than calling [`Upstream::failed`].
    pub reused: bool,
    /// Its TLS (idle connections are reused for the same TLS only).
    tls: Option<Arc<Target>>,
    /// The worker thread whose reactor watches it (`workers::current`
    /// where it was connected), kept with it when it goes idle.
    home: Option<usize>,
    /// The app instance its backend registered as, if it did.
    instance: Option<Arc<AppInstance>>,
    guard: BackendGuard,
    pool: Arc<PoolContext>,
}

/// Why no backend could be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("pool {0:?} has no backends")]
    NoBackends(String),
    /// `tls`: the last failure was a TLS handshake's, and how it failed.
    #[error("every backend of pool {pool:?} failed; last: {last}")]
    AllFailed { pool: String, last: String, tls: Option<Failure> },
    #[error("every backend of pool {pool:?} is at its connection limit ([backends] max_conns)")]
    ConnLimit { pool: String },
}

/// Why one backend did not give a connection.
enum Miss {
    AtCap,
    Failed(String, Option<Failure>),
    /// The router ran out of fds, buffers or memory: every other backend
    /// would fail the same way (EMFILE comes from `socket()` itself), so
    /// the request stops here.
    Shortage(String),
}

/// Where a pool made at run time comes from: the label its reuse counts under.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Learned {
    /// A route learned from NATS (`pool="nats"`).
    Nats,
    /// A route service's URL (`pool="route_service"`).
    RouteService,
}

impl Learned {
    fn reused(self) -> Counter {
        static NATS: std::sync::OnceLock<Counter> = std::sync::OnceLock::new();
        static ROUTE_SERVICE: std::sync::OnceLock<Counter> = std::sync::OnceLock::new();
        let (cell, label) = match self {
            Learned::Nats => (&NATS, "nats"),
            Learned::RouteService => (&ROUTE_SERVICE, "route_service"),
        };
        cell.get_or_init(|| crate::metrics::reused_counter(label)).clone()
    }
}

impl Pool {
    /// The pool `cfg` of a config whose `[backends]` are `settings`, its
    /// backends' state taken from (or added to) `registry`; `tls`: how its
    /// backends are dialled when it has `tls` (built with the snapshot).
    pub fn new(cfg: &config::Pool, settings: &BackendSettings, registry: &Registry, tls: Option<Arc<Target>>) -> Pool {
        let tls = tls.map(|t| vec![Some(t); cfg.backends.len()]).unwrap_or_default();
        Pool::with_reuse_counter(cfg, settings, registry, crate::metrics::reused_counter(&cfg.name), tls)
    }

    /// The pool of one URI learned from NATS: its endpoints (each an
    /// address, and its TLS when it registered a `tls_port`), no PROXY
    /// header, no active check. Named by its URI (in logs and in the
    /// failure series of a backend that fails); reuse counts under one
    /// series for all such pools, `pool=` [`Learned`]'s label, not one per URI.
    pub fn learned(
        uri: &str,
        endpoints: impl IntoIterator<Item = (SocketAddr, Option<Arc<Target>>)>,
        balance: Balance,
        settings: &BackendSettings,
        registry: &Registry,
        kind: Learned,
    ) -> Pool {
        let (backends, mut tls): (Vec<SocketAddr>, Vec<Option<Arc<Target>>>) = endpoints.into_iter().unzip();
        if tls.iter().all(Option::is_none) {
            tls = Vec::new();
        }
        let cfg = config::Pool {
            name: uri.to_string(),
            backends: backends.into_iter().collect(),
            balance,
            check: None,
            send_proxy: SendProxy::Off,
            tls: None,
        };
        Pool::with_reuse_counter(&cfg, settings, registry, kind.reused(), tls)
    }

    /// The backend registered as instance `index` of app `app_id` (gorouter's
    /// `X-CF-APP-INSTANCE: APP_GUID:APP_INDEX`), for [`ConnectOpts::only`].
    pub fn find_instance(&self, app_id: &str, index: &str) -> Option<usize> {
        self.instances
            .iter()
            .position(|i| i.as_deref().is_some_and(|i| &*i.app_id == app_id && &*i.instance_index == index))
    }

    /// The app instance each backend (same order as the endpoints it was
    /// made with) registered as: what a request to it is told.
    pub fn with_instances(self, instances: Vec<Option<Arc<AppInstance>>>) -> Pool {
        debug_assert_eq!(instances.len(), self.backends.len(), "one instance per backend");
        let instances = if instances.iter().all(Option::is_none) { Vec::new() } else { instances };
        Pool { instances, ..self }
    }

    fn with_reuse_counter(
        cfg: &config::Pool,
        settings: &BackendSettings,
        registry: &Registry,
        reused: Counter,
        tls: Vec<Option<Arc<Target>>>,
    ) -> Pool {
        Pool {
            name: cfg.name.clone(),
            backends: cfg.backends.iter().map(|&addr| registry.backend(addr)).collect(),
            tls,
            instances: Vec::new(),
            balance: cfg.balance,
            next: AtomicUsize::new(0),
            ctx: Arc::new(PoolContext {
                name: cfg.name.clone(),
                settings: settings.clone(),
                backoff: Backoff::from_settings(settings),
                reused,
                send_proxy: cfg.send_proxy,
            }),
        }
    }

    /// The order in which this request considers the backends (indexes).
    fn order(&self) -> Vec<usize> {
        let n = self.backends.len();
        let start = match self.balance {
            Balance::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % n,
            Balance::LeastConn => {
                // Ties go round robin so equal backends share the load.
                let offset = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n).map(|i| (i + offset) % n).min_by_key(|&i| self.backends[i].active()).unwrap_or(0)
            }
        };
        (0..n).map(|i| (start + i) % n).collect()
    }

    /// A connection for one request: an idle pooled one when `opts.reuse`
    /// and one is alive, else a new one, to the balancer's pick among the
    /// backends in service, trying each at most once. If every backend is
    /// out (back-off, active check), they are tried anyway, in order,
    /// rather than refusing. A backend at `[backends] max_conns` is
    /// skipped; all at their cap: [`ConnectError::ConnLimit`].
    pub async fn connect(&self, opts: ConnectOpts) -> Result<Upstream, ConnectError> {
        if self.backends.is_empty() {
            return Err(ConnectError::NoBackends(self.name.clone()));
        }
        let order = match opts.only {
            Some(i) if i < self.backends.len() => vec![i],
            Some(_) => return Err(ConnectError::NoBackends(self.name.clone())),
            None => self.order(),
        };
        let mut out = Vec::new();
        let mut last = None;
        let mut tried = false;
        for i in order {
            if self.backends[i].admit(Instant::now(), self.ctx.backoff) == Admit::No {
                out.push(i);
                continue;
            }
            match self.attempt(i, opts).await {
                Ok(upstream) => return Ok(upstream),
                Err(Miss::Shortage(why)) => return Err(self.all_failed(why, None)),
                Err(miss) => {
                    tried = true;
                    if let Miss::Failed(why, tls) = miss {
                        last = Some((why, tls));
                    }
                }
            }
        }
        if !tried {
            tracing::debug!(pool = %self.name, "every backend is out of service; trying them anyway");
            for i in out {
                match self.attempt(i, opts).await {
                    Ok(upstream) => return Ok(upstream),
                    Err(Miss::Failed(why, tls)) => last = Some((why, tls)),
                    Err(Miss::Shortage(why)) => return Err(self.all_failed(why, None)),
                    Err(Miss::AtCap) => {}
                }
            }
        }
        Err(match last {
            Some((last, tls)) => self.all_failed(last, tls),
            None => ConnectError::ConnLimit { pool: self.name.clone() },
        })
    }

    fn all_failed(&self, last: String, tls: Option<Failure>) -> ConnectError {
        ConnectError::AllFailed { pool: self.name.clone(), last, tls }
    }

    async fn attempt(&self, i: usize, opts: ConnectOpts) -> Result<Upstream, Miss> {
        let backend = &self.backends[i];
        let tls = self.tls.get(i).and_then(Option::as_ref);
        let settings = &self.ctx.settings;
        let proxied = self.ctx.send_proxy != SendProxy::Off;
        if opts.reuse && settings.max_idle_per_backend > 0 && !proxied {
            let here = crate::workers::current();
            if let Some((stream, home)) = backend.idle.take_live(Instant::now(), tls.map(|t| &**t), here) {
                self.ctx.reused.inc();
                return Ok(self.upstream(i, stream, home, backend.lease(), true));
            }
        }
        let guard = backend.reserve(settings.max_conns).ok_or(Miss::AtCap)?;
        let header = match (self.ctx.send_proxy, opts.client) {
            (SendProxy::Off, _) => None,
            (version, Some((client, local))) => Some(crate::proxy::header(version, client, local.get())),
            // No client to speak of (an active check never comes here).
            (_, None) => None,
        };
        // A failed TLS handshake counts as a failed connect (passive health).
        match stream::connect(backend.addr, opts.timeout, opts.user_timeout, header.as_deref(), tls.map(|t| &**t)).await
        {
            Ok(stream) => Ok(self.upstream(i, stream, crate::workers::current(), guard, false)),
            Err(e) => {
                drop(guard);
                crate::metrics::connect_failure(&self.name);
                let why = format!("{}: {e}", backend.addr);
                // Out of fds or memory is the router's trouble: putting
                // the backend out of service would fail requests on after
                // the router recovered.
                match e.shortage() {
                    Some(error) => {
                        crate::metrics::resource_error("connect", error);
                        Err(Miss::Shortage(why))
                    }
                    None => {
                        backend.failed(&self.name, &e.to_string(), self.ctx.backoff);
                        Err(Miss::Failed(why, e.tls))
                    }
                }
            }
        }
    }

    /// Backend `i`'s connection for one request.
    fn upstream(
        &self,
        i: usize,
        stream: BackendStream,
        home: Option<usize>,
        guard: BackendGuard,
        reused: bool,
    ) -> Upstream {
        let tls = self.tls.get(i).cloned().flatten();
        let instance = self.instances.get(i).cloned().flatten();
        Upstream { stream, reused, tls, home, instance, guard, pool: self.ctx.clone() }
    }
}

impl Upstream {
    pub fn addr(&self) -> SocketAddr {
        self.guard.addr()
    }

    /// The app instance its backend registered as (an endpoint learned
    /// from NATS), if it did.
    pub fn instance(&self) -> Option<&Arc<AppInstance>> {
        self.instance.as_ref()
    }

    /// The response was read to its end and neither side said close: the
    /// connection goes to its backend's idle list, or is closed when the
    /// list is full, reuse is off, or the backend left the config.
    pub fn release(self) {
        let Upstream { stream, tls, home, guard, pool, .. } = self;
        let settings = &pool.settings;
        let backend = guard.backend();
        if settings.max_idle_per_backend == 0 || backend.is_retired() || pool.send_proxy != SendProxy::Off {
            return;
        }
        let expires = Instant::now() + settings.idle_conn_timeout;
        // Over the cap it is handed back, and closed here.
        let _ = backend.idle.put(stream, tls, home, expires, settings.max_idle_per_backend);
    }

    /// The backend failed this request before any response byte (reset,
    /// or no response within response_timeout): counts for passive
    /// health; the connection is closed.
    pub fn failed(self, why: &str) {
        self.guard.backend().failed(&self.pool.name, why, self.pool.backoff);
    }

    /// A response head arrived: the backend's failure streak ends.
    pub fn succeeded(&self) {
        self.guard.backend().succeeded(&self.pool.name);
    }

    /// For a tunnel: the stream and the guard that keeps the active count up.
    pub fn into_tunnel(self) -> (BackendStream, BackendGuard) {
        (self.stream, self.guard)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    const OPTS: ConnectOpts =
        ConnectOpts { timeout: Duration::from_secs(1), user_timeout: None, reuse: true, client: None, only: None };

    fn pool_with(balance: Balance, backends: &[SocketAddr], settings: BackendSettings) -> (Pool, Arc<Registry>) {
        let registry = Registry::new();
        let cfg = config::Pool {
            name: "p".into(),
            backends: backends.iter().copied().collect(),
            balance,
            check: None,
            send_proxy: SendProxy::Off,
            tls: None,
        };
        (Pool::new(&cfg, &settings, &registry, None), registry)
    }

    fn pool(balance: Balance, n: u16) -> Pool {
        let addrs: Vec<SocketAddr> = (0..n).map(|i| SocketAddr::from(([127, 0, 0, 1], 9000 + i))).collect();
        pool_with(balance, &addrs, BackendSettings::default()).0
    }

    fn failures_of(backend: SocketAddr) -> u64 {
        let labels = crate::metrics::BackendLabels { pool: "p".into(), backend: backend.to_string() };
        crate::metrics::get().backend_failures.get_or_create(&labels).get()
    }

    async fn dead_addr() -> SocketAddr {
        let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
        dead.local_addr().unwrap()
    }

    #[test]
    fn round_robin_rotates_and_covers_every_backend() {
        let p = pool(Balance::RoundRobin, 3);
        let firsts: Vec<u16> = (0..6).map(|_| p.backends[p.order()[0]].addr.port()).collect();
        assert_eq!(firsts, vec![9000, 9001, 9002, 9000, 9001, 9002]);
        let mut all: Vec<u16> = p.order().iter().map(|&i| p.backends[i].addr.port()).collect();
        all.sort();
        assert_eq!(all, vec![9000, 9001, 9002]);
    }

    #[test]
    fn least_conn_prefers_the_idlest() {
        let p = pool(Balance::LeastConn, 3);
        let _held: Vec<BackendGuard> = [(0, 5), (1, 1), (2, 3)]
            .into_iter()
            .flat_map(|(i, n)| (0..n).map(move |_| i))
            .map(|i| p.backends[i].lease())
            .collect();
        assert_eq!(p.backends[p.order()[0]].addr.port(), 9001);
    }

    #[tokio::test]
    async fn fails_over_and_skips_a_failed_backend_until_its_backoff_ends() {
        let live = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = dead_addr().await;
        let settings = BackendSettings { backoff: Duration::from_millis(300), ..BackendSettings::default() };
        let (p, _r) = pool_with(Balance::RoundRobin, &[dead, live.local_addr().unwrap()], settings);
        let up = p.connect(OPTS).await.unwrap();
        assert_eq!(up.addr(), live.local_addr().unwrap());
        assert!(!p.backends[0].in_service(), "the refusing backend is out after one failure");
        // Round robin would start with the dead one now: it is skipped.
        for _ in 0..4 {
            assert_eq!(p.connect(OPTS).await.unwrap().addr(), live.local_addr().unwrap());
        }
        assert_eq!(failures_of(dead), 1);
        // After the back-off one request probes it (and fails over again).
        tokio::time::sleep(Duration::from_millis(350)).await;
        p.connect(OPTS).await.unwrap();
        p.connect(OPTS).await.unwrap();
        assert_eq!(failures_of(dead), 2);
    }

    #[tokio::test]
    async fn a_backend_that_resets_requests_is_reached_once_then_skipped() {
        // A backend that accepts and resets: the request fails on it as the
        // handshake reports it (Upstream::failed), and it is not reached
        // again within its back-off.
        let resets = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let good = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (reset_addr, good_addr) = (resets.local_addr().unwrap(), good.local_addr().unwrap());
        let reached = Arc::new(AtomicUsize::new(0));
        let counter = reached.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = resets.accept().await {
                counter.fetch_add(1, Ordering::Relaxed);
                let _ = s.set_zero_linger();
            }
        });
        let (p, _r) = pool_with(Balance::RoundRobin, &[reset_addr, good_addr], BackendSettings::default());
        for _ in 0..6 {
            let mut up = p.connect(OPTS).await.unwrap();
            if up.addr() == reset_addr {
                let _ = up.stream.write_all(b"GET / HTTP/1.1\r\n\r\n").await;
                let mut buf = [0u8; 1];
                let got = up.stream.read(&mut buf).await;
                assert!(!matches!(got, Ok(1)), "no response byte");
                up.failed("reset before any response byte");
                // The request goes to the next backend, as the handshake's retry would.
                continue;
            }
            up.succeeded();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(reached.load(Ordering::Relaxed), 1, "reached once, then skipped");
        assert!(!p.backends[0].in_service());
    }

    #[tokio::test]
    async fn every_backend_out_is_tried_anyway_and_a_success_brings_it_back() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (p, _r) = pool_with(Balance::RoundRobin, &[l.local_addr().unwrap()], BackendSettings::default());
        let up = p.connect(OPTS).await.unwrap();
        up.failed("reset before the response");
        assert!(!p.backends[0].in_service());
        // The only backend is out: tried anyway, not refused.
        let up = p.connect(OPTS).await.unwrap();
        up.succeeded();
        assert!(p.backends[0].in_service());
    }

    #[tokio::test]
    async fn released_connections_are_reused_and_dropped_ones_are_not() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (p, _r) = pool_with(Balance::RoundRobin, &[l.local_addr().unwrap()], BackendSettings::default());
        let up = p.connect(OPTS).await.unwrap();
        assert!(!up.reused);
        let port = up.stream.tcp().local_addr().unwrap().port();
        let (mut peer, _) = l.accept().await.unwrap();
        up.release();
        assert_eq!(p.backends[0].active(), 0);
        let mut again = p.connect(OPTS).await.unwrap();
        assert!(again.reused);
        assert_eq!(again.stream.tcp().local_addr().unwrap().port(), port);
        assert_eq!(p.backends[0].active(), 1);
        // It is the same connection end to end.
        again.stream.write_all(b"x").await.unwrap();
        assert_eq!(peer.read_u8().await.unwrap(), b'x');
        drop(again);
        // Dropped, not released: the next one is new; reuse off: new too.
        assert!(!p.connect(OPTS).await.unwrap().reused);
        let up = p.connect(OPTS).await.unwrap();
        up.release();
        assert!(!p.connect(ConnectOpts { reuse: false, ..OPTS }).await.unwrap().reused);
    }

    #[tokio::test]
    async fn max_conns_skips_a_full_backend_and_refuses_when_all_are_full() {
        let a = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let b = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let settings = BackendSettings { max_conns: 1, ..BackendSettings::default() };
        let (p, _r) = pool_with(Balance::RoundRobin, &[a.local_addr().unwrap(), b.local_addr().unwrap()], settings);
        let first = p.connect(OPTS).await.unwrap();
        let (tunnel, guard) = p.connect(OPTS).await.unwrap().into_tunnel();
        assert_ne!(first.addr(), guard.addr(), "the full backend is skipped");
        match p.connect(OPTS).await {
            Err(ConnectError::ConnLimit { pool }) => assert_eq!(pool, "p"),
            other => panic!("expected ConnLimit, got {other:?}"),
        }
        // A tunnel holds its slot until its guard goes.
        drop(tunnel);
        assert!(p.connect(OPTS).await.is_err());
        drop(guard);
        p.connect(OPTS).await.unwrap();
    }

    #[tokio::test]
    async fn a_connection_carries_its_own_backends_app_instance() {
        let a = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let b = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addrs = [a.local_addr().unwrap(), b.local_addr().unwrap()];
        let (p, _r) = pool_with(Balance::RoundRobin, &addrs, BackendSettings::default());
        let of = |addr: SocketAddr| Some(Arc::new(AppInstance::new("app", &addr.to_string(), "0")));
        let p = p.with_instances(addrs.iter().map(|&addr| of(addr)).collect());
        for _ in 0..2 {
            let up = p.connect(OPTS).await.unwrap();
            assert_eq!(&*up.instance().unwrap().instance_id, up.addr().to_string());
            // A reused connection keeps saying its own backend's.
            up.release();
            let again = p.connect(OPTS).await.unwrap();
            assert_eq!(&*again.instance().unwrap().instance_id, again.addr().to_string());
        }
        // A pool from the file: none.
        let (p, _r) = pool_with(Balance::RoundRobin, &addrs, BackendSettings::default());
        assert!(p.connect(OPTS).await.unwrap().instance().is_none());
    }

    /// `X-CF-APP-INSTANCE`: the instance's backend every time, whatever
    /// the balancer's turn; an instance the pool does not have is found
    /// nowhere (the caller answers gorouter's 400).
    #[tokio::test]
    async fn only_the_instance_asked_for_serves() {
        let a = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let b = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addrs = [a.local_addr().unwrap(), b.local_addr().unwrap()];
        let (p, _r) = pool_with(Balance::RoundRobin, &addrs, BackendSettings::default());
        let p = p.with_instances(vec![
            Some(Arc::new(AppInstance::new("app", "inst-0", "0"))),
            Some(Arc::new(AppInstance::new("app", "inst-1", "1"))),
        ]);
        assert_eq!(p.find_instance("app", "1"), Some(1));
        assert_eq!(p.find_instance("app", "0"), Some(0));
        assert_eq!(p.find_instance("app", "2"), None, "no such index");
        assert_eq!(p.find_instance("other", "0"), None, "another app's index");
        for _ in 0..4 {
            let up = p.connect(ConnectOpts { only: Some(1), ..OPTS }).await.unwrap();
            assert_eq!(up.addr(), addrs[1]);
            assert_eq!(&*up.instance().unwrap().instance_id, "inst-1");
        }
        // A pool from the file has no instances.
        let (p, _r) = pool_with(Balance::RoundRobin, &addrs, BackendSettings::default());
        assert_eq!(p.find_instance("app", "0"), None);
    }

    #[tokio::test]
    async fn a_pool_without_backends_says_so() {
        let (p, _r) = pool_with(Balance::RoundRobin, &[], BackendSettings::default());
        assert!(matches!(p.connect(OPTS).await, Err(ConnectError::NoBackends(_))));
    }
}
