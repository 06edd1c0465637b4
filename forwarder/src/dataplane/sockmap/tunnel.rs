//! One tunnel through the sockmap plane: handoff, watching, bounds,
//! stepping aside, half-close and teardown.
//!
//! Handoff, in this order (each step is there for a failure reproduced on
//! 6.18 by a test in `tests/sockmap.rs` or the conformance suite):
//! 0. a socket that is not ESTABLISHED (already got FIN) cannot join a
//!    sockmap: the tunnel is refused untouched → [`Rejected`]. The bytes
//!    queued on either socket are read into the leftovers: the verdict reads
//!    whole segments, so a segment the control plane read in part would be
//!    sent again from its start. What each socket consumed so far is noted
//!    for the exactness check when the tunnel leaves;
//! 1. both sockets join `TARGETS` (no program: nothing changes for them);
//! 2. `PEERS` and `CONTROL` entries are written;
//! 3. userspace writes the leftovers while neither socket is active: bytes
//!    arriving meanwhile wait in TCP's receive queue, under its own flow
//!    control;
//! 4. the destinations' byte counts are read (exact: only userspace wrote);
//! 5. both sockets join `ACTIVE`; the second one refused (it got FIN
//!    meanwhile) makes the tunnel step aside at once;
//! 6. both sockets are kicked ([`sys::kick`]): segments that arrived before
//!    step 5 are verdicted now instead of waiting for the next one (the
//!    stall).
//!
//! Then the kernel moves the bytes. The sockets leave tokio (whose reactor
//! would wake for every redirected segment) and join the plane's one epoll
//! set, armed one-shot for what the tunnel waits on: FIN, hang-up and
//! errors; readable/writable only while userspace copies. The tunnel wakes
//! on those reports, on a ring-buffer event when a direction moved another
//! `budget` bytes, on timers while something is pending, and on the idle
//! deadline.
//!
//! # Bounds: stepping aside
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
//!
//! What one tunnel can add to the node's memory beyond its sockets' own
//! TCP buffers: [`Limits::per_tunnel`], plus what arrives between the
//! crossing and the watch's reaction (a notification and a wakeup: up to
//! about 20 MB at 1.3 GB/s on a loaded 2-core machine).
//!
//! Half-close: on FIN from a source, the plane waits until every byte was
//! forwarded and every redirected byte reached the destination's send
//! queue (TCP_INFO acked + SIOCOUTQ against the count the program keeps),
//! then shuts the destination's write side (the FIN race).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tokio::net::TcpStream;
use upsplice_common::{Control, PeerEntry, DIR_TO_BACKEND, DIR_TO_CLIENT, PEER_BROKEN};

use super::kernel::{Kernel, Signal};
use super::sys;
use crate::dataplane::error::chain;
use crate::dataplane::{abort, CloseReason, Direction, Outcome, Rejected, Tunnel};

/// Bytes userspace wrote itself (leftovers, and bytes carried while the
/// tunnel steps aside), per direction, for the plane's totals.
#[derive(Debug, Default)]
pub struct UserBytes {
    pub to_backend: AtomicU64,
    pub to_client: AtomicU64,
}

/// Bounds, per direction, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A direction with more than this redirected and not yet acknowledged
    /// by its reader makes the tunnel step aside.
    pub high: u64,
    /// Check a direction's queues each time it moved this much.
    pub budget: u64,
}

impl Limits {
    pub fn new(queue_limit: u64) -> Limits {
        let high = queue_limit.max(64 * 1024);
        Limits { high, budget: (high / 4).max(16 * 1024) }
    }

    /// A direction holding more than this (bytes written to its destination
    /// and not acknowledged) makes the tunnel step aside: `high`, or one
    /// budget while the plane's node-wide bound is exceeded.
    fn threshold(&self, node_over: bool) -> u64 {
        if node_over {
            self.budget
        } else {
            self.high
        }
    }

    /// Most bytes userspace reads from a direction's source while the
    /// tunnel steps aside, given what the direction holds in the kernel:
    /// kernel and userspace together stay within one threshold and one
    /// budget ([`Limits::per_tunnel`]). Reading into this tail is what lets
    /// an echo that stops reading while its writes wait drain the other
    /// way; reading without a bound let four stalled tunnels hold 12 MiB
    /// each against a 16 MiB node-wide bound (the tail grew to `high`).
    fn tail_max(&self, node_over: bool, in_kernel: u64) -> u64 {
        (self.threshold(node_over) + self.budget).saturating_sub(in_kernel)
    }

    /// What one tunnel adds at most to the memory its sockets' own TCP
    /// buffers hold (which every plane has), both directions: bytes
    /// redirected and not yet acknowledged before it steps aside, plus one
    /// notification budget of lag; bytes userspace holds while stepping
    /// aside count within it ([`Limits::tail_max`]).
    pub fn per_tunnel(&self) -> u64 {
        2 * (self.high + self.budget)
    }
}

/// The node-wide bound: bytes all tunnels of the plane hold in the kernel
/// and in their userspace buffers. Past `limit`, a tunnel steps aside as
/// soon as a direction holds more than one notification budget instead of
/// `high`, so the sum cannot grow with the number of tunnels.
#[derive(Debug)]
pub struct NodeHeld {
    pub total: AtomicU64,
    pub limit: u64,
    /// Woken when `total` crosses above `limit`: every tunnel checks itself
    /// against the lower threshold then (a stalled one would not wake by
    /// itself: no byte moves).
    crossed: tokio::sync::Notify,
}

impl NodeHeld {
    pub fn new(limit: u64) -> NodeHeld {
        NodeHeld { total: AtomicU64::new(0), limit, crossed: tokio::sync::Notify::new() }
    }

    fn over(&self) -> bool {
        self.total.load(Ordering::Relaxed) > self.limit
    }
}

/// One tunnel's share of [`NodeHeld`], given back when the tunnel ends.
struct HeldShare<'k> {
    node: &'k NodeHeld,
    reported: [u64; 2],
}

