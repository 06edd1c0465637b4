//! `hold`: open N upgraded WebSocket connections at a bounded rate and
//! concurrency, keep them open and idle for a while (optionally sending one
//! small message per connection every K seconds and counting the echoes), then
//! close them. Measures what a router does with many idle tunnels.
//!
//! Per connection the generator keeps one tokio task with its socket, a 64-byte
//! read buffer that grows only if the peer sends more, and a few counters.

use crate::codec::Codec;
use crate::lifecycle::{self, LifecycleConfig, StopSignals};
use crate::recorder::{ErrorKind, Recorder};
use crate::report::HoldStats;
use crate::ws::{self, Conn};
use crate::wsproto::Rng;
use anyhow::Context;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

/// Settings of a `hold` run.
#[derive(Debug, Clone)]
pub struct HoldConfig {
    /// Target, liveness message size, sources, threads.
    pub common: LifecycleConfig,
    /// Connections to open and hold.
    pub connections: usize,
    /// New connections per second; `None`: as fast as `open_concurrency` allows.
    pub open_rate: Option<f64>,
    /// Handshakes in progress at most.
    pub open_concurrency: usize,
    /// How long to hold once every connection is open.
    pub duration: Duration,
    /// Interval of the per-connection liveness message; `None`: fully idle.
    pub ping_every: Option<Duration>,
    /// How long to wait for outstanding echoes after the hold.
    pub drain: Duration,
}

/// What a `hold` run produced.
#[derive(Debug)]
pub struct HoldOutput {
    /// Handshake times, liveness round trips (`sent` / `received` count the
    /// liveness messages) and errors.
    pub recorder: Recorder,
    /// Hold-specific figures (`fd_limit` is left for the caller).
    pub stats: HoldStats,
    /// Wall-clock time of the whole run.
    pub wall: Duration,
}

/// Phases announced to every connection.
const RUN: u8 = 0;
/// No new liveness messages; outstanding echoes are still awaited.
const DRAIN: u8 = 1;
/// Close now.
const CLOSE: u8 = 2;

/// How long a connection waits for the peer's EOF after our close frame and FIN.
const CLOSE_WAIT: Duration = Duration::from_secs(1);

/// Read buffer a held connection starts with.
const READ_BUF: usize = 64;

struct Shared {
    rec: Mutex<Recorder>,
    /// Upgraded and not closed by the peer.
    alive: AtomicU64,
    closed_early: AtomicU64,
    /// Liveness messages written and not yet echoed on live connections.
    pending: AtomicU64,
    /// The phase as well, for the race-free check before a liveness message
    /// (the watch channel only wakes the connections).
    phase: AtomicU8,
    t0: Instant,
}

impl Shared {
    fn rec(&self) -> std::sync::MutexGuard<'_, Recorder> {
        // A panicking connection task cannot leave the counters half-updated in
        // a way that matters more than losing the run; keep going.
        self.rec.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }
}

/// Runs a hold and returns its measurements.
pub fn run(cfg: &HoldConfig) -> anyhow::Result<HoldOutput> {
    lifecycle::run_on_runtime(cfg.common.threads, run_async(cfg))?
}

