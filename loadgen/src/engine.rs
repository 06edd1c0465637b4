//! The open-loop engine: C connections over N threads (one current-thread
//! tokio runtime each), every connection writing on its fixed schedule with up
//! to `max_inflight` messages outstanding, and a reader matching replies by
//! sequence number.
//!
//! Latency is charged from the intended send time (corrected) and from the
//! moment the message was handed to the socket (uncorrected). When behind
//! schedule the writer sends everything that is due at once (catch-up), still
//! charging from the intended times.

use crate::codec::Codec;
use crate::net::{ReadHalf, WriteHalf};
use crate::progress::Live;
use crate::recorder::{ErrorKind, Recorder};
use crate::schedule::Schedule;
use crate::target::Wire;
use crate::timer::Timer;
use crate::ws::{self, Conn, WsTarget};
use crate::wsproto::{opcode, Rng};
use std::cell::{Cell, RefCell};
use std::net::{IpAddr, SocketAddr};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

/// Which protocol the connections speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    /// WebSocket after an RFC 6455 handshake.
    Ws,
    /// HTTP/1.1 keep-alive (requests pipelined up to `max_inflight`).
    HttpKeepAlive,
    /// HTTP/1.1 with `Connection: close`: one connection per request.
    HttpClose,
    /// Raw TCP messages echoed back (ping-pong).
    Raw,
}

/// Settings of one run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Protocol.
    pub proto: Proto,
    /// Where to connect.
    pub target: SocketAddr,
    /// PROXY header and TLS of every connection.
    pub wire: Wire,
    /// Host header.
    pub host: String,
    /// Request path.
    pub path: String,
    /// Number of connections.
    pub connections: usize,
    /// Total messages (requests) per second over all connections.
    pub rate: f64,
    /// Measured duration.
    pub duration: Duration,
    /// Warm-up before measuring (sent, not recorded).
    pub warmup: Duration,
    /// Message size in bytes (WebSocket payload / raw message).
    pub size: usize,
    /// Messages outstanding per connection before the writer waits.
    pub max_inflight: usize,
    /// New connections per second; `None` opens all at once.
    pub ramp_rate: Option<f64>,
    /// Local addresses to spread connections over.
    pub source_ips: Vec<IpAddr>,
    /// Generator threads.
    pub threads: usize,
    /// Connect + handshake time limit.
    pub connect_timeout: Duration,
    /// How long to wait for outstanding replies after the last send.
    pub drain: Duration,
    /// Keep per-second histograms (for `--hlog`).
    pub keep_intervals: bool,
}

impl RunConfig {
    /// Time from the run's zero instant until the last connection starts connecting.
    pub fn ramp_time(&self) -> Duration {
        match self.ramp_rate {
            Some(r) if r > 0.0 => Duration::from_secs_f64(self.connections as f64 / r),
            _ => Duration::ZERO,
        }
    }

    /// Upper bound on how long the run can take.
    pub fn hard_limit(&self) -> Duration {
        self.ramp_time() + self.connect_timeout + self.warmup + self.duration + self.drain + Duration::from_secs(2)
    }
}

/// What a run produced.
#[derive(Debug)]
pub struct RunOutput {
    /// All threads' measurements merged.
    pub recorder: Recorder,
    /// Wall-clock time of the whole run.
    pub wall: Duration,
    /// Unix time at which the measured window began.
    pub start_unix: std::time::SystemTime,
}

/// Run-wide timing, in ns since the zero instant `t0`.
#[derive(Debug, Clone, Copy)]
struct Clock {
    t0: Instant,
    warm_ns: u64,
    end_ns: u64,
    drain_ns: u64,
}

impl Clock {
    fn now_ns(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }

    fn at(&self, ns: u64) -> tokio::time::Instant {
        self.instant(ns).into()
    }

    fn instant(&self, ns: u64) -> Instant {
        self.t0 + Duration::from_nanos(ns)
    }

    fn measured(&self, intended_ns: u64) -> bool {
        intended_ns >= self.warm_ns && intended_ns < self.end_ns
    }
}

