//! One direction of a sockmap tunnel: its phase, its counters, and what the
//! watch decides for it, as pure functions of that state. Nothing here
//! makes a syscall: [`super::carry`] and [`super::step_aside`] read the
//! kernel's counters, ask these functions, and act.
//!
//! A direction's life (its source socket's, really):
//!
//! ```text
//! Active ─(pressed, or following the other)─▶ Quiescing ─(one tick)─▶ Copying
//!   │                                             │                      │
//!   └───────────────────(FIN passed on)───────────┴──────────────────────┴─▶ Done
//! ```
//!
//! There is no way back to `Active`: a direction is never paused and
//! resumed (`step_aside`'s module docs say why), the tunnel leaves the
//! plane instead.

use std::os::fd::RawFd;
use std::sync::atomic::AtomicU64;

use bytes::BytesMut;
use upsplice_common::Control;

use crate::dataplane::{CloseReason, Outcome};

/// Where a direction stands between the handoff and its FIN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Phase {
    /// `src` is in `ACTIVE`: the verdict redirects its bytes.
    Active,
    /// `src` is about to leave `ACTIVE`: its low-water mark is raised so
    /// that TCP stops running the verdict for it first. Holds the receive
    /// buffer it had before (raising the mark grows it).
    Quiescing { rcvbuf: i32 },
    /// `src` left `ACTIVE`: the verdict no longer sees its bytes, which
    /// wait in its receive queue; userspace carries them.
    Copying,
    /// FIN passed on to `dst`; nothing more goes this way.
    Done,
}

/// What stepping aside does next with one direction's source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Leave {
    /// Nothing, for now.
    Stay,
    /// Raise the source's low-water mark: the first half of leaving
    /// `ACTIVE`. `pressed`: the direction is over the bound itself (else it
    /// follows the other one out).
    Quiesce { pressed: bool },
    /// Take the source out of `ACTIVE` and give back its receive buffer
    /// (`rcvbuf`, before it grew): the second half, one tick later.
    Deactivate { rcvbuf: i32 },
}

/// One direction of the tunnel.
pub(super) struct Dir<'a> {
    /// Where this direction's userspace bytes are added up.
    pub user_total: &'a AtomicU64,
    /// The socket this direction's bytes arrive on, and the one they leave by.
    pub src: RawFd,
    pub dst: RawFd,
    pub src_cookie: u64,
    /// Bytes written into `dst` (acked + queued) when redirection began.
    pub base: u64,
    /// Leftover bytes written by userspace before redirection began.
    pub leftover: u64,
    /// Bytes the verdict redirected from `src`, as last read.
    pub redirected: u64,
    /// Bytes of `src` consumed (read or verdicted) when the handoff began:
    /// leaving the maps checks that the kernel consumed nothing since that
    /// this tunnel did not account for.
    pub consumed_base: u64,
    /// Bytes written to `dst` and not yet acknowledged, as last checked.
    pub in_kernel: u64,
    /// `Control::notify_at` currently set for `src`.
    pub notify_at: u64,
    pub phase: Phase,
    /// `src` sent FIN.
    pub eof: bool,
    /// What userspace carried once `src` left `ACTIVE`; None until then.
    pub carried: Option<Box<Carried>>,
}

/// What userspace carries of a direction whose source left `ACTIVE`.
/// Boxed in [`Dir`], and only once used: most tunnels never step aside,
/// and a `Dir` stays in every idle tunnel's relay future.
#[derive(Debug, Default)]
pub(super) struct Carried {
    /// Bytes userspace read from `src`'s receive queue after it left
    /// `ACTIVE` (the verdict never saw them).
    pub drained: u64,
    /// A read from `src`, out of `ACTIVE`, returned 0: every byte before its
    /// FIN was read.
    pub drained_eof: bool,
    /// Of `drained`, bytes userspace wrote to `dst`.
    pub copied: u64,
    /// Bytes read from `src` by userspace, not written to `dst` yet.
    pub tail: BytesMut,
    /// `tail` waits for redirected bytes to leave the psock queue (polled
    /// on the timer; `dst` being writable says nothing about it).
    pub awaiting_flush: bool,
}

impl<'a> Dir<'a> {
    pub fn new(user_total: &'a AtomicU64, src: RawFd, dst: RawFd, src_cookie: u64, budget: u64) -> Dir<'a> {
        Dir {
            user_total,
            src,
            dst,
            src_cookie,
            base: 0,
            leftover: 0,
            redirected: 0,
            consumed_base: 0,
            in_kernel: 0,
            notify_at: budget,
            phase: Phase::Active,
            eof: false,
            carried: None,
        }
    }
}

impl Dir<'_> {
    /// What userspace carried, created on first use.
    pub fn carried_mut(&mut self) -> &mut Carried {
        self.carried.get_or_insert_with(Box::default)
    }