impl HeldShare<'_> {
    fn set(&mut self, side: usize, held: u64) {
        let old = std::mem::replace(&mut self.reported[side], held);
        if held > old {
            let before = self.node.total.fetch_add(held - old, Ordering::Relaxed);
            let limit = self.node.limit;
            if before <= limit && before + (held - old) > limit {
                self.node.crossed.notify_waiters();
            }
        } else if old > held {
            self.node.total.fetch_sub(old - held, Ordering::Relaxed);
        }
    }
}

impl Drop for HeldShare<'_> {
    fn drop(&mut self) {
        self.set(0, 0);
        self.set(1, 0);
    }
}

/// Why and how often tunnels left the plane (for `/metrics`).
#[derive(Debug, Default)]
pub struct StepAsides {
    /// Handed to the next plane with every byte accounted for.
    pub handed_over: AtomicU64,
    /// Could not leave exactly: reset both sides instead.
    pub reset: AtomicU64,
}

/// Shortest and longest wait between checks while something is pending
/// (a tunnel stepping aside, a FIN waiting for its bytes to drain).
const TICK_MIN: Duration = Duration::from_millis(1);
const TICK_BUSY_MAX: Duration = Duration::from_millis(20);
/// How long leaving the maps may wait for the last redirected bytes.
const LEAVE_MAX: Duration = Duration::from_secs(2);
/// One read or write of bytes userspace forwards.
const TAIL_BUFFER: usize = 64 * 1024;
/// Reads and writes per direction per check, so one busy tunnel cannot
/// keep its task from yielding.
const FORWARD_STEPS: usize = 64;

/// One direction of the tunnel.
struct Dir<'a> {
    /// Where this direction's userspace bytes are added up.
    user_total: &'a AtomicU64,
    /// The socket this direction's bytes arrive on, and the one they leave by.
    src: RawFd,
    dst: RawFd,
    src_cookie: u64,
    /// Bytes written into `dst` (acked + queued) when redirection began.
    base: u64,
    /// Leftover bytes written by userspace before redirection began.
    leftover: u64,
    /// Bytes the verdict redirected from `src`, as last read.
    redirected: u64,
    /// Bytes userspace read from `src`'s receive queue after it left
    /// `ACTIVE` (the verdict never saw them).
    drained: u64,
    /// A read from `src`, out of `ACTIVE`, returned 0: every byte before its
    /// FIN was read.
    drained_eof: bool,
    /// Of `drained`, bytes userspace wrote to `dst`.
    copied: u64,
    /// Bytes of `src` consumed (read or verdicted) when the handoff began:
    /// leaving the maps checks that the kernel consumed nothing since that
    /// this tunnel did not account for.
    consumed_base: u64,
    /// Bytes written to `dst` and not yet acknowledged, as last checked.
    in_kernel: u64,
    /// `Control::notify_at` currently set for `src`.
    notify_at: u64,
    /// `src` is in `ACTIVE`: the verdict sees its bytes. Cleared when the
    /// tunnel steps aside; its later bytes wait in the receive queue.
    active: bool,
    /// `src` is about to leave `ACTIVE`: its low-water mark is raised so
    /// that TCP stops running the verdict for it first. Holds the receive
    /// buffer it had before (raising the mark grows it).
    quiescing: Option<i32>,
    /// `src` sent FIN.
    eof: bool,
    /// FIN passed on to `dst`; nothing more goes this way.
    done: bool,
    /// Bytes read from `src` by userspace, not written to `dst` yet.
    tail: BytesMut,
    /// `tail` waits for redirected bytes to leave the psock queue (polled
    /// on the timer; `dst` being writable says nothing about it).
    awaiting_flush: bool,
}

impl<'a> Dir<'a> {
    fn new(user_total: &'a AtomicU64, src: RawFd, dst: RawFd, src_cookie: u64, budget: u64) -> Dir<'a> {
        Dir {
            user_total,
            src,
            dst,
            src_cookie,
            base: 0,
            leftover: 0,
            redirected: 0,
            drained: 0,
            drained_eof: false,
            copied: 0,
            consumed_base: 0,
            in_kernel: 0,
            notify_at: budget,
            active: true,
            quiescing: None,
            eof: false,
            done: false,
            tail: BytesMut::new(),
            awaiting_flush: false,
        }
    }

    fn src_fd(&self) -> RawFd {
        self.src
    }

    fn dst_fd(&self) -> RawFd {
        self.dst
    }

    fn moved(&self) -> u64 {
        self.leftover + self.redirected + self.copied
    }

    /// Bytes written to `dst` since the handoff (by the kernel or by
    /// userspace) that its reader has not acknowledged.
    fn in_kernel(&self, acked: u64) -> u64 {
        (self.base + self.redirected + self.copied).saturating_sub(acked)
    }

    /// Every byte redirected or copied so far reached `dst`'s send queue
    /// (none is left in the psock queue).
    fn flushed(&self) -> io::Result<bool> {
        Ok(sys::written_at_least(self.dst_fd())? >= self.base + self.redirected + self.copied)
    }

    /// Userspace carries this direction: its source left `ACTIVE`.
    fn copying(&self) -> bool {
        !self.done && !self.active
    }

    /// Copying in userspace and waiting for its source to have bytes.
    fn waits_for_source(&self, tail_max: u64) -> bool {
        self.copying() && !self.eof && (self.tail.len() as u64) < tail_max
    }

    /// Bytes this direction holds: in the kernel (redirected or written and
    /// not acknowledged) and in userspace.
    fn held(&self) -> u64 {
        self.in_kernel + self.tail.len() as u64
    }

    /// Copying in userspace and waiting for room in its destination.
    fn waits_for_destination(&self) -> bool {
        self.copying() && !self.awaiting_flush && !self.tail.is_empty()
    }

    fn control(&self) -> Control {
        Control { notify_at: self.notify_at }
    }
}

/// Takes the tunnel's sockets out of every map and the events thread's
/// epoll set when dropped, whatever ended the tunnel (also a cancelled
/// relay future).
struct Membership<'k> {
    kernel: &'k Kernel,
    cookies: [u64; 2],
    /// The sockets, once registered with the events thread.
    registered: Option<[RawFd; 2]>,
    /// The sockets are closed right after: closing takes them out of the
    /// socket maps and the epoll set by itself (four map deletions and two
    /// epoll_ctl calls fewer per tunnel).
    closing: bool,
    /// Already out of everything ([`Membership::leave`]).
    left: bool,
}