/// Runs the load and returns the merged measurements.
pub fn run(cfg: &RunConfig, live: Option<Arc<Live>>) -> RunOutput {
    let threads = cfg.threads.clamp(1, cfg.connections.max(1));
    let t0 = Instant::now() + Duration::from_millis(20);
    let clock = Clock {
        t0,
        warm_ns: cfg.warmup.as_nanos() as u64,
        end_ns: (cfg.warmup + cfg.duration).as_nanos() as u64,
        drain_ns: (cfg.warmup + cfg.duration + cfg.drain).as_nanos() as u64,
    };
    let start_unix = std::time::SystemTime::now() + Duration::from_millis(20) + cfg.warmup;
    let mut total = Recorder::new(cfg.keep_intervals);
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|tid| {
                let live = live.clone();
                s.spawn(move || thread_main(cfg, clock, tid, threads, live))
            })
            .collect();
        for h in handles {
            match h.join() {
                Ok(r) => total.merge(&r),
                Err(p) => std::panic::resume_unwind(p),
            }
        }
    });
    RunOutput { recorder: total, wall: t0.elapsed(), start_unix }
}

fn thread_main(cfg: &RunConfig, clock: Clock, tid: usize, threads: usize, live: Option<Arc<Live>>) -> Recorder {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let rec = Rc::new(RefCell::new(Recorder::new(cfg.keep_intervals)));
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let timer = Rc::new(Timer::new().expect("timerfd"));
        let driver = {
            let t = timer.clone();
            tokio::task::spawn_local(async move { t.drive().await })
        };
        let ticker = live.map(|live| {
            let rec = rec.clone();
            tokio::task::spawn_local(async move { live.feed_forever(&rec).await })
        });
        let mut tasks = Vec::new();
        for idx in (tid..cfg.connections).step_by(threads) {
            let rec = rec.clone();
            let cfg = cfg.clone();
            let timer = timer.clone();
            tasks.push(tokio::task::spawn_local(async move {
                connection(&cfg, clock, idx, &rec, &timer).await;
            }));
        }
        let limit = clock.t0 + cfg.hard_limit();
        for t in tasks {
            let _ = tokio::time::timeout_at(limit.into(), t).await;
        }
        if let Some(t) = ticker {
            t.abort();
        }
        driver.abort();
    });
    // Aborted tasks still hold clones of `rec` until the LocalSet is gone.
    drop(local);
    rt.shutdown_timeout(Duration::from_millis(100));
    Rc::try_unwrap(rec).map(RefCell::into_inner).unwrap_or_else(|rc| rc.borrow().clone())
}

/// State shared by a connection's writer and reader (same thread).
struct Shared {
    next_seq: Cell<u64>,
    next_ack: Cell<u64>,
    send_ns: Box<[Cell<u64>]>,
    /// The writer waits for the window or the drain and wants a wake per reply.
    writer_waiting: Cell<bool>,
    wake: Notify,
    /// The reader ended (error, close or EOF).
    dead: Cell<bool>,
    /// We started closing: EOF and close frames are expected now.
    closing: Cell<bool>,
    /// Control frames (pongs) the writer must send.
    ctrl: RefCell<Vec<u8>>,
    /// Sequence numbers below this were counted as sent (a message written
    /// again after a reconnect is not counted twice).
    counted: Cell<u64>,
    /// The connection may be opened again when the peer closes it (HTTP keep-alive).
    may_reconnect: bool,
    /// The reader ended because the peer closed the connection in a way
    /// HTTP keep-alive allows (`Connection: close`, or EOF after answering):
    /// open a new connection and go on.
    reconnect: Cell<bool>,
}

impl Shared {
    fn inflight(&self) -> u64 {
        self.next_seq.get() - self.next_ack.get()
    }

    /// Starts over on a new connection: what the old one never answered is
    /// written again (still charged from its intended send time).
    fn restart(&self) {
        self.next_seq.set(self.next_ack.get());
        self.dead.set(false);
        self.reconnect.set(false);
        self.ctrl.borrow_mut().clear();
    }
}

