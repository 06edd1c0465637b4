//! Watching one tunnel the kernel relays, until it ends or settles to step
//! aside.
//!
//! The sockets are out of tokio (whose reactor would wake for every
//! redirected segment) and in the plane's one epoll set, armed one-shot
//! for what the tunnel waits on: FIN, hang-up and errors; readable/writable
//! only while userspace copies. The tunnel wakes on those reports, on a
//! ring-buffer event when a direction moved another `budget` bytes, when
//! the node-wide bound is crossed, on the drain, and at the idle deadline,
//! all through its signal from the events thread; and on a timer of its
//! own only while something nothing reports is pending ([`super::pace`]).
//! An idle tunnel's watch is one wait on its signal: no timer, no wait on
//! the drain token. It reads the kernel's counters when it wakes, not
//! in between: a tunnel that carries a few small messages and closes is
//! looked at once per FIN.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use tokio::time::Sleep;

use super::super::deadlines::Entry;
use super::super::kernel::{Kernel, Signal};
use super::super::sys;
use super::bounds::{HeldShare, Rate};
use super::carry::{check, Failed, Reads};
use super::direction::{interest, Dir};
use super::pace::{Pace, Pending, Sign};
use super::step_aside::step_aside;
use super::Shared;
use crate::dataplane::{CloseReason, Direction};

/// How the watch of a tunnel ended.
pub(super) enum Ended {
    Closed(CloseReason),
    /// Both sources left `ACTIVE` and settled: it leaves the maps
    /// ([`super::step_aside::leave`]).
    StepAside(&'static str),
}

/// What the watching of one tunnel needs besides its two directions.
///
/// Owned, as [`Watched`] is: [`Watch::run`] hands both back when the
/// watch ends. Its future is then where they are kept for the tunnel's
/// life, once (references to the relay's own copies cost 80 bytes more in
/// every idle tunnel).
pub(super) struct Watch<'w> {
    pub kernel: &'w Kernel,
    /// The bounds and the node's total.
    pub shared: &'w Shared,
    pub signal: Arc<Signal>,
    pub idle_timeout: Duration,
    pub drain: tokio_util::sync::CancellationToken,
}

/// What the watch moves on: both directions and the tunnel's share of the
/// node's total.
pub(super) struct Watched<'a, 's> {
    pub up: Dir<'a>,
    pub down: Dir<'a>,
    pub share: HeldShare<'s>,
}

/// What each socket (client, backend) is armed for.
#[derive(Debug, Default)]
struct Armed {
    /// None: disarmed (a report came) or never armed.
    events: [Option<u32>; 2],
    /// Hung up: never armed again (it would report HUP on every arming).
    hung_up: [bool; 2],
}

impl Armed {
    /// As [`Kernel::register`] left both sockets (a report that came since
    /// is taken before they are armed again).
    fn registered() -> Armed {
        Armed { events: [Some(Kernel::ARMED_AT_REGISTER); 2], hung_up: [false; 2] }
    }

    /// Whether socket `side` must be armed again to report `want`.
    fn needs(&self, side: usize, want: u32) -> bool {
        !self.hung_up[side] && self.events[side] != Some(want)
    }
}

/// What one epoll report on a socket says.
#[derive(Debug, PartialEq, Eq)]
struct Report {
    /// `EPOLLERR`: `SO_ERROR` says which (0: none after all).
    error: bool,
    /// FIN came (`EPOLLRDHUP`), or the socket hung up.
    fin: bool,
    /// `EPOLLHUP`.
    hup: bool,
}

impl Report {
    fn new(bits: u32) -> Report {
        let hup = bits & libc::EPOLLHUP as u32 != 0;
        Report { error: bits & libc::EPOLLERR as u32 != 0, fin: bits & libc::EPOLLRDHUP as u32 != 0 || hup, hup }
    }
}

/// Bytes userspace moved or holds, both ways: did a readiness report help?
fn progress(up: &Dir<'_>, down: &Dir<'_>) -> u64 {
    up.copied() + down.copied() + up.drained() + down.drained()
}

/// What idleness is measured on: bytes moved and acknowledged either way.
fn activity_sign(up: &Dir<'_>, down: &Dir<'_>) -> Sign {
    let acked = |d: &Dir<'_>| sys::tcp_counters(d.dst).map(|c| c.bytes_acked).unwrap_or(0);
    up.moved().wrapping_add(down.moved()).wrapping_add(acked(up)).wrapping_add(acked(down))
}

