//! Bounds: stepping aside, and leaving the maps.
//!
//! A direction whose destination holds more than `sockmap_queue_limit`
//! bytes not yet acknowledged (psock queue + send queue), or one budget
//! while the plane's node-wide bound is exceeded, makes the tunnel leave the
//! sockmap for good and go on through the next plane (splice). Why not
//! pause a direction (pass its bytes to userspace) and resume: each psock
//! has *one* backlog queue, processed strictly in order, for both the
//! bytes redirected *to* its socket (waiting for room in its send queue)
//! and the socket's own bytes passed to itself (`SK_PASS`, waiting for room
//! in its receive buffer when that is full). A paused direction's passed
//! bytes queue behind the other direction's redirected ones, which wait
//! for the other reader — and in an echo, that reader waits for the paused
//! direction (it stops reading while its write blocks). And bytes in that
//! backlog are not charged to the socket (`tcp_read_skb` orphans each
//! segment before the verdict), so TCP keeps the window open: a tunnel
//! saturated both ways stalls for good, with 52 MB in one socket's receive
//! queue (`conformance::two_way_*`).
//!
//! Stepping aside uses no `SK_PASS`:
//! 1. the pressed direction's source leaves `ACTIVE` — after its low-water
//!    mark went up for one tick, so that TCP stops running the verdict for
//!    it first (a segment verdicted just as the program is detached finds
//!    none and is dropped: seen in about one of 15 step-asides before);
//!    its later bytes stay in its receive queue, under TCP's own flow
//!    control, and userspace carries them once every byte redirected before
//!    reached the destination's send queue;
//! 2. the other source follows once the first direction's redirected bytes
//!    are all out (or when it is pressed itself), so a fast direction does
//!    not wait for a slow reader;
//! 3. once both are out and nothing redirected is left in a psock, the
//!    sockets leave the other maps, and the tunnel's accounting is checked
//!    against TCP's own count of consumed bytes ([`leave`]); a mismatch
//!    (bytes the kernel dropped) resets both sides instead of handing on a
//!    stream with a gap. The next plane gets what userspace still holds as
//!    leftovers.
//!
//! While a direction waits for its redirected bytes to flush, userspace
//! reads its source into a buffer (so that an echo which stops reading
//! while its writes wait can go on), but only as far as kernel and buffer
//! together stay within the direction's bound ([`Limits::tail_max`]).

use std::time::{Duration, Instant};

use super::super::kernel::Kernel;
use super::super::sys;
use super::bounds::{step_aside_reason, Limits, RATE_REASON};
use super::carry::flushed;
use super::direction::{both_settled, Dir, Leave, Phase};
use super::membership::Membership;
use super::pace::TICK_MIN;

/// How long leaving the maps may wait for the last redirected bytes.
const LEAVE_MAX: Duration = Duration::from_secs(2);

