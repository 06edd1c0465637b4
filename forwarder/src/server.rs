//! The router's lifecycle: bind the listeners, accept with limits and
//! back-off, reload on SIGHUP, drain on SIGTERM/SIGINT.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::access_log::AccessLog;
use crate::config::{Config, Protocol};
use crate::connection::{self, Session};
use crate::dataplane::DataPlanes;
use crate::metrics::{self, ListenerLabels};
use crate::state::{Shared, Snapshot};
use crate::workers::{self, Workers};

/// Runs the router until SIGTERM/SIGINT and the drain are over.
pub async fn run(config: Config, path: Option<PathBuf>) -> anyhow::Result<()> {
    // Handlers first: once /healthz answers, a SIGHUP or SIGTERM must reach
    // them, never the default action (SIGHUP's is to kill the process).
    let term = signal(SignalKind::terminate())?;
    let int = signal(SignalKind::interrupt())?;
    let hup = signal(SignalKind::hangup())?;
    let usr1 = signal(SignalKind::user_defined1())?;
    let planes = Arc::new(DataPlanes::start(&config.data_plane)?);
    let fallbacks: Vec<&str> = planes.fallbacks().map(crate::dataplane::Mode::as_str).collect();
    if fallbacks.is_empty() {
        tracing::info!(data_plane = %planes.mode(), "data plane ready (no fallback)");
    } else {
        tracing::info!(data_plane = %planes.mode(), "data plane ready (fallbacks: {})", fallbacks.join(", "));
    }
    metrics::set_planes(planes.clone());

    let workers = Workers::start(&config.runtime).context("[runtime]: starting the worker threads")?;
    tracing::info!("serving on {}", config.runtime.describe());
    let mut bound = Vec::new();
    for l in &config.listeners {
        let sockets: Vec<TcpListener> = workers::bind(l.bind, workers.sockets_per_listener())
            .and_then(|sockets| sockets.into_iter().enumerate().map(|(i, s)| workers.adopt(i, s)).collect())
            .with_context(|| format!("listener {:?}: cannot bind {}", l.name, l.bind))?;
        tracing::info!(listener = %l.name, bind = %sockets[0].local_addr()?, protocol = %l.protocol, "listening");
        bound.push((sockets, Arc::<str>::from(l.name.as_str()), l.protocol));
    }
    let admin = match &config.admin {
        Some(a) => Some(
            workers::bind(a.bind, 1)
                .and_then(|mut s| TcpListener::from_std(s.remove(0)))
                .with_context(|| format!("[admin]: cannot bind {}", a.bind))?,
        ),
        None => None,
    };
    announce(&bound, admin.as_ref())?;

    adopt(&config, "config");
    for l in &config.listeners {
        metrics::declare_listener(&l.name, &planes);
    }
    let access_log = match &config.access_log.path {
        Some(path) => AccessLog::open(path, config.access_log.format)
            .with_context(|| format!("access_log.path: cannot open {}", path.display()))?,
        None => AccessLog::trace(),
    };
    let shared = Arc::new(Shared::new(config, planes, access_log)?);
    let stop_accepting = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut accept_loops = Vec::new();
    for (sockets, name, protocol) in bound {
        for (i, listener) in sockets.into_iter().enumerate() {
            accept_loops.push(workers.spawn(
                i,
                accept_loop(listener, name.clone(), protocol, shared.clone(), stop_accepting.clone(), tracker.clone()),
            ));
        }
    }
    let nats = shared.snapshot().config.nats.clone().map(|cfg| crate::nats::spawn(cfg, shared.clone()));
    if let Some(admin) = admin {
        tracing::info!(bind = %admin.local_addr()?, "admin endpoint: /metrics, /healthz, /routes");
        tokio::spawn(crate::admin::serve(admin, shared.clone(), nats));
    }

    let mut signals = Signals { term, int, hup, usr1, shared: shared.clone(), path };
    let exit_after = loop {
        tokio::select! {
            _ = signals.term.recv() => break true,
            _ = signals.int.recv() => break true,
            _ = signals.usr1.recv() => break false,
            _ = signals.hup.recv() => reload(&shared, signals.path.as_deref()),
        }
    };
    drain(&shared, &mut signals, stop_accepting, accept_loops, tracker).await;
    if !exit_after {
        tracing::info!("drained after SIGUSR1; not exiting (SIGTERM or SIGINT exits)");
        signals.until_stopped(std::future::pending::<()>()).await;
    }
    shared.access_log.sync(Duration::from_secs(2));
    tracing::info!("exiting");
    Ok(())
}