/// Why the tunnel steps aside, once it began to (out of `ACTIVE`), and how
/// fast its directions move (whether it should begin to).
struct Leaving {
    why: Option<&'static str>,
    /// Boxed, and only from the first ring-buffer event (a direction moved
    /// a budget): the relay future stays in every idle tunnel, and most
    /// never move a budget.
    rate: Option<Box<Rate>>,
}

/// What woke the watch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Woke {
    /// Socket reports, and ring-buffer events for the directions from the
    /// client and from the backend.
    Reports { budget: [bool; 2] },
    /// The node crossed its bound: every direction's share is read again.
    Crossed,
    /// The timer: something pending, or the idle deadline.
    Timer,
}

impl Woke {
    /// What a look reads for direction `side` (0: from the client) in
    /// state `d`.
    fn reads(self, side: usize, d: &Dir<'_>) -> Reads {
        let (budget, all) = match self {
            Woke::Reports { budget } => (budget[side], false),
            Woke::Crossed | Woke::Timer => (false, true),
        };
        Reads { counts: d.needs_counts(budget, all), kick: self == Woke::Timer }
    }
}

impl<'w> Watch<'w> {
    /// Watches the tunnel until it ends or settles to step aside.
    ///
    /// Not an `async fn`: its future, which stays for the tunnel's life,
    /// would keep its arguments twice (as given, and moved into its body).
    #[expect(clippy::manual_async_fn, reason = "an async fn's future keeps its arguments twice")]
    pub fn run<'r, 'a, 's>(
        self,
        mut watched: Watched<'a, 's>,
        deadline: &'r mut Entry,
    ) -> impl Future<Output = (Ended, Self, Watched<'a, 's>)> + Send + use<'r, 'w, 'a, 's> {
        // `watched` is used in place, never moved out (nor borrowed into a
        // local): a coroutine keeps room for what it captured for its
        // whole life.
        async move {
            let mut pace = Pace::new(Instant::now());
            let mut leaving = Leaving { why: None, rate: None };
            let mut armed = Armed::registered();
            // The node's crossings seen so far ([`NodeHeld::crossings`]).
            let mut crossings = self.shared.node.crossings();
            // A timer of the tunnel's own, only while something nothing
            // reports is pending; boxed, and dropped when nothing is: the
            // idle deadline is the events thread's (`Deadlines`).
            let mut tick: Option<Pin<Box<Sleep>>> = None;
            // Nothing to look at before the first wake: the handoff left both
            // directions as it counted them and kicked both sources; a FIN or
            // an error that came meanwhile was reported (the sockets are armed
            // for them from their registration), bytes redirected meanwhile by
            // the ring buffer.
            let mut woke = None;
            let ended = loop {
                if self.draining() {
                    break Ended::Closed(CloseReason::Drain);
                }
                if let Some(woke) = woke {
                    if let Some(ended) =
                        self.look(&mut watched.up, &mut watched.down, &mut watched.share, &mut pace, &mut leaving, woke)
                    {
                        break ended;
                    }
                }
                pace.judge_readiness(progress(&watched.up, &watched.down));
                let now = Instant::now();
                let Some(idle_deadline) =
                    pace.idle_deadline(now, self.idle_timeout, || activity_sign(&watched.up, &watched.down))
                else {
                    break Ended::Closed(CloseReason::Idle);
                };
                self.kernel.deadlines.set(watched.up.src_cookie, idle_deadline, deadline);
                let held = watched.up.in_kernel.max(watched.down.in_kernel);
                let pending = Pending::of(
                    leaving.why.is_some(),
                    watched.up.closing() || watched.down.closing(),
                    held,
                    self.shared.limits.budget,
                );
                if pending == Pending::Nothing {
                    tick = None;
                } else {
                    let at = tokio::time::Instant::from_std(now + pace.wait(pending, idle_deadline, now));
                    match &mut tick {
                        Some(t) => t.as_mut().reset(at),
                        None => tick = Some(Box::pin(tokio::time::sleep_until(at))),
                    }
                }
                let copy_armed = match self.arm(&watched.up, &watched.down, pace.copy_ready(), &mut armed) {
                    Ok(copy_armed) => copy_armed,
                    Err(e) => {
                        tracing::warn!("sockmap: epoll: {e}");
                        break Ended::Closed(CloseReason::Error);
                    }
                };
                let before = progress(&watched.up, &watched.down);

                let ticked = std::future::poll_fn(|cx| {
                    if self.signal.poll_woken(cx).is_ready() {
                        return Poll::Ready(false);
                    }
                    match &mut tick {
                        Some(t) => t.as_mut().poll(cx).map(|()| true),
                        None => Poll::Pending,
                    }
                })
                .await;
                woke = Some(if ticked {
                    pace.timer();
                    Woke::Timer
                } else {
                    if self.draining() {
                        break Ended::Closed(CloseReason::Drain);
                    }
                    if let Some(ended) = self.reports(&mut watched.up, &mut watched.down, &mut armed) {
                        break ended;
                    }
                    let budget = [self.signal.take_budget(0), self.signal.take_budget(1)];
                    let due = self.signal.take_deadline();
                    // The node's crossing wakes every tunnel through its
                    // signal; a crossing reads everything (and the reports
                    // just taken come with it), as the idle deadline does.
                    match self.shared.node.crossings() {
                        now if now != crossings => {
                            crossings = now;
                            pace.changed();
                            Woke::Crossed
                        }
                        _ if due => {
                            pace.timer();
                            Woke::Timer
                        }
                        _ => {
                            pace.reported(copy_armed, before);
                            Woke::Reports { budget }
                        }
                    }
                });
            };
            (ended, self, watched)
        }
    }

    /// The drain deadline passed: for the plane ([`Shared::draining`]), or
    /// for this tunnel's token.
    fn draining(&self) -> bool {
        self.shared.draining.load(Ordering::Acquire) || self.drain.is_cancelled()
    }
}

