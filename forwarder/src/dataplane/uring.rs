//! `uring`: upgraded tunnels relayed by io_uring workers.
//!
//! After the handshake a tunnel's two sockets move (as owned fds) to one of
//! N worker threads, each owning an io_uring instance, a provided-buffer ring
//! and its tunnels (see [`worker`] for the per-tunnel state machine). Bytes
//! move by multishot recv into the shared buffer ring plus send, which the
//! kernel runs inline, and the submissions of all tunnels of a worker are
//! batched into one `io_uring_enter` per loop turn. The async side only sends
//! the pair over a channel, wakes the worker through an eventfd and awaits
//! the outcome; drain (or dropping the relay future) becomes a cancel.
//!
//! Memory: each worker maps a pool of 16 MiB in buffers of
//! `data_plane.uring_buffer` bytes once; an idle tunnel holds none, a
//! direction with a slow reader at most [`UringPlane::direction_limit`].
//! When the pool runs dry (a burst of small messages over many tunnels takes
//! a whole buffer per message; many stalled readers hold it), a direction
//! reads the bytes waiting on its socket into a heap buffer of exactly that
//! size (at most 16 KiB; ENOBUFS path), or polls first when none wait, so
//! the worker's other tunnels keep moving and a quiet tunnel holds nothing;
//! each direction stays bounded either way. The pool's pages go back to the
//! system after a worker spent a second without tunnels.
//!
//! Why not IORING_OP_SPLICE: measured on this kernel (6.18; the benches in
//! `tests/uring.rs`), a splice prototype moved one bulk stream a little
//! faster than recv + send on this 2-core machine, but every splice waiting
//! on a socket or an empty pipe parks a kernel io-wq thread (64 idle
//! one-way tunnels: +128 threads, against +0 here), and a non-blocking
//! variant needs a poll and an io-wq hop per chunk. Multishot recv + send
//! stays inline and batches: 0.1–0.15 `io_uring_enter` per relayed message
//! with 200 busy tunnels, against ~3 syscalls per message for the copy
//! plane. Fewer syscalls did not buy less CPU on loopback, though: end to
//! end (WebSocket echo, 200 connections, 60k msg/s) the router used about
//! the same CPU as with copy (kernel TCP and wakeups dominate), with a lower
//! median latency; one bulk stream moves about as fast as copy.

mod bufring;
mod worker;

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;

use io_uring::{opcode, IoUring};
use tokio::sync::oneshot;

use super::{selftest, ByteCounters, CloseReason, DataPlane, Mode, Outcome, PlaneError, Rejected, Settings, Tunnel};
use worker::{Cmd, Job, Shared, Sizing, Worker};

/// Bytes of pool buffers per worker (mapped once, touched only as used,
/// given back after a second without tunnels).
const POOL_BYTES: u64 = 16 << 20;
/// Submission queue entries per worker (the completion queue is 8x).
const RING_ENTRIES: u32 = 1024;

/// What the running kernel's io_uring does, found by trying it (never by
/// its version: distributions backport).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Features {
    /// A multishot recv takes a total length cap in `sqe->optlen` (upstream
    /// 6.17, "io_uring/net: Support multishot receive len cap"). Before
    /// that the same bytes are `file_index`, which RECV must leave zero:
    /// setting it fails every recv with EINVAL (Debian's 6.1 and 6.12).
    pub mshot_len_cap: bool,
    /// The errno the kernel refused the capped recv with, if it did.
    pub mshot_len_cap_errno: Option<i32>,
}

impl Features {
    /// One line for logs and `upsplice check`.
    pub fn describe(&self) -> String {
        match (self.mshot_len_cap, self.mshot_len_cap_errno) {
            (true, _) => "multishot recv length cap: yes".into(),
            (false, Some(errno)) => format!(
                "multishot recv length cap: no (a capped recv failed: {}; the plane recvs one buffer at a time instead)",
                io::Error::from_raw_os_error(errno)
            ),
            (false, None) => "multishot recv length cap: not probed".into(),
        }
    }
}

