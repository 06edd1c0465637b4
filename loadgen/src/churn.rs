//! `churn`: connection lifecycles back to back. Each cycle connects, upgrades,
//! sends one message, waits for its echo and closes (close frame and FIN from
//! the client first), with at most `concurrency` cycles at once and either a
//! fixed start rate or as fast as possible, until a duration or count limit.
//!
//! With `connect_only`, a cycle is only the connection: connect, PROXY
//! header and TLS handshake, then the client-first close (TLS close_notify,
//! FIN, the peer's EOF) — a handshake rate without upgrade or echo; the
//! cycle's latency ends when the handshake does.
//!
//! With a rate, cycle `i` is due at `t0 + i/rate`; its corrected latency
//! counts from then, so cycles held back by a full concurrency window are
//! charged for the wait (coordinated omission), the uncorrected one from the
//! actual start.

use crate::codec::Codec;
use crate::lifecycle::{self, LifecycleConfig, StopSignals};
use crate::net;
use crate::recorder::{ErrorKind, Recorder};
use crate::report::ChurnStats;
use crate::ws::{self, Conn};
use crate::wsproto::Rng;
use anyhow::Context;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Settings of a `churn` run.
#[derive(Debug, Clone)]
pub struct ChurnConfig {
    /// Target, message size, sources, threads; the target's timeout also
    /// bounds the wait for the echo.
    pub common: LifecycleConfig,
    /// Cycles started per second; `None`: as fast as `concurrency` allows.
    pub rate: Option<f64>,
    /// Cycles in progress at most.
    pub concurrency: usize,
    /// No cycle starts after this.
    pub duration: Duration,
    /// No more than this many cycles.
    pub count: Option<u64>,
    /// A cycle is connect, PROXY header and TLS handshake only, then the close.
    pub connect_only: bool,
}

/// What a `churn` run produced.
#[derive(Debug)]
pub struct ChurnOutput {
    /// `sent` = cycles started, `received` = echoes; cycle latencies,
    /// handshake times and errors.
    pub recorder: Recorder,
    /// Churn-specific figures.
    pub stats: ChurnStats,
    /// Seconds over which cycles were started (for the achieved rate).
    pub dispatch_s: f64,
    /// Wall-clock time of the run's start: second 0 of the recorder's
    /// per-second histograms (the interval log).
    pub start_unix: SystemTime,
    /// Wall-clock time of the whole run.
    pub wall: Duration,
}

/// How long a cycle waits for the peer's EOF after its close frame and FIN.
const CLOSE_WAIT: Duration = Duration::from_secs(2);

/// Read buffer a cycle's connection starts with.
const READ_BUF: usize = 256;

struct Shared {
    rec: Mutex<Recorder>,
    /// The run's start, the zero of the recorder's timeline.
    t0: Instant,
    handshakes: AtomicU64,
    completed: AtomicU64,
}

impl Shared {
    fn rec(&self) -> std::sync::MutexGuard<'_, Recorder> {
        self.rec.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Nanoseconds from the run's start to `t`.
    fn ns(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.t0).as_nanos() as u64
    }

    /// Records a cycle's reply now: from its due time (corrected) and from
    /// its actual `start` (uncorrected), in the second of the run it ended.
    fn answered(&self, due: Instant, start: Instant) {
        let now = Instant::now();
        let second = now.saturating_duration_since(self.t0).as_secs() as usize;
        let mut r = self.rec();
        r.reply(now.saturating_duration_since(due).as_nanos() as u64, (now - start).as_nanos() as u64, second);
        r.timeline.answered(self.ns(due), self.ns(now));
    }

    /// Bounds a cycle's client-first close by [`CLOSE_WAIT`] and counts how it went.
    async fn close(&self, close: impl std::future::Future<Output = Result<(), ErrorKind>>) {
        match tokio::time::timeout(CLOSE_WAIT, close).await {
            Ok(Ok(())) => {
                self.completed.fetch_add(1, Ordering::SeqCst);
            }
            Ok(Err(kind)) => self.rec().error(kind),
            Err(_) => self.rec().error(ErrorKind::CloseTimeout),
        }
    }

    /// Counts a failed cycle: its error, and its echo owed from `due` until now.
    fn failed(&self, kind: ErrorKind, due: Instant) {
        let mut r = self.rec();
        r.error(kind);
        r.timeline.owed(self.ns(due), self.ns(Instant::now()));
    }
}

/// Runs the churn and returns its measurements.
pub fn run(cfg: &ChurnConfig) -> anyhow::Result<ChurnOutput> {
    lifecycle::run_on_runtime(cfg.common.threads, run_async(cfg))?
}