async fn run_async(cfg: &HoldConfig) -> anyhow::Result<HoldOutput> {
    let mut signals = StopSignals::install().context("installing SIGTERM/SIGINT handlers")?;
    let t0 = Instant::now();
    let sh = Arc::new(Shared {
        rec: Mutex::new(Recorder::new(false)),
        alive: AtomicU64::new(0),
        closed_early: AtomicU64::new(0),
        pending: AtomicU64::new(0),
        phase: AtomicU8::new(RUN),
        t0,
    });
    let (phase_tx, phase_rx) = watch::channel(RUN);
    let concurrency = cfg.open_concurrency.clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize));
    let sem = Arc::new(Semaphore::new(concurrency));
    let shared_cfg = Arc::new(cfg.clone());
    let mut tasks = tokio::task::JoinSet::new();
    let mut stopped = false;

    // Opening: at most `open_rate` per second, at most `concurrency` handshakes at once.
    {
        let opening = async {
            for i in 0..cfg.connections {
                if let Some(r) = cfg.open_rate {
                    tokio::time::sleep_until((t0 + Duration::from_secs_f64(i as f64 / r)).into()).await;
                }
                let permit = sem.clone().acquire_owned().await.expect("the semaphore is never closed");
                tasks.spawn(connection(shared_cfg.clone(), i, sh.clone(), phase_rx.clone(), permit));
            }
            // Every permit back: every handshake has finished (or failed).
            let _all = sem.acquire_many(concurrency as u32).await.expect("the semaphore is never closed");
        };
        tokio::select! {
            _ = opening => {}
            _ = signals.recv() => stopped = true,
        }
    }
    let open_s = t0.elapsed();

    // Holding.
    let hold_start = Instant::now();
    if !stopped {
        tokio::select! {
            _ = tokio::time::sleep(cfg.duration) => {}
            _ = signals.recv() => stopped = true,
        }
    }
    let held_for = hold_start.elapsed();
    let held = sh.alive.load(Ordering::SeqCst);

    // Draining: no new liveness messages; wait (bounded) for the echoes still due.
    sh.phase.store(DRAIN, Ordering::SeqCst);
    phase_tx.send_replace(DRAIN);
    // Also after a signal: echoes in flight then are not failures (the wait is bounded by --drain).
    if cfg.ping_every.is_some() {
        let deadline = Instant::now() + cfg.drain;
        while sh.pending.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    // Closing: every connection sends a close frame and FIN, and waits briefly for EOF.
    sh.phase.store(CLOSE, Ordering::SeqCst);
    phase_tx.send_replace(CLOSE);
    let bound = cfg.common.target.timeout + CLOSE_WAIT + Duration::from_secs(1);
    let _ = tokio::time::timeout(bound, async { while tasks.join_next().await.is_some() {} }).await;
    tasks.abort_all();

    let mut rec = std::mem::replace(&mut *sh.rec(), Recorder::new(false));
    let unanswered = rec.sent.saturating_sub(rec.received);
    rec.error_n(ErrorKind::Unanswered, unanswered);
    let stats = HoldStats {
        open_rate: cfg.open_rate.unwrap_or(0.0),
        open_concurrency: concurrency as u64,
        open_s: open_s.as_secs_f64(),
        hold_s: cfg.duration.as_secs_f64(),
        held_for_s: held_for.as_secs_f64(),
        ping_interval_s: cfg.ping_every.map_or(0.0, |d| d.as_secs_f64()),
        held,
        closed_early: sh.closed_early.load(Ordering::SeqCst),
        pings_sent: rec.sent,
        pings_echoed: rec.received,
        pings_unanswered: unanswered,
        stopped_by_signal: stopped,
        fd_limit: 0,
    };
    Ok(HoldOutput { recorder: rec, stats, wall: t0.elapsed() })
}

/// One held connection: open (holding a concurrency permit), then idle until
/// told to close, answering pings and sending the liveness messages.
async fn connection(
    cfg: Arc<HoldConfig>,
    idx: usize,
    sh: Arc<Shared>,
    mut phase: watch::Receiver<u8>,
    permit: OwnedSemaphorePermit,
) {
    let codec = Codec::Ws { size: cfg.common.size, rng: Rng::new(idx as u64), frag_seq: None };
    let source = lifecycle::source_for(&cfg.common.source_ips, idx);
    let opened = ws::open(&cfg.common.target, source, codec, READ_BUF).await;
    drop(permit);
    let conn = match opened {
        Ok(o) => {
            let mut r = sh.rec();
            o.record(&mut r);
            r.connections_ok += 1;
            o.conn
        }
        Err(e) => {
            e.record(&mut sh.rec());
            return;
        }
    };
    sh.alive.fetch_add(1, Ordering::SeqCst);
    let mut state = Held { conn, start_ns: sh.now_ns(), next_seq: 0, next_ack: 0, last_write_ns: 0 };
    let outcome = state.idle(&cfg, &sh, &mut phase).await;
    if let Some(every) = cfg.ping_every.filter(|_| state.next_ack < state.next_seq) {
        // Liveness messages never echoed were owed until now.
        sh.rec().timeline.owed(state.due_ns(every, state.next_ack), sh.now_ns());
    }
    match outcome {
        // Close frame, then FIN; waits (bounded) for the peer's EOF so that the
        // close is orderly. Nothing here counts as an error.
        Ok(()) => {
            let _ = tokio::time::timeout(CLOSE_WAIT, state.conn.close()).await;
        }
        Err(kind) => {
            // The peer closed or broke the connection before we did.
            sh.alive.fetch_sub(1, Ordering::SeqCst);
            sh.closed_early.fetch_add(1, Ordering::SeqCst);
            sh.pending.fetch_sub(state.next_seq - state.next_ack, Ordering::SeqCst);
            sh.rec().error(kind);
        }
    }
}