/// What this kernel's io_uring supports of what the plane uses; an error
/// names what is missing.
pub fn probe_features() -> Result<Features, PlaneError> {
    let disabled = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|_| "0".into());
    if disabled == "2" {
        return Err(PlaneError::Unsupported("io_uring is disabled (sysctl kernel.io_uring_disabled = 2)".into()));
    }
    let mut ring = IoUring::new(8).map_err(PlaneError::io(if disabled == "0" {
        "io_uring_setup failed".to_owned()
    } else {
        format!(
            "io_uring_setup failed (sysctl kernel.io_uring_disabled = {disabled}: \
             only CAP_SYS_ADMIN or kernel.io_uring_group may create rings)"
        )
    }))?;
    if !ring.params().is_feature_ext_arg() {
        return Err(PlaneError::Unsupported("io_uring lacks IORING_FEAT_EXT_ARG (timed waits)".into()));
    }
    let mut p = io_uring::Probe::new();
    ring.submitter().register_probe(&mut p).map_err(PlaneError::io("IORING_REGISTER_PROBE failed"))?;
    for (code, name) in [
        (opcode::RecvMulti::CODE, "RECV"),
        (opcode::Send::CODE, "SEND"),
        (opcode::AsyncCancel::CODE, "ASYNC_CANCEL"),
        (opcode::Read::CODE, "READ"),
        (opcode::PollAdd::CODE, "POLL_ADD"),
    ] {
        if !p.is_supported(code) {
            return Err(PlaneError::Unsupported(format!("io_uring opcode IORING_OP_{name} is not supported")));
        }
    }
    // One buffer ring per attempt (group ids 0 and 1): an attempt takes a
    // buffer and does not give it back, and a second attempt on an empty
    // ring fails with ENOBUFS whatever the kernel supports (seen on 6.18).
    let plain_bufs = bufring::BufRing::new(2, 4096, 0).map_err(PlaneError::io("mmap failed"))?;
    plain_bufs.register(&ring.submitter()).map_err(PlaneError::io("IORING_REGISTER_PBUF_RING failed"))?;
    let capped_bufs = bufring::BufRing::new(2, 4096, 1).map_err(PlaneError::io("mmap failed"))?;
    capped_bufs.register(&ring.submitter()).map_err(PlaneError::io("IORING_REGISTER_PBUF_RING failed"))?;
    let plain = try_multishot_recv(&mut ring, &plain_bufs, None);
    let capped = plain.as_ref().ok().map(|_| try_multishot_recv(&mut ring, &capped_bufs, Some(4096)));
    // The ring goes first: no operation may outlive the buffers.
    drop(ring);
    drop(plain_bufs);
    drop(capped_bufs);
    match plain {
        Ok(()) => {}
        Err(errno) => {
            return Err(PlaneError::io("a multishot recv into a provided buffer ring failed")(
                io::Error::from_raw_os_error(errno),
            ))
        }
    }
    let capped = capped.unwrap_or(Err(0));
    Ok(Features { mshot_len_cap: capped.is_ok(), mshot_len_cap_errno: capped.err().filter(|&e| e != 0) })
}

