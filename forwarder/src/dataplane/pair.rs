//! The tunnel driver shared by the readiness-based planes (copy, splice).
//!
//! It is written against tokio's readiness API (`poll_read_ready`,
//! `try_io`, …) rather than as nested `async fn`s, so that a tunnel's
//! whole state — two [`Mover`]s, an idle timer and the drain signal — is a
//! few hundred bytes: that is what an idle WebSocket costs the router, and
//! a node holds 100,000 of them.
//!
//! Each direction is a [`Mover`]: it waits for readability holding nothing,
//! then borrows a *burst* resource — a pipe from the splice pool while the
//! source streams ([`Streaming`]), else a buffer from the copy pool — moves
//! bytes until the source would block and the resource is empty, and gives
//! it back. So an idle tunnel holds no buffer and no pipe, and a slow
//! reader pins at most one resource per direction (nothing more is read
//! until it drains).
//!
//! The driver turns EOF into a half-close of the other side, a failure into
//! a reset of both sides, and ends the tunnel on idle timeout or drain.
//!
//! A tunnel that may be promoted ([`Tunnel::promote`]) is judged once per
//! window on the reads it made ([`Judge`]); when it earned a promotion, it
//! is handed back at the first moment both directions hold nothing (no
//! leftover, no burst: every byte read was written) and neither has ended,
//! so the next plane starts from the sockets alone. Bytes in flight stay
//! in the kernel's socket queues, where the next plane finds them.
//!
//! A side may be a kTLS socket ([`Sides`]): the kernel decrypts what is
//! read and encrypts what is written, so the movers splice or copy
//! plaintext as for any socket. What differs is TLS's framing of the
//! stream's end and its control records, handled here and nowhere else
//! (see [`super::ktls`]): an alert or handshake record stops a read
//! (EIO, or EINVAL for splice) and is read with its type; the peer's
//! `close_notify` is its EOF and a FIN without one is a truncation
//! (passed on as a reset, as the userspace TLS relay does); the router's
//! own clean end towards a kTLS side is `close_notify` then FIN.

use std::future::{poll_fn, Future};
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd};
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::ktls::{self, Control};
use super::lifetime::Lifetime;
use super::pools::{BufferPool, Pipe, PipePool};
use super::{abort, ByteCounters, Cause, CloseReason, Direction, Outcome, Promote, Rejected, Tunnel};

/// Which sides of a pair are kTLS sockets (see the module docs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sides {
    pub client_ktls: bool,
}

impl Sides {
    /// Plain TCP on both sides.
    pub const PLAIN: Sides = Sides { client_ktls: false };
}

/// Where a plane's movers get their burst resources.
pub struct Resources<'a> {
    pub buffers: &'a BufferPool,
    /// None for the copy plane.
    pub pipes: Option<&'a PipePool>,
}

/// How one direction ended.
enum End {
    /// The source sent FIN and everything before it was delivered.
    Eof,
    /// Reading the source failed (reset, or the socket broke).
    SrcFailed,
    /// Writing the destination failed.
    DstFailed,
}

/// What a direction holds while bytes move.
enum Burst {
    Idle,
    Buffer { buf: Box<[u8]>, start: usize, end: usize },
    Pipe { pipe: Pipe, filled: usize },
}

/// One direction of a tunnel.
struct Mover {
    /// Bytes userspace read past the heads: delivered before anything else.
    first: Bytes,
    burst: Burst,
    eof: bool,
    moved: u64,
    /// Reads that returned bytes (for [`Judge`]).
    reads: u64,
    /// The source is a kTLS socket: control records and its end are TLS's.
    tls_src: bool,
    /// The destination is a kTLS socket that still owes a `close_notify`
    /// before its FIN.
    notify_dst: bool,
    /// Where pipes exist: the direction streams, so its bursts splice
    /// ([`Streaming`]).
    streaming: Streaming,
}

