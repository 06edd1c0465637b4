//! Raw TCP bulk throughput: each connection writes and/or reads as fast as it
//! can; bytes are counted only inside the measured window.

use crate::net::{self, DialError, DialTimes};
use crate::recorder::{ErrorKind, Recorder};
use crate::target::Wire;
use crate::timeline::Timeline;
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
    /// Connect time limit (TLS handshake included).
    pub connect_timeout: Duration,
    /// PROXY header and TLS.
    pub wire: Wire,
}

/// How often the bytes moved are sampled for the stall timeline.
const SAMPLE: Duration = Duration::from_millis(10);

/// How long the connections get to wind down after the measured window.
const GRACE: Duration = Duration::from_secs(2);

/// How one connection went: its connect and TLS times once established, and
/// the error that ended it, if any. A connection that was established
/// counts as such however it ended.
enum Outcome {
    Failed(DialError),
    Ran { times: DialTimes, error: Option<ErrorKind> },
}

/// Runs a bulk transfer and returns bytes and errors in a [`Recorder`].
pub fn run(cfg: &BulkConfig) -> anyhow::Result<Recorder> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(cfg.threads.max(1)).enable_all().build()?;
    rt.block_on(async {
        let counting = Arc::new(AtomicBool::new(false));
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stop_rx_sampler = stop_rx.clone();
        let out = Arc::new(AtomicU64::new(0));
        let inn = Arc::new(AtomicU64::new(0));
        // Bytes moved either way at any time, sampled for the stall timeline.
        let moved = Arc::new(AtomicU64::new(0));
        let t0 = Instant::now();
        let sampler = {
            let moved = moved.clone();
            tokio::spawn(async move {
                let mut timeline = Timeline::default();
                let mut tick = tokio::time::interval(SAMPLE);
                let mut last = 0;
                loop {
                    tick.tick().await;
                    let now = moved.load(Ordering::Relaxed);
                    if now != last {
                        timeline.moved(t0.elapsed().as_nanos() as u64);
                        last = now;
                    }
                    if *stop_rx_sampler.borrow() {
                        return timeline;
                    }
                }
            })
        };
        let mut tasks = Vec::new();
        for i in 0..cfg.connections {
            let cfg = cfg.clone();
            let (counting, out, inn, moved) = (counting.clone(), out.clone(), inn.clone(), moved.clone());
            let stop = stop_rx.clone();
            tasks.push(tokio::spawn(async move {
                let source = (!cfg.source_ips.is_empty()).then(|| cfg.source_ips[i % cfg.source_ips.len()]);
                let deadline = tokio::time::Instant::now() + cfg.connect_timeout;
                let dialed = match net::dial(cfg.target, source, &cfg.wire, deadline).await {
                    Ok(d) => d,
                    Err(e) => return Outcome::Failed(e),
                };
                let times = dialed.times;
                let (mut rd, mut wr) = net::split(dialed.stream);
                let stopped = || *stop.borrow();
                let writer = async {
                    if cfg.direction == Direction::Down {
                        return Ok(());
                    }
                    let chunk = vec![0x5Au8; cfg.size.max(1)];
                    let mut stop = stop.clone();
                    while !stopped() {
                        // A write blocked on a peer that stopped reading ends with the window.
                        tokio::select! {
                            // TLS buffers what it encrypts: flush it to the socket.
                            r = async { wr.write_all(&chunk).await?; wr.flush().await } => r.map_err(|_| ErrorKind::Io)?,
                            _ = stop.wait_for(|s| *s) => break,
                        }
                        moved.fetch_add(chunk.len() as u64, Ordering::Relaxed);
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
                    let mut stop = stop.clone();
                    while !stopped() {
                        let n = tokio::select! {
                            r = rd.read(&mut buf) => r,
                            _ = stop.wait_for(|s| *s) => break,
                        };
                        match n {
                            Ok(0) if stopped() => return Ok(()),
                            Ok(0) => return Err(ErrorKind::ClosedByPeer),
                            Ok(n) => {
                                moved.fetch_add(n as u64, Ordering::Relaxed);
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
                Outcome::Ran { times, error: w.and(r).err() }
            }));
        }
        tokio::time::sleep(cfg.warmup).await;
        counting.store(true, Ordering::Relaxed);
        tokio::time::sleep(cfg.duration).await;
        counting.store(false, Ordering::Relaxed);
        stop_tx.send_replace(true);
        let mut rec = Recorder::new(false);
        let deadline = tokio::time::Instant::now() + GRACE;
        for t in tasks {
            // A task still connecting is cut off with the grace period.
            match tokio::time::timeout_at(deadline, t).await {
                Ok(Ok(Outcome::Ran { times, error })) => {
                    rec.connections_ok += 1;
                    times.record(&mut rec);
                    if let Some(kind) = error {
                        rec.error(kind);
                    }
                }
                Ok(Ok(Outcome::Failed(e))) => e.record(&mut rec),
                _ => {}
            }
        }
        if let Ok(timeline) = sampler.await {
            rec.timeline = timeline;
        }
        // Bytes were due for the whole run, warm-up included.
        rec.timeline.owed(0, (cfg.warmup + cfg.duration).as_nanos() as u64);
        rec.bytes_out = out.load(Ordering::Relaxed);
        rec.bytes_in = inn.load(Ordering::Relaxed);
        Ok(rec)
    })
}