impl Membership<'_> {
    /// Out of every map and the epoll set now (the sockets live on, for
    /// another plane); nothing is left for `drop`.
    fn leave(&mut self) {
        for c in self.cookies {
            self.kernel.deactivate(c);
            self.kernel.unpair(c);
            self.kernel.remove_target(c);
        }
        if let Some(fds) = self.registered.take() {
            self.kernel.unregister(self.cookies, fds);
        }
        self.left = true;
    }
}

impl Drop for Membership<'_> {
    fn drop(&mut self) {
        if self.left {
            return;
        }
        if !self.closing {
            for c in self.cookies {
                self.kernel.deactivate(c);
            }
        }
        for c in self.cookies {
            self.kernel.unpair(c);
        }
        if !self.closing {
            for c in self.cookies {
                self.kernel.remove_target(c);
            }
        }
        if let Some(fds) = self.registered {
            if self.closing {
                self.kernel.forget(self.cookies);
            } else {
                self.kernel.unregister(self.cookies, fds);
            }
        }
    }
}

/// How a handoff ended: the tunnel is over already, or the kernel relays it.
#[expect(
    clippy::large_enum_variant,
    reason = "returned once per tunnel and taken apart at once; a box would cost an allocation per handoff"
)]
enum Handoff<'k> {
    Ended(Outcome),
    Watch(Handed<'k>),
}

/// A tunnel the kernel relays: what its watch needs, and what ends with it.
struct Handed<'k> {
    members: Membership<'k>,
    up: Dir<'k>,
    down: Dir<'k>,
    signal: Arc<Signal>,
    /// Client, backend: out of tokio, closed when the tunnel ends.
    sockets: (std::net::TcpStream, std::net::TcpStream),
    idle_timeout: Duration,
    drain: tokio_util::sync::CancellationToken,
}

#[expect(clippy::result_large_err, reason = "the seam's Rejected carries the whole tunnel")]
fn rejected<T>(tunnel: Tunnel, reason: String) -> Result<T, Rejected> {
    Err(Rejected::untouched(tunnel, reason))
}

/// Writes all of `buf` to `dst`; the count written so far on error.
async fn write_all(dst: &TcpStream, buf: &[u8]) -> Result<(), (usize, io::Error)> {
    let mut done = 0;
    while done < buf.len() {
        if let Err(e) = dst.writable().await {
            return Err((done, e));
        }
        match dst.try_write(&buf[done..]) {
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err((done, e)),
        }
    }
    Ok(())
}

fn ended(up: &Dir<'_>, down: &Dir<'_>, reason: CloseReason) -> Outcome {
    Outcome { to_backend: up.moved(), to_client: down.moved(), reason }
}