/// The signals the router takes once it runs.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
    hup: tokio::signal::unix::Signal,
    usr1: tokio::signal::unix::Signal,
    shared: Arc<Shared>,
    path: Option<PathBuf>,
}

impl Signals {
    /// Waits for `until`, reloading on SIGHUP meanwhile; None when SIGTERM
    /// or SIGINT came first. (A SIGUSR1 during a drain changes nothing.)
    async fn until_stopped<F: std::future::Future>(&mut self, until: F) -> Option<F::Output> {
        tokio::pin!(until);
        loop {
            tokio::select! {
                out = &mut until => return Some(out),
                _ = self.term.recv() => return None,
                _ = self.int.recv() => return None,
                _ = self.hup.recv() => reload(&self.shared, self.path.as_deref()),
                _ = self.usr1.recv() => tracing::info!("SIGUSR1: already draining"),
            }
        }
    }
}

/// Drains the router, as gorouter does behind a load balancer:
/// 1. `/healthz` answers 503 at once, but the listeners keep accepting for
///    `drain_wait`, so the load balancer takes the node out before any
///    connection is refused;
/// 2. then accepting stops, and open connections may live `drain_timeout`;
/// 3. at that deadline the ones still open are reset (the data-plane
///    contract: a stream cut short is reset, never closed as if complete).
///
/// A second SIGTERM or SIGINT skips to 3 at once.
async fn drain(
    shared: &Arc<Shared>,
    signals: &mut Signals,
    stop_accepting: CancellationToken,
    accept_loops: Vec<tokio::task::JoinHandle<()>>,
    tracker: TaskTracker,
) {
    let limits = shared.snapshot().config.limits.clone();
    shared.draining.cancel();
    tracing::info!(
        open = shared.active(),
        "draining: /healthz answers 503; still accepting for drain_wait {:?}",
        limits.drain_wait
    );
    let mut cut_short = signals.until_stopped(tokio::time::sleep(limits.drain_wait)).await.is_none();

    stop_accepting.cancel();
    for l in accept_loops {
        let _ = l.await;
    }
    tracker.close();
    if !cut_short {
        tracing::info!(
            open = shared.active(),
            "draining: accepting no more; open connections may live {:?}",
            limits.drain_timeout
        );
        match signals.until_stopped(tokio::time::timeout(limits.drain_timeout, tracker.wait())).await {
            Some(Ok(())) => {
                tracing::info!("drained: every connection ended");
                return;
            }
            Some(Err(_)) => {}
            None => cut_short = true,
        }
    }
    let open = shared.active();
    let why = if cut_short { "a second SIGTERM/SIGINT ended the drain" } else { "drain_timeout passed" };
    tracing::info!(open, "{why}: resetting {open} open connections");
    shared.drain.cancel();
    shared.planes.drain();
    if tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await.is_err() {
        tracing::warn!(open = shared.active(), "connections still open 5s after the drain deadline");
    }
}

/// Prints what was bound on stdout, one line each, before anything is
/// served: a `bind` with port 0 gets a free port from the kernel, and this
/// is how a script or a test learns it (as `upsplice-loadgen echo` does):
/// `listening on 127.0.0.1:41234 listener=web protocol=http`, then
/// `admin on 127.0.0.1:41235`.
fn announce(bound: &[(Vec<TcpListener>, Arc<str>, Protocol)], admin: Option<&TcpListener>) -> io::Result<()> {
    use std::io::Write;
    let mut out = io::stdout().lock();
    for (sockets, name, protocol) in bound {
        writeln!(out, "listening on {} listener={name} protocol={protocol}", sockets[0].local_addr()?)?;
    }
    if let Some(admin) = admin {
        writeln!(out, "admin on {}", admin.local_addr()?)?;
    }
    out.flush()
}