/// Arms one multishot recv (with a total length cap when `cap` is set) on
/// a socket pair holding one byte followed by EOF, and reaps it to its
/// final completion; `Err(errno)` if the kernel refused it.
fn try_multishot_recv(ring: &mut IoUring, bufs: &bufring::BufRing, cap: Option<u32>) -> Result<(), i32> {
    let (mut near, far) = std::os::unix::net::UnixStream::pair().map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
    std::io::Write::write_all(&mut near, b"x").map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
    near.shutdown(std::net::Shutdown::Write).map_err(|e| e.raw_os_error().unwrap_or(libc::EIO))?;
    let mut recv = opcode::RecvMulti::new(io_uring::types::Fd(far.as_raw_fd()), bufs.bgid()).build().user_data(7);
    if let Some(cap) = cap {
        worker::set_multishot_limit(&mut recv, cap);
    }
    // SAFETY: the recv writes only into the registered buffer ring, which
    // outlives the ring (the caller drops the ring first).
    unsafe { ring.submission().push(&recv).map_err(|_| libc::EBUSY)? };
    // Bounded: one byte then EOF end the recv in two completions; each
    // wait is capped at a second and there are at most four.
    let mut result = Err(libc::ETIME);
    for _ in 0..4 {
        let ts = io_uring::types::Timespec::new().sec(1);
        let args = io_uring::types::SubmitArgs::new().timespec(&ts);
        match ring.submitter().submit_with_args(1, &args) {
            Ok(_) => {}
            Err(e) if matches!(e.raw_os_error(), Some(libc::ETIME | libc::EINTR)) => {}
            Err(e) => return Err(e.raw_os_error().unwrap_or(libc::EIO)),
        }
        let mut done = false;
        for cqe in ring.completion() {
            let res = cqe.result();
            if res < 0 {
                result = Err(-res);
            } else if result.is_err() || res > 0 {
                result = Ok(());
            }
            done |= !io_uring::cqueue::more(cqe.flags());
        }
        if done {
            return result;
        }
    }
    result
}

/// Pool layout for buffers of `buf_size` bytes: [`POOL_BYTES`] per worker
/// (at least 16 buffers), a direction pauses at two buffers queued and
/// resumes at one.
fn sizing(buf_size: u64, features: Features) -> Result<Sizing, PlaneError> {
    if !(4096..=1 << 20).contains(&buf_size) || !buf_size.is_power_of_two() {
        return Err(PlaneError::Settings(format!(
            "uring_buffer = {buf_size}: must be a power of two between 4KiB and 1MiB"
        )));
    }
    let count = (POOL_BYTES / buf_size).clamp(16, 32768) as u16;
    Ok(Sizing {
        ring_entries: RING_ENTRIES,
        buf_count: count,
        buf_size: buf_size as u32,
        high_water: 2 * buf_size as usize,
        low_water: buf_size as usize,
        mshot_len_cap: features.mshot_len_cap,
    })
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".into())
}

/// The async side's handle on one worker thread.
struct WorkerHandle {
    tx: mpsc::Sender<Cmd>,
    wake: Arc<OwnedFd>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl WorkerHandle {
    fn send(&self, cmd: Cmd) -> Result<(), Cmd> {
        self.tx.send(cmd).map_err(|e| e.0)?;
        if self.shared.needs_wake() {
            wake(&self.wake);
        }
        Ok(())
    }
}

struct DeadOnExit(Arc<Shared>);

impl Drop for DeadOnExit {
    fn drop(&mut self) {
        self.0.alive.store(false, Ordering::Release);
    }
}

/// Adds 1 to an eventfd, waking the worker blocked on its read.
fn wake(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live local to an eventfd we own.
    unsafe {
        libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8);
    }
}

pub struct UringPlane {
    workers: Vec<WorkerHandle>,
    sizing: Sizing,
    counters: Arc<ByteCounters>,
    next_id: AtomicU64,
    self_test: selftest::Report,
    features: Features,
}

impl DataPlane for UringPlane {
    const MODE: Mode = Mode::Uring;

    /// Whether this kernel and build can run the uring plane.
    fn probe() -> Result<(), PlaneError> {
        probe_features().map(|_| ())
    }