/// Steps 0–6 of the handoff (module docs): on success the sockets are in
/// the maps, out of tokio and ready to be watched.
async fn handoff<'k>(
    kernel: &'k Kernel,
    limits: Limits,
    user: &'k UserBytes,
    mut t: Tunnel,
) -> Result<Handoff<'k>, Rejected> {
    let (c_fd, b_fd) = (t.client.as_raw_fd(), t.backend.as_raw_fd());
    let (c_ck, b_ck) = match (sys::cookie(c_fd), sys::cookie(b_fd)) {
        (Ok(c), Ok(b)) => (c, b),
        (Err(e), _) | (_, Err(e)) => return rejected(t, format!("SO_COOKIE: {e}")),
    };

    // 0. Only ESTABLISHED sockets can join a sockmap: refuse the others
    //    untouched. Then everything queued on either socket is read into
    //    the leftovers, until the queue is empty, so that no partly read
    //    segment is left for the verdict (it would resend the part already
    //    read); this must happen before the sockets join any map. Too many
    //    (a sender at full speed): the copy planes handle them better.
    for (fd, side) in [(c_fd, Direction::ToBackend.source_name()), (b_fd, Direction::ToClient.source_name())] {
        match sys::tcp_counters(fd) {
            Ok(info) if info.state == sys::TCP_ESTABLISHED => {}
            Ok(info) => {
                return rejected(t, format!("{side} socket not established ({})", sys::tcp_state_name(info.state)))
            }
            Err(e) => return rejected(t, format!("{side} socket: TCP_INFO: {e}")),
        }
    }
    let max = limits.high as usize;
    for (fd, from) in [(c_fd, Direction::ToBackend), (b_fd, Direction::ToClient)] {
        let side = from.source_name();
        let leftover = match from {
            Direction::ToBackend => &mut t.to_backend,
            Direction::ToClient => &mut t.to_client,
        };
        let mut bytes = leftover.to_vec();
        let drained = sys::read_queued(fd, &mut bytes, max);
        if bytes.len() != leftover.len() {
            *leftover = Bytes::from(bytes);
        }
        // Whatever was read is in the leftovers: a refused tunnel is whole.
        match drained {
            Ok(true) => {}
            Ok(false) => return rejected(t, format!("more than {max} bytes queued on the {side} socket at handoff")),
            // The read took the socket's error (a reset): handed on, the
            // tunnel would see a clean EOF instead. Pass the reset on.
            Err(e) => {
                tracing::debug!("sockmap: {side} socket failed at handoff: {e}");
                abort(c_fd);
                abort(b_fd);
                let reason = from.source_failed();
                return Ok(Handoff::Ended(Outcome { to_backend: 0, to_client: 0, reason }));
            }
        }
    }

    // What each source consumed so far (the leftovers): leaving the maps
    // later checks the kernel consumed nothing this tunnel missed.
    let consumed = match (sys::consumed(c_fd), sys::consumed(b_fd)) {
        (Ok(c), Ok(b)) => [c, b],
        (Err(e), _) | (_, Err(e)) => return rejected(t, format!("TCP counters: {e}")),
    };

    // 1. Redirect targets; a refusal here leaves the tunnel untouched.
    let mut members = Membership { kernel, cookies: [c_ck, b_ck], registered: None, closing: false, left: false };
    if let Err(e) = kernel.add_target(c_ck, c_fd) {
        drop(members);
        return rejected(t, format!("client socket refused by the sockmap: {e}"));
    }
    if let Err(e) = kernel.add_target(b_ck, b_fd) {
        drop(members);
        return rejected(t, format!("backend socket refused by the sockmap: {e}"));
    }

    let mut up = Dir::new(&user.to_backend, c_fd, b_fd, c_ck, limits.budget);
    let mut down = Dir::new(&user.to_client, b_fd, c_fd, b_ck, limits.budget);
    up.consumed_base = consumed[0];
    down.consumed_base = consumed[1];

    // 2. Pair: the verdict will redirect every byte it sees.
    let control = Control { notify_at: limits.budget };
    let paired = kernel
        .pair(c_ck, PeerEntry { peer: b_ck, dir: DIR_TO_BACKEND, ..PeerEntry::default() })
        .and_then(|()| kernel.pair(b_ck, PeerEntry { peer: c_ck, dir: DIR_TO_CLIENT, ..PeerEntry::default() }))
        .and_then(|()| kernel.control(c_ck, control))
        .and_then(|()| kernel.control(b_ck, control));
    if let Err(e) = paired {
        drop(members);
        return rejected(t, format!("sockmap peer entries: {e}"));
    }

    // 3. Leftovers, by userspace, before either socket is active: bytes
    //    arriving meanwhile wait in TCP's receive queue, under its own flow
    //    control, and are verdicted after the leftovers went out.
    let leftovers = async {
        let (a, b) = tokio::join!(write_all(&t.backend, &t.to_backend), write_all(&t.client, &t.to_client));
        (a, b)
    };
    let (wrote_up, wrote_down) = tokio::select! {
        r = leftovers => r,
        _ = t.drain.cancelled() => {
            drop(members);
            abort(c_fd);
            abort(b_fd);
            return Ok(Handoff::Ended(ended(&up, &down, CloseReason::Drain)));
        }
        _ = tokio::time::sleep(t.idle_timeout) => {
            drop(members);
            return Ok(Handoff::Ended(ended(&up, &down, CloseReason::Idle)));
        }
    };
    up.leftover = t.to_backend.len() as u64;
    down.leftover = t.to_client.len() as u64;
    let failed = match (wrote_up, wrote_down) {
        (Err((n, _)), _) => {
            up.leftover = n as u64;
            Some(Direction::ToBackend.destination_failed())
        }
        (_, Err((n, _))) => {
            down.leftover = n as u64;
            Some(Direction::ToClient.destination_failed())
        }
        _ => None,
    };
    up.user_total.fetch_add(up.leftover, Ordering::Relaxed);
    down.user_total.fetch_add(down.leftover, Ordering::Relaxed);
    if let Some(reason) = failed {
        drop(members);
        abort(c_fd);
        abort(b_fd);
        return Ok(Handoff::Ended(ended(&up, &down, reason)));
    }
    t.to_backend = Bytes::new();
    t.to_client = Bytes::new();

    // 4. Bases: what each destination was written so far (exact: only
    //    userspace wrote to it, and it is done).
    match (sys::written_exact(b_fd), sys::written_exact(c_fd)) {
        (Ok(u), Ok(d)) => {
            up.base = u;
            down.base = d;
        }
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!("sockmap: TCP counters: {e}");
            drop(members);
            abort(c_fd);
            abort(b_fd);
            return Ok(Handoff::Ended(ended(&up, &down, CloseReason::Error)));
        }
    }

    // From here on, a tunnel handed back has had its leftovers delivered.
    let delivered = (up.leftover, down.leftover);
    let signal = Arc::new(Signal::default());
    if let Err(e) = kernel.register([c_ck, b_ck], [c_fd, b_fd], &signal) {
        kernel.unregister([c_ck, b_ck], [c_fd, b_fd]);
        drop(members);
        return Err(Rejected { tunnel: t, reason: format!("sockmap events: {e}"), relayed: delivered });
    }
    members.registered = Some([c_fd, b_fd]);

    // 5. Activate. A refusal of the first socket (it got FIN meanwhile)
    //    hands the tunnel on with its leftovers delivered. A
    //    refusal of the second comes after the first one's bytes began to
    //    be redirected: the tunnel steps aside at once (`leave`), with
    //    what was redirected counted.
    if let Err(e) = kernel.activate(c_ck, c_fd) {
        drop(members);
        return Err(Rejected {
            tunnel: t,
            reason: format!("client socket refused by the sockmap: {e}"),
            relayed: delivered,
        });
    }
    if let Err(e) = kernel.activate(b_ck, b_fd) {
        kernel.deactivate(c_ck);
        tokio::time::sleep(TICK_MIN).await;
        if let Err(why) = leave(kernel, &mut members, &mut up, &mut down).await {
            tracing::warn!("sockmap: backend socket refused, and leaving failed: {why}");
            drop(members);
            abort(c_fd);
            abort(b_fd);
            return Ok(Handoff::Ended(ended(&up, &down, CloseReason::Error)));
        }
        let relayed = (up.moved(), down.moved());
        t.to_backend = std::mem::take(&mut up.tail).freeze();
        t.to_client = std::mem::take(&mut down.tail).freeze();
        return Err(Rejected { tunnel: t, reason: format!("backend socket refused by the sockmap: {e}"), relayed });
    }

    // 6. Kick: bytes queued before activation are verdicted now. A socket
    //    error it reports stays for the watch to find (SO_ERROR is gone,
    //    but the socket is closed: the next read or write fails).
    let _ = sys::kick(c_fd);
    let _ = sys::kick(b_fd);

    // From here on only this plane touches the sockets: take them away from
    // tokio, so that bytes the kernel redirects no longer wake its reactor
    // (a wakeup per segment); the events thread reports what matters.
    let Tunnel { client, backend, idle_timeout, drain, .. } = t;
    let (client, backend) = match (client.into_std(), backend.into_std()) {
        (Ok(c), Ok(b)) => (c, b),
        (c, b) => {
            tracing::warn!("sockmap: leaving tokio: {:?} {:?}", c.err(), b.err());
            drop(members);
            abort(c_fd);
            abort(b_fd);
            return Ok(Handoff::Ended(ended(&up, &down, CloseReason::Error)));
        }
    };
    Ok(Handoff::Watch(Handed { members, up, down, signal, sockets: (client, backend), idle_timeout, drain }))
}

