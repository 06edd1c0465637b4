//! One io_uring worker: a thread owning a ring, a provided-buffer pool and
//! the tunnels handed to it.
//!
//! Per tunnel and direction (0: client → backend, 1: backend → client):
//!
//! * a multishot recv on the source picks buffers from the shared pool as
//!   bytes arrive (an idle tunnel holds none); on kernels without the
//!   multishot length cap (before 6.17) a single-shot recv picks one buffer
//!   at a time instead, so that a direction stays within its bound;
//! * received buffers queue in order behind the leftover bytes of the
//!   handshake and go out through one `Send` at a time;
//! * a direction may queue `high_water` bytes (two buffers): each multishot
//!   recv is capped to what is left of that budget, a recv still armed at
//!   the mark is cancelled, and it is re-armed once the queue fell to
//!   `low_water` (one buffer): a slow reader bounds what the worker holds;
//! * when the pool is empty (a burst of small messages, or many stalled
//!   readers, holds it), a direction reads exactly the bytes waiting on its
//!   socket (`FIONREAD`, at most 16 KiB at a time) into a heap buffer of
//!   that size, so the other tunnels keep moving; with nothing waiting it
//!   polls for readability first and holds no buffer while its peer is
//!   quiet;
//! * EOF on the source (recv gives 0) becomes `shutdown(SHUT_WR)` on the
//!   destination once the queue is empty; both done closes the tunnel;
//! * a failed recv or send is a reset: both sockets get `SO_LINGER 0` so
//!   the survivor sees an RST. A peer's reset (ECONNRESET, EPIPE, …) is
//!   reported as that side's reset; any other error is the plane's own
//!   (`dataplane_error`) and logged at warn with the op and errno.
//!
//! A tunnel ends (idle, drain, reset, done) by cancelling its in-flight
//! operations and waiting for their completions; only then are its buffers
//! returned and its sockets closed, so the kernel never writes into a buffer
//! or a socket that was reused.
//!
//! Submissions of all tunnels are batched: each loop turn pushes every queued
//! entry and enters the kernel once to submit and wait.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use bytes::Bytes;
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use socket2::SockRef;
use tokio::sync::oneshot;

use super::bufring::BufRing;
use crate::dataplane::queues::inq;
use crate::dataplane::{abort, ByteCounters, CloseReason, Direction, Outcome};

/// user_data of the eventfd read that wakes the worker.
const WAKE_UD: u64 = u64::MAX;

const KIND_RECV: u64 = 1;
const KIND_SEND: u64 = 2;
const KIND_CANCEL: u64 = 3;

fn ud(slot: u32, dir: usize, kind: u64) -> u64 {
    ((slot as u64) << 8) | ((dir as u64) << 4) | kind
}

/// A tunnel handed to a worker.
pub struct Job {
    pub id: u64,
    pub client: OwnedFd,
    pub backend: OwnedFd,
    pub to_backend: Bytes,
    pub to_client: Bytes,
    pub idle_timeout: Duration,
    pub reply: oneshot::Sender<Outcome>,
}

/// What the async side asks of a worker.
pub enum Cmd {
    Start(Job),
    /// Close tunnel `id` at once (drain, or its relay future was dropped).
    Cancel(u64),
    /// Close every tunnel and exit.
    Stop,
}

/// Sizes of a worker's resources.
#[derive(Debug, Clone, Copy)]
pub struct Sizing {
    pub ring_entries: u32,
    pub buf_count: u16,
    pub buf_size: u32,
    /// Bytes queued in one direction at which its recv pauses.
    pub high_water: usize,
    /// Bytes queued in one direction at or below which it resumes.
    pub low_water: usize,
    /// The kernel honours a total length on a multishot recv (probed at
    /// startup; kernels before 6.17 reject the field with EINVAL).
    pub mshot_len_cap: bool,
}

/// State shared between a worker and the plane.
pub struct Shared {
    pub counters: Arc<ByteCounters>,
    /// Tunnels currently on this worker (for placement).
    pub load: AtomicUsize,
    /// False once the worker thread stopped taking tunnels.
    pub alive: AtomicBool,
    /// Pool buffers currently holding bytes (taken by a recv, not yet sent).
    pub bufs_in_use: AtomicUsize,
    /// The most pool buffers that held bytes at once.
    pub bufs_peak: AtomicUsize,
    /// The most bytes one direction of a tunnel queued at once.
    pub queued_peak: AtomicUsize,
    /// Recvs that went to a heap buffer because the pool was empty.
    pub heap_recvs: AtomicUsize,
    /// Bytes of heap buffers allocated for those recvs and not freed yet.
    pub heap_bytes: AtomicUsize,
    /// The most bytes of such heap buffers held at once.
    pub heap_bytes_peak: AtomicUsize,
    /// The eventfd was written since the worker last took its commands:
    /// a sender need not write it again (see [`Shared::needs_wake`]).
    pub woken: AtomicBool,
}

