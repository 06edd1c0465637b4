//! Pieces shared by the connection-lifecycle modes (`hold`, `churn`): opening
//! an upgraded WebSocket connection with its timings, the fd-limit check, and
//! the stop signals.

use crate::handshake;
use crate::net;
use crate::recorder::{record_ns, ErrorKind, Recorder};
use crate::wsproto::Rng;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Where and how to upgrade.
#[derive(Debug, Clone)]
pub struct WsTarget {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Host header.
    pub host: String,
    /// Request path.
    pub path: String,
    /// Limit for connect + handshake.
    pub timeout: Duration,
}

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

/// An upgraded connection and how long getting there took.
#[derive(Debug)]
pub struct Opened {
    /// The socket, positioned after the 101 head.
    pub sock: TcpStream,
    /// Bytes read past the 101 head (the start of the first frames, if any).
    pub leftover: Vec<u8>,
    /// TCP connect, ns.
    pub connect_ns: u64,
    /// Request written to 101 parsed, ns.
    pub upgrade_ns: u64,
}

impl Opened {
    /// Records connect, upgrade and whole-handshake times.
    pub fn record(&self, rec: &mut Recorder) {
        record_ns(&mut rec.connect, self.connect_ns);
        record_ns(&mut rec.upgrade, self.upgrade_ns);
        record_ns(&mut rec.handshake, self.connect_ns + self.upgrade_ns);
    }
}

/// Connects (from `source` when given) and performs the RFC 6455 client
/// handshake, all within `t.timeout`. Failures come back as the error kind
/// they are counted under.
pub async fn open(t: &WsTarget, source: Option<IpAddr>, rng: &mut Rng) -> Result<Opened, ErrorKind> {
    let t_start = Instant::now();
    let deadline = tokio::time::Instant::from(t_start + t.timeout);
    let mut sock = match tokio::time::timeout_at(deadline, net::connect(t.addr, source)).await {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => return Err(ErrorKind::Connect),
        Err(_) => return Err(ErrorKind::ConnectTimeout),
    };
    let t_conn = Instant::now();
    match tokio::time::timeout_at(deadline, handshake::client_handshake(&mut sock, &t.host, &t.path, rng)).await {
        Ok(Ok(leftover)) => Ok(Opened {
            sock,
            // The handshake's read buffer is 4 KiB or more; keep only what is in it.
            leftover: leftover.as_slice().to_vec(),
            connect_ns: (t_conn - t_start).as_nanos() as u64,
            upgrade_ns: t_conn.elapsed().as_nanos() as u64,
        }),
        Ok(Err(e)) => Err(e.kind()),
        Err(_) => Err(ErrorKind::ConnectTimeout),
    }
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