impl Watch<'_> {
    /// One look at both directions: queues, FINs and progress, the node's
    /// share, then stepping aside. Some(how) when the watch ends.
    fn look<'a>(
        &self,
        up: &mut Dir<'a>,
        down: &mut Dir<'a>,
        share: &mut HeldShare<'_>,
        pace: &mut Pace,
        leaving: &mut Leaving,
        woke: Woke,
    ) -> Option<Ended> {
        for (side, (dir, direction)) in
            [(&mut *up, Direction::ToBackend), (&mut *down, Direction::ToClient)].into_iter().enumerate()
        {
            let reads = woke.reads(side, dir);
            match check(self.kernel, self.shared.limits, self.shared.node.over(), dir, reads) {
                Ok(true) => pace.moved(Instant::now()),
                Ok(false) => {}
                Err(failed) => {
                    if let Failed::Broken = failed {
                        tracing::warn!("sockmap: {failed}; resetting the tunnel");
                    } else {
                        tracing::debug!("sockmap: {failed}");
                    }
                    return Some(Ended::Closed(failed.close_reason(direction)));
                }
            }
            share.set(direction.index(), dir.held());
        }
        if up.done() && down.done() {
            return Some(Ended::Closed(CloseReason::Done));
        }
        // A direction past `demote_rate` begins to step aside (judged only
        // until the tunnel began to leave, for whatever reason).
        let limits = &self.shared.limits;
        let fast = match (&mut leaving.rate, woke) {
            _ if limits.demote_rate == 0 || leaving.why.is_some() => [false; 2],
            (Some(rate), _) => rate.over(limits, Instant::now(), [up.moved(), down.moved()]),
            (None, Woke::Reports { budget }) if budget.contains(&true) => {
                leaving.rate = Some(Box::new(Rate::new(Instant::now(), [up.moved(), down.moved()])));
                [false; 2]
            }
            (None, _) => [false; 2],
        };
        match step_aside(self.kernel, *limits, self.shared.node.over(), up, down, &mut leaving.why, fast) {
            Ok(Some(why)) => Some(Ended::StepAside(why)),
            Ok(None) => None,
            Err(e) => {
                tracing::warn!("sockmap: stepping aside: {e}");
                Some(Ended::Closed(CloseReason::Error))
            }
        }
    }

    /// Arms each socket for what it should report next. Readiness only
    /// helps a direction whose next step waits on a socket (not on the
    /// psock queue flushing, which the timer polls), and only if the last
    /// readiness led to progress (`copy_ready`). Ok(true) when a socket is
    /// armed for readiness.
    fn arm(&self, up: &Dir<'_>, down: &Dir<'_>, copy_ready: bool, armed: &mut Armed) -> std::io::Result<bool> {
        let over = self.shared.node.over();
        let tail_max = |d: &Dir<'_>| self.shared.limits.tail_max(over, d.in_kernel);
        let want = [interest(up, down, copy_ready, tail_max(up)), interest(down, up, copy_ready, tail_max(down))];
        for (side, d) in [up, down].into_iter().enumerate() {
            if armed.needs(side, want[side]) {
                // A source's cookie is also its epoll token.
                self.kernel.arm(d.src_cookie, d.src, want[side])?;
                armed.events[side] = Some(want[side]);
            }
        }
        Ok(want.iter().any(|w| w & (libc::EPOLLIN | libc::EPOLLOUT) as u32 != 0))
    }

    /// Takes the socket reports the events thread left: an error ends the
    /// tunnel (Some), FIN and hang-up are noted.
    fn reports<'a>(&self, up: &mut Dir<'a>, down: &mut Dir<'a>, armed: &mut Armed) -> Option<Ended> {
        for (side, dir) in [up, down].into_iter().enumerate() {
            let bits = self.signal.take(side);
            if bits == 0 {
                continue;
            }
            armed.events[side] = None;
            let from = Direction::BOTH[side];
            let from_client = from == Direction::ToBackend;
            let report = Report::new(bits);
            let so_error = if report.error { sys::take_error(dir.src) } else { Ok(0) };
            tracing::trace!(bits, ?so_error, from_client, "sockmap: socket event");
            if so_error.as_ref().map(|&e| e != 0).unwrap_or(true) {
                tracing::debug!(from_client, bits, ?so_error, "sockmap: socket error");
                return Some(Ended::Closed(from.source_failed()));
            }
            if report.fin {
                if !dir.eof {
                    tracing::debug!(from_client, bits, "sockmap: FIN seen (epoll)");
                }
                dir.eof = true;
            }
            armed.hung_up[side] |= report.hup;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_says_error_fin_and_hang_up() {
        let bit = |b: libc::c_int| b as u32;
        assert_eq!(Report::new(0), Report { error: false, fin: false, hup: false });
        assert_eq!(Report::new(bit(libc::EPOLLRDHUP)), Report { error: false, fin: true, hup: false });
        assert_eq!(
            Report::new(bit(libc::EPOLLHUP)),
            Report { error: false, fin: true, hup: true },
            "a hang-up is a FIN"
        );
        assert_eq!(
            Report::new(bit(libc::EPOLLERR) | bit(libc::EPOLLIN)),
            Report { error: true, fin: false, hup: false }
        );
    }

    #[test]
    fn a_report_reads_only_the_counts_it_concerns_and_only_the_timer_kicks() {
        let total = std::sync::atomic::AtomicU64::new(0);
        let d = Dir::new(&total, 10, 11, 1, 1 << 20);
        let report = Woke::Reports { budget: [false, true] };
        assert!(!report.reads(0, &d).counts, "a socket report: no PEERS lookup for a redirected direction");
        assert!(report.reads(1, &d).counts, "its ring-buffer event");
        assert!(!report.reads(1, &d).kick);
        assert!(Woke::Crossed.reads(0, &d).counts && !Woke::Crossed.reads(0, &d).kick);
        assert!(Woke::Timer.reads(0, &d).counts && Woke::Timer.reads(0, &d).kick);
    }

    #[test]
    fn a_socket_is_armed_again_only_for_something_new_and_never_once_hung_up() {
        let mut armed = Armed::default();
        assert!(armed.needs(0, 0), "never armed");
        armed.events[0] = Some(libc::EPOLLRDHUP as u32);
        assert!(!armed.needs(0, libc::EPOLLRDHUP as u32));
        assert!(armed.needs(0, (libc::EPOLLRDHUP | libc::EPOLLIN) as u32));
        armed.events[0] = None;
        assert!(armed.needs(0, libc::EPOLLRDHUP as u32), "a report disarmed it");
        armed.hung_up[1] = true;
        assert!(!armed.needs(1, libc::EPOLLRDHUP as u32));
        let registered = Armed::registered();
        assert!(!registered.needs(0, libc::EPOLLRDHUP as u32), "armed for FIN when registered");
        assert!(!registered.needs(1, libc::EPOLLRDHUP as u32));
        assert!(registered.needs(0, (libc::EPOLLRDHUP | libc::EPOLLIN) as u32));
    }
}