/// What every tunnel of the plane shares: bounds, totals and counters.
#[derive(Debug)]
pub struct Shared {
    pub limits: Limits,
    /// Bytes userspace wrote itself.
    pub user: UserBytes,
    pub node: NodeHeld,
    pub step_asides: StepAsides,
}

/// Relays `t` through the kernel until it ends. Hands it back when its
/// sockets cannot join the maps (untouched, or with its leftovers already
/// delivered and nothing else), and when it stepped aside: then out of the
/// maps, with what userspace still holds as leftovers and the bytes this
/// plane relayed in [`Rejected::relayed`].
pub async fn relay(kernel: &Kernel, shared: &Shared, t: Tunnel) -> Result<Outcome, Rejected> {
    let limits = shared.limits;
    // Boxed: the handoff's state (leftover writes, refusal paths) is freed
    // before the watch, which is what stays for the tunnel's life.
    let Handed { mut members, mut up, mut down, signal, sockets, idle_timeout, drain } =
        match Box::pin(handoff(kernel, limits, &shared.user, t)).await? {
            Handoff::Ended(outcome) => return Ok(outcome),
            Handoff::Watch(handed) => handed,
        };
    // Client → backend is `up`: its source is the client socket.
    let ([c_ck, b_ck], [c_fd, b_fd]) = ([up.src_cookie, down.src_cookie], [up.src, down.src]);
    let mut share = HeldShare { node: &shared.node, reported: [0, 0] };
    let ctx = Watch {
        kernel,
        limits,
        node: &shared.node,
        signal: &signal,
        idle_timeout,
        drain: &drain,
        cookies: [c_ck, b_ck],
    };
    let reason = match ctx.run(&mut up, &mut down, &mut share).await {
        Ended::Closed(reason) => reason,
        Ended::StepAside(why) => match Box::pin(leave(kernel, &mut members, &mut up, &mut down)).await {
            Ok(()) => {
                shared.step_asides.handed_over.fetch_add(1, Ordering::Relaxed);
                drop(share);
                let (client, backend) = sockets;
                let (client, backend) = match (TcpStream::from_std(client), TcpStream::from_std(backend)) {
                    (Ok(c), Ok(b)) => (c, b),
                    (c, b) => {
                        tracing::warn!("sockmap: back to tokio: {:?} {:?}", c.err(), b.err());
                        abort(c_fd);
                        abort(b_fd);
                        return Ok(ended(&up, &down, CloseReason::Error));
                    }
                };
                let relayed = (up.moved(), down.moved());
                let tunnel = Tunnel {
                    client,
                    backend,
                    to_backend: std::mem::take(&mut up.tail).freeze(),
                    to_client: std::mem::take(&mut down.tail).freeze(),
                    idle_timeout,
                    drain,
                };
                tracing::info!(
                    reason = why,
                    to_backend = relayed.0,
                    to_client = relayed.1,
                    "sockmap: tunnel stepped aside to the next data plane"
                );
                return Err(Rejected { tunnel, reason: format!("stepped aside: {why}"), relayed });
            }
            Err(e) => {
                shared.step_asides.reset.fetch_add(1, Ordering::Relaxed);
                tracing::warn!("sockmap: stepping aside failed, resetting the tunnel: {e}");
                CloseReason::Error
            }
        },
    };
    drop(share);
    // The last counts, before the entries go.
    up.redirected = kernel.peer(c_ck).bytes;
    down.redirected = kernel.peer(b_ck).bytes;
    let outcome = ended(&up, &down, reason);
    members.closing = true;
    drop(members);
    // A reset, a stream that can no longer be relayed exactly, or one the
    // drain deadline cut: a FIN would tell the peers everything arrived.
    if reason.resets() {
        abort(c_fd);
        abort(b_fd);
    }
    drop(sockets);
    Ok(outcome)
}