/// Whether a direction's next burst goes through a pipe or a buffer, on a
/// plane that has both (splice).
///
/// A splice is dearer than a read: small messages cost the splice plane
/// 6 splices per round trip (in, out, and one that can only return
/// EAGAIN, per direction) against copy's 2 reads and 2 sends, and 1.6×
/// copy's CPU (docs/performance.md §1). And a short read says the socket's
/// queue is empty, so copy needs no EAGAIN read, where a short splice may
/// only have run out of pipe slots. So, as HAProxy's `splice-auto`: a
/// direction reads into a buffer until one read fills it (the source
/// streams), then splices; it goes back to the buffer after a burst that
/// carried less than [`SMALL_BURST`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Streaming {
    on: bool,
    /// Bytes spliced in since the burst began.
    burst_in: u32,
}

/// A burst that spliced in less than this goes back to the buffer: the
/// size the adaptive policy calls a small message
/// (`promote_message_size`'s default).
const SMALL_BURST: u32 = 4096;

impl Streaming {
    /// A read into a buffer of `len` bytes returned `n`.
    fn read(&mut self, n: usize, len: usize) {
        if n == len {
            self.on = true;
        }
    }

    /// A splice moved `n` bytes into the pipe.
    fn spliced(&mut self, n: usize) {
        self.burst_in = self.burst_in.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
    }

    /// The burst ended (the source would block). One that spliced
    /// nothing in (a wake with nothing to read, or a burst spent on the
    /// buffer) says nothing about the sizes.
    fn burst_ended(&mut self) {
        if self.on && (1..SMALL_BURST).contains(&self.burst_in) {
            self.on = false;
        }
        self.burst_in = 0;
    }
}