/// One connection slot for the whole run.
async fn connection(cfg: &RunConfig, clock: Clock, idx: usize, rec: &Rc<RefCell<Recorder>>, timer: &Timer) {
    let sched = Schedule::new(idx, cfg.connections, cfg.rate);
    let start_ns = match cfg.ramp_rate {
        Some(r) if r > 0.0 => (idx as f64 * 1e9 / r) as u64,
        _ => 0,
    };
    timer.sleep_until(clock.instant(start_ns)).await;
    let source = (!cfg.source_ips.is_empty()).then(|| cfg.source_ips[idx % cfg.source_ips.len()]);
    if cfg.proto == Proto::HttpClose {
        return http_close_loop(cfg, clock, sched, source, rec, timer).await;
    }
    let codec = match cfg.proto {
        Proto::Ws => Codec::Ws { size: cfg.size, rng: Rng::new(idx as u64), frag_seq: None },
        Proto::HttpKeepAlive => Codec::Http { request: crate::codec::http_request(&cfg.host, &cfg.path, false).into() },
        _ => Codec::Raw { size: cfg.size },
    };
    let Some(mut conn) = open(cfg, source, codec.clone(), READ_BUF, rec).await else {
        return;
    };
    rec.borrow_mut().connections_ok += 1;
    // Messages due before the connection was ready are not sent (they show as
    // a lower achieved rate); the connection joins the schedule from now on.
    let first = sched.first_at_or_after(clock.now_ns());
    rec.borrow_mut().skipped += skipped_measured(sched, first, clock);
    let cap = cfg.max_inflight.max(1);
    let shared = Rc::new(Shared {
        next_seq: Cell::new(first),
        next_ack: Cell::new(first),
        send_ns: (0..cap).map(|_| Cell::new(0)).collect(),
        writer_waiting: Cell::new(false),
        wake: Notify::new(),
        dead: Cell::new(false),
        closing: Cell::new(false),
        ctrl: RefCell::new(Vec::new()),
        counted: Cell::new(first),
        may_reconnect: cfg.proto == Proto::HttpKeepAlive,
        reconnect: Cell::new(false),
    });
    let (ok, writer, reader) = loop {
        let mut codec = conn.codec().clone();
        let (rd, mut wr) = conn.into_split();
        let reader = {
            let shared = shared.clone();
            let rec = rec.clone();
            tokio::task::spawn_local(async move { read_loop(rd, &shared, sched, clock, &rec).await })
        };
        let ok = write_loop(&mut wr, &mut codec, &shared, sched, clock, rec, timer).await;
        // Drain: wait for outstanding replies until the deadline.
        while ok && !shared.dead.get() && shared.inflight() > 0 && clock.now_ns() < clock.drain_ns {
            shared.writer_waiting.set(true);
            tokio::select! {
                _ = shared.wake.notified() => {}
                _ = tokio::time::sleep_until(clock.at(clock.drain_ns)) => {}
            }
        }
        let more = shared.inflight() > 0 || sched.due_ns(shared.next_seq.get()) < clock.end_ns;
        if !(shared.reconnect.get() && more && clock.now_ns() < clock.drain_ns) {
            break (ok, Some((wr, codec)), reader);
        }
        // The server closed a keep-alive connection: reconnect at once. The
        // time it takes is in the corrected latency of every request due
        // meanwhile, as the schedule does not wait.
        reader.abort();
        drop(wr);
        let remaining = clock.instant(clock.drain_ns).saturating_duration_since(std::time::Instant::now());
        let reopened = tokio::time::timeout(remaining, open(cfg, source, codec, READ_BUF, rec)).await;
        let Ok(Some(c)) = reopened else {
            // Counted by open(); what the old connection left unanswered stays so.
            break (false, None, reader);
        };
        rec.borrow_mut().reconnects += 1;
        shared.restart();
        conn = c;
    };
    shared.writer_waiting.set(false);
    let lost = unanswered_measured(&shared, sched, clock);
    {
        let mut r = rec.borrow_mut();
        r.error_n(ErrorKind::Unanswered, lost);
        // Whatever was due and never answered was owed until now, or at
        // least until the window ended (a connection that failed early).
        let oldest = sched.due_ns(shared.next_ack.get());
        if oldest < clock.end_ns {
            r.timeline.owed(oldest, clock.now_ns().max(clock.end_ns));
        }
    }
    shared.closing.set(true);
    if let Some((mut wr, mut codec)) = writer.filter(|_| ok && !shared.dead.get()) {
        let mut bye = Vec::new();
        codec.encode_control(opcode::CLOSE, &1000u16.to_be_bytes(), &mut bye);
        if !bye.is_empty() && wr.write_all(&bye).await.is_ok() && wr.flush().await.is_ok() {
            // Give the server a moment to answer the close.
            let _ = tokio::time::timeout(Duration::from_millis(300), async {
                while !shared.dead.get() {
                    shared.writer_waiting.set(true);
                    shared.wake.notified().await;
                }
            })
            .await;
        }
    }
    reader.abort();
}