/// Takes a tunnel whose sockets left `ACTIVE` ([`Watch::step_aside`]) out
/// of the other maps, so that another plane can carry it, and checks that
/// the kernel consumed no byte this tunnel did not account for.
///
/// 1. Every byte the verdict redirected before it stopped reaches its
///    destination's send queue.
/// 2. Out of `TARGETS` and `PEERS`, off the events thread: the psock goes,
///    with nothing in its queues.
/// 3. Each source's consumed count (TCP: received − queued) equals what
///    the tunnel accounted for: consumed before the handoff + redirected +
///    read by userspace since. A segment the kernel verdicted just as the program was
///    detached finds no program and is dropped; then the caller resets
///    both sides instead of handing on a stream with a gap.
async fn leave<'a>(
    kernel: &Kernel,
    members: &mut Membership<'_>,
    up: &mut Dir<'a>,
    down: &mut Dir<'a>,
) -> Result<(), String> {
    let deadline = Instant::now() + LEAVE_MAX;
    for d in [&mut *up, &mut *down] {
        loop {
            d.redirected = kernel.peer(d.src_cookie).bytes;
            if d.done || d.flushed().map_err(|e| format!("TCP counters: {e}"))? {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "redirected bytes still in the kernel after {LEAVE_MAX:?} (redirected {}, copied {})",
                    d.redirected, d.copied
                ));
            }
            tokio::time::sleep(TICK_MIN).await;
        }
    }
    let trimmed = [kernel.peer(up.src_cookie).trimmed, kernel.peer(down.src_cookie).trimmed];
    members.leave();
    for (d, trimmed) in [&*up, &*down].into_iter().zip(trimmed) {
        let consumed = sys::consumed(d.src).map_err(|e| format!("TCP counters: {e}"))?;
        let accounted = d.consumed_base + d.redirected + d.drained;
        if consumed != accounted {
            let state = sys::tcp_counters(d.src).map(|c| sys::tcp_state_name(c.state));
            return Err(format!(
                "the kernel consumed {consumed} bytes of a source, this tunnel accounted for {accounted} \
                 (before the handoff {}, redirected {}, read after leaving ACTIVE {}, trimmed {trimmed}; \
                 source {}, FIN seen {}, destination's FIN sent {})",
                d.consumed_base,
                d.redirected,
                d.drained,
                state.unwrap_or_else(|e| e.to_string()),
                d.eof,
                [&*up, &*down].iter().any(|o| o.dst == d.src && o.done),
            ));
        }
    }
    Ok(())
}

/// How the watch of a tunnel ended.
enum Ended {
    Closed(CloseReason),
    /// Both sources left `ACTIVE` and settled: it leaves the maps ([`leave`]).
    StepAside(&'static str),
}

/// What the watching of one tunnel needs besides its two directions.
struct Watch<'w> {
    kernel: &'w Kernel,
    limits: Limits,
    node: &'w NodeHeld,
    signal: &'w Signal,
    idle_timeout: Duration,
    drain: &'w tokio_util::sync::CancellationToken,
    /// Client, backend: also the epoll tokens.
    cookies: [u64; 2],
}

/// Epoll interest of one socket: `EPOLLRDHUP` while its FIN may still come,
/// `EPOLLIN`/`EPOLLOUT` while a direction copying in userspace waits on it.
fn interest(src_of: &Dir<'_>, dst_of: &Dir<'_>, copy_ready: bool, tail_max: u64) -> u32 {
    let mut events = 0;
    if !src_of.eof {
        events |= libc::EPOLLRDHUP as u32;
    }
    if copy_ready && src_of.waits_for_source(tail_max) {
        events |= libc::EPOLLIN as u32;
    }
    if copy_ready && dst_of.waits_for_destination() {
        events |= libc::EPOLLOUT as u32;
    }
    events
}

