//! The resources a connection pair moves bytes with ([`super::pair`]):
//! userspace buffers (copy, and splice when it runs out of pipes) and
//! kernel pipes (splice), each pooled, so an idle tunnel holds neither.

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};

/// Buffers kept for reuse at most; more in flight are allocated and freed.
const POOL_KEEP: usize = 256;

/// A pool of equally sized buffers.
pub struct BufferPool {
    size: usize,
    free: Mutex<Vec<Box<[u8]>>>,
}

impl BufferPool {
    pub fn new(size: usize) -> BufferPool {
        BufferPool { size, free: Mutex::new(Vec::new()) }
    }

    pub fn take(&self) -> Box<[u8]> {
        let reused = self.free.lock().expect("buffer pool lock").pop();
        reused.unwrap_or_else(|| vec![0u8; self.size].into_boxed_slice())
    }

    pub fn give(&self, buf: Box<[u8]>) {
        let mut free = self.free.lock().expect("buffer pool lock");
        if free.len() < POOL_KEEP {
            free.push(buf);
        }
    }
}

/// Empty pipes kept open for reuse; beyond it a returned pipe is closed.
const KEEP_IDLE_PIPES: usize = 256;

/// `SPLICE_F_MOVE` is a hint the kernel ignores today; NONBLOCK makes the
/// pipe side never block (the socket side is non-blocking already).
const FLAGS: SpliceFFlags = SpliceFFlags::SPLICE_F_NONBLOCK.union(SpliceFFlags::SPLICE_F_MOVE);

/// A non-blocking pipe and its capacity.
pub struct Pipe {
    pub(super) r: OwnedFd,
    pub(super) w: OwnedFd,
    cap: usize,
}

impl Pipe {
    pub fn new(size: Option<u64>) -> io::Result<Pipe> {
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
    /// A pool of pipes of `size` (the kernel's default when None), at most
    /// `max` open at once.
    pub fn new(size: Option<u64>, max: usize) -> PipePool {
        PipePool { size, max, open: AtomicUsize::new(0), idle: Mutex::new(Vec::new()) }
    }

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
