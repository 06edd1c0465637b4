//! `splice`: zero-copy relay through a kernel pipe, driven by readiness.
//!
//! Each direction waits for readability holding nothing, borrows a pipe
//! from a shared pool, splices the socket into the pipe and the pipe into
//! the other socket until the source would block and the pipe is empty, and
//! gives the pipe back. The payload never enters userspace. When the pool
//! is exhausted (`data_plane.max_pipes`), that burst goes through a pooled
//! userspace buffer instead — the tunnel never fails for want of a pipe.
//!
//! Backpressure: a pipe is filled only when empty, and drained before the
//! source is read again, so one direction holds at most one pipe's worth.

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use nix::fcntl::{fcntl, splice, FcntlArg, OFlag, SpliceFFlags};
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::copy::{copy_ready, BufferPool};
use super::pair::{self, Flow, Pump, PumpEnd};
use super::{ByteCounters, Outcome, Rejected, Tunnel};
use crate::config::DataPlaneConfig;

/// Empty pipes kept open for reuse; beyond it a returned pipe is closed.
const KEEP_IDLE_PIPES: usize = 256;

/// Can this kernel splice? Moves one byte between two pipes.
pub fn probe() -> Result<(), String> {
    let a = Pipe::new(None).map_err(|e| format!("pipe2: {e}"))?;
    let b = Pipe::new(None).map_err(|e| format!("pipe2: {e}"))?;
    nix::unistd::write(&a.w, b"x").map_err(|e| format!("write to a pipe: {e}"))?;
    match splice(
        a.r.as_fd(),
        None,
        b.w.as_fd(),
        None,
        1,
        SpliceFFlags::SPLICE_F_NONBLOCK,
    ) {
        Ok(1) => Ok(()),
        Ok(n) => Err(format!("splice moved {n} bytes instead of 1")),
        Err(e) => Err(format!("splice(2) failed: {e}")),
    }
}

/// A non-blocking pipe: read end, write end.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipe {
    fn new(size: Option<u64>) -> io::Result<Pipe> {
        let (r, w) = nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC)?;
        if let Some(size) = size {
            // The kernel rounds up to a power of two pages and caps it at
            // /proc/sys/fs/pipe-max-size for unprivileged processes.
            fcntl(&w, FcntlArg::F_SETPIPE_SZ(size as i32))?;
        }
        Ok(Pipe { r, w })
    }
}

/// Pipes shared by every tunnel of the plane, at most `max` open at once.
struct PipePool {
    size: Option<u64>,
    max: usize,
    open: AtomicUsize,
    idle: Mutex<Vec<Pipe>>,
}

impl PipePool {
    /// An empty pipe, or None when `max` are in use (or pipe2 fails).
    fn take(&self) -> Option<Pipe> {
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
    fn give(&self, pipe: Pipe) {
        let mut idle = self.idle.lock().expect("pipe pool lock");
        if idle.len() < KEEP_IDLE_PIPES {
            idle.push(pipe);
        } else {
            drop(idle);
            self.discard(pipe);
        }
    }

    /// Closes a pipe that may still hold bytes (its tunnel failed).
    fn discard(&self, pipe: Pipe) {
        drop(pipe);
        self.open.fetch_sub(1, Ordering::Relaxed);
    }
}

pub struct SplicePlane {
    pipes: PipePool,
    buffers: BufferPool,
    /// Bytes asked of one splice call: the pipe's capacity.
    chunk: usize,
    counters: ByteCounters,
}

impl SplicePlane {
    pub fn new(cfg: &DataPlaneConfig) -> Result<SplicePlane, String> {
        probe()?;
        // Check the configured size once so a bad pipe_size fails at start.
        let test =
            Pipe::new(cfg.pipe_size).map_err(|e| format!("pipe of data_plane.pipe_size: {e}"))?;
        let capacity = fcntl(&test.w, FcntlArg::F_GETPIPE_SZ)
            .map_err(|e| format!("F_GETPIPE_SZ: {e}"))? as usize;
        drop(test);
        Ok(SplicePlane {
            pipes: PipePool {
                size: cfg.pipe_size,
                max: cfg.max_pipes,
                open: AtomicUsize::new(0),
                idle: Mutex::new(Vec::new()),
            },
            buffers: BufferPool::new(cfg.copy_buffer as usize),
            chunk: capacity,
            counters: ByteCounters::default(),
        })
    }

    pub fn counters(&self) -> &ByteCounters {
        &self.counters
    }

    /// Splice takes every tunnel: without a pipe it copies that burst.
    pub async fn relay(&self, t: Tunnel) -> Result<Outcome, Rejected> {
        Ok(pair::drive(self, t, &self.counters).await)
    }

    /// Moves what `src` has now through `pipe`; Ok(true) on EOF. On error
    /// the pipe may hold bytes and must be discarded.
    async fn burst(
        &self,
        pipe: &Pipe,
        src: &TcpStream,
        dst: &TcpStream,
        flow: &Flow<'_>,
    ) -> Result<bool, PumpEnd> {
        let flags = SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE;
        loop {
            let filled = src.try_io(Interest::READABLE, || {
                splice(src.as_fd(), None, pipe.w.as_fd(), None, self.chunk, flags)
                    .map_err(io::Error::from)
            });
            let mut in_pipe = match filled {
                Ok(0) => return Ok(true),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(PumpEnd::SrcFailed(e)),
            };
            while in_pipe > 0 {
                if let Err(e) = dst.writable().await {
                    return Err(PumpEnd::DstFailed(e));
                }
                let drained = dst.try_io(Interest::WRITABLE, || {
                    splice(pipe.r.as_fd(), None, dst.as_fd(), None, in_pipe, flags)
                        .map_err(io::Error::from)
                });
                match drained {
                    Ok(n) => {
                        in_pipe -= n;
                        flow.delivered(n);
                    }
                    Err(e)
                        if matches!(
                            e.kind(),
                            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                        ) => {}
                    Err(e) => return Err(PumpEnd::DstFailed(e)),
                }
            }
        }
    }
}

impl Pump for SplicePlane {
    async fn pump(
        &self,
        src: &TcpStream,
        dst: &TcpStream,
        first: &[u8],
        flow: &Flow<'_>,
    ) -> PumpEnd {
        if let Err(e) = pair::write_all(dst, first, flow).await {
            return PumpEnd::DstFailed(e);
        }
        loop {
            if let Err(e) = src.readable().await {
                return PumpEnd::SrcFailed(e);
            }
            let result = match self.pipes.take() {
                Some(pipe) => {
                    let r = self.burst(&pipe, src, dst, flow).await;
                    match r {
                        Ok(_) => self.pipes.give(pipe),
                        Err(_) => self.pipes.discard(pipe),
                    }
                    r
                }
                None => copy_ready(&self.buffers, src, dst, flow).await,
            };
            match result {
                Ok(true) => return PumpEnd::Eof,
                Ok(false) => {}
                Err(end) => return end,
            }
        }
    }
}
