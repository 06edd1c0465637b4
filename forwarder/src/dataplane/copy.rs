//! `copy`: the portable userspace relay and the baseline the other planes are
//! measured against.
//!
//! Each direction waits for readability holding no buffer, then borrows one
//! from a shared pool, reads and writes until the socket would block, and
//! gives the buffer back. An idle tunnel therefore costs two tokio tasks'
//! worth of state and no buffer; a slow reader holds at most one buffer per
//! direction (the write waits, nothing more is read).

use std::io;
use std::sync::{Arc, Mutex};

use tokio::net::TcpStream;

use super::pair::{self, Flow, Pump, PumpEnd};
use super::{ByteCounters, Outcome, Tunnel};
use crate::config::DataPlaneConfig;

/// Buffers kept for reuse at most; more in flight are allocated and freed.
const POOL_KEEP: usize = 256;

/// A pool of equally sized buffers.
pub struct BufferPool {
    size: usize,
    free: Mutex<Vec<Box<[u8]>>>,
}

impl BufferPool {
    pub fn new(size: usize) -> BufferPool {
        BufferPool {
            size,
            free: Mutex::new(Vec::new()),
        }
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

pub struct CopyPlane {
    buffers: Arc<BufferPool>,
    counters: ByteCounters,
}

impl CopyPlane {
    pub fn new(cfg: &DataPlaneConfig) -> CopyPlane {
        CopyPlane {
            buffers: Arc::new(BufferPool::new(cfg.copy_buffer as usize)),
            counters: ByteCounters::default(),
        }
    }

    pub fn counters(&self) -> &ByteCounters {
        &self.counters
    }

    pub async fn relay(&self, t: Tunnel) -> Outcome {
        pair::drive(self, t, &self.counters).await
    }
}

impl Pump for CopyPlane {
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
        copy_until_eof(&self.buffers, src, dst, flow).await
    }
}

/// Copies `src` to `dst` through pooled buffers until EOF on `src`. Also the
/// splice plane's fallback when it has no pipe to spare.
pub async fn copy_until_eof(
    pool: &BufferPool,
    src: &TcpStream,
    dst: &TcpStream,
    flow: &Flow<'_>,
) -> PumpEnd {
    loop {
        if let Err(e) = src.readable().await {
            return PumpEnd::SrcFailed(e);
        }
        match copy_ready(pool, src, dst, flow).await {
            Ok(true) => return PumpEnd::Eof,
            Ok(false) => {}
            Err(end) => return end,
        }
    }
}

/// Moves what `src` has ready now through one pooled buffer; Ok(true) on EOF.
pub(super) async fn copy_ready(
    pool: &BufferPool,
    src: &TcpStream,
    dst: &TcpStream,
    flow: &Flow<'_>,
) -> Result<bool, PumpEnd> {
    let mut buf = pool.take();
    let result = loop {
        match src.try_read(&mut buf) {
            Ok(0) => break Ok(true),
            Ok(n) => {
                if let Err(e) = pair::write_all(dst, &buf[..n], flow).await {
                    break Err(PumpEnd::DstFailed(e));
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(false),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(PumpEnd::SrcFailed(e)),
        }
    };
    pool.give(buf);
    result
}