async fn run_async(cfg: &ChurnConfig) -> anyhow::Result<ChurnOutput> {
    let mut signals = StopSignals::install().context("installing SIGTERM/SIGINT handlers")?;
    let t0 = Instant::now();
    let start_unix = SystemTime::now();
    let end = t0 + cfg.duration;
    let sh = Arc::new(Shared {
        rec: Mutex::new(Recorder::new(true)),
        t0,
        handshakes: AtomicU64::new(0),
        completed: AtomicU64::new(0),
    });
    let concurrency = cfg.concurrency.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let sem = Arc::new(Semaphore::new(concurrency));
    let shared_cfg = Arc::new(cfg.clone());
    let mut started: u64 = 0;
    let mut stopped = false;
    {
        let dispatch = async {
            while cfg.count.is_none_or(|c| started < c) {
                let due = cfg.rate.map(|r| t0 + Duration::from_secs_f64(started as f64 / r));
                if due.is_some_and(|d| d >= end) {
                    break;
                }
                if let Some(d) = due {
                    tokio::time::sleep_until(d.into()).await;
                }
                let permit = tokio::select! {
                    p = sem.clone().acquire_owned() => p.expect("the semaphore is never closed"),
                    _ = tokio::time::sleep_until(end.into()) => break,
                };
                let now = Instant::now();
                if now >= end {
                    break;
                }
                sh.rec().count_sent(1, true);
                tokio::spawn(cycle(shared_cfg.clone(), started, due.unwrap_or(now), sh.clone(), permit));
                started += 1;
            }
        };
        tokio::select! {
            _ = dispatch => {}
            _ = signals.recv() => stopped = true,
        }
    }
    let dispatch_s = match cfg.rate {
        // The schedule's span, so that a run ended by --count is not charged for time it was not asked to run.
        Some(r) if !stopped => (started as f64 / r).min(cfg.duration.as_secs_f64()),
        _ => t0.elapsed().as_secs_f64(),
    };
    // Every permit back: every cycle has ended. Each is bounded by its own timeouts.
    let bound = 2 * cfg.common.target.timeout + CLOSE_WAIT + Duration::from_secs(1);
    let _ = tokio::time::timeout(bound, sem.acquire_many(concurrency as u32)).await;
    let elapsed = t0.elapsed().as_secs_f64();
    let rec = std::mem::replace(&mut *sh.rec(), Recorder::new(false));
    let handshakes = sh.handshakes.load(Ordering::SeqCst);
    let completed = sh.completed.load(Ordering::SeqCst);
    let stats = ChurnStats {
        target_rate: cfg.rate.unwrap_or(0.0),
        concurrency: concurrency as u64,
        count_limit: cfg.count.unwrap_or(0),
        attempts: started,
        handshakes,
        completed,
        elapsed_s: elapsed,
        handshakes_per_s: handshakes as f64 / elapsed.max(1e-9),
        cycles_per_s: completed as f64 / elapsed.max(1e-9),
        stopped_by_signal: stopped,
    };
    Ok(ChurnOutput { recorder: rec, stats, dispatch_s, start_unix, wall: t0.elapsed() })
}

/// One connection lifecycle; the permit is held until it ends.
async fn cycle(cfg: Arc<ChurnConfig>, idx: u64, due: Instant, sh: Arc<Shared>, permit: OwnedSemaphorePermit) {
    let _permit = permit;
    let start = Instant::now();
    let source = lifecycle::source_for(&cfg.common.source_ips, idx as usize);
    if cfg.connect_only {
        return connect_only(&cfg, source, due, start, &sh).await;
    }
    let codec = Codec::Ws { size: cfg.common.size, rng: Rng::new(idx), frag_seq: None };
    let mut conn = match ws::open(&cfg.common.target, source, codec, READ_BUF).await {
        Ok(o) => {
            let mut r = sh.rec();
            o.record(&mut r);
            r.connections_ok += 1;
            sh.handshakes.fetch_add(1, Ordering::SeqCst);
            o.conn
        }
        Err(e) => {
            e.note(&mut sh.rec());
            sh.failed(e.kind, due);
            return;
        }
    };
    let exchanged = tokio::time::timeout(cfg.common.target.timeout, exchange(&mut conn, idx))
        .await
        .unwrap_or(Err(ErrorKind::Unanswered));
    if let Err(kind) = exchanged {
        sh.failed(kind, due);
        return;
    }
    sh.answered(due, start);
    sh.close(conn.close()).await;
}

/// A `connect_only` cycle: dial (connect, PROXY header, TLS handshake),
/// recorded as the cycle's reply, then the client-first close.
async fn connect_only(cfg: &ChurnConfig, source: Option<std::net::IpAddr>, due: Instant, start: Instant, sh: &Shared) {
    let t = &cfg.common.target;
    let deadline = tokio::time::Instant::from(start + t.timeout);
    let mut stream = match net::dial(t.addr, source, &t.wire, deadline).await {
        Ok(d) => {
            sh.answered(due, start);
            let mut r = sh.rec();
            d.times.record(&mut r);
            r.connections_ok += 1;
            sh.handshakes.fetch_add(1, Ordering::SeqCst);
            d.stream
        }
        Err(e) => {
            e.note(&mut sh.rec());
            sh.failed(e.kind, due);
            return;
        }
    };
    // close_notify (TLS) and FIN, then read until the peer's EOF: TLS 1.3
    // session tickets arrive after the handshake, so this read is also what
    // stores them for the next `--resume` connection.
    let close = async {
        stream.shutdown().await.map_err(|_| ErrorKind::Io)?;
        let mut buf = [0u8; 512];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                // A peer that closes without its own close_notify, or with a
                // reset, has closed too: the handshake is what was measured.
                Err(e)
                    if matches!(e.kind(), std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset) =>
                {
                    return Ok(())
                }
                Err(_) => return Err(ErrorKind::Io),
            }
        }
    };
    sh.close(close).await;
}

/// Sends message `seq` and reads until its echo, answering pings.
async fn exchange(conn: &mut Conn, seq: u64) -> Result<(), ErrorKind> {
    conn.send(seq).await?;
    match conn.next_reply().await?.seq {
        Some(got) if got == seq => Ok(()),
        _ => Err(ErrorKind::Protocol),
    }
}