/// Connects (and upgrades, for WebSocket), recording connect/upgrade times
/// and counting failures.
async fn open(
    cfg: &RunConfig,
    source: Option<IpAddr>,
    codec: Codec,
    read_buf: usize,
    rec: &Rc<RefCell<Recorder>>,
) -> Option<Conn> {
    let target = WsTarget {
        addr: cfg.target,
        host: cfg.host.clone(),
        path: cfg.path.clone(),
        timeout: cfg.connect_timeout,
        wire: cfg.wire.clone(),
    };
    match ws::open(&target, source, codec, read_buf).await {
        Ok(o) => {
            o.record(&mut rec.borrow_mut());
            Some(o.conn)
        }
        Err(e) => {
            e.record(&mut rec.borrow_mut());
            None
        }
    }
}

/// Read buffer a connection starts with.
const READ_BUF: usize = 4096;

/// Most messages written with one `write` when catching up.
const MAX_BATCH: usize = 64;

/// Writes messages on schedule until the measured window ends. Returns false
/// when the connection failed.
async fn write_loop(
    wr: &mut WriteHalf,
    codec: &mut Codec,
    sh: &Shared,
    sched: Schedule,
    clock: Clock,
    rec: &Rc<RefCell<Recorder>>,
    timer: &Timer,
) -> bool {
    let cap = sh.send_ns.len() as u64;
    // Small to start: tens of thousands of connections must fit in memory;
    // the buffer grows once if catch-up batches need more.
    let mut buf: Vec<u8> = Vec::with_capacity(4096);
    let drain_at = clock.at(clock.drain_ns);
    loop {
        if sh.dead.get() {
            return false;
        }
        buf.clear();
        buf.append(&mut sh.ctrl.borrow_mut());
        let due = sched.due_ns(sh.next_seq.get());
        if due >= clock.end_ns && buf.is_empty() {
            return true;
        }
        let now = clock.now_ns();
        if now >= clock.drain_ns {
            // Hopelessly behind: what is still unsent is reported, not hidden.
            rec.borrow_mut().unsent += unsent_measured(sched, sh.next_seq.get().max(sh.counted.get()), clock);
            return true;
        }
        if buf.is_empty() {
            if sh.inflight() >= cap {
                sh.writer_waiting.set(true);
                tokio::select! {
                    _ = sh.wake.notified() => {}
                    _ = tokio::time::sleep_until(drain_at) => {}
                }
                sh.writer_waiting.set(false);
                continue;
            }
            if now < due {
                tokio::select! {
                    _ = timer.sleep_until(clock.instant(due)) => {}
                    _ = sh.wake.notified() => {}
                }
                continue;
            }
        }
        // Everything due now that the window allows goes out in one write.
        let mut sent_measured = 0;
        for _ in 0..MAX_BATCH {
            let k = sh.next_seq.get();
            let due = sched.due_ns(k);
            if due > now || due >= clock.end_ns || sh.inflight() >= cap {
                break;
            }
            codec.encode(k, &mut buf);
            sh.send_ns[(k % cap) as usize].set(now);
            sh.next_seq.set(k + 1);
            if clock.measured(due) && k >= sh.counted.get() {
                sent_measured += 1;
            }
        }
        sh.counted.set(sh.counted.get().max(sh.next_seq.get()));
        rec.borrow_mut().count_sent(sent_measured, now < clock.end_ns);
        // TLS buffers what it encrypts: flush it to the socket.
        let written = async {
            wr.write_all(&buf).await?;
            wr.flush().await
        }
        .await;
        if written.is_err() {
            if sh.may_reconnect {
                // The server closed: the reader meets the same close and
                // decides whether it is a keep-alive close (a new connection)
                // or an error.
                while !sh.dead.get() && clock.now_ns() < clock.drain_ns {
                    sh.writer_waiting.set(true);
                    tokio::select! {
                        _ = sh.wake.notified() => {}
                        _ = tokio::time::sleep_until(drain_at) => {}
                    }
                }
                sh.writer_waiting.set(false);
            }
            if !sh.dead.get() {
                rec.borrow_mut().error(ErrorKind::Io);
                sh.dead.set(true);
            }
            return false;
        }
    }
}

