//! The router's lifecycle: bind the listeners, accept with limits and
//! back-off, reload on SIGHUP, drain on SIGTERM/SIGINT.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tokio::net::{TcpListener, TcpSocket};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Config, Protocol};
use crate::connection::{self, Session};
use crate::dataplane::DataPlanes;
use crate::metrics::{self, ListenerLabels};
use crate::state::{Shared, Snapshot};

/// Runs the router until SIGTERM/SIGINT and the drain are over.
pub async fn run(config: Config, path: Option<PathBuf>) -> anyhow::Result<()> {
    // Handlers first: once /healthz answers, a SIGHUP or SIGTERM must reach
    // them, never the default action (SIGHUP's is to kill the process).
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let planes = Arc::new(DataPlanes::start(&config.data_plane).map_err(anyhow::Error::msg)?);
    tracing::info!(data_plane = %planes.mode(), "data plane ready (fallbacks: {})",
        planes.planes().iter().skip(1).map(|p| p.mode().as_str()).collect::<Vec<_>>().join(", "));
    metrics::set_planes(planes.clone());

    let mut bound = Vec::new();
    for l in &config.listeners {
        let listener = bind(l.bind).with_context(|| format!("listener {:?}: cannot bind {}", l.name, l.bind))?;
        tracing::info!(listener = %l.name, bind = %listener.local_addr()?, protocol = ?l.protocol, "listening");
        bound.push((listener, Arc::<str>::from(l.name.as_str()), l.protocol));
    }
    let admin = match &config.admin {
        Some(a) => Some(bind(a.bind).with_context(|| format!("[admin]: cannot bind {}", a.bind))?),
        None => None,
    };
    announce(&bound, admin.as_ref())?;

    let shared = Arc::new(Shared::new(config, planes));
    let stop_accepting = CancellationToken::new();
    let tracker = TaskTracker::new();
    let mut accept_loops = Vec::new();
    for (listener, name, protocol) in bound {
        accept_loops.push(tokio::spawn(accept_loop(
            listener,
            name,
            protocol,
            shared.clone(),
            stop_accepting.clone(),
            tracker.clone(),
        )));
    }
    if let Some(admin) = admin {
        tracing::info!(bind = %admin.local_addr()?, "admin endpoint: /metrics, /healthz");
        tokio::spawn(crate::admin::serve(admin, shared.clone()));
    }

    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => reload(&shared, path.as_deref()),
        }
    }

    // Drain: stop accepting at once, let open connections run up to
    // drain_timeout, then close them.
    let drain_timeout = shared.snapshot().config.limits.drain_timeout;
    shared.draining.store(true, Ordering::Relaxed);
    stop_accepting.cancel();
    for l in accept_loops {
        let _ = l.await;
    }
    tracker.close();
    let open = shared.active();
    tracing::info!(open, "draining: accepting no more; open connections may live {drain_timeout:?}");
    if tokio::time::timeout(drain_timeout, tracker.wait()).await.is_err() {
        tracing::info!(open = shared.active(), "drain timeout: closing open connections");
        shared.drain.cancel();
        if tokio::time::timeout(Duration::from_secs(5), tracker.wait()).await.is_err() {
            tracing::warn!("connections still open 5s after the drain deadline; exiting anyway");
        }
    }
    tracing::info!("drained; exiting");
    Ok(())
}

/// Prints what was bound on stdout, one line each, before anything is
/// served: a `bind` with port 0 gets a free port from the kernel, and this
/// is how a script or a test learns it (as `upsplice-loadgen echo` does):
/// `listening on 127.0.0.1:41234 listener=web protocol=http`, then
/// `admin on 127.0.0.1:41235`.
fn announce(bound: &[(TcpListener, Arc<str>, Protocol)], admin: Option<&TcpListener>) -> io::Result<()> {
    use std::io::Write;
    let mut out = io::stdout().lock();
    for (listener, name, protocol) in bound {
        let protocol = match protocol {
            Protocol::Http => "http",
            Protocol::Tcp => "tcp",
        };
        writeln!(out, "listening on {} listener={name} protocol={protocol}", listener.local_addr()?)?;
    }
    if let Some(admin) = admin {
        writeln!(out, "admin on {}", admin.local_addr()?)?;
    }
    out.flush()
}

/// Binds a listening socket with a deep accept queue (handshake bursts).
fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

async fn accept_loop(
    listener: TcpListener,
    name: Arc<str>,
    protocol: Protocol,
    shared: Arc<Shared>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let labels = ListenerLabels { listener: name.to_string() };
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
        let Some(guard) = shared.admit(max) else {
            metrics::get().rejected_over_limit.get_or_create(&labels).inc();
            if protocol == Protocol::Http {
                tracker.spawn(connection::refuse_over_limit(stream));
            }
            continue;
        };
        let session = Session { shared: shared.clone(), listener: name.clone() };
        tracker.spawn(async move {
            session.serve(stream, peer, protocol).await;
            drop(guard);
        });
    }
}

fn is_transient(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EINTR | libc::EPROTO | libc::EPERM))
}

/// Re-reads the config file; a bad one is logged and the old one stays.
fn reload(shared: &Shared, path: Option<&Path>) {
    let Some(path) = path else {
        tracing::warn!("SIGHUP: running on the built-in config; nothing to reload");
        return;
    };
    match load_compatible(shared, path) {
        Ok(config) => {
            let routes = config.routes.len();
            let pools = config.pools.len();
            shared.replace(Snapshot::new(config));
            tracing::info!(routes, pools, "SIGHUP: reloaded {}", path.display());
        }
        Err(e) => tracing::error!("SIGHUP: reload rejected, keeping the running config: {e:#}"),
    }
}

/// Loads `path` and checks that it only changes what a reload can change.
fn load_compatible(shared: &Shared, path: &Path) -> anyhow::Result<Config> {
    let new = Config::load(path)?;
    let old = shared.snapshot();
    let shape = |c: &Config| c.listeners.iter().map(|l| (l.name.clone(), l.bind, l.protocol)).collect::<Vec<_>>();
    if shape(&new) != shape(&old.config) {
        bail!("{}: listener: names, binds and protocols can only change with a restart", path.display());
    }
    if new.admin.as_ref().map(|a| a.bind) != old.config.admin.as_ref().map(|a| a.bind) {
        bail!("{}: admin.bind can only change with a restart", path.display());
    }
    if new.data_plane.mode != old.config.data_plane.mode {
        bail!("{}: data_plane.mode can only change with a restart", path.display());
    }
    Ok(new)
}
