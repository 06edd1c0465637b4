//! `splice`: zero-copy relay through a kernel pipe, driven by readiness.
//!
//! Each direction borrows a pipe from a shared pool when its source becomes
//! readable, splices socket → pipe → socket until the source would block and
//! the pipe is empty, and gives the pipe back (see [`super::pair`]). The
//! payload never enters userspace and an idle tunnel holds no pipe. When the
//! pool is exhausted (`data_plane.max_pipes`, or pipe2 fails for want of
//! fds) that burst goes through a pooled userspace buffer instead: a tunnel
//! never fails for want of a pipe.
//!
//! Backpressure: a pipe is filled only when empty and drained before the
//! source is read again, so a direction holds at most one pipe's worth.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};

use super::copy::BufferPool;
use super::pair::{self, Resources};
use super::{selftest, ByteCounters, DataPlane, Mode, Outcome, PlaneError, Rejected, Settings, Tunnel};

/// Empty pipes kept open for reuse; beyond it a returned pipe is closed.
const KEEP_IDLE_PIPES: usize = 256;

/// `SPLICE_F_MOVE` is a hint the kernel ignores today; NONBLOCK makes the
/// pipe side never block (the socket side is non-blocking already).
const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_NONBLOCK.union(SpliceFFlags::SPLICE_F_MOVE);

/// A non-blocking pipe and its capacity.
pub struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
    cap: usize,
}

impl Pipe {
    fn new(size: Option<u64>) -> io::Result<Pipe> {
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        if let Some(size) = size {
            // The kernel rounds up to a power of two pages and caps it at
            // /proc/sys/fs/pipe-max-size for unprivileged processes.
            fcntl(&w, FcntlArg::F_SETPIPE_SZ(size as i32))?;
        }
        let cap = fcntl(&w, FcntlArg::F_GETPIPE_SZ)? as usize;
        Ok(Pipe { r, w, cap })
    }

    /// Splices from a socket into this (empty) pipe, up to its capacity.
    pub fn splice_in(&self, src: BorrowedFd<'_>) -> io::Result<usize> {
        Ok(splice(src, None, self.w.as_fd(), None, self.cap, FLAGS)?)
    }

    /// Splices up to `len` bytes from this pipe into a socket.
    pub fn splice_out(&self, dst: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
        Ok(splice(self.r.as_fd(), None, dst, None, len, FLAGS)?)
    }
}

/// Pipes shared by every tunnel of the plane, at most `max` open at once.
pub struct PipePool {
    size: Option<u64>,
    max: usize,
    open: AtomicUsize,
    idle: Mutex<Vec<Pipe>>,
}

impl PipePool {
    /// An empty pipe, or None when `max` are in use (or pipe2 fails).
    pub fn take(&self) -> Option<Pipe> {
        if let Some(p) = self.idle.lock().expect("pipe pool lock").pop() {
            return Some(p);
        }
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        match Pipe::new(self.size) {
            Ok(p) => Some(p),
            Err(e) => {
                self.open.fetch_sub(1, Ordering::Relaxed);
                tracing::warn!("cannot open a pipe ({e}); copying this burst");
                None
            }
        }
    }

    /// Takes back an empty pipe.
    pub fn give(&self, pipe: Pipe) {
        let mut idle = self.idle.lock().expect("pipe pool lock");
        if idle.len() < KEEP_IDLE_PIPES {
            idle.push(pipe);
        } else {
            drop(idle);
            self.discard(pipe);
        }
    }

    /// Closes a pipe that may still hold bytes (its tunnel failed).
    pub fn discard(&self, pipe: Pipe) {
        drop(pipe);
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct SplicePlane {
    pipes: PipePool,
    buffers: BufferPool,
    counters: ByteCounters,
    /// What the self-test at start passed.
    self_test: String,
}

impl DataPlane for SplicePlane {
    const MODE: Mode = Mode::Splice;

    /// Can this kernel splice? Moves one byte between two pipes.
    fn probe() -> Result<(), PlaneError> {
        let a = Pipe::new(None).map_err(PlaneError::io("pipe2"))?;
        let b = Pipe::new(None).map_err(PlaneError::io("pipe2"))?;
        nix::unistd::write(&a.w, b"x").map_err(|e| PlaneError::io("write to a pipe")(e.into()))?;
        match splice(a.r.as_fd(), None, b.w.as_fd(), None, 1, SpliceFFlags::SPLICE_F_NONBLOCK) {
            Ok(1) => Ok(()),
            Ok(n) => Err(PlaneError::Unsupported(format!("splice moved {n} bytes instead of 1"))),
            Err(e) => Err(PlaneError::io("splice(2) failed")(e.into())),
        }
    }

    /// Opens a pipe of the configured size, then relays the self-test's
    /// tunnels: it carries no tunnel before that passed on this kernel.
    fn start(cfg: &Settings) -> Result<SplicePlane, PlaneError> {
        SplicePlane::probe()?;
        // Open one pipe of the configured size now so a bad size fails at start.
        Pipe::new(cfg.pipe_size).map_err(PlaneError::io("a pipe of data_plane.pipe_size"))?;
        let mut plane = SplicePlane {
            pipes: PipePool {
                size: cfg.pipe_size,
                max: cfg.max_pipes,
                open: AtomicUsize::new(0),
                idle: Mutex::new(Vec::new()),
            },
            buffers: BufferPool::new(cfg.copy_buffer as usize),
            counters: ByteCounters::default(),
            self_test: String::new(),
        };
        let report = selftest::run_blocking(|t| plane.relay(t));
        if let Some(why) = report.failure() {
            return Err(PlaneError::SelfTest(why));
        }
        // The self-test's bytes are not traffic.
        plane.counters.reset();
        plane.self_test = report.to_string();
        Ok(plane)
    }

    fn startup_report(&self) -> String {
        self.self_test.clone()
    }

    /// Splice takes every tunnel: without a pipe it copies that burst.
    async fn relay(&self, t: Tunnel) -> Result<Outcome, Rejected> {
        Ok(pair::drive(t, Resources { buffers: &self.buffers, pipes: Some(&self.pipes) }, &self.counters).await)
    }

    fn bytes_relayed(&self) -> (u64, u64) {
        self.counters.load()
    }
}