    /// Starts `cfg.uring_workers` workers (0: one per core), each with its
    /// own ring and buffer pool, and runs the self-test through them; fails
    /// with the reason if any cannot start or a check fails.
    fn start(cfg: &Settings) -> Result<Self, PlaneError> {
        let features = probe_features()?;
        let n = match cfg.uring_workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        };
        let sizing = sizing(cfg.uring_buffer, features)?;
        let counters = Arc::new(ByteCounters::default());
        let mut plane = UringPlane {
            workers: Vec::with_capacity(n),
            sizing,
            counters: counters.clone(),
            next_id: AtomicU64::new(1),
            self_test: selftest::Report { checks: Vec::new() },
            features,
        };
        for i in 0..n {
            // A blocking eventfd: io_uring waits on it by polling.
            // SAFETY: eventfd has no memory arguments; the result is checked.
            let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
            if raw < 0 {
                return Err(PlaneError::io("eventfd")(io::Error::last_os_error()));
            }
            // SAFETY: `raw` is a fresh fd nobody else owns.
            let wake_fd = Arc::new(unsafe { OwnedFd::from_raw_fd(raw) });
            let shared = Arc::new(Shared {
                counters: counters.clone(),
                load: AtomicUsize::new(0),
                alive: AtomicBool::new(true),
                bufs_in_use: AtomicUsize::new(0),
                bufs_peak: AtomicUsize::new(0),
                queued_peak: AtomicUsize::new(0),
                heap_recvs: AtomicUsize::new(0),
                heap_bytes: AtomicUsize::new(0),
                heap_bytes_peak: AtomicUsize::new(0),
                woken: AtomicBool::new(false),
            });
            let (tx, rx) = mpsc::channel();
            let (ready_tx, ready_rx) = mpsc::sync_channel(1);
            let (w_fd, w_shared) = (wake_fd.clone(), shared.clone());
            let thread = std::thread::Builder::new()
                .name(format!("uring-{i}"))
                .spawn(move || {
                    // Marks the worker dead however the thread ends (even by
                    // a panic), so no new tunnel is sent to it.
                    let _dead_on_exit = DeadOnExit(w_shared.clone());
                    match Worker::new(sizing, rx, w_fd, w_shared) {
                        Ok(w) => {
                            let _ = ready_tx.send(Ok(()));
                            w.run();
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                        }
                    }
                })
                .map_err(PlaneError::io("spawning uring worker"))?;
            let started = ready_rx.recv().unwrap_or_else(|_| Err(io::Error::other("worker exited during setup")));
            plane.workers.push(WorkerHandle { tx, wake: wake_fd, shared, thread: Some(thread) });
            started.map_err(PlaneError::io(format!("uring worker {i}")))?;
        }
        if !features.mshot_len_cap {
            tracing::info!(
                "kernel {}: io_uring has no multishot recv length cap (upstream 6.17; {}): a slow \
                 reader's direction is bounded by cancelling its recv, which can overshoot by \
                 up to about 32 buffers",
                kernel_release(),
                features.describe()
            );
        }
        // Carry no tunnel before the plane relayed the self-test's tunnels
        // correctly on this kernel.
        let report = selftest::run_blocking(|t| plane.relay(t));
        if let Some(why) = report.failure() {
            return Err(PlaneError::SelfTest(format!("kernel {}: {why}", kernel_release())));
        }
        plane.self_test = report;
        plane.reset_stats();
        tracing::info!(
            workers = n,
            buffers = sizing.buf_count,
            buffer_size = sizing.buf_size,
            mshot_len_cap = features.mshot_len_cap,
            "uring data plane started (multishot recv + provided buffer ring), {}; {}",
            plane.self_test,
            features.describe()
        );
        Ok(plane)
    }

    fn startup_report(&self) -> String {
        format!("{}; {}", self.self_test, self.features.describe())
    }

    /// Relays `t` on a worker until it ends. Hands it back only when no
    /// worker is alive.
    async fn relay(&self, t: Tunnel) -> Result<Outcome, Rejected> {
        let Some(worker) = self.pick() else {
            return Err(Rejected::untouched(t, "no uring worker is running"));
        };
        let Tunnel { client, backend, to_backend, to_client, idle_timeout, drain, .. } = t;
        let (client, backend) = match (into_fd(client), into_fd(backend)) {
            (Ok(c), Ok(b)) => (c, b),
            (c, b) => {
                tracing::warn!("uring: cannot take the sockets off tokio: {:?} {:?}", c.err(), b.err());
                return Ok(Outcome { to_backend: 0, to_client: 0, reason: CloseReason::Error });
            }
        };
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (reply, mut outcome) = oneshot::channel();
        let job = Job { id, client, backend, to_backend, to_client, idle_timeout, reply };
        if let Err(Cmd::Start(job)) = worker.send(Cmd::Start(job)) {
            // The worker died between pick and send: give the tunnel back.
            return match rebuild(job, drain) {
                Ok(tunnel) => Err(Rejected::untouched(tunnel, "uring worker stopped")),
                Err(_) => Ok(Outcome { to_backend: 0, to_client: 0, reason: CloseReason::Error }),
            };
        }
        let mut guard = CancelOnDrop { worker, id, armed: true };
        let result = tokio::select! {
            r = &mut outcome => r,
            _ = drain.cancelled() => {
                guard.cancel();
                outcome.await
            }
        };
        guard.armed = false;
        Ok(result.unwrap_or(Outcome { to_backend: 0, to_client: 0, reason: CloseReason::Error }))
    }

    fn bytes_relayed(&self) -> (u64, u64) {
        self.counters.load()
    }
}

