//! What the watch does to one direction each time it looks: read the
//! kernel's counters, keep the ring-buffer notification ahead, kick bytes
//! that arrived without a data-ready, carry the bytes in userspace once the
//! source left `ACTIVE`, and pass FIN on.
//!
//! Half-close: on FIN from a source, the plane waits until every byte was
//! forwarded and every redirected byte reached the destination's send
//! queue (TCP_INFO acked + SIOCOUTQ against the count the program keeps),
//! then shuts the destination's write side (the FIN race).

use std::io;
use std::sync::atomic::Ordering;

use bytes::{Buf, BytesMut};
use upsplice_common::PEER_BROKEN;

use super::super::kernel::Kernel;
use super::super::sys;
use super::bounds::Limits;
use super::direction::{Dir, Phase};
use crate::dataplane::error::chain;
use crate::dataplane::{CloseReason, Direction};

/// One read or write of bytes userspace forwards.
const TAIL_BUFFER: usize = 64 * 1024;
/// Reads and writes per direction per check, so one busy tunnel cannot
/// keep its task from yielding.
const FORWARD_STEPS: usize = 64;

/// Which socket of a direction failed, or whether its stream broke.
pub(super) enum Failed {
    Src(io::Error),
    Dst(io::Error),
    /// The program could not cut a repeated head off a segment (an
    /// allocation failed) and dropped it: bytes are missing.
    Broken,
}

impl Failed {
    /// How the tunnel ends when `direction` failed so.
    pub fn close_reason(&self, direction: Direction) -> CloseReason {
        match self {
            Failed::Src(_) => direction.source_failed(),
            Failed::Dst(_) => direction.destination_failed(),
            Failed::Broken => CloseReason::Error,
        }
    }
}

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failed::Src(e) => write!(f, "source failed: {e}"),
            Failed::Dst(e) => write!(f, "destination failed: {e}"),
            Failed::Broken => write!(f, "a retransmitted segment could not be trimmed in the kernel"),
        }
    }
}

/// Every byte redirected or copied so far reached `d.dst`'s send queue
/// ([`Dir::flushed_at`], with its counters read now).
pub(super) fn flushed(d: &Dir<'_>) -> io::Result<bool> {
    Ok(d.flushed_at(sys::written_at_least(d.dst)?))
}

/// What a look reads for one direction besides its destination's TCP
/// counters (which tell a destination that closed under it).
#[derive(Debug, Clone, Copy)]
pub(super) struct Reads {
    /// The program's counts (`PEERS`): [`Dir::needs_counts`].
    pub counts: bool,
    /// Bytes queued on an active source without a data-ready (a
    /// `SIOCINQ`), which the handoff's kick leaves none of: only when time,
    /// not a report, woke the watch — before idleness is judged.
    pub kick: bool,
}

/// Updates one direction: counters, userspace forwarding once its source
/// left `ACTIVE`, FIN. Ok(true) when its state changed (check again soon).
pub(super) fn check(
    kernel: &Kernel,
    limits: Limits,
    node_over: bool,
    d: &mut Dir<'_>,
    reads: Reads,
) -> Result<bool, Failed> {
    if d.done() {
        d.in_kernel = 0;
        return Ok(false);
    }
    // Bytes the kernel redirected are no work for userspace. (Counting
    // redirects as a change woke every tunnel a handful of times per
    // message: 1.3x HAProxy's router CPU at 20,000 messages/s.) Pressure is
    // checked when the ring buffer says a direction moved another budget
    // of bytes (or broke: the program reports that too).
    if reads.counts {
        let entry = kernel.peer(d.src_cookie);
        if entry.flags & PEER_BROKEN != 0 {
            return Err(Failed::Broken);
        }
        d.redirected = entry.bytes;
    }
    let dst = sys::tcp_counters(d.dst).map_err(Failed::Dst)?;
    if dst.state == sys::TCP_CLOSE {
        return Err(Failed::Dst(io::Error::other("destination closed while bytes were owed")));
    }
    d.in_kernel = d.in_kernel(dst.bytes_acked);

    if d.copying() {
        // Out of `ACTIVE`: userspace carries the bytes after the last
        // verdicted one until the tunnel hands over — a peer that stops
        // reading while its own writes wait (an echo) would otherwise keep
        // the other direction from ever draining. FIN follows once a read
        // returned it and everything before it is out.
        let tail_max = limits.tail_max(node_over, d.in_kernel);
        let changed = forward_tail(kernel, tail_max, d)?;
        tracing::trace!(
            redirected = d.redirected,
            drained = d.drained(),
            copied = d.copied(),
            tail = d.tail().len(),
            in_kernel = d.in_kernel,
            "sockmap: forwarding"
        );
        if d.fin_pending() && flushed(d).map_err(Failed::Dst)? {
            tracing::debug!(src = d.src, drained = d.drained(), "sockmap: FIN passed on (out of ACTIVE)");
            return pass_fin(d);
        }
        return Ok(changed);
    }

    if let Some(notify_at) = d.next_notify(d.redirected, limits.budget) {
        d.notify_at = notify_at;
        kernel.control(d.src_cookie, d.control()).map_err(|e| Failed::Src(io::Error::other(chain(&e))))?;
    }
    if reads.kick && d.kicks() && sys::inq(d.src).map_err(Failed::Src)? > 0 {
        // Bytes that arrived without a data-ready: run the verdict.
        sys::kick(d.src).map_err(Failed::Src)?;
        return Ok(true);
    }
    if d.fin_pending() {
        // Once everything redirected reached the send queue, FIN can follow.
        // The verdict had seen every byte before FIN when FIN was reported,
        // so the counts read above (a direction with FIN always reads
        // them: `Dir::needs_counts`) hold them all; and the acknowledged
        // count read above, before the queue now, makes a lower bound of
        // what `dst` was written (as [`sys::written_at_least`]).
        let written = dst.bytes_acked + sys::outq(d.dst).map_err(Failed::Dst)?;
        if d.flushed_at(written) {
            tracing::debug!(
                src = d.src,
                base = d.base,
                leftover = d.leftover,
                redirected = d.redirected,
                "sockmap: FIN passed on"
            );
            return pass_fin(d);
        }
    }
    Ok(false)
}