impl Shared {
    /// Called by a sender after queueing a command: whether it must write
    /// the eventfd. Only the first command since the worker last took its
    /// commands does; the rest are taken with it. A burst of handoffs so
    /// costs one eventfd write and one wakeup of the worker, not one each.
    pub fn needs_wake(&self) -> bool {
        // Pairs with the fence in `took_commands`: either this swap sees
        // the worker's `false`, or the worker's next look at the channel
        // sees the command queued before it.
        std::sync::atomic::fence(Ordering::SeqCst);
        !self.woken.swap(true, Ordering::SeqCst)
    }

    /// Called by the worker when its eventfd read completed, before it
    /// looks at the channel: the next command must wake it again.
    fn took_commands(&self) {
        self.woken.store(false, Ordering::SeqCst);
        std::sync::atomic::fence(Ordering::SeqCst);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Recv {
    Off,
    /// A multishot recv into the pool.
    Armed,
    /// A multishot recv being cancelled (the direction hit its high-water mark).
    Cancelling,
    /// The pool was empty: one recv into a heap buffer sized to the bytes
    /// waiting (`Dir::heap`).
    Heap,
    /// The pool was empty and no bytes waited: a poll for readability,
    /// which holds no buffer while the peer is quiet.
    Poll,
}

/// The most bytes one recv reads into a heap buffer while the pool is empty.
const HEAP_RECV: usize = 16 * 1024;

/// A heap buffer read into while the pool was empty, counted in
/// [`Shared::heap_bytes`] from allocation to drop.
struct HeapBuf {
    bytes: Box<[u8]>,
    shared: Arc<Shared>,
}

impl HeapBuf {
    fn new(len: usize, shared: &Arc<Shared>) -> HeapBuf {
        let held = shared.heap_bytes.fetch_add(len, Ordering::Relaxed) + len;
        shared.heap_bytes_peak.fetch_max(held, Ordering::Relaxed);
        HeapBuf { bytes: vec![0u8; len].into_boxed_slice(), shared: shared.clone() }
    }
}

impl Drop for HeapBuf {
    fn drop(&mut self) {
        self.shared.heap_bytes.fetch_sub(self.bytes.len(), Ordering::Relaxed);
    }
}

enum Chunk {
    /// Bytes read past the handshake heads.
    Leftover(Bytes),
    /// A pool buffer holding `len` received bytes.
    Pool { bid: u16, len: u32 },
    /// Bytes received while the pool was empty.
    Heap { buf: HeapBuf, len: usize },
}

impl Chunk {
    fn len(&self) -> usize {
        match self {
            Chunk::Leftover(b) => b.len(),
            Chunk::Pool { len, .. } => *len as usize,
            Chunk::Heap { len, .. } => *len,
        }
    }
}

struct Dir {
    queue: VecDeque<Chunk>,
    /// Bytes of the front chunk already sent.
    front_off: usize,
    queued: usize,
    recv: Recv,
    /// Target of the heap recv in flight ([`Recv::Heap`]); kept here until
    /// its completion is reaped.
    heap: Option<HeapBuf>,
    sending: bool,
    eof: bool,
    /// The destination was shut down for writing: this direction is done.
    shut: bool,
    moved: u64,
}

impl Dir {
    fn new(first: Bytes) -> Dir {
        let mut d = Dir {
            queue: VecDeque::new(),
            front_off: 0,
            queued: 0,
            recv: Recv::Off,
            heap: None,
            sending: false,
            eof: false,
            shut: false,
            moved: 0,
        };
        if !first.is_empty() {
            d.queued = first.len();
            d.queue.push_back(Chunk::Leftover(first));
        }
        d
    }
}

struct Tun {
    id: u64,
    /// 0: client, 1: backend. Direction d reads fds[d] and writes fds[1 - d].
    fds: [OwnedFd; 2],
    dirs: [Dir; 2],
    inflight: u32,
    last_active: Instant,
    idle: Duration,
    closing: Option<CloseReason>,
    reply: Option<oneshot::Sender<Outcome>>,
}

impl Tun {
    fn src(&self, d: usize) -> RawFd {
        self.fds[d].as_raw_fd()
    }
    fn dst(&self, d: usize) -> RawFd {
        self.fds[1 - d].as_raw_fd()
    }
}

/// The reason a tunnel ends when an operation on one of its sockets failed
/// with `errno`: `peer_reset` (that side's reset, from [`Direction`]) when
/// the peer caused it.
///
/// Only the errors a peer causes (a reset, an abort, a dead connection)
/// are the peer's: anything else (EINVAL, EFAULT, EBADF, ENOMEM,
/// EOPNOTSUPP, …) is the plane's own failure — an operation this kernel
/// refused — and goes to the access log as `dataplane_error`, never as the
/// client's reset.
fn failed(errno: i32, peer_reset: CloseReason) -> CloseReason {
    match errno {
        libc::ECONNRESET
        | libc::EPIPE
        | libc::ECONNABORTED
        | libc::ETIMEDOUT
        | libc::EHOSTUNREACH
        | libc::ENETUNREACH => peer_reset,
        _ => CloseReason::Error,
    }
}

/// Logs an operation that failed with `errno` on the `side` ("client" or
/// "backend") socket and the reason the tunnel ends with: a plane error at
/// warn (with the op and errno, so an operator can tell it from a client),
/// a peer's reset at debug.
fn log_failed(id: u64, op: &str, side: &str, errno: i32, reason: CloseReason) {
    let err = io::Error::from_raw_os_error(errno);
    if reason == CloseReason::Error {
        tracing::warn!(
            tunnel = id,
            data_plane = "uring",
            "uring: {op} on the {side} socket failed: errno {errno} ({err}); closing the tunnel as dataplane_error"
        );
    } else {
        tracing::debug!(tunnel = id, data_plane = "uring", "uring: {op} on the {side} socket: {err}");
    }
}

pub struct Worker {
    ring: IoUring,
    bufs: BufRing,
    sizing: Sizing,
    rx: mpsc::Receiver<Cmd>,
    wake_fd: Arc<OwnedFd>,
    /// Target of the eventfd read; boxed so its address is stable.
    wake_buf: Box<u64>,
    wake_armed: bool,
    shared: Arc<Shared>,
    tunnels: Vec<Option<Tun>>,
    free: Vec<u32>,
    by_id: HashMap<u64, u32>,
    timers: BinaryHeap<Reverse<(Instant, u32, u64)>>,
    pending: VecDeque<squeue::Entry>,
    cqes: Vec<(u64, i32, u32)>,
    stopping: bool,
    now: Instant,
    /// When to give the pool's pages back, set when the last tunnel ended.
    trim_at: Option<Instant>,
}

/// How long a worker stays without tunnels before its pool pages go back
/// to the system.
const TRIM_AFTER: Duration = Duration::from_secs(1);

impl Worker {
    /// Creates the ring and registers the buffer pool. Runs on the worker
    /// thread itself (the ring is set up for a single issuer).
    pub fn new(
        sizing: Sizing,
        rx: mpsc::Receiver<Cmd>,
        wake_fd: Arc<OwnedFd>,
        shared: Arc<Shared>,
    ) -> io::Result<Worker> {
        let ring = IoUring::builder()
            .setup_cqsize(sizing.ring_entries * 8)
            .setup_single_issuer()
            .setup_coop_taskrun()
            .build(sizing.ring_entries)?;
        let bufs = BufRing::new(sizing.buf_count, sizing.buf_size, 0)?;
        bufs.register(&ring.submitter())?;
        Ok(Worker {
            ring,
            bufs,
            sizing,
            rx,
            wake_fd,
            wake_buf: Box::new(0),
            wake_armed: false,
            shared,
            tunnels: Vec::new(),
            free: Vec::new(),
            by_id: HashMap::new(),
            timers: BinaryHeap::new(),
            pending: VecDeque::new(),
            cqes: Vec::with_capacity(256),
            stopping: false,
            now: Instant::now(),
            trim_at: None,
        })
    }

    /// Runs until [`Cmd::Stop`] and every tunnel is closed, or the ring fails.
    pub fn run(mut self) {
        self.arm_wake();
        let result = self.event_loop();
        self.shared.alive.store(false, Ordering::Release);
        if let Err(e) = result {
            tracing::error!("uring worker failed: {e}");
            // Operations may still be in flight: the kernel could write into
            // the buffers after we return, so they must never be unmapped,
            // nor a tunnel's heap buffers and queued chunks freed.
            for mut t in self.tunnels.iter_mut().filter_map(Option::take) {
                for dir in &mut t.dirs {
                    std::mem::forget(dir.heap.take());
                    std::mem::forget(std::mem::take(&mut dir.queue));
                }
                finish_reply(t, CloseReason::Error);
            }
            let Worker { ring, bufs, wake_buf, .. } = self;
            drop(ring);
            std::mem::forget(bufs);
            std::mem::forget(wake_buf);
        }
        // On a clean exit nothing is in flight; the ring drops before the
        // buffers (field order is irrelevant: no operation is pending).
    }

    fn event_loop(&mut self) -> io::Result<()> {
        loop {
            if self.stopping && self.by_id.is_empty() && !self.wake_armed {
                return Ok(());
            }
            self.flush_sq()?;
            let want = usize::from(self.pending.is_empty());
            let timeout = self.next_deadline().map(|d| d.saturating_duration_since(Instant::now()));
            let entered = match timeout {
                Some(t) => {
                    let ts = types::Timespec::new().sec(t.as_secs()).nsec(t.subsec_nanos());
                    let args = types::SubmitArgs::new().timespec(&ts);
                    self.ring.submitter().submit_with_args(want, &args)
                }
                None => self.ring.submitter().submit_and_wait(want),
            };
            match entered {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)) => {}
                Err(e) => return Err(e),
            }
            self.now = Instant::now();
            self.reap();
            self.expire_timers();
            self.maybe_trim();
        }
    }

