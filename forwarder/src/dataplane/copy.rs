//! `copy`: the portable userspace relay and the baseline the other planes are
//! measured against.
//!
//! Each direction borrows a buffer from a shared pool only while bytes are
//! ready and gives it back when the source would block (see [`super::pair`]),
//! so an idle tunnel holds no buffer and a slow reader pins at most one per
//! direction.

use std::future::Future;

use super::pair::{self, Resources};
use super::pools::BufferPool;
use super::{ByteCounters, DataPlane, Mode, Outcome, PlaneError, Rejected, Settings, Tunnel};

pub struct CopyPlane {
    buffers: BufferPool,
    counters: ByteCounters,
}

impl CopyPlane {
    /// Copy needs no kernel feature and takes no resource up front: it
    /// always starts (the last plane of every chain).
    pub fn new(cfg: &Settings) -> CopyPlane {
        CopyPlane { buffers: BufferPool::new(cfg.copy_buffer as usize), counters: ByteCounters::default() }
    }
}

impl DataPlane for CopyPlane {
    const MODE: Mode = Mode::Copy;

    fn probe() -> Result<(), PlaneError> {
        Ok(())
    }

    fn start(settings: &Settings) -> Result<CopyPlane, PlaneError> {
        Ok(CopyPlane::new(settings))
    }

    fn startup_report(&self) -> String {
        // Plain read/write: no kernel feature to prove; `upsplice check`
        // still runs the checks through it (check_all).
        "no self-test at startup (userspace copy)".into()
    }

    /// Copy takes every tunnel; it hands one back only for promotion.
    fn relay(&self, t: Tunnel) -> impl Future<Output = Result<Outcome, Rejected>> + Send {
        // The driver's future itself, not one around it (that would keep
        // the tunnel once more).
        pair::drive(t, Resources { buffers: &self.buffers, pipes: None }, &self.counters)
    }

    fn bytes_relayed(&self) -> (u64, u64) {
        self.counters.load()
    }
}