    /// [`Carried::drained`], 0 before anything was carried.
    pub fn drained(&self) -> u64 {
        self.carried.as_ref().map_or(0, |c| c.drained)
    }

    /// [`Carried::drained_eof`].
    pub fn drained_eof(&self) -> bool {
        self.carried.as_ref().is_some_and(|c| c.drained_eof)
    }

    /// [`Carried::copied`].
    pub fn copied(&self) -> u64 {
        self.carried.as_ref().map_or(0, |c| c.copied)
    }

    /// [`Carried::tail`], empty before anything was carried.
    pub fn tail(&self) -> &[u8] {
        self.carried.as_ref().map_or(&[], |c| &c.tail[..])
    }

    /// [`Carried::awaiting_flush`].
    pub fn awaiting_flush(&self) -> bool {
        self.carried.as_ref().is_some_and(|c| c.awaiting_flush)
    }

    /// Takes the tail, for the next plane to deliver first.
    pub fn take_tail(&mut self) -> BytesMut {
        self.carried.as_mut().map(|c| std::mem::take(&mut c.tail)).unwrap_or_default()
    }

    /// Bytes this direction relayed: leftovers, redirected, copied.
    pub fn moved(&self) -> u64 {
        self.leftover + self.redirected + self.copied()
    }

    /// Bytes `dst`'s send queue must have taken in before userspace writes
    /// or shuts it: its base and every byte redirected or copied since.
    fn owed(&self, redirected: u64) -> u64 {
        self.base + redirected + self.copied()
    }

    /// Bytes written to `dst` since the handoff (by the kernel or by
    /// userspace) that its reader has not acknowledged.
    pub fn in_kernel(&self, acked: u64) -> u64 {
        self.owed(self.redirected).saturating_sub(acked)
    }

    /// Flush: every byte redirected or copied so far reached `dst`'s send
    /// queue (none is left in the psock queue), given what `dst` was
    /// written at least.
    pub fn flushed_at(&self, written: u64) -> bool {
        written >= self.owed(self.redirected)
    }

    /// The same, for a settled step aside: the source is out of `ACTIVE`
    /// and everything `redirected` (read now, before `written`) reached
    /// `dst`. The counters are asked only when that can be so.
    pub fn settled<E>(
        &self,
        redirected: impl FnOnce() -> u64,
        written: impl FnOnce() -> Result<u64, E>,
    ) -> Result<bool, E> {
        Ok(match self.phase {
            Phase::Done => true,
            Phase::Copying => {
                let owed = self.owed(redirected());
                written()? >= owed
            }
            Phase::Active | Phase::Quiescing { .. } => false,
        })
    }

    pub fn done(&self) -> bool {
        self.phase == Phase::Done
    }

    /// Userspace carries this direction: its source left `ACTIVE`.
    pub fn copying(&self) -> bool {
        self.phase == Phase::Copying
    }

    /// Out of `ACTIVE` for good, or finished: nothing of it is redirected
    /// any more.
    pub fn left_active(&self) -> bool {
        matches!(self.phase, Phase::Copying | Phase::Done)
    }

    /// FIN came and is not passed on yet: the watch polls until it can be
    /// (nothing reports the bytes before it leaving the psock).
    pub fn closing(&self) -> bool {
        !self.done() && self.eof
    }

    /// FIN may follow once everything before it is flushed. Copying: a read
    /// returned FIN and the tail is out. Redirected: FIN was seen, and every
    /// byte before it was verdicted by then (the verdict runs as segments
    /// arrive, FIN after them).
    pub fn fin_pending(&self) -> bool {
        match self.phase {
            Phase::Copying => self.drained_eof() && self.tail().is_empty(),
            Phase::Active | Phase::Quiescing { .. } => self.eof,
            Phase::Done => false,
        }
    }

    /// Bytes queued on `src` while the verdict runs for it arrived without
    /// a data-ready: they are worth a kick. Not while quiescing (the raised
    /// mark holds them back on purpose), nor out of `ACTIVE`, nor after FIN
    /// (the verdict had seen every byte before it when FIN was reported).
    pub fn kicks(&self) -> bool {
        self.phase == Phase::Active && !self.eof
    }