impl UringPlane {
    /// What the startup self-test found (every check passed, or `start` failed).
    pub fn self_test(&self) -> &selftest::Report {
        &self.self_test
    }

    /// What the startup probe found this kernel's io_uring does.
    pub fn features(&self) -> Features {
        self.features
    }

    /// Forgets what the self-test's tunnels moved: counters and peaks
    /// describe real tunnels only.
    fn reset_stats(&self) {
        self.counters.reset();
        for w in &self.workers {
            w.shared.bufs_peak.store(0, Ordering::Relaxed);
            w.shared.queued_peak.store(0, Ordering::Relaxed);
            w.shared.heap_recvs.store(0, Ordering::Relaxed);
            w.shared.heap_bytes_peak.store(0, Ordering::Relaxed);
        }
    }

    /// Bytes of pool buffers holding data now, summed over the workers, and
    /// the highest any single worker reached (for tests and diagnostics).
    pub fn buffered_bytes(&self) -> (usize, usize) {
        let mut now = 0;
        let mut peak = 0;
        for w in &self.workers {
            now += w.shared.bufs_in_use.load(Ordering::Relaxed);
            peak = peak.max(w.shared.bufs_peak.load(Ordering::Relaxed));
        }
        let size = self.sizing.buf_size as usize;
        (now * size, peak * size)
    }

    /// How many recvs read into a heap buffer because a worker's pool was
    /// empty (a burst of small messages over many tunnels, or many stalled
    /// readers; see `data_plane.uring_buffer`).
    pub fn heap_recvs(&self) -> usize {
        self.workers.iter().map(|w| w.shared.heap_recvs.load(Ordering::Relaxed)).sum()
    }

    /// Bytes of those heap buffers allocated now, summed over the workers,
    /// and the highest any single worker reached (for tests and diagnostics).
    pub fn heap_buffered_bytes(&self) -> (usize, usize) {
        let now = self.workers.iter().map(|w| w.shared.heap_bytes.load(Ordering::Relaxed)).sum();
        let peak = self.workers.iter().map(|w| w.shared.heap_bytes_peak.load(Ordering::Relaxed)).max().unwrap_or(0);
        (now, peak)
    }

    /// The most bytes one direction of a tunnel queued at once so far, on
    /// any worker (for tests and diagnostics).
    pub fn queued_peak(&self) -> usize {
        self.workers.iter().map(|w| w.shared.queued_peak.load(Ordering::Relaxed)).max().unwrap_or(0)
    }