    /// Pushes queued entries into the submission queue, submitting whenever
    /// it fills up.
    fn flush_sq(&mut self) -> io::Result<()> {
        // Bounded: each turn either pushes an entry or submits; a submit that
        // makes no room ends the flush (the rest waits for the next turn).
        while let Some(entry) = self.pending.front() {
            // SAFETY: every entry refers to memory that outlives the
            // operation: pool buffers (unmapped only after the ring is gone),
            // a tunnel's leftover Bytes (kept in its queue until the send
            // completes) and `wake_buf` (kept until its read completes).
            let pushed = unsafe { self.ring.submission().push(entry).is_ok() };
            if pushed {
                self.pending.pop_front();
                continue;
            }
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if matches!(e.raw_os_error(), Some(libc::EBUSY | libc::EAGAIN | libc::EINTR)) => return Ok(()),
                Err(e) => return Err(e),
            }
            if self.ring.submission().is_full() {
                return Ok(());
            }
        }
        Ok(())
    }

    fn next_deadline(&self) -> Option<Instant> {
        let timer = self.timers.peek().map(|Reverse((at, _, _))| *at);
        match (timer, self.trim_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Gives the pool's pages back once the worker sat without tunnels for
    /// [`TRIM_AFTER`]: no recv is armed and no buffer holds bytes then.
    fn maybe_trim(&mut self) {
        if let Some(at) = self.trim_at {
            if at <= self.now {
                self.trim_at = None;
                if self.by_id.is_empty() {
                    self.bufs.release_memory();
                }
            }
        }
    }

    fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        // A few passes (handlers make syscalls, which can post more
        // completions); what arrives after them waits for the next turn.
        for _ in 0..4 {
            cqes.clear();
            cqes.extend(self.ring.completion().map(|c| (c.user_data(), c.result(), c.flags())));
            if cqes.is_empty() {
                break;
            }
            for &(user_data, res, flags) in &cqes {
                self.on_cqe(user_data, res, flags);
            }
        }
        self.cqes = cqes;
    }

    fn arm_wake(&mut self) {
        let read =
            opcode::Read::new(types::Fd(self.wake_fd.as_raw_fd()), (&mut *self.wake_buf as *mut u64).cast::<u8>(), 8)
                .build()
                .user_data(WAKE_UD);
        self.pending.push_back(read);
        self.wake_armed = true;
    }

    fn on_cqe(&mut self, user_data: u64, res: i32, flags: u32) {
        if user_data == WAKE_UD {
            self.wake_armed = false;
            self.shared.took_commands();
            self.take_commands();
            if !self.stopping {
                self.arm_wake();
            }
            return;
        }
        let slot = (user_data >> 8) as u32;
        let d = ((user_data >> 4) & 0xf) as usize;
        let kind = user_data & 0xf;
        let Some(mut t) = self.tunnels.get_mut(slot as usize).and_then(Option::take) else {
            // Cannot happen (a slot is freed only with nothing in flight),
            // but never lose a buffer.
            if let Some(bid) = cqueue::buffer_select(flags) {
                self.bufs.provide(bid);
            }
            return;
        };
        match kind {
            KIND_RECV => self.on_recv(slot, &mut t, d, res, flags),
            KIND_SEND => self.on_send(slot, &mut t, d, res),
            _ => t.inflight -= 1,
        }
        self.settle(slot, t);
    }

    /// Puts a tunnel back in its slot, or finishes it when it is closing and
    /// nothing is in flight anymore.
    fn settle(&mut self, slot: u32, t: Tun) {
        if t.closing.is_some() && t.inflight == 0 {
            self.finish(slot, t);
        } else {
            self.tunnels[slot as usize] = Some(t);
        }
    }

    fn take_commands(&mut self) {
        // Bounded by what was sent before this turn (try_recv never waits).
        while let Ok(cmd) = self.rx.try_recv() {
            match cmd {
                Cmd::Start(job) => self.start(job),
                Cmd::Cancel(id) => {
                    if let Some(&slot) = self.by_id.get(&id) {
                        if let Some(mut t) = self.tunnels[slot as usize].take() {
                            self.close(slot, &mut t, CloseReason::Drain);
                            self.settle(slot, t);
                        }
                    }
                }
                Cmd::Stop => {
                    self.stopping = true;
                    let slots: Vec<u32> = self.by_id.values().copied().collect();
                    for slot in slots {
                        if let Some(mut t) = self.tunnels[slot as usize].take() {
                            self.close(slot, &mut t, CloseReason::Drain);
                            self.settle(slot, t);
                        }
                    }
                }
            }
        }
    }

    fn start(&mut self, job: Job) {
        if self.stopping {
            let t = Tun {
                id: job.id,
                fds: [job.client, job.backend],
                dirs: [Dir::new(Bytes::new()), Dir::new(Bytes::new())],
                inflight: 0,
                last_active: self.now,
                idle: job.idle_timeout,
                closing: None,
                reply: Some(job.reply),
            };
            for fd in &t.fds {
                abort(fd.as_raw_fd());
            }
            finish_reply(t, CloseReason::Drain);
            return;
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                self.tunnels.push(None);
                (self.tunnels.len() - 1) as u32
            }
        };
        let mut t = Tun {
            id: job.id,
            fds: [job.client, job.backend],
            dirs: [Dir::new(job.to_backend), Dir::new(job.to_client)],
            inflight: 0,
            last_active: self.now,
            idle: job.idle_timeout,
            closing: None,
            reply: Some(job.reply),
        };
        self.by_id.insert(t.id, slot);
        self.shared.load.fetch_add(1, Ordering::Relaxed);
        // An idle timeout too large to represent means no timeout.
        if let Some(at) = self.now.checked_add(t.idle) {
            self.timers.push(Reverse((at, slot, t.id)));
        }
        for d in 0..2 {
            self.arm_recv(slot, &mut t, d);
            self.kick_send(slot, &mut t, d);
        }
        self.settle(slot, t);
    }

    fn arm_recv(&mut self, slot: u32, t: &mut Tun, d: usize) {
        let fd = types::Fd(t.src(d));
        let user_data = ud(slot, d, KIND_RECV);
        let recv = if self.sizing.mshot_len_cap {
            // Let the kernel end this multishot recv by itself once it
            // received what the direction may still queue (at least one
            // buffer's worth).
            let mut recv = opcode::RecvMulti::new(fd, self.bufs.bgid()).build().user_data(user_data);
            let budget = (self.sizing.high_water).saturating_sub(t.dirs[d].queued).max(self.bufs.buf_size() as usize);
            set_multishot_limit(&mut recv, budget as u32);
            recv
        } else {
            // Without the cap (before 6.17; the field is `file_index` there
            // and setting it fails the recv with EINVAL) a multishot recv
            // takes up to 32 buffers in one go before a cancel lands (1 MiB
            // queued for one stalled direction on Debian's 6.1 and 6.12,
            // against the 384 KiB bound). A single-shot recv with a buffer
            // picked from the ring takes exactly one, and like the multishot
            // one holds none while it waits: re-armed per buffer, it keeps
            // the direction within its bound on every kernel.
            opcode::Recv::new(fd, std::ptr::null_mut(), self.bufs.buf_size())
                .buf_group(self.bufs.bgid())
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)
                .user_data(user_data)
        };
        self.pending.push_back(recv);
        t.dirs[d].recv = Recv::Armed;
        t.inflight += 1;
    }

    fn cancel_op(&mut self, slot: u32, t: &mut Tun, d: usize, kind: u64) {
        let cancel = opcode::AsyncCancel::new(ud(slot, d, kind)).build().user_data(ud(slot, d, KIND_CANCEL));
        self.pending.push_back(cancel);
        t.inflight += 1;
    }

    /// Starts sending the front chunk of direction `d` unless a send is in
    /// flight already.
    fn kick_send(&mut self, slot: u32, t: &mut Tun, d: usize) {
        let dst = t.dst(d);
        let dir = &mut t.dirs[d];
        if dir.sending || t.closing.is_some() {
            return;
        }
        let Some(front) = dir.queue.front() else {
            return;
        };
        let (ptr, len) = match front {
            Chunk::Leftover(b) => (b.as_ptr(), b.len()),
            Chunk::Pool { bid, len } => (self.bufs.addr(*bid).cast_const(), *len as usize),
            Chunk::Heap { buf, len } => (buf.bytes.as_ptr(), *len),
        };
        debug_assert!(dir.front_off < len);
        // SAFETY: front_off < len, so the pointer stays inside the chunk.
        // The chunk stays at the front of the queue (its pool buffer not
        // returned, its Bytes or heap buffer not dropped; moving the Box
        // does not move its heap block) until this send's completion is
        // reaped.
        let ptr = unsafe { ptr.add(dir.front_off) };
        let send = opcode::Send::new(types::Fd(dst), ptr, (len - dir.front_off) as u32)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(ud(slot, d, KIND_SEND));
        self.pending.push_back(send);
        dir.sending = true;
        t.inflight += 1;
    }

    fn on_recv(&mut self, slot: u32, t: &mut Tun, d: usize, res: i32, flags: u32) {
        match t.dirs[d].recv {
            Recv::Heap => return self.on_heap_recv(slot, t, d, res),
            Recv::Poll => return self.on_poll(slot, t, d, res),
            Recv::Off | Recv::Armed | Recv::Cancelling => {}
        }
        if !cqueue::more(flags) {
            t.inflight -= 1;
            t.dirs[d].recv = Recv::Off;
        }
        if res > 0 {
            let Some(bid) = cqueue::buffer_select(flags) else {
                tracing::warn!(
                    tunnel = t.id,
                    data_plane = "uring",
                    "uring: multishot recv on the {} socket returned {res} bytes without a buffer id; \
                     closing the tunnel as dataplane_error",
                    Direction::BOTH[d].source_name()
                );
                self.close(slot, t, CloseReason::Error);
                return;
            };
            let in_use = self.shared.bufs_in_use.fetch_add(1, Ordering::Relaxed) + 1;
            self.shared.bufs_peak.fetch_max(in_use, Ordering::Relaxed);
            if t.closing.is_some() {
                self.give_back(bid);
                return;
            }
            t.last_active = self.now;
            let dir = &mut t.dirs[d];
            dir.queue.push_back(Chunk::Pool { bid, len: res as u32 });
            dir.queued += res as usize;
            self.shared.queued_peak.fetch_max(dir.queued, Ordering::Relaxed);
            if dir.queued >= self.sizing.high_water && dir.recv == Recv::Armed {
                dir.recv = Recv::Cancelling;
                self.cancel_op(slot, t, d, KIND_RECV);
            }
            self.kick_send(slot, t, d);
        } else if res == 0 {
            t.dirs[d].eof = true;
        } else {
            match -res {
                libc::ECANCELED => {}
                // The pool is empty (other directions hold it all): read
                // what waits here without it, so a burst or a few stalled
                // readers cannot stall the worker's other tunnels.
                libc::ENOBUFS if t.closing.is_none() && t.dirs[d].queued <= self.sizing.low_water => {
                    self.recv_without_pool(slot, t, d, false)
                }
                libc::ENOBUFS => {}
                errno => {
                    if t.closing.is_none() {
                        self.op_failed(slot, t, "multishot recv", Direction::BOTH[d], errno);
                    }
                    return;
                }
            }
        }
        self.advance(slot, t, d);
    }

    /// Reads direction `d` while the pool is empty: the bytes waiting on its
    /// socket (at most [`HEAP_RECV`]) go into a heap buffer of exactly that
    /// size. With none waiting, a poll waits for readability first
    /// (`polled` once it fired: then the socket holds an EOF or an error,
    /// which a one-byte recv reports), so a direction whose peer is quiet
    /// holds no buffer. A 64-byte message costs 64 bytes of heap, not a
    /// fixed-size buffer: a burst over thousands of tunnels stays small.
    fn recv_without_pool(&mut self, slot: u32, t: &mut Tun, d: usize, polled: bool) {
        let src = t.src(d);
        // Unknown (the ioctl failed): read up to the cap, as any recv would.
        let waiting = inq(src).map_or(HEAP_RECV, |n| usize::try_from(n).unwrap_or(HEAP_RECV).min(HEAP_RECV));
        if waiting == 0 && !polled {
            let poll =
                opcode::PollAdd::new(types::Fd(src), libc::POLLIN as u32).build().user_data(ud(slot, d, KIND_RECV));
            self.pending.push_back(poll);
            t.dirs[d].recv = Recv::Poll;
            t.inflight += 1;
            return;
        }
        let dir = &mut t.dirs[d];
        let buf = dir.heap.insert(HeapBuf::new(waiting.max(1), &self.shared));
        let recv = opcode::Recv::new(types::Fd(src), buf.bytes.as_mut_ptr(), buf.bytes.len() as u32)
            .build()
            .user_data(ud(slot, d, KIND_RECV));
        self.pending.push_back(recv);
        dir.recv = Recv::Heap;
        t.inflight += 1;
        self.shared.heap_recvs.fetch_add(1, Ordering::Relaxed);
    }

    /// The poll of [`Worker::recv_without_pool`] fired: bytes (or an EOF, or
    /// an error) wait on the socket now.
    fn on_poll(&mut self, slot: u32, t: &mut Tun, d: usize, res: i32) {
        t.inflight -= 1;
        t.dirs[d].recv = Recv::Off;
        if t.closing.is_some() {
            return;
        }
        if res < 0 {
            self.op_failed(slot, t, "poll", Direction::BOTH[d], -res);
            return;
        }
        self.recv_without_pool(slot, t, d, true);
    }

    fn on_heap_recv(&mut self, slot: u32, t: &mut Tun, d: usize, res: i32) {
        t.inflight -= 1;
        let dir = &mut t.dirs[d];
        dir.recv = Recv::Off;
        let buf = dir.heap.take();
        if t.closing.is_some() {
            return;
        }
        match (res, buf) {
            (n, Some(buf)) if n > 0 => {
                t.last_active = self.now;
                dir.queue.push_back(Chunk::Heap { buf, len: n as usize });
                dir.queued += n as usize;
                self.shared.queued_peak.fetch_max(dir.queued, Ordering::Relaxed);
                self.kick_send(slot, t, d);
            }
            (0, _) => dir.eof = true,
            (n, _) if n == -libc::ECANCELED || n == -libc::EAGAIN => {}
            (n, _) => {
                let errno = if n < 0 { -n } else { libc::EFAULT };
                self.op_failed(slot, t, "recv into a heap buffer", Direction::BOTH[d], errno);
                return;
            }
        }
        self.advance(slot, t, d);
    }

    fn on_send(&mut self, slot: u32, t: &mut Tun, d: usize, res: i32) {
        t.inflight -= 1;
        t.dirs[d].sending = false;
        if res <= 0 {
            if t.closing.is_none() {
                // A send of at least one byte that sent none is the plane's
                // failure too (reported as EIO).
                let errno = if res < 0 { -res } else { libc::EIO };
                // The send's destination is the socket the other direction reads.
                self.op_failed(slot, t, "send", Direction::BOTH[d].opposite(), errno);
            }
            return;
        }
        let n = res as usize;
        t.last_active = self.now;
        let dir = &mut t.dirs[d];
        dir.moved += n as u64;
        dir.queued -= n;
        dir.front_off += n;
        if d == 0 {
            self.shared.counters.add(n as u64, 0);
        } else {
            self.shared.counters.add(0, n as u64);
        }
        let front_len = dir.queue.front().map_or(0, Chunk::len);
        if dir.front_off >= front_len {
            dir.front_off = 0;
            if let Some(Chunk::Pool { bid, .. }) = dir.queue.pop_front() {
                self.give_back(bid);
            }
        }
        if t.closing.is_some() {
            return;
        }
        self.kick_send(slot, t, d);
        self.advance(slot, t, d);
    }

    /// Re-arms a paused recv, turns a finished EOF into a half-close, and
    /// closes the tunnel once both directions are done.
    fn advance(&mut self, slot: u32, t: &mut Tun, d: usize) {
        if t.closing.is_some() {
            return;
        }
        let dir = &t.dirs[d];
        if dir.recv == Recv::Off && !dir.eof && dir.queued <= self.sizing.low_water {
            self.arm_recv(slot, t, d);
        }
        let dir = &mut t.dirs[d];
        if dir.eof && !dir.shut && dir.queue.is_empty() && !dir.sending {
            dir.shut = true;
            // Half-close: the destination sees FIN, the other way keeps
            // flowing. An error here (peer already gone) shows up on the
            // other direction's next operation.
            let _ = SockRef::from(&t.fds[1 - d]).shutdown(std::net::Shutdown::Write);
        }
        if t.dirs[0].shut && t.dirs[1].shut {
            self.close(slot, t, CloseReason::Done);
        }
    }

    /// Closes a tunnel after `op` failed with `errno` on the socket that
    /// `reader` reads: that side's reset if the peer caused it, else the
    /// plane's own error; logged either way ([`log_failed`]).
    fn op_failed(&mut self, slot: u32, t: &mut Tun, op: &str, reader: Direction, errno: i32) {
        let reason = failed(errno, reader.source_failed());
        log_failed(t.id, op, reader.source_name(), errno, reason);
        self.close(slot, t, reason);
    }

    /// Starts closing a tunnel: resets both sides if `reason` is a reset,
    /// and cancels whatever is in flight. [`Worker::settle`] finishes it
    /// once the last completion came back.
    fn close(&mut self, slot: u32, t: &mut Tun, reason: CloseReason) {
        if t.closing.is_some() {
            return;
        }
        t.closing = Some(reason);
        // A plane error and the drain deadline reset both sides too: a
        // stream cut short must never look complete.
        if reason.resets() {
            for fd in &t.fds {
                abort(fd.as_raw_fd());
            }
        }
        for d in 0..2 {
            if t.dirs[d].recv != Recv::Off {
                self.cancel_op(slot, t, d, KIND_RECV);
            }
            if t.dirs[d].sending {
                self.cancel_op(slot, t, d, KIND_SEND);
            }
        }
    }

    /// Returns a tunnel's buffers, closes its sockets and reports its outcome.
    fn finish(&mut self, slot: u32, mut t: Tun) {
        for dir in &mut t.dirs {
            for chunk in dir.queue.drain(..) {
                if let Chunk::Pool { bid, .. } = chunk {
                    self.give_back(bid);
                }
            }
        }
        self.by_id.remove(&t.id);
        self.free.push(slot);
        self.shared.load.fetch_sub(1, Ordering::Relaxed);
        if self.by_id.is_empty() {
            self.trim_at = Some(self.now + TRIM_AFTER);
        }
        let reason = t.closing.unwrap_or(CloseReason::Error);
        finish_reply(t, reason);
    }

    fn give_back(&mut self, bid: u16) {
        self.bufs.provide(bid);
        self.shared.bufs_in_use.fetch_sub(1, Ordering::Relaxed);
    }

    /// Closes tunnels idle past their timeout; re-queues the others.
    fn expire_timers(&mut self) {
        // Bounded: every tunnel has at most one timer entry, and an entry
        // popped here is either dropped or pushed back with a later deadline.
        let mut later = Vec::new();
        while let Some(&Reverse((at, slot, id))) = self.timers.peek() {
            if at > self.now {
                break;
            }
            self.timers.pop();
            let Some(mut t) = self.tunnels.get_mut(slot as usize).and_then(Option::take) else {
                continue;
            };
            if t.id != id || t.closing.is_some() {
                self.tunnels[slot as usize] = Some(t);
                continue;
            }
            let Some(deadline) = t.last_active.checked_add(t.idle) else {
                self.settle(slot, t);
                continue;
            };
            if deadline <= self.now {
                self.close(slot, &mut t, CloseReason::Idle);
            } else {
                later.push(Reverse((deadline, slot, id)));
            }
            self.settle(slot, t);
        }
        self.timers.extend(later);
        // Finished tunnels leave their entries behind; drop them once they
        // outnumber the live tunnels, so churn cannot grow the heap.
        if self.timers.len() > 2 * self.by_id.len() + 64 {
            let tunnels = &self.tunnels;
            self.timers
                .retain(|Reverse((_, slot, id))| matches!(tunnels.get(*slot as usize), Some(Some(t)) if t.id == *id));
        }
    }
}

