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
//! Small messages go through the buffer too: a direction splices only
//! once a read filled the buffer (its source streams), and goes back after
//! a burst of less than 4 KiB, as HAProxy's `splice-auto` does. A 64-byte
//! message cost 3 splices per direction (in, out, and one that could only
//! return EAGAIN) where a read and a send do (`pair::Streaming`).
//!
//! Backpressure: a pipe is filled only when empty and drained before the
//! source is read again, so a direction holds at most one pipe's worth.

use std::future::Future;
use std::os::fd::AsFd;

use nix::fcntl::{splice, SpliceFFlags};

use super::pair::{self, Resources};
use super::pools::{BufferPool, Pipe, PipePool};
use super::{selftest, ByteCounters, DataPlane, Mode, Outcome, PlaneError, Rejected, Settings, Tunnel};

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
            pipes: PipePool::new(cfg.pipe_size, cfg.max_pipes),
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

    /// Splice takes every tunnel (without a pipe it copies that burst); it
    /// hands one back only for promotion.
    fn relay(&self, t: Tunnel) -> impl Future<Output = Result<Outcome, Rejected>> + Send {
        // The driver's future itself, not one around it (that would keep
        // the tunnel once more).
        pair::drive(t, Resources { buffers: &self.buffers, pipes: Some(&self.pipes) }, &self.counters)
    }

    fn bytes_relayed(&self) -> (u64, u64) {
        self.counters.load()
    }
}