/// Stepping aside, one socket at a time ([`Dir::step_aside`] decides). A
/// direction holding more than `high` (or one budget while the node is
/// over its bound: `node_over`) takes its source out of `ACTIVE`: the
/// verdict stops for it, and its later bytes wait in the receive queue
/// under TCP's own flow control, while the other direction keeps being
/// redirected. The other source follows once everything redirected from
/// the first reached its destination (or when it is over the bound
/// itself). A direction `fast` (past `demote_rate`) begins as one over the
/// bound does. `leaving` holds why, once it began. Some(why) once both left
/// and every byte redirected before reached its destination's send queue:
/// the psocks hold nothing any more.
pub(super) fn step_aside<'a>(
    kernel: &Kernel,
    limits: Limits,
    node_over: bool,
    up: &mut Dir<'a>,
    down: &mut Dir<'a>,
    leaving: &mut Option<&'static str>,
    fast: [bool; 2],
) -> Result<Option<&'static str>, String> {
    let threshold = limits.threshold(node_over);
    let why = step_aside_reason(node_over);
    let mut settled = [false, false];
    for (i, d) in [&*up, &*down].into_iter().enumerate() {
        settled[i] = d
            .settled(|| kernel.peer(d.src_cookie).bytes, || sys::written_at_least(d.dst))
            .map_err(|e| format!("TCP counters: {e}"))?;
    }
    for (i, d) in [&mut *up, &mut *down].into_iter().enumerate() {
        match d.step_aside(threshold, fast[i], leaving.is_some(), settled[1 - i]) {
            Leave::Stay => {}
            // Leaving `ACTIVE` detaches the program, and a segment the kernel
            // verdicts at that very moment finds none and is dropped (seen:
            // one 65,483-byte segment in about one of 15 step-asides under
            // two-way bulk; `leave` detects it and resets). So first the
            // source's low-water mark goes up: TCP then stops running the
            // verdict (data-ready) for it and lets bytes wait in the receive
            // queue; the socket leaves `ACTIVE` on the next tick, and the
            // mark comes back down. (The kernel caps the mark at half the
            // largest receive buffer, so a verdict then is rare, not
            // impossible: `leave` checks.)
            Leave::Quiesce { pressed } => {
                // Pressed below the threshold: by its rate.
                let why = if pressed && d.in_kernel <= threshold { RATE_REASON } else { why };
                tracing::debug!(in_kernel = d.in_kernel, threshold, pressed, "sockmap: stepping aside: {why}");
                let rcvbuf = sys::rcvbuf(d.src).map_err(|e| format!("SO_RCVBUF: {e}"))?;
                sys::set_rcvlowat(d.src, i32::MAX).map_err(|e| format!("SO_RCVLOWAT: {e}"))?;
                let window = limits.rcvbuf_after(rcvbuf) / 2;
                sys::clamp_window(d.src, window).map_err(|e| format!("TCP_WINDOW_CLAMP: {e}"))?;
                d.phase = Phase::Quiescing { rcvbuf };
                leaving.get_or_insert(why);
            }
            // The kernel grows the receive buffer to fit the mark
            // (`tcp_set_rcvlowat`: 17 MB here, for a mark capped at
            // `tcp_rmem[2] / 2`), never shrinks it, and lets the window grow
            // with it. Left so, fifty saturated tunnels took the node into
            // `tcp_mem`'s pressure, where TCP drops segments. A smaller mark
            // does not work: at half the buffer (a young socket has 128 KiB)
            // or at `sockmap_queue_limit` a verdict met the detach in about
            // one of 100 step-asides. So the mark stays high, but the window
            // is clamped at once to what the buffer the source goes back to
            // holds (half of it: the rest is the segments' overhead); then,
            // out of `ACTIVE`, the buffer goes back toward what TCP had made
            // it, or `sockmap_queue_limit` if that is more
            // ([`Limits::rcvbuf_after`]), no lower than what the peer was
            // already offered ([`sys::shrink_rcvbuf`]). Setting it straight
            // back, without the clamp, dropped about 60 segments per fifty
            // step-asides, and once a sender backed off for a minute with
            // the tunnel moving nothing (CI). With both: no drop, and the
            // fifty buffers add up to about 2.7 times their targets instead
            // of 6.3. It stays fixed from then on.
            Leave::Deactivate { rcvbuf } => {
                kernel.deactivate(d.src_cookie);
                let _ = sys::set_rcvlowat(d.src, 1);
                let target = limits.rcvbuf_after(rcvbuf);
                match sys::shrink_rcvbuf(d.src, target) {
                    Ok(now) => tracing::debug!(target, now, "sockmap: receive buffer after leaving ACTIVE"),
                    Err(e) => tracing::debug!("sockmap: receive buffer stays grown: {e}"),
                }
                d.phase = Phase::Copying;
            }
        }
    }
    Ok(both_settled(up, down, settled).then(|| leaving.unwrap_or(why)))
}

/// Takes a tunnel whose sockets left `ACTIVE` ([`step_aside`]) out of the
/// other maps, so that another plane can carry it, and checks that the
/// kernel consumed no byte this tunnel did not account for.
///
/// 1. Every byte the verdict redirected before it stopped reaches its
///    destination's send queue.
/// 2. Out of `TARGETS` and `PEERS`, off the events thread: the psock goes,
///    with nothing in its queues.
/// 3. Each source's consumed count (TCP: received − queued) equals what
///    the tunnel accounted for: consumed before the handoff + redirected +
///    read by userspace since. A segment the kernel verdicted just as the
///    program was detached finds no program and is dropped; then the
///    caller resets both sides instead of handing on a stream with a gap.
pub(super) async fn leave<'a>(
    members: &mut Membership<'_>,
    up: &mut Dir<'a>,
    down: &mut Dir<'a>,
) -> Result<(), String> {
    let kernel = members.kernel;
    let deadline = Instant::now() + LEAVE_MAX;
    for d in [&mut *up, &mut *down] {
        loop {
            d.redirected = kernel.peer(d.src_cookie).bytes;
            if d.done() || flushed(d).map_err(|e| format!("TCP counters: {e}"))? {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "redirected bytes still in the kernel after {LEAVE_MAX:?} (redirected {}, copied {})",
                    d.redirected,
                    d.copied()
                ));
            }
            tokio::time::sleep(TICK_MIN).await;
        }
    }
    let trimmed = [kernel.peer(up.src_cookie).trimmed, kernel.peer(down.src_cookie).trimmed];
    members.leave();
    for (d, trimmed) in [&*up, &*down].into_iter().zip(trimmed) {
        let consumed = sys::consumed(d.src).map_err(|e| format!("TCP counters: {e}"))?;
        let accounted = d.consumed_base + d.redirected + d.drained();
        if consumed != accounted {
            let state = sys::tcp_counters(d.src).map(|c| sys::tcp_state_name(c.state));
            return Err(format!(
                "the kernel consumed {consumed} bytes of a source, this tunnel accounted for {accounted} \
                 (before the handoff {}, redirected {}, read after leaving ACTIVE {}, trimmed {trimmed}; \
                 source {}, FIN seen {}, destination's FIN sent {})",
                d.consumed_base,
                d.redirected,
                d.drained(),
                state.unwrap_or_else(|e| e.to_string()),
                d.eof,
                [&*up, &*down].iter().any(|o| o.dst == d.src && o.done()),
            ));
        }
    }
    Ok(())
}