/// Sets the total byte limit of a multishot recv (`sqe->optlen`, kernel
/// 6.17+, "io_uring/net: Support multishot receive len cap"): the kernel
/// ends the request (a CQE without `F_MORE`) once it received that much, so
/// a fast sender cannot take many pool buffers before a cancel arrives.
/// Older kernels do not ignore the field: it is `file_index` there, and
/// RECV fails with EINVAL when it is set — call this only where
/// [`super::Features::mshot_len_cap`] was probed. Without it the cancel at
/// the high-water mark bounds the direction (less tightly).
pub(super) fn set_multishot_limit(entry: &mut squeue::Entry, limit: u32) {
    const _: () = assert!(std::mem::size_of::<squeue::Entry>() == 64);
    // Offset of the `splice_fd_in / file_index / optlen` union in the
    // kernel's `struct io_uring_sqe` (uapi; fixed since 5.x).
    const OPTLEN_OFFSET: usize = 44;
    // SAFETY: `squeue::Entry` is `#[repr(C)]` around the uapi
    // `io_uring_sqe` (64 bytes, asserted above); bytes 44..48 are the u32
    // `optlen` field. The write is unaligned-safe and stays inside `entry`.
    unsafe {
        let base = (entry as *mut squeue::Entry).cast::<u8>();
        base.add(OPTLEN_OFFSET).cast::<u32>().write_unaligned(limit);
    }
}

/// Closes a finished tunnel's sockets (with an RST when `SO_LINGER 0` was
/// set), then reports its outcome.
fn finish_reply(t: Tun, reason: CloseReason) {
    let Tun { fds, dirs, reply, .. } = t;
    drop(fds);
    let outcome = Outcome { to_backend: dirs[0].moved, to_client: dirs[1].moved, reason };
    if let Some(reply) = reply {
        // The relay future may be gone (cancelled); nothing to report then.
        let _ = reply.send(outcome);
    }
}