async fn accept_loop(
    listener: TcpListener,
    name: Arc<str>,
    protocol: Protocol,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let labels = ListenerLabels { listener: name.clone() };
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                if is_transient(&e) {
                    continue;
                }
                // EMFILE, ENFILE, ENOBUFS, ENOMEM: wait instead of spinning.
                if let Some(error) = crate::socket::shortage(&e) {
                    metrics::resource_error("accept", error);
                }
                tracing::warn!(listener = %name, "accept failed: {e}; retrying in {backoff:?}");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        backoff = Duration::from_millis(5);
        metrics::get().accepted.get_or_create(&labels).inc();
        let max = shared.snapshot().config.limits.max_connections;
        let Some(admitted) = shared.admit(max) else {
            metrics::get().rejected_over_limit.get_or_create(&labels).inc();
            if protocol == Protocol::Http {
                tracker.spawn(connection::refuse_over_limit(stream));
            }
            continue;
        };
        let session = Session { shared: shared.clone(), listener: name.clone(), admitted };
        tracker.spawn(session.serve(stream, peer, protocol, tracker.clone()));
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO | libc::EPERM))
}

/// What taking a config on (at start, on reload) involves besides the
/// snapshot: its warnings logged, its pools' series declared at 0.
fn adopt(config: &Config, context: &str) {
    for w in config.warnings() {
        tracing::warn!("{context}: {w}");
    }
    for p in &config.pools {
        metrics::declare_pool(&p.name);
    }
}

/// Re-reads the config file; a bad one is logged and the old one stays.
/// The access-log file is reopened either way (logrotate's postrotate).
fn reload(shared: &Shared, path: Option<&Path>) {
    shared.access_log.reopen();
    let Some(path) = path else {
        tracing::warn!("SIGHUP: running on the built-in config; nothing to reload");
        return;
    };
    let loaded = load_compatible(shared, path).and_then(|config| {
        let (routes, pools) = (config.routes.len(), config.pools.len());
        // The TLS files are read here: a bad one rejects the reload.
        let snapshot = Snapshot::new(config, &shared.registry)?;
        Ok((snapshot, routes, pools))
    });
    match loaded {
        Ok((snapshot, routes, pools)) => {
            adopt(&snapshot.config, "SIGHUP: config");
            shared.replace(snapshot);
            tracing::info!(routes, pools, "SIGHUP: reloaded {}", path.display());
        }
        Err(e) => tracing::error!("SIGHUP: reload rejected, keeping the running config: {e:#}"),
    }
}

/// Loads `path` and checks that it only changes what a reload can change.
fn load_compatible(shared: &Shared, path: &Path) -> anyhow::Result<Config> {
    let new = Config::load(path).map_err(|e| anyhow::anyhow!(e.one_line()))?;
    let old = shared.snapshot();
    let restart = |what: String| anyhow::anyhow!("{}: {what} can only change with a restart", path.display());
    if new.listeners.len() != old.config.listeners.len() {
        return Err(restart(format!(
            "the number of listeners ({} → {})",
            old.config.listeners.len(),
            new.listeners.len()
        )));
    }
    for (i, (o, n)) in old.config.listeners.iter().zip(&new.listeners).enumerate() {
        let changed = if o.name != n.name {
            Some(format!("name ({:?} → {:?})", o.name, n.name))
        } else if o.bind != n.bind {
            Some(format!("bind ({} → {})", o.bind, n.bind))
        } else if o.protocol != n.protocol {
            Some(format!("protocol ({} → {})", o.protocol, n.protocol))
        } else {
            None
        };
        if let Some(changed) = changed {
            return Err(restart(format!("listener[{i}] {:?}: {changed}", o.name)));
        }
    }
    if new.access_log != old.config.access_log {
        return Err(restart("access_log (path, format)".into()));
    }
    if new.nats != old.config.nats {
        return Err(restart("[nats]".into()));
    }
    let admin = |c: &Config| c.admin.as_ref().map(|a| a.bind);
    if admin(&new) != admin(&old.config) {
        return Err(restart("admin.bind".into()));
    }
    if new.runtime != old.config.runtime {
        return Err(restart("[runtime] (workers, work_stealing)".into()));
    }
    if new.data_plane.mode != old.config.data_plane.mode {
        return Err(restart(format!("data_plane.mode ({} → {})", old.config.data_plane.mode, new.data_plane.mode)));
    }
    Ok(new)
}