fn is_would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Mover {
    fn new(first: Bytes, tls_src: bool, tls_dst: bool) -> Mover {
        Mover {
            first,
            burst: Burst::Idle,
            eof: false,
            moved: 0,
            reads: 0,
            tls_src,
            notify_dst: tls_dst,
            streaming: Streaming::default(),
        }
    }

    /// Holds no byte of the stream and has not ended: the direction could
    /// go on from its sockets alone.
    fn holds_nothing(&self) -> bool {
        self.first.is_empty() && matches!(self.burst, Burst::Idle) && !self.eof
    }

    /// Sends the `close_notify` a kTLS destination is owed, once; Pending
    /// while its send buffer is full.
    fn poll_close_notify(&mut self, cx: &mut Context<'_>, dst: &TcpStream) -> Poll<io::Result<()>> {
        while self.notify_dst {
            ready!(dst.poll_write_ready(cx))?;
            match dst.try_io(Interest::WRITABLE, || ktls::close_notify(dst.as_raw_fd())) {
                Ok(()) => self.notify_dst = false,
                Err(e) if is_would_block(&e) => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// A read from a kTLS source stopped at a control record: reads it and
    /// says what it means for this direction.
    fn take_control(&mut self, src: &TcpStream) -> Result<(), End> {
        match ktls::take_control(src.as_raw_fd()) {
            Control::CloseNotify => {
                self.eof = true;
                Ok(())
            }
            Control::Data(bytes) => {
                // The record turned out to be data (the read's error had
                // another cause): it goes out before the next read.
                self.first = bytes;
                Ok(())
            }
            Control::Handled => Ok(()),
            Control::Fail => Err(End::SrcFailed),
        }
    }

    /// Returns the burst resource to its pool (a pipe only if it is empty).
    fn release(&mut self, res: &Resources<'_>) {
        match std::mem::replace(&mut self.burst, Burst::Idle) {
            Burst::Idle => {}
            Burst::Buffer { buf, .. } => res.buffers.give(buf),
            Burst::Pipe { pipe, filled } => {
                if let Some(pool) = res.pipes {
                    if filled == 0 {
                        pool.give(pipe)
                    } else {
                        pool.discard(pipe)
                    }
                }
            }
        }
    }

    /// Delivers what is pending: `first`, then the burst's contents.
    /// Ready(Ok(n)) when something was written, Ready(Ok(0)) when nothing is pending.
    fn poll_flush(&mut self, cx: &mut Context<'_>, dst: &TcpStream) -> Poll<io::Result<usize>> {
        loop {
            let pending = !self.first.is_empty()
                || match &self.burst {
                    Burst::Buffer { start, end, .. } => start < end,
                    Burst::Pipe { filled, .. } => *filled > 0,
                    Burst::Idle => false,
                };
            if !pending {
                return Poll::Ready(Ok(0));
            }
            ready!(dst.poll_write_ready(cx))?;
            let written = if !self.first.is_empty() {
                dst.try_write(&self.first).inspect(|&n| self.first.advance(n))
            } else {
                match &mut self.burst {
                    Burst::Buffer { buf, start, end } => dst.try_write(&buf[*start..*end]).inspect(|&n| *start += n),
                    Burst::Pipe { pipe, filled } => dst
                        .try_io(Interest::WRITABLE, || pipe.splice_out(dst.as_fd(), *filled))
                        .inspect(|&n| *filled -= n),
                    Burst::Idle => unreachable!("checked above"),
                }
            };
            match written {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if is_would_block(&e) || e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Moves bytes from `src` to `dst` until EOF, an error, or nothing is
    /// ready (Pending, holding no resource unless bytes wait for `dst`).
    fn poll_move(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        res: &Resources<'_>,
        total: &std::sync::atomic::AtomicU64,
    ) -> Poll<End> {
        loop {
            match self.poll_flush(cx, dst) {
                Poll::Ready(Ok(0)) => {}
                Poll::Ready(Ok(n)) => {
                    self.moved += n as u64;
                    total.fetch_add(n as u64, Ordering::Relaxed);
                    continue;
                }
                Poll::Ready(Err(_)) => {
                    self.release(res);
                    return Poll::Ready(End::DstFailed);
                }
                Poll::Pending => return Poll::Pending,
            }
            if self.eof {
                self.release(res);
                return match ready!(self.poll_close_notify(cx, dst)) {
                    Ok(()) => Poll::Ready(End::Eof),
                    Err(_) => Poll::Ready(End::DstFailed),
                };
            }
            match src.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => {
                    self.release(res);
                    return Poll::Ready(End::SrcFailed);
                }
                Poll::Pending => {
                    // Idle: hold nothing until the next bytes arrive.
                    self.release(res);
                    self.streaming.burst_ended();
                    return Poll::Pending;
                }
            }
            match self.burst {
                Burst::Idle => {
                    let pipe = res.pipes.filter(|_| self.streaming.on).and_then(PipePool::take);
                    self.burst = match pipe {
                        Some(pipe) => Burst::Pipe { pipe, filled: 0 },
                        None => Burst::Buffer { buf: res.buffers.take(), start: 0, end: 0 },
                    };
                }
                // The buffer's last read filled it (flushed by now): the
                // rest of the burst splices.
                Burst::Buffer { .. } if self.streaming.on => {
                    if let Some(pipe) = res.pipes.and_then(PipePool::take) {
                        self.release(res);
                        self.burst = Burst::Pipe { pipe, filled: 0 };
                    }
                }
                _ => {}
            }
            let tls_src = self.tls_src;
            let streaming = &mut self.streaming;
            let read = match &mut self.burst {
                Burst::Buffer { buf, start, end } => {
                    // A short read from kTLS ends a record, not the queue: a
                    // control record may wait behind it with no new event.
                    let n = if tls_src { src.try_read(buf) } else { read_until_drained(src, buf) };
                    n.inspect(|&n| {
                        (*start, *end) = (0, n);
                        streaming.read(n, buf.len());
                    })
                }
                Burst::Pipe { pipe, filled } => {
                    src.try_io(Interest::READABLE, || pipe.splice_in(src.as_fd())).inspect(|&n| {
                        *filled = n;
                        streaming.spliced(n);
                    })
                }
                Burst::Idle => unreachable!("set above"),
            };
            match read {
                // TLS ends with close_notify (read as a control record
                // below): a bare FIN is a truncation, passed on as a reset.
                Ok(0) if self.tls_src => {
                    self.release(res);
                    return Poll::Ready(End::SrcFailed);
                }
                Ok(0) => self.eof = true,
                Ok(_) => self.reads += 1,
                Err(e) if self.tls_src && ktls::stopped_at_control(&e) => {
                    if let Err(end) = self.take_control(src) {
                        self.release(res);
                        return Poll::Ready(end);
                    }
                }
                // Readiness was cleared: the next poll_read_ready registers
                // this task for the next bytes (and releases the resource).
                Err(e) if is_would_block(&e) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.release(res);
                    return Poll::Ready(End::SrcFailed);
                }
            }
        }
    }
}

/// Reads into `buf` as `try_read` does, but a short read (fewer bytes
/// than `buf` holds: TCP's receive queue is empty now) also clears the
/// readiness it was made under, as tokio's own `poll_read` does. So the
/// next `poll_read_ready` waits for the reactor's next edge instead of
/// making a read that can only return EAGAIN (profiled: 2 of copy's 4
/// reads per relayed message, docs/performance.md). No wakeup is lost:
/// `try_io` clears only the readiness event it took before the read, and
/// bytes that arrive after it raise a newer one.
fn read_until_drained(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut short = 0;
    let read = src.try_io(Interest::READABLE, || {
        let n = nix::sys::socket::recv(src.as_raw_fd(), buf, nix::sys::socket::MsgFlags::empty())?;
        if n > 0 && n < buf.len() {
            short = n;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match read {
        Err(e) if short > 0 && is_would_block(&e) => Ok(short),
        other => other,
    }
}

/// Judges, once per window, whether a tunnel earned a promotion
/// ([`Promote`]), from the reads and bytes of the window just past.
struct Judge {
    policy: Promote,
    /// When the current window ends.
    next: Instant,
    /// Reads and bytes (both ways) when it began.
    reads: u64,
    bytes: u64,
}

impl Judge {
    /// The first window ends after `first`; the later ones last
    /// `policy.window`.
    fn new(policy: Promote, now: Instant, first: Duration) -> Judge {
        Judge { policy, next: now + first, reads: 0, bytes: 0 }
    }

    /// A tunnel's first window lasts between one and two windows, at
    /// random: tunnels opened together (a burst of reconnects after a
    /// restart) are not all judged, and moved, in the same millisecond.
    /// Measured: 1,000 tunnels promoted at once held every message through
    /// the router back for up to ~40 ms (p99.9 at 20,000 msg/s,
    /// docs/adaptive/benchmarks.md).
    fn first_window(policy: Promote) -> Duration {
        policy.window.mul_f64(1.0 + fastrand::f64())
    }

    /// Whether the tunnel, with `reads` reads and `bytes` moved so far,
    /// earned a promotion: false until a window ended; then the window
    /// just past decides, and the next one begins.
    fn earned(&mut self, now: Instant, reads: u64, bytes: u64) -> bool {
        if now < self.next {
            return false;
        }
        let earned = self.policy.earned(reads - self.reads, bytes - self.bytes);
        (self.next, self.reads, self.bytes) = (now + self.policy.window, reads, bytes);
        // Earned, and the node's pace has room: else judged again a window on.
        earned && self.policy.pacer.take(now)
    }
}

/// How the driver stopped.
enum Stop {
    Closed(CloseReason),
    /// Handed back for promotion, holding nothing.
    Promoted,
}

/// Runs a tunnel of two plain sockets until it ends, moving bytes with
/// `res`; hands it back when it earned a promotion ([`Tunnel::promote`]).
///
/// Not an `async fn`, nor is [`drive_sides`]: an async fn keeps each
/// argument for its whole life, so every level would keep the tunnel
/// (184 B) once more beside the state that took it apart.
pub fn drive<'a>(
    t: Tunnel,
    res: Resources<'a>,
    counters: &'a ByteCounters,
) -> impl Future<Output = Result<Outcome, Rejected>> + Send + 'a {
    drive_sides(t, Sides::PLAIN, res, counters)
}

/// Runs a tunnel whose `sides` say which sockets are kTLS until it ends (or
/// is promoted: only a plain pair can be, a kTLS socket cannot leave the
/// relay, and its `promote` is ignored).
pub fn drive_sides<'a>(
    t: Tunnel,
    sides: Sides,
    res: Resources<'a>,
    counters: &'a ByteCounters,
) -> impl Future<Output = Result<Outcome, Rejected>> + Send + 'a {
    // Taken apart before the future: it keeps only the parts.
    let Tunnel { client, backend, to_backend, to_client, idle_timeout, drain, promote } = t;
    let mut up = Mover::new(to_backend, sides.client_ktls, false);
    let mut down = Mover::new(to_client, false, sides.client_ktls);
    let mut judge =
        promote.filter(|_| sides == Sides::PLAIN).map(|p| Judge::new(p, Instant::now(), Judge::first_window(p)));
    async move {
        let (mut up_done, mut down_done) = (false, false);
        let mut life = Lifetime::new(idle_timeout);
        // A block: its timer and drain wait end with it, and a promoted
        // tunnel takes its drain signal along.
        let stop = {
            let mut idle = pin!(tokio::time::sleep(idle_timeout));
            let mut drained = pin!(drain.cancelled());
            poll_fn(|cx| {
                for dir in Direction::BOTH {
                    let (mover, done, src, dst, total) = match dir {
                        Direction::ToBackend => (&mut up, &mut up_done, &client, &backend, &counters.to_backend),
                        Direction::ToClient => (&mut down, &mut down_done, &backend, &client, &counters.to_client),
                    };
                    if *done {
                        continue;
                    }
                    if let Poll::Ready(end) = mover.poll_move(cx, src, dst, &res, total) {
                        match end {
                            End::Eof => {
                                // Half-close: the destination sees FIN, the other way keeps flowing.
                                let _ = SockRef::from(dst).shutdown(Shutdown::Write);
                                *done = true;
                            }
                            End::SrcFailed => return Poll::Ready(Stop::Closed(dir.source_failed())),
                            End::DstFailed => return Poll::Ready(Stop::Closed(dir.destination_failed())),
                        }
                    }
                }
                // Both directions wait on their sockets: a moment to let go.
                if let Some(judge) = judge.as_mut() {
                    if !up_done
                        && !down_done
                        && up.holds_nothing()
                        && down.holds_nothing()
                        && judge.earned(Instant::now(), up.reads + down.reads, up.moved + down.moved)
                    {
                        return Poll::Ready(Stop::Promoted);
                    }
                }
                life.poll_end(cx, [up_done, down_done], (up.moved, down.moved), idle.as_mut(), drained.as_mut())
                    .map(Stop::Closed)
            })
            .await
        };

        up.release(&res);
        down.release(&res);
        let reason = match stop {
            Stop::Closed(reason) => reason,
            Stop::Promoted => {
                // Nothing held: the next plane starts from the sockets.
                let relayed = (up.moved, down.moved);
                let tunnel = Tunnel {
                    client,
                    backend,
                    to_backend: up.first,
                    to_client: down.first,
                    idle_timeout,
                    drain,
                    promote: None,
                };
                let reason = "promoted: a long-lived tunnel carrying small messages".to_string();
                return Err(Rejected { tunnel, reason, relayed, cause: Cause::Promoted("small_messages") });
            }
        };
        if reason.resets() {
            // A truncated stream must not look complete: reset both sides.
            abort(client.as_raw_fd());
            abort(backend.as_raw_fd());
        } else if down.notify_dst {
            // The router's clean close (idle timeout) of a kTLS client:
            // close_notify then FIN, if it fits now (a peer that takes no
            // bytes gets the FIN alone).
            let _ = ktls::close_notify(client.as_raw_fd());
        }
        Ok(Outcome { to_backend: up.moved, to_client: down.moved, reason })
    }
}

#[cfg(test)]
mod tests {
    use super::super::pacer::Pacer;
    use super::*;

    static PACER: Pacer = Pacer::new(1_000_000);
    const POLICY: Promote = Promote { window: Duration::from_secs(1), message_size: 4096, pacer: &PACER };

    #[test]
    fn a_window_of_small_reads_earns_a_promotion_once_it_ended() {
        let t0 = Instant::now();
        let mut judge = Judge::new(POLICY, t0, POLICY.window);
        let at = |ms| t0 + Duration::from_millis(ms);
        assert!(!judge.earned(at(500), 100, 6_400), "the first window has not ended");
        assert!(judge.earned(at(1_000), 100, 6_400), "100 reads of 64 bytes");
    }

    #[test]
    fn each_window_is_judged_on_its_own_reads() {
        let t0 = Instant::now();
        let mut judge = Judge::new(POLICY, t0, POLICY.window);
        let at = |ms| t0 + Duration::from_millis(ms);
        // A bulk first window: 100 reads of 64 KiB.
        assert!(!judge.earned(at(1_000), 100, 100 << 16));
        // The next window ends a second later, not before.
        assert!(!judge.earned(at(1_500), 200, (100 << 16) + 6_400));
        // Then small messages: 100 reads of 64 bytes in the second window.
        assert!(judge.earned(at(2_000), 200, (100 << 16) + 6_400));
    }

    #[test]
    fn an_earned_promotion_waits_for_the_node_pace() {
        // One promotion per second, bursts of one: the first tunnel takes it.
        static SLOW: Pacer = Pacer::new(1);
        let policy = Promote { pacer: &SLOW, ..POLICY };
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let (mut first, mut second) = (Judge::new(policy, t0, policy.window), Judge::new(policy, t0, policy.window));
        assert!(first.earned(at(1_000), 100, 6_400));
        assert!(!second.earned(at(1_000), 100, 6_400), "no room: judged again a window on");
        assert!(second.earned(at(2_000), 200, 12_800), "the next window, with room again");
    }

    #[test]
    fn a_direction_splices_once_a_read_filled_the_buffer_until_a_small_burst() {
        let mut s = Streaming::default();
        s.read(64, 65_536);
        assert!(!s.on, "a short read: small messages stay on the buffer");
        s.read(65_536, 65_536);
        assert!(s.on, "a full buffer: the source streams, the next reads splice");
        s.spliced(65_536);
        s.spliced(10);
        s.burst_ended();
        assert!(s.on, "a large burst keeps streaming");
        s.spliced(SMALL_BURST as usize - 1);
        s.burst_ended();
        assert!(!s.on, "a burst under SMALL_BURST goes back to the buffer");
        s.burst_ended();
        assert!(!s.on && s.burst_in == 0);
        s.read(65_536, 65_536);
        s.burst_ended();
        assert!(s.on, "a burst that spliced nothing in (a wake with nothing to read) keeps streaming");
        s.spliced(SMALL_BURST as usize - 1);
        s.burst_ended();
        assert!(!s.on);
        // Counted per burst: the splices of one burst add up, those of
        // the bursts before it do not.
        s.read(8, 8);
        s.spliced(SMALL_BURST as usize / 2);
        s.spliced(SMALL_BURST as usize / 2);
        s.burst_ended();
        assert!(s.on, "two half-sized splices in one burst");
        s.spliced(SMALL_BURST as usize / 2);
        s.burst_ended();
        assert!(!s.on, "a burst is judged on its own bytes");
        s.spliced(usize::MAX);
        assert_eq!(s.burst_in, u32::MAX, "saturates");
    }

    #[test]
    fn a_first_window_lasts_one_to_two_windows() {
        for _ in 0..1000 {
            let first = Judge::first_window(POLICY);
            assert!((POLICY.window..POLICY.window * 2).contains(&first), "{first:?}");
        }
    }

    #[test]
    fn too_few_reads_or_too_large_ones_earn_nothing() {
        assert!(!POLICY.earned(super::super::PROMOTE_MIN_READS - 1, 64), "too few reads");
        assert!(POLICY.earned(super::super::PROMOTE_MIN_READS, 8 * 4096), "exactly at the size");
        assert!(!POLICY.earned(super::super::PROMOTE_MIN_READS, 8 * 4096 + 1), "larger on average");
        assert!(!POLICY.earned(0, 0), "an idle window");
    }
}
