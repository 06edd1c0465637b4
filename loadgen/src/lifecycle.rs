//! The life of a connection-lifecycle run (`hold`, `churn`) around its
//! connections: their shared settings, the runtime, the open-files limit, the
//! stop signals and the spreading over source addresses. The connections
//! themselves are [`crate::ws::Conn`]s.

use crate::net;
use crate::ws::WsTarget;
use std::net::IpAddr;
use std::time::Duration;

/// Settings every connection-lifecycle mode (`hold`, `churn`) shares.
#[derive(Debug, Clone)]
pub struct LifecycleConfig {
    /// Where and how to upgrade.
    pub target: WsTarget,
    /// Message payload size (at least 8: the sequence number).
    pub size: usize,
    /// Local addresses to spread connections over.
    pub source_ips: Vec<IpAddr>,
    /// Runtime worker threads.
    pub threads: usize,
}

/// Runs `f` to completion on a multi-threaded runtime of `threads` workers
/// (at least one), then gives its tasks 200 ms to wind down.
pub fn run_on_runtime<F: std::future::Future>(threads: usize, f: F) -> anyhow::Result<F::Output> {
    use anyhow::Context;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let out = rt.block_on(f);
    rt.shutdown_timeout(Duration::from_millis(200));
    Ok(out)
}

/// Descriptors kept free for the runtime, stdio, output files and the like.
pub const FD_RESERVE: u64 = 64;

/// Raises the soft open-files limit to the hard limit and checks that
/// `sockets` more descriptors fit. Returns the limit.
pub fn ensure_fds(sockets: u64, what: &str) -> anyhow::Result<u64> {
    let limit = net::raise_fd_limit();
    let need = sockets.saturating_add(FD_RESERVE);
    if need > limit {
        anyhow::bail!(
            "{what} {sockets} needs about {need} open files ({FD_RESERVE} kept for the generator itself), \
             but this process may open only {limit} (the hard RLIMIT_NOFILE; soft was raised to it). \
             Lower {what}, or raise the hard limit (ulimit -Hn, systemd LimitNOFILE=, /etc/security/limits.conf)"
        );
    }
    Ok(limit)
}

/// Resolves when SIGTERM or SIGINT arrives.
pub struct StopSignals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl StopSignals {
    /// Installs the handlers (inside a runtime).
    pub fn install() -> std::io::Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(StopSignals { term: signal(SignalKind::terminate())?, int: signal(SignalKind::interrupt())? })
    }

    /// Waits for either signal.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// The source address of connection `i`, round-robin over `ips`.
pub fn source_for(ips: &[IpAddr], i: usize) -> Option<IpAddr> {
    (!ips.is_empty()).then(|| ips[i % ips.len()])
}