/// Messages in flight (written, not answered) that are due in the measured
/// window: what `sent` counted and `received` never will. Counting only
/// these keeps `sent = received + unanswered`.
fn unanswered_measured(sh: &Shared, sched: Schedule, clock: Clock) -> u64 {
    // After a reconnect, messages counted as sent may not be written again yet.
    (sh.next_ack.get()..sh.next_seq.get().max(sh.counted.get())).filter(|&k| clock.measured(sched.due_ns(k))).count()
        as u64
}

/// Messages due in the measured window from sequence `next` on.
fn unsent_measured(sched: Schedule, next: u64, clock: Clock) -> u64 {
    let from = next.max(sched.first_at_or_after(clock.warm_ns));
    sched.first_at_or_after(clock.end_ns).saturating_sub(from)
}

/// Messages due in the measured window before sequence `first` (the
/// connection was not ready for them).
fn skipped_measured(sched: Schedule, first: u64, clock: Clock) -> u64 {
    let from = sched.first_at_or_after(clock.warm_ns);
    first.min(sched.first_at_or_after(clock.end_ns)).saturating_sub(from)
}

/// Reads replies, matches them to sequence numbers and records latencies.
/// When the connection may be opened again (HTTP keep-alive), a peer that closes after a reply
/// (`Connection: close`, or EOF or a reset once it answered something on this
/// connection) ends the connection without an error and asks for a new one
/// ([`Shared::reconnect`]); a peer that closes a connection before answering
/// anything on it is an error.
async fn read_loop(mut conn: Conn<ReadHalf>, sh: &Shared, sched: Schedule, clock: Clock, rec: &Rc<RefCell<Recorder>>) {
    let cap = sh.send_ns.len() as u64;
    let mut answered = 0u64;
    let outcome: Result<(), ErrorKind> = 'conn: loop {
        loop {
            let reply = conn.buffered_reply();
            if conn.take_control(&mut sh.ctrl.borrow_mut()) {
                sh.wake.notify_one();
            }
            let ws::Reply { seq, failed, last } = match reply {
                Err(kind) => break 'conn Err(kind),
                Ok(None) => break,
                Ok(Some(r)) => r,
            };
            let expected = sh.next_ack.get();
            if expected >= sh.next_seq.get() || seq.is_some_and(|s| s != expected) {
                break 'conn Err(ErrorKind::Protocol);
            }
            let now = clock.now_ns();
            let intended = sched.due_ns(expected);
            let actual = sh.send_ns[(expected % cap) as usize].get();
            sh.next_ack.set(expected + 1);
            answered += 1;
            let mut r = rec.borrow_mut();
            r.timeline.answered(intended, now);
            if clock.measured(intended) {
                let second = (now.saturating_sub(clock.warm_ns) / 1_000_000_000) as usize;
                r.reply(now.saturating_sub(intended), now.saturating_sub(actual), second);
                if failed {
                    r.error(ErrorKind::HttpStatus);
                }
            }
            drop(r);
            if sh.writer_waiting.get() {
                sh.wake.notify_one();
            }
            if last && sh.may_reconnect {
                sh.reconnect.set(true);
                break 'conn Ok(());
            }
        }
        if let Err(kind) = conn.fill().await {
            let clean = matches!(kind, ErrorKind::ClosedByPeer | ErrorKind::Io);
            // Only after an answer: a server that closes fresh connections
            // would otherwise be reconnected to in a tight loop.
            if sh.may_reconnect && clean && answered > 0 {
                sh.reconnect.set(true);
                break Ok(());
            }
            break Err(kind);
        }
    };
    if let Err(kind) = outcome {
        if !sh.closing.get() {
            rec.borrow_mut().error(kind);
        }
    }
    sh.dead.set(true);
    sh.wake.notify_one();
}

