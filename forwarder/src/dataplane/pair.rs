//! The tunnel driver shared by the readiness-based planes (copy, splice):
//! runs one pump per direction, turns EOF into a half-close, a reset into a
//! reset of the other side, and ends the tunnel on idle timeout or drain.
//!
//! A plane only supplies [`Pump::pump`]: move bytes from `src` to `dst` until
//! `src` reaches EOF (then return [`PumpEnd::Eof`]) or fails.

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use socket2::SockRef;
use tokio::net::TcpStream;

use super::{ByteCounters, CloseReason, Outcome, Tunnel};

/// How one direction ended.
#[derive(Debug)]
pub enum PumpEnd {
    /// `src` sent FIN and everything before it reached `dst`.
    Eof,
    /// Reading `src` failed: it reset (or its socket broke).
    SrcFailed(io::Error),
    /// Writing `dst` failed: it reset (or its socket broke).
    DstFailed(io::Error),
}

/// Per-direction state a pump reports progress into.
pub struct Flow<'a> {
    moved: AtomicU64,
    activity: &'a Activity,
    global: &'a AtomicU64,
}

impl Flow<'_> {
    /// Records `n` bytes delivered to the destination.
    pub fn delivered(&self, n: usize) {
        self.moved.fetch_add(n as u64, Ordering::Relaxed);
        self.global.fetch_add(n as u64, Ordering::Relaxed);
        self.activity.touch();
    }
}

/// The time of the last byte moved in either direction.
pub struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Completes once nothing moved for `idle`.
    async fn idle(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let deadline = last + idle;
            if Instant::now() >= deadline {
                return;
            }
            tokio::time::sleep_until(deadline.into()).await;
        }
    }
}

/// A plane's way of moving bytes one direction.
pub trait Pump {
    /// Writes `first` to `dst`, then moves bytes from `src` to `dst` until EOF
    /// on `src` or an error. Must hold no buffer while `src` has nothing to
    /// read, and never buffer more than a bounded amount.
    fn pump(
        &self,
        src: &TcpStream,
        dst: &TcpStream,
        first: &[u8],
        flow: &Flow<'_>,
    ) -> impl std::future::Future<Output = PumpEnd> + Send;
}

/// Writes all of `buf` to a non-blocking socket, waiting for writability.
pub async fn write_all(dst: &TcpStream, mut buf: &[u8], flow: &Flow<'_>) -> io::Result<()> {
    while !buf.is_empty() {
        dst.writable().await?;
        match dst.try_write(buf) {
            Ok(n) => {
                flow.delivered(n);
                buf = &buf[n..];
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Aborts a socket: the close sends RST instead of FIN.
pub fn abort(s: &TcpStream) {
    let _ = SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// Runs a tunnel with `plane`'s pump until it ends.
pub async fn drive<P: Pump>(plane: &P, t: Tunnel, counters: &ByteCounters) -> Outcome {
    let Tunnel {
        client,
        backend,
        to_backend,
        to_client,
        idle_timeout,
        drain,
    } = t;
    let activity = Activity::new();
    let up = Flow {
        moved: AtomicU64::new(0),
        activity: &activity,
        global: &counters.to_backend,
    };
    let down = Flow {
        moved: AtomicU64::new(0),
        activity: &activity,
        global: &counters.to_client,
    };

    let c2b = plane.pump(&client, &backend, &to_backend, &up);
    let b2c = plane.pump(&backend, &client, &to_client, &down);
    tokio::pin!(c2b, b2c);
    let (mut up_done, mut down_done) = (false, false);

    let reason = loop {
        tokio::select! {
            end = &mut c2b, if !up_done => match end {
                PumpEnd::Eof => {
                    // Half-close: the backend sees FIN, the other way keeps flowing.
                    let _ = SockRef::from(&backend).shutdown(Shutdown::Write);
                    up_done = true;
                }
                PumpEnd::SrcFailed(_) => break CloseReason::ClientReset,
                PumpEnd::DstFailed(_) => break CloseReason::BackendReset,
            },
            end = &mut b2c, if !down_done => match end {
                PumpEnd::Eof => {
                    let _ = SockRef::from(&client).shutdown(Shutdown::Write);
                    down_done = true;
                }
                PumpEnd::SrcFailed(_) => break CloseReason::BackendReset,
                PumpEnd::DstFailed(_) => break CloseReason::ClientReset,
            },
            _ = activity.idle(idle_timeout) => break CloseReason::Idle,
            _ = drain.cancelled() => break CloseReason::Drain,
        }
        if up_done && down_done {
            break CloseReason::Done;
        }
    };
    if matches!(reason, CloseReason::ClientReset | CloseReason::BackendReset) {
        // A truncated stream must not look complete: reset the survivor.
        abort(&client);
        abort(&backend);
    }
    Outcome {
        to_backend: up.moved.load(Ordering::Relaxed),
        to_client: down.moved.load(Ordering::Relaxed),
        reason,
    }
}
