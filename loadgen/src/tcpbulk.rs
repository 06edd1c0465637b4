//! Raw TCP bulk throughput: each connection writes and/or reads as fast as it
//! can; bytes are counted only inside the measured window.

use crate::net;
use crate::recorder::{record_ns, ErrorKind, Recorder};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Which way the bytes flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Direction {
    /// Write and read at once (against an echo server).
    Both,
    /// Only write (against `echo --mode discard`).
    Up,
    /// Only read (against `echo --mode source`).
    Down,
}

/// Settings of a bulk run.
#[derive(Debug, Clone)]
pub struct BulkConfig {
    /// Where to connect.
    pub target: SocketAddr,
    /// Connections.
    pub connections: usize,
    /// Measured duration.
    pub duration: Duration,
    /// Warm-up (not counted).
    pub warmup: Duration,
    /// Write chunk size.
    pub size: usize,
    /// Direction.
    pub direction: Direction,
    /// Local addresses to spread connections over.
    pub source_ips: Vec<IpAddr>,
    /// Threads for the runtime.
    pub threads: usize,
    /// Connect time limit.
    pub connect_timeout: Duration,
}

/// Runs a bulk transfer and returns bytes and errors in a [`Recorder`].
pub fn run(cfg: &BulkConfig) -> anyhow::Result<Recorder> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(cfg.threads.max(1)).enable_all().build()?;
    rt.block_on(async {
        let counting = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let out = Arc::new(AtomicU64::new(0));
        let inn = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for i in 0..cfg.connections {
            let cfg = cfg.clone();
            let (counting, stop, out, inn) = (counting.clone(), stop.clone(), out.clone(), inn.clone());
            tasks.push(tokio::spawn(async move {
                let source = (!cfg.source_ips.is_empty()).then(|| cfg.source_ips[i % cfg.source_ips.len()]);
                let t = Instant::now();
                let sock = match tokio::time::timeout(cfg.connect_timeout, net::connect(cfg.target, source)).await {
                    Ok(Ok(s)) => s,
                    Ok(Err(_)) => return Err(ErrorKind::Connect),
                    Err(_) => return Err(ErrorKind::ConnectTimeout),
                };
                let connect_ns = t.elapsed().as_nanos() as u64;
                let (mut rd, mut wr) = sock.into_split();
                let writer = async {
                    if cfg.direction == Direction::Down {
                        return Ok(());
                    }
                    let chunk = vec![0x5Au8; cfg.size.max(1)];
                    while !stop.load(Ordering::Relaxed) {
                        wr.write_all(&chunk).await.map_err(|_| ErrorKind::Io)?;
                        if counting.load(Ordering::Relaxed) {
                            out.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                        }
                    }
                    let _ = wr.shutdown().await;
                    Ok(())
                };
                let reader = async {
                    if cfg.direction == Direction::Up {
                        return Ok(());
                    }
                    let mut buf = vec![0u8; 256 * 1024];
                    while !stop.load(Ordering::Relaxed) {
                        match rd.read(&mut buf).await {
                            Ok(0) if stop.load(Ordering::Relaxed) => return Ok(()),
                            Ok(0) => return Err(ErrorKind::ClosedByPeer),
                            Ok(n) => {
                                if counting.load(Ordering::Relaxed) {
                                    inn.fetch_add(n as u64, Ordering::Relaxed);
                                }
                            }
                            Err(_) => return Err(ErrorKind::Io),
                        }
                    }
                    Ok(())
                };
                let (w, r) = tokio::join!(writer, reader);
                w.and(r).map(|_| connect_ns)
            }));
        }
        tokio::time::sleep(cfg.warmup).await;
        counting.store(true, Ordering::Relaxed);
        tokio::time::sleep(cfg.duration).await;
        counting.store(false, Ordering::Relaxed);
        stop.store(true, Ordering::Relaxed);
        let mut rec = Recorder::new(false);
        for t in tasks {
            // A task blocked on a socket that never drains is cut off after a grace period.
            match tokio::time::timeout(Duration::from_secs(2), t).await {
                Ok(Ok(Ok(connect_ns))) => {
                    rec.connections_ok += 1;
                    record_ns(&mut rec.connect, connect_ns);
                }
                Ok(Ok(Err(kind))) => rec.error(kind),
                Ok(Err(_)) | Err(_) => {}
            }
        }
        rec.bytes_out = out.load(Ordering::Relaxed);
        rec.bytes_in = inn.load(Ordering::Relaxed);
        Ok(rec)
    })
}