    /// Whether a look reads this direction's counts from the program
    /// (`PEERS`): when its ring-buffer event came (`budget`: it moved
    /// another budget, or broke), when the timer or the node's crossing
    /// woke the watch (`all`), and whenever the direction is not plainly
    /// redirected (FIN came, or leaving `ACTIVE`). A socket report alone
    /// says nothing new about a redirected direction's counts.
    pub fn needs_counts(&self, budget: bool, all: bool) -> bool {
        budget || all || self.phase != Phase::Active || self.eof
    }

    /// The next `notify_at`, once the verdict has `redirected` bytes: the
    /// ring buffer reports the direction again `budget` bytes from here.
    /// None while the current mark is more than half a budget away.
    pub fn next_notify(&self, redirected: u64, budget: u64) -> Option<u64> {
        (redirected + budget / 2 >= self.notify_at).then_some(redirected + budget)
    }

    pub fn control(&self) -> Control {
        Control { notify_at: self.notify_at }
    }

    /// Step aside, for this direction: a direction holding more than
    /// `threshold` in the kernel, or `fast` (it passed `demote_rate`),
    /// begins to leave `ACTIVE`, and so does one whose tunnel is `leaving`
    /// once the other direction settled (so that a fast direction does not
    /// wait for a slow one's reader); one that began leaves on the next
    /// check.
    pub fn step_aside(&self, threshold: u64, fast: bool, leaving: bool, other_settled: bool) -> Leave {
        match self.phase {
            Phase::Quiescing { rcvbuf } => Leave::Deactivate { rcvbuf },
            Phase::Active => {
                let pressed = self.in_kernel > threshold || fast;
                if pressed || (leaving && other_settled) {
                    Leave::Quiesce { pressed }
                } else {
                    Leave::Stay
                }
            }
            Phase::Copying | Phase::Done => Leave::Stay,
        }
    }

    /// Most bytes one read from `src` may take into the tail, given
    /// `tail_max` and the bytes `written` from the tail in this pass (held
    /// in the kernel until acknowledged: they count against `tail_max`),
    /// in reads of `chunk` at most. 0 once a read returned FIN.
    pub fn read_room(&self, tail_max: u64, written: u64, chunk: usize) -> usize {
        if self.drained_eof() {
            return 0;
        }
        (tail_max.saturating_sub(written) as usize).saturating_sub(self.tail().len()).min(chunk)
    }

    /// Copying in userspace and waiting for its source to have bytes.
    pub fn waits_for_source(&self, tail_max: u64) -> bool {
        self.copying() && !self.eof && (self.tail().len() as u64) < tail_max
    }

    /// Copying in userspace and waiting for room in its destination.
    pub fn waits_for_destination(&self) -> bool {
        self.copying() && !self.awaiting_flush() && !self.tail().is_empty()
    }

    /// Bytes this direction holds: in the kernel (redirected or written and
    /// not acknowledged) and in userspace.
    pub fn held(&self) -> u64 {
        self.in_kernel + self.tail().len() as u64
    }
}