/// Shuts `d.dst`'s write side: nothing more goes this way.
fn pass_fin(d: &mut Dir<'_>) -> Result<bool, Failed> {
    sys::shutdown_write(d.dst).map_err(Failed::Dst)?;
    d.phase = Phase::Done;
    Ok(true)
}

/// Carries a direction whose source left `ACTIVE`, without blocking: reads
/// its receive queue (which the verdict never saw) into the tail, up to
/// `tail_max`, and writes the tail to `dst` once every byte redirected
/// before reached `dst`'s send queue. Ok(true) if bytes moved.
///
/// Reading and writing are decoupled: bytes are read as they come, whether
/// or not they may be written yet — the redirected bytes they must follow
/// may wait for a reader that waits for this source to be read (an echo).
fn forward_tail(kernel: &Kernel, tail_max: u64, d: &mut Dir<'_>) -> Result<bool, Failed> {
    let mut moved = false;
    let mut buf = Vec::new();
    // Bytes written here are held in the kernel until acknowledged: they
    // count against `tail_max` as the tail they left.
    let mut written = 0u64;
    for _ in 0..FORWARD_STEPS {
        let room = d.read_room(tail_max, written, TAIL_BUFFER);
        let mut read_now = 0;
        // Read on until a read itself says FIN (epoll reports it while
        // bytes before it still wait in the receive queue).
        if room > 0 {
            buf.resize(room, 0);
            match sys::recv_now(d.src, &mut buf[..room]) {
                Ok(0) => {
                    if !d.eof {
                        tracing::debug!(src = d.src, drained = d.drained(), "sockmap: FIN seen (read)");
                    }
                    d.carried_mut().drained_eof = true;
                    d.eof = true;
                    moved = true;
                }
                Ok(n) => {
                    let carried = d.carried_mut();
                    carried.tail.extend_from_slice(&buf[..n]);
                    carried.drained += n as u64;
                    read_now = n;
                    moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(Failed::Src(e)),
            }
        }
        let mut wrote_now = 0;
        if !d.tail().is_empty() {
            d.redirected = kernel.peer(d.src_cookie).bytes;
            let awaiting_flush = !flushed(d).map_err(Failed::Dst)?;
            let (dst, user_total) = (d.dst, d.user_total);
            let carried = d.carried_mut();
            carried.awaiting_flush = awaiting_flush;
            if !awaiting_flush {
                match sys::send_now(dst, &carried.tail) {
                    Ok(n) => {
                        carried.tail.advance(n);
                        carried.copied += n as u64;
                        written += n as u64;
                        user_total.fetch_add(n as u64, Ordering::Relaxed);
                        wrote_now = n;
                        moved = true;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(Failed::Dst(e)),
                }
            }
        }
        if read_now == 0 && wrote_now == 0 {
            break;
        }
    }
    if let Some(carried) = d.carried.as_mut().filter(|c| c.tail.is_empty() && c.tail.capacity() > 0) {
        // Nothing held: give the buffer back (an idle tunnel holds none).
        carried.tail = BytesMut::new();
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_names_the_side_that_failed() {
        let e = || io::Error::other("x");
        assert_eq!(Failed::Src(e()).close_reason(Direction::ToBackend), CloseReason::ClientReset);
        assert_eq!(Failed::Dst(e()).close_reason(Direction::ToBackend), CloseReason::BackendReset);
        assert_eq!(Failed::Src(e()).close_reason(Direction::ToClient), CloseReason::BackendReset);
        assert_eq!(Failed::Dst(e()).close_reason(Direction::ToClient), CloseReason::ClientReset);
        for d in Direction::BOTH {
            assert_eq!(Failed::Broken.close_reason(d), CloseReason::Error, "a gap is no peer's reset");
        }
    }
}
