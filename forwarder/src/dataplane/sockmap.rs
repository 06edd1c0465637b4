//! `sockmap` data plane (work in progress: not wired yet).

use super::{ByteCounters, Outcome, Rejected, Tunnel};
use crate::config::DataPlaneConfig;

/// Whether this kernel and build can run the sockmap plane.
pub fn probe() -> Result<(), String> {
    Err("the sockmap plane is not built yet".into())
}

pub struct SockmapPlane {
    counters: ByteCounters,
}

impl SockmapPlane {
    pub fn new(_cfg: &DataPlaneConfig) -> Result<Self, String> {
        probe()?;
        Ok(SockmapPlane { counters: ByteCounters::default() })
    }

    pub fn counters(&self) -> &ByteCounters {
        &self.counters
    }

    pub fn bytes_relayed(&self) -> (u64, u64) {
        (0, 0)
    }

    pub async fn relay(&self, t: Tunnel) -> Result<Outcome, Rejected> {
        Err(Rejected { tunnel: t, reason: "not built yet".into() })
    }
}