/// Per-connection state while held.
struct Held {
    conn: Conn,
    start_ns: u64,
    /// Liveness messages written.
    next_seq: u64,
    /// Next echo expected.
    next_ack: u64,
    last_write_ns: u64,
}

impl Held {
    /// Scheduled time of liveness message `k`: one interval after the upgrade, then every interval.
    fn due_ns(&self, every: Duration, k: u64) -> u64 {
        self.start_ns + (k + 1) * every.as_nanos() as u64
    }

    /// Idles until the CLOSE phase (Ok) or until the peer closes or breaks the connection (Err).
    async fn idle(&mut self, cfg: &HoldConfig, sh: &Shared, phase: &mut watch::Receiver<u8>) -> Result<(), ErrorKind> {
        let mut now_phase = *phase.borrow_and_update();
        loop {
            self.handle_replies(cfg, sh).await?;
            if now_phase == CLOSE {
                return Ok(());
            }
            let ping_at = cfg
                .ping_every
                .filter(|_| now_phase == RUN)
                .map(|every| sh.t0 + Duration::from_nanos(self.due_ns(every, self.next_seq)));
            tokio::select! {
                r = self.conn.fill() => r?,
                _ = tokio::time::sleep_until(ping_at.unwrap_or(sh.t0).into()), if ping_at.is_some() => {
                    // Counted before the phase check (both SeqCst): either the drain sees this
                    // message as pending, or this connection sees the drain and sends nothing.
                    sh.pending.fetch_add(1, Ordering::SeqCst);
                    if sh.phase.load(Ordering::SeqCst) != RUN {
                        sh.pending.fetch_sub(1, Ordering::SeqCst);
                        continue;
                    }
                    self.last_write_ns = sh.now_ns();
                    self.next_seq += 1;
                    sh.rec().count_sent(1, true);
                    self.conn.send(self.next_seq - 1).await?;
                }
                r = phase.changed() => {
                    now_phase = if r.is_ok() { *phase.borrow_and_update() } else { CLOSE };
                }
            }
        }
    }

    /// Handles every complete reply in the read buffer and answers the pings met on the way.
    async fn handle_replies(&mut self, cfg: &HoldConfig, sh: &Shared) -> Result<(), ErrorKind> {
        while let Some(reply) = self.conn.buffered_reply()? {
            let every = cfg.ping_every.ok_or(ErrorKind::Protocol)?;
            let k = self.next_ack;
            if k >= self.next_seq || reply.seq != Some(k) {
                return Err(ErrorKind::Protocol);
            }
            self.next_ack += 1;
            sh.pending.fetch_sub(1, Ordering::SeqCst);
            let now = sh.now_ns();
            let corrected = now.saturating_sub(self.due_ns(every, k));
            // Only the latest message's write time is kept; older ones are charged from schedule.
            let uncorrected = if k + 1 == self.next_seq { now.saturating_sub(self.last_write_ns) } else { corrected };
            let mut r = sh.rec();
            r.reply(corrected, uncorrected, 0);
            r.timeline.answered(self.due_ns(every, k), now);
        }
        self.conn.flush().await
    }
}