/// Read buffer of a `Connection: close` request's connection.
const HTTP_CLOSE_READ_BUF: usize = 16 * 1024;

/// `Connection: close` HTTP: each scheduled request opens its own connection.
/// Connect time is part of both latencies; uncorrected counts from the moment
/// the connection attempt began.
async fn http_close_loop(
    cfg: &RunConfig,
    clock: Clock,
    sched: Schedule,
    source: Option<IpAddr>,
    rec: &Rc<RefCell<Recorder>>,
    timer: &Timer,
) {
    let codec = Codec::Http { request: crate::codec::http_request(&cfg.host, &cfg.path, true).into() };
    let mut k = sched.first_at_or_after(clock.now_ns());
    rec.borrow_mut().skipped += skipped_measured(sched, k, clock);
    let mut counted = false;
    loop {
        let due = sched.due_ns(k);
        if due >= clock.end_ns {
            return;
        }
        timer.sleep_until(clock.instant(due)).await;
        let begin = clock.now_ns();
        if begin >= clock.drain_ns {
            rec.borrow_mut().unsent += unsent_measured(sched, k, clock);
            return;
        }
        let measured = clock.measured(due);
        k += 1;
        let Some(mut conn) = open(cfg, source, codec.clone(), HTTP_CLOSE_READ_BUF, rec).await else {
            rec.borrow_mut().timeline.owed(due, clock.now_ns());
            continue;
        };
        if measured {
            // Written now; counted with the moment the attempt began, as its latency is.
            rec.borrow_mut().count_sent(1, begin < clock.end_ns);
        }
        if !counted {
            // The slot counts as one connection, however many it opens.
            rec.borrow_mut().connections_ok += 1;
            counted = true;
        }
        let result = async {
            conn.send(k - 1).await?;
            Ok(conn.next_reply().await?.failed)
        };
        let remaining = tokio::time::Instant::from(clock.t0 + Duration::from_nanos(clock.drain_ns));
        let outcome = tokio::time::timeout_at(remaining, result).await.unwrap_or(Err(ErrorKind::Unanswered));
        let now = clock.now_ns();
        let mut recm = rec.borrow_mut();
        match outcome {
            Ok(_) => recm.timeline.answered(due, now),
            Err(_) => recm.timeline.owed(due, now),
        }
        match outcome {
            Ok(failed) if measured => {
                let second = (now.saturating_sub(clock.warm_ns) / 1_000_000_000) as usize;
                recm.reply(now.saturating_sub(due), now.saturating_sub(begin), second);
                if failed {
                    recm.error(ErrorKind::HttpStatus);
                }
            }
            Ok(_) => {}
            Err(kind) => {
                recm.error(kind);
                // The request was written and got no answer: keep sent = received + unanswered.
                if measured && kind != ErrorKind::Unanswered {
                    recm.error(ErrorKind::Unanswered);
                }
            }
        }
    }
}