    /// The most bytes one direction of a tunnel queues while its reader is
    /// slow: a multishot recv is armed with a byte budget that ends at the
    /// high-water mark (at least one buffer's worth), and cancelled there.
    ///
    /// Pool memory is another matter: each recv completion takes a whole
    /// buffer, however few bytes it carries (a 64 KiB loopback segment fills
    /// half of a 128 KiB buffer), so a stalled direction may hold up to
    /// about twice this in buffers; the pool ([`POOL_BYTES`] per worker)
    /// bounds the total, and recvs go to small heap buffers once it is
    /// empty so that other tunnels keep moving.
    pub fn direction_limit(&self) -> usize {
        self.sizing.high_water + self.sizing.buf_size as usize
    }

    /// The live worker with the fewest tunnels.
    fn pick(&self) -> Option<&WorkerHandle> {
        self.workers
            .iter()
            .filter(|w| w.shared.alive.load(Ordering::Acquire))
            .min_by_key(|w| w.shared.load.load(Ordering::Relaxed))
    }
}

impl Drop for UringPlane {
    fn drop(&mut self) {
        for w in &self.workers {
            let _ = w.send(Cmd::Stop);
        }
        for w in &mut self.workers {
            if let Some(t) = w.thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// Cancels a tunnel on its worker if the relay future goes away (or drain
/// fires) before the outcome arrived.
struct CancelOnDrop<'a> {
    worker: &'a WorkerHandle,
    id: u64,
    armed: bool,
}

impl CancelOnDrop<'_> {
    fn cancel(&mut self) {
        if std::mem::take(&mut self.armed) {
            let _ = self.worker.send(Cmd::Cancel(self.id));
        }
    }
}

impl Drop for CancelOnDrop<'_> {
    fn drop(&mut self) {
        self.cancel();
    }
}

/// Takes a socket off tokio's reactor as an fd for a worker. It stays
/// non-blocking: io_uring's send and recv take their blocking mode from
/// the operation (they try without waiting, then arm a poll), never from
/// the file's `O_NONBLOCK` (`io_uring/net.c`, 6.1 to 6.18), so making it
/// blocking, as the plane did, cost two `ioctl(FIONBIO)` per tunnel (and
/// two more to give one back) for nothing. The conformance suite runs
/// this plane on 6.1 and 6.12 (`scripts/vm-test`).
fn into_fd(s: tokio::net::TcpStream) -> std::io::Result<OwnedFd> {
    Ok(OwnedFd::from(s.into_std()?))
}

/// Turns a job that never reached a worker back into a tunnel.
fn rebuild(job: Job, drain: tokio_util::sync::CancellationToken) -> std::io::Result<Tunnel> {
    // Still non-blocking ([`into_fd`]), as tokio needs it.
    let back = |fd: OwnedFd| tokio::net::TcpStream::from_std(std::net::TcpStream::from(fd));
    Ok(Tunnel {
        client: back(job.client)?,
        backend: back(job.backend)?,
        to_backend: job.to_backend,
        to_client: job.to_client,
        idle_timeout: job.idle_timeout,
        drain,
        promote: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The probe's answer about the length cap matches one capped recv
    /// tried alone on a fresh ring (the probe once tried it on a buffer
    /// ring the first attempt had emptied and said "no" on 6.18).
    #[test]
    fn the_length_cap_probe_matches_a_lone_attempt() {
        let Ok(features) = probe_features() else {
            println!("SKIPPED: io_uring unavailable here");
            return;
        };
        let mut ring = IoUring::new(8).expect("ring");
        let bufs = bufring::BufRing::new(2, 4096, 0).expect("buffers");
        bufs.register(&ring.submitter()).expect("register");
        let alone = try_multishot_recv(&mut ring, &bufs, Some(4096));
        drop(ring);
        assert_eq!(features.mshot_len_cap, alone.is_ok(), "probe {features:?}, a lone capped recv {alone:?}");
        assert_eq!(features.mshot_len_cap_errno, alone.err());
    }
}