/// Epoll interest of one socket, the source of `src_of` and destination of
/// `dst_of`: `EPOLLRDHUP` while its FIN may still come, `EPOLLIN`/`EPOLLOUT`
/// while a direction copying in userspace waits on it (and `copy_ready`:
/// the last such report led to progress).
pub(super) fn interest(src_of: &Dir<'_>, dst_of: &Dir<'_>, copy_ready: bool, tail_max: u64) -> u32 {
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

/// Both directions left `ACTIVE` (or finished) and every byte redirected
/// before reached its destination (`settled`, per direction): the tunnel
/// can leave the maps.
pub(super) fn both_settled(up: &Dir<'_>, down: &Dir<'_>, settled: [bool; 2]) -> bool {
    up.left_active() && down.left_active() && settled[0] && settled[1]
}

/// How a tunnel ended, with the bytes each direction relayed.
pub(super) fn ended(up: &Dir<'_>, down: &Dir<'_>, reason: CloseReason) -> Outcome {
    Outcome { to_backend: up.moved(), to_client: down.moved(), reason }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use super::*;

    const BUDGET: u64 = 64 * 1024;

    fn dir(total: &AtomicU64) -> Dir<'_> {
        Dir::new(total, 10, 11, 1, BUDGET)
    }

    fn written(n: u64) -> impl FnOnce() -> Result<u64, Infallible> {
        move || Ok(n)
    }

    #[test]
    fn flushed_once_the_destination_took_base_redirected_and_copied() {
        let total = AtomicU64::new(0);
        let mut d = dir(&total);
        d.base = 100;
        d.redirected = 50;
        d.carried_mut().copied = 7;
        assert!(!d.flushed_at(156));
        assert!(d.flushed_at(157));
        assert_eq!(d.in_kernel(150), 7);
        assert_eq!(d.in_kernel(1_000), 0, "never below zero");
        d.leftover = 3;
        assert_eq!(d.moved(), 60);
    }

    #[test]
    fn settled_only_out_of_active_and_flushed() {
        let total = AtomicU64::new(0);
        let mut d = dir(&total);
        let asked = std::cell::Cell::new(false);
        let ask = || {
            asked.set(true);
            Ok::<_, Infallible>(1_000)
        };
        let count = || {
            asked.set(true);
            0
        };
        assert_eq!(d.settled(count, ask), Ok(false), "active: still redirected");
        assert!(!asked.get(), "no counters read for an active direction");
        d.phase = Phase::Quiescing { rcvbuf: 1 };
        assert_eq!(d.settled(count, written(1_000)), Ok(false));
        assert!(!asked.get(), "nor for a quiescing one");
        d.phase = Phase::Copying;
        d.base = 10;
        assert_eq!(d.settled(|| 20, written(29)), Ok(false), "redirected bytes still in the psock");
        assert_eq!(d.settled(|| 20, written(30)), Ok(true));
        d.phase = Phase::Done;
        assert_eq!(d.settled(count, written(0)), Ok(true), "finished: nothing owed");
        assert!(!asked.get(), "nor for a finished one");
    }

    #[test]
    fn fin_follows_what_came_before_it() {
        let total = AtomicU64::new(0);
        let mut d = dir(&total);
        assert!(!d.fin_pending());
        d.eof = true;
        assert!(d.fin_pending(), "redirected: FIN seen is enough");
        assert!(d.closing());
        d.phase = Phase::Quiescing { rcvbuf: 1 };
        assert!(d.fin_pending());
        d.phase = Phase::Copying;
        assert!(!d.fin_pending(), "copying: epoll's FIN may precede queued bytes");
        d.carried_mut().drained_eof = true;
        d.carried_mut().tail.extend_from_slice(b"rest");
        assert!(!d.fin_pending(), "the tail goes first");
        d.carried_mut().tail.clear();
        assert!(d.fin_pending());
        d.phase = Phase::Done;
        assert!(!d.fin_pending());
        assert!(!d.closing());
    }

    #[test]
    fn renotifies_half_a_budget_before_the_mark() {
        let total = AtomicU64::new(0);
        let mut d = dir(&total);
        assert_eq!(d.notify_at, BUDGET);
        assert_eq!(d.next_notify(0, BUDGET), None);
        assert_eq!(d.next_notify(BUDGET / 2 - 1, BUDGET), None);
        assert_eq!(d.next_notify(BUDGET / 2, BUDGET), Some(BUDGET / 2 + BUDGET));
        d.notify_at = 10 * BUDGET;
        assert_eq!(d.next_notify(9 * BUDGET, BUDGET), None);
        assert_eq!(d.next_notify(10 * BUDGET, BUDGET), Some(11 * BUDGET));
        assert_eq!(d.control().notify_at, 10 * BUDGET);
    }

    #[test]
    fn kicks_only_while_the_verdict_runs() {
        let total = AtomicU64::new(0);
        let mut d = dir(&total);
        assert!(d.kicks());
        for phase in [Phase::Quiescing { rcvbuf: 1 }, Phase::Copying, Phase::Done] {
            d.phase = phase;
            assert!(!d.kicks(), "{phase:?}");
        }
        d.phase = Phase::Active;
        d.eof = true;
        assert!(!d.kicks(), "FIN came after every byte was verdicted");
    }

    #[test]
    fn counts_are_read_when_they_can_have_moved_on_something() {
        let total = AtomicU64::new(0);
        let mut d = dir(&total);
        assert!(!d.needs_counts(false, false), "a socket report: nothing to read for a redirected direction");
        assert!(d.needs_counts(true, false), "its ring-buffer event");
        assert!(d.needs_counts(false, true), "the timer or the node's crossing");
        d.eof = true;
        assert!(d.needs_counts(false, false), "FIN: passed on once every count is out");
        d.eof = false;
        for phase in [Phase::Quiescing { rcvbuf: 1 }, Phase::Copying, Phase::Done] {
            d.phase = phase;
            assert!(d.needs_counts(false, false), "{phase:?}");
        }
    }

    #[test]
    fn steps_aside_when_pressed_or_following_then_leaves_a_tick_later() {
        let total = AtomicU64::new(0);
        let mut d = dir(&total);
        d.in_kernel = 100;
        assert_eq!(d.step_aside(100, false, false, true), Leave::Stay, "at the threshold: stays");
        assert_eq!(d.step_aside(99, false, false, false), Leave::Quiesce { pressed: true });
        assert_eq!(d.step_aside(100, false, true, false), Leave::Stay, "the other direction still owes bytes");
        assert_eq!(d.step_aside(100, false, true, true), Leave::Quiesce { pressed: false });
        assert_eq!(d.step_aside(100, false, false, true), Leave::Stay, "nothing to follow");
        assert_eq!(d.step_aside(100, true, false, false), Leave::Quiesce { pressed: true }, "past demote_rate");
        d.phase = Phase::Quiescing { rcvbuf: 131_072 };
        assert_eq!(d.step_aside(0, false, true, true), Leave::Deactivate { rcvbuf: 131_072 });
        for phase in [Phase::Copying, Phase::Done] {
            d.phase = phase;
            assert_eq!(d.step_aside(0, false, true, true), Leave::Stay, "{phase:?}");
        }
    }

    #[test]
    fn both_settled_needs_both_out_and_flushed() {
        let total = AtomicU64::new(0);
        let (mut up, mut down) = (dir(&total), dir(&total));
        up.phase = Phase::Copying;
        assert!(!both_settled(&up, &down, [true, true]), "down still active");
        down.phase = Phase::Quiescing { rcvbuf: 1 };
        assert!(!both_settled(&up, &down, [true, true]), "down still quiescing");
        down.phase = Phase::Done;
        assert!(!both_settled(&up, &down, [false, true]));
        assert!(both_settled(&up, &down, [true, true]));
    }

    #[test]
    fn read_room_keeps_kernel_and_tail_within_the_bound() {
        let total = AtomicU64::new(0);
        let mut d = dir(&total);
        assert_eq!(d.read_room(1_000_000, 0, 65_536), 65_536, "one chunk at most");
        assert_eq!(d.read_room(1_000, 0, 65_536), 1_000);
        assert_eq!(d.read_room(1_000, 400, 65_536), 600, "written bytes count");
        d.carried_mut().tail.extend_from_slice(&[0; 500]);
        assert_eq!(d.read_room(1_000, 400, 65_536), 100);
        assert_eq!(d.read_room(1_000, 600, 65_536), 0);
        assert_eq!(d.read_room(100, 600, 65_536), 0, "never below zero");
        d.carried_mut().tail.clear();
        d.carried_mut().drained_eof = true;
        assert_eq!(d.read_room(1_000_000, 0, 65_536), 0, "nothing after FIN");
    }

    #[test]
    fn interest_is_fin_always_and_readiness_only_while_copying() {
        let total = AtomicU64::new(0);
        let (mut up, down) = (dir(&total), dir(&total));
        let rdhup = libc::EPOLLRDHUP as u32;
        let (rd, wr) = (libc::EPOLLIN as u32, libc::EPOLLOUT as u32);
        assert_eq!(interest(&up, &down, true, 1_000), rdhup, "redirected: FIN only");
        up.phase = Phase::Copying;
        assert_eq!(interest(&up, &down, true, 1_000), rdhup | rd, "copying: the source's bytes");
        assert_eq!(interest(&up, &down, false, 1_000), rdhup, "the last readiness moved nothing");
        up.carried_mut().tail.extend_from_slice(&[0; 1_000]);
        assert_eq!(interest(&up, &down, true, 1_000), rdhup, "the tail is full");
        assert_eq!(interest(&down, &up, true, 1_000), rdhup | wr, "the tail waits for room");
        up.carried_mut().awaiting_flush = true;
        assert_eq!(interest(&down, &up, true, 1_000), rdhup, "the tail waits for the psock, not the socket");
        up.eof = true;
        up.carried_mut().tail.clear();
        assert_eq!(interest(&up, &down, true, 1_000), 0, "FIN seen: nothing more to read");
    }

    #[test]
    fn held_counts_kernel_and_tail() {
        let total = AtomicU64::new(0);
        let mut d = dir(&total);
        d.in_kernel = 10;
        d.carried_mut().tail.extend_from_slice(b"abc");
        assert_eq!(d.held(), 13);
        assert!(!d.left_active());
        d.phase = Phase::Copying;
        assert!(d.left_active() && d.copying() && !d.done());
    }
}