impl Watch<'_> {
    /// Watches the tunnel until it ends or settles to step aside.
    async fn run<'a>(&self, up: &mut Dir<'a>, down: &mut Dir<'a>, share: &mut HeldShare<'_>) -> Ended {
        let mut tick = TICK_MIN;
        let mut copy_stalled = false;
        let mut copy_fired_at: Option<u64> = None;
        // Why the tunnel steps aside, once it began to (out of `ACTIVE`).
        let mut leaving: Option<&'static str> = None;
        // Idleness is checked lazily, when the deadline comes: the sign (two
        // TCP_INFO calls) is read then, not on every wake; a tunnel closes
        // between one and two idle timeouts after its last byte.
        let mut last_sign = activity_sign(up, down);
        let mut last_activity = Instant::now();
        // What each socket (client, backend) is armed for; None: disarmed
        // (a report came) or hung up (never armed again).
        let mut armed: [Option<u32>; 2] = [None, None];
        let mut hung_up = [false, false];
        loop {
            // Check queues, FINs and progress.
            for (dir, direction) in [(&mut *up, Direction::ToBackend), (&mut *down, Direction::ToClient)] {
                match check(self.kernel, self.limits, self.node.over(), dir) {
                    Ok(true) => tick = TICK_MIN,
                    Ok(false) => {}
                    Err(failed @ Failed::Broken) => {
                        tracing::warn!("sockmap: {failed}; resetting the tunnel");
                        return Ended::Closed(CloseReason::Error);
                    }
                    Err(failed) => {
                        tracing::debug!("sockmap: {failed}");
                        return Ended::Closed(match failed {
                            Failed::Src(_) => direction.source_failed(),
                            _ => direction.destination_failed(),
                        });
                    }
                }
                share.set(direction.index(), dir.held());
            }
            if up.done && down.done {
                return Ended::Closed(CloseReason::Done);
            }
            match self.step_aside(up, down, &mut leaving) {
                Ok(Some(why)) => return Ended::StepAside(why),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!("sockmap: stepping aside: {e}");
                    return Ended::Closed(CloseReason::Error);
                }
            }
            if let Some(before) = copy_fired_at.take() {
                // Readiness that moved nothing: wait for the timer once.
                copy_stalled = progress(up, down) == before;
            }
            let mut idle_deadline = last_activity + self.idle_timeout;
            let mut now = Instant::now();
            if now >= idle_deadline {
                let sign = activity_sign(up, down);
                if sign != last_sign {
                    last_sign = sign;
                    last_activity = now;
                    idle_deadline = now + self.idle_timeout;
                    now = Instant::now();
                }
            }
            if now >= idle_deadline {
                return Ended::Closed(CloseReason::Idle);
            }
            let busy = leaving.is_some() || [&*up, &*down].iter().any(|d| !d.done && d.eof);
            let wait = if busy { tick.min(TICK_BUSY_MAX) } else { tick.min(idle_deadline - now) };

            // Arm each socket for what it should report next. Readiness only
            // helps a direction whose next step waits on a socket (not on the
            // psock queue flushing, which the timer polls), and only if the
            // last readiness led to progress.
            let over = self.node.over();
            let tail_max = |d: &Dir<'_>| self.limits.tail_max(over, d.in_kernel);
            let want =
                [interest(up, down, !copy_stalled, tail_max(up)), interest(down, up, !copy_stalled, tail_max(down))];
            for side in 0..2 {
                if hung_up[side] || armed[side] == Some(want[side]) {
                    continue;
                }
                let fd = if side == 0 { up.src } else { down.src };
                if let Err(e) = self.kernel.arm(self.cookies[side], fd, want[side]) {
                    tracing::warn!("sockmap: epoll: {e}");
                    return Ended::Closed(CloseReason::Error);
                }
                armed[side] = Some(want[side]);
            }
            let copy_armed = want.iter().any(|w| w & (libc::EPOLLIN | libc::EPOLLOUT) as u32 != 0);
            let before = progress(up, down);

            tokio::select! {
                biased;
                _ = self.drain.cancelled() => return Ended::Closed(CloseReason::Drain),
                _ = self.node.crossed.notified() => tick = TICK_MIN,
                _ = self.signal.notify.notified() => {
                    for side in 0..2 {
                        let bits = self.signal.take(side);
                        if bits == 0 {
                            continue;
                        }
                        armed[side] = None;
                        let from = Direction::BOTH[side];
                        let from_client = from == Direction::ToBackend;
                        let fd = if from_client { up.src } else { down.src };
                        let error = bits & libc::EPOLLERR as u32 != 0;
                        let so_error = if error { sys::take_error(fd) } else { Ok(0) };
                        tracing::trace!(bits, ?so_error, from_client, "sockmap: socket event");
                        if so_error.as_ref().map(|&e| e != 0).unwrap_or(true) {
                            tracing::debug!(from_client, bits, ?so_error, "sockmap: socket error");
                            return Ended::Closed(from.source_failed());
                        }
                        let hup = bits & libc::EPOLLHUP as u32 != 0;
                        if bits & libc::EPOLLRDHUP as u32 != 0 || hup {
                            let dir = if from_client { &mut *up } else { &mut *down };
                            if !dir.eof {
                                tracing::debug!(from_client, bits, "sockmap: FIN seen (epoll)");
                            }
                            dir.eof = true;
                        }
                        // A hung-up socket would report HUP on every arming.
                        hung_up[side] |= hup;
                    }
                    if copy_armed {
                        copy_fired_at = Some(before);
                    }
                    tick = TICK_MIN;
                }
                _ = tokio::time::sleep(wait) => {
                    copy_stalled = false;
                    tick = (tick * 2).min(Duration::from_secs(3600));
                }
            }
        }
    }

    /// Stepping aside (module docs, "Bounds"), one socket at a time. A
    /// direction holding more than `high` (or one budget while the node is
    /// over its bound) takes its source out of `ACTIVE`: the verdict stops
    /// for it, and its later bytes wait in the receive queue under TCP's own
    /// flow control, while the other direction keeps being redirected. The
    /// other source follows once everything redirected from the first
    /// reached its destination (or when it is over the bound itself), so a
    /// fast direction does not wait for a slow one's reader. Some(why) once
    /// both left and every byte redirected before reached its destination's
    /// send queue: the psocks hold nothing any more.
    fn step_aside<'a>(
        &self,
        up: &mut Dir<'a>,
        down: &mut Dir<'a>,
        leaving: &mut Option<&'static str>,
    ) -> Result<Option<&'static str>, String> {
        let over = self.node.over();
        let threshold = self.limits.threshold(over);
        let why =
            if over { "the plane's node-wide bound was reached" } else { "a direction reached sockmap_queue_limit" };
        let mut flushed = [false, false];
        for (i, d) in [&*up, &*down].into_iter().enumerate() {
            let redirected = self.kernel.peer(d.src_cookie).bytes;
            flushed[i] = d.done
                || (!d.active
                    && sys::written_at_least(d.dst_fd()).map_err(|e| format!("TCP counters: {e}"))?
                        >= d.base + redirected + d.copied);
        }
        for (i, d) in [&mut *up, &mut *down].into_iter().enumerate() {
            if !d.active || d.done {
                continue;
            }
            let pressed = d.in_kernel > threshold;
            let follows = leaving.is_some() && flushed[1 - i];
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
            //
            // The kernel grows the receive buffer to fit the mark
            // (`tcp_set_rcvlowat`: 17 MB here, for a mark capped at
            // `tcp_rmem[2] / 2`) and never shrinks it: every tunnel that
            // stepped aside kept 17 MB buffers on both sockets for its life
            // on the next plane, and fifty saturated tunnels beside other
            // tests took the node near `tcp_mem`'s pressure line, where TCP
            // drops segments — one tunnel backed off to 13 s RTOs and moved
            // nothing for a minute (CI; `ss`: `backoff:6`, drops on both
            // sockets). A smaller mark does not work: at half the buffer (a
            // young socket has 128 KiB) or at `sockmap_queue_limit` a verdict
            // met the detach in about one of 100 step-asides. So the mark
            // stays high while the source leaves `ACTIVE`, and then the
            // buffer goes back to what TCP had made it, or to
            // `sockmap_queue_limit` if that is more (a young socket's 128 KiB
            // would slow the bulk tunnel the next plane carries); it stays
            // fixed from then on (`restore_rcvbuf`).
            if let Some(before) = d.quiescing {
                self.kernel.deactivate(d.src_cookie);
                let _ = sys::set_rcvlowat(d.src, 1);
                let floor = i32::try_from(self.limits.high).unwrap_or(i32::MAX);
                if let Err(e) = sys::restore_rcvbuf(d.src, before.max(floor)) {
                    tracing::debug!("sockmap: receive buffer stays grown: {e}");
                }
                d.quiescing = None;
                d.active = false;
            } else if pressed || follows {
                tracing::debug!(in_kernel = d.in_kernel, threshold, pressed, "sockmap: stepping aside: {why}");
                let before = sys::rcvbuf(d.src).map_err(|e| format!("SO_RCVBUF: {e}"))?;
                sys::set_rcvlowat(d.src, i32::MAX).map_err(|e| format!("SO_RCVLOWAT: {e}"))?;
                d.quiescing = Some(before);
                leaving.get_or_insert(why);
            }
        }
        let left = [&*up, &*down].iter().all(|d| d.done || !d.active);
        Ok((left && flushed[0] && flushed[1]).then(|| leaving.unwrap_or(why)))
    }
}

/// Bytes userspace moved or holds, both ways: did a readiness report help?
fn progress(up: &Dir<'_>, down: &Dir<'_>) -> u64 {
    up.copied + down.copied + up.drained + down.drained
}

/// What idleness is measured on: bytes moved and acknowledged either way.
fn activity_sign(up: &Dir<'_>, down: &Dir<'_>) -> (u64, u64, u64, u64) {
    let acked = |d: &Dir<'_>| sys::tcp_counters(d.dst_fd()).map(|c| c.bytes_acked).unwrap_or(0);
    (up.moved(), down.moved(), acked(up), acked(down))
}

/// Which socket of a direction failed, or whether its stream broke.
enum Failed {
    Src(io::Error),
    Dst(io::Error),
    /// The program could not cut a repeated head off a segment (an
    /// allocation failed) and dropped it: bytes are missing.
    Broken,
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

/// Updates one direction: counters, userspace forwarding once its source
/// left `ACTIVE`, FIN. Ok(true) when its state changed (check again soon).
fn check(kernel: &Kernel, limits: Limits, node_over: bool, d: &mut Dir<'_>) -> Result<bool, Failed> {
    if d.done {
        d.in_kernel = 0;
        return Ok(false);
    }
    let entry = kernel.peer(d.src_cookie);
    if entry.flags & PEER_BROKEN != 0 {
        return Err(Failed::Broken);
    }
    // Bytes the kernel redirected are no work for userspace. (Counting
    // redirects as a change woke every tunnel a handful of times per
    // message: 1.3x HAProxy's router CPU at 20,000 messages/s.) Pressure is
    // checked when the ring buffer says a direction moved another budget
    // of bytes.
    let mut changed = false;
    d.redirected = entry.bytes;
    let dst = sys::tcp_counters(d.dst_fd()).map_err(Failed::Dst)?;
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
        changed |= forward_tail(kernel, tail_max, d)?;
        tracing::trace!(
            redirected = d.redirected,
            drained = d.drained,
            copied = d.copied,
            tail = d.tail.len(),
            in_kernel = d.in_kernel,
            "sockmap: forwarding"
        );
        if d.drained_eof && d.tail.is_empty() && d.flushed().map_err(Failed::Dst)? {
            tracing::debug!(src = d.src_fd(), drained = d.drained, "sockmap: FIN passed on (out of ACTIVE)");
            sys::shutdown_write(d.dst).map_err(Failed::Dst)?;
            d.done = true;
            return Ok(true);
        }
        return Ok(changed);
    }

    if entry.bytes + limits.budget / 2 >= d.notify_at {
        // Ask for the next event `budget` bytes from here.
        d.notify_at = entry.bytes + limits.budget;
        kernel.control(d.src_cookie, d.control()).map_err(|e| Failed::Src(io::Error::other(chain(&e))))?;
    }
    let queued = if d.quiescing.is_some() { 0 } else { sys::inq(d.src_fd()).map_err(Failed::Src)? };
    if queued > 0 {
        // Bytes that arrived without a data-ready: run the verdict.
        sys::kick(d.src_fd()).map_err(Failed::Src)?;
        return Ok(true);
    }
    if d.eof {
        // Every byte before FIN was verdicted by now (the verdict runs as
        // segments arrive, FIN after them); once everything redirected
        // reached the send queue, FIN can follow.
        d.redirected = kernel.peer(d.src_cookie).bytes;
        if d.flushed().map_err(Failed::Dst)? {
            tracing::debug!(
                src = d.src_fd(),
                base = d.base,
                leftover = d.leftover,
                redirected = d.redirected,
                "sockmap: FIN passed on"
            );
            sys::shutdown_write(d.dst).map_err(Failed::Dst)?;
            d.done = true;
            return Ok(true);
        }
    }
    Ok(changed)
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
        let room = (tail_max.saturating_sub(written) as usize).saturating_sub(d.tail.len()).min(TAIL_BUFFER);
        let mut read_now = 0;
        // Read on until a read itself says FIN (epoll reports it while
        // bytes before it still wait in the receive queue).
        if room > 0 && !d.drained_eof {
            buf.resize(room, 0);
            match sys::recv_now(d.src, &mut buf[..room]) {
                Ok(0) => {
                    if !d.eof {
                        tracing::debug!(src = d.src_fd(), drained = d.drained, "sockmap: FIN seen (read)");
                    }
                    d.drained_eof = true;
                    d.eof = true;
                    moved = true;
                }
                Ok(n) => {
                    d.tail.extend_from_slice(&buf[..n]);
                    d.drained += n as u64;
                    read_now = n;
                    moved = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(Failed::Src(e)),
            }
        }
        let mut wrote_now = 0;
        if !d.tail.is_empty() {
            d.redirected = kernel.peer(d.src_cookie).bytes;
            d.awaiting_flush = !d.flushed().map_err(Failed::Dst)?;
            if !d.awaiting_flush {
                match sys::send_now(d.dst, &d.tail) {
                    Ok(n) => {
                        d.tail.advance(n);
                        d.copied += n as u64;
                        written += n as u64;
                        d.user_total.fetch_add(n as u64, Ordering::Relaxed);
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
    if d.tail.is_empty() && d.tail.capacity() > 0 {
        // Nothing held: give the buffer back (an idle tunnel holds none).
        d.tail = BytesMut::new();
    }
    Ok(moved)
}
