//! When the watch looks at a tunnel again, and when the tunnel is idle:
//! the watch's clock, as pure state (the caller passes the time).
//!
//! The watch sleeps on what moves a tunnel on: socket reports (FIN,
//! hang-up, errors; readiness while userspace copies), ring-buffer events
//! (a direction moved another budget of bytes), the node-wide bound's
//! crossing, the drain, and the idle deadline. A timer runs only in the
//! states nothing reports ([`Pending`]):
//!
//! * [`Pending::Busy`]: the tunnel steps aside (a quiescing source leaves
//!   `ACTIVE` one tick later, and bytes carried in userspace wait for the
//!   redirected ones before them to leave the psock), or a FIN waits for
//!   the bytes before it to leave the psock: nothing reports a psock's
//!   queue draining;
//! * [`Pending::Held`]: a direction holds a budget or more in the kernel:
//!   its reader acknowledges them without a report, and the node-wide
//!   count ([`super::bounds::NodeHeld`]) should follow it down.
//!
//! That timer starts at [`TICK_MIN`] after anything happened and doubles
//! while nothing does. A tunnel that only carries small messages sets none
//! of them: it is looked at when a socket reports, and at its idle
//! deadline.

use std::time::{Duration, Instant};

/// Shortest wait between checks while something is pending.
pub(super) const TICK_MIN: Duration = Duration::from_millis(TICK_MIN_MS as u64);
const TICK_MIN_MS: u8 = 1;
/// Longest wait between checks while the tunnel is [`Pending::Busy`].
const BUSY_MAX: Duration = Duration::from_millis(BUSY_MAX_MS as u64);
const BUSY_MAX_MS: u8 = 20;
/// Longest wait between checks while the tunnel is [`Pending::Held`] (a
/// stale count keeps the node's total high for that long at most: other
/// tunnels step aside early, never late). As short as [`BUSY_MAX`]: a
/// timer wake also checks whether a psock stalled with bytes queued and
/// kicks it, and with a 1 s cap a slow reader behind a full psock once
/// waited 2.9 s for bytes (CI, `sockmap::two_way_with_a_slow_far_reader`;
/// the old watch looked at most every 20 ms there). Tunnels that carry
/// small messages never hold a budget: they keep no timer.
const HELD_MAX_MS: u8 = BUSY_MAX_MS;
#[cfg(test)]
const HELD_MAX: Duration = Duration::from_millis(HELD_MAX_MS as u64);

/// What idleness is measured on: the sum of bytes moved, and of bytes
/// acknowledged by each destination's reader, either way. Each count only
/// grows, so the sum changes exactly when one of them does (8 bytes in
/// every idle tunnel, not 32).
pub(super) type Sign = u64;

/// What only time moves a tunnel on from, after a look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pending {
    /// Nothing: reports, ring-buffer events and the idle deadline suffice.
    Nothing,
    /// A direction holds `budget` bytes or more in the kernel.
    Held,
    /// Stepping aside, or a FIN waiting for its bytes to leave the psock.
    Busy,
}

impl Pending {
    /// `leaving`: the tunnel began to step aside; `closing`: a FIN came and
    /// is not passed on yet; `held`: the most bytes a direction holds in
    /// the kernel, as last read; `budget`: the ring buffer reports a
    /// direction each time it moved that much.
    pub fn of(leaving: bool, closing: bool, held: u64, budget: u64) -> Pending {
        if leaving || closing {
            Pending::Busy
        } else if held >= budget {
            Pending::Held
        } else {
            Pending::Nothing
        }
    }
}

/// The watch's clock for one tunnel.
pub(super) struct Pace {
    /// Milliseconds, [`TICK_MIN`] to [`HELD_MAX`] (a byte: the clock stays
    /// in every idle tunnel).
    tick_ms: u8,
    /// The last readiness report moved nothing: wait for the timer once.
    copy_stalled: bool,
    /// Bytes userspace had moved when a readiness report woke the watch,
    /// until the next pass compares ([`Pace::judge_readiness`]).
    copy_fired_at: Option<u64>,
    /// None until read first (at the first idle deadline).
    last_sign: Option<Sign>,
    last_activity: Instant,
}

impl Pace {
    /// The clock of a tunnel starting at `now`. Its activity sign is not
    /// read now (two TCP_INFO calls most tunnels never need): the first
    /// idle deadline reads it and counts as activity, so a tunnel silent
    /// from its start closes two idle timeouts after it, one silent later
    /// between one and two, as always.
    pub fn new(now: Instant) -> Pace {
        Pace { tick_ms: TICK_MIN_MS, copy_stalled: false, copy_fired_at: None, last_sign: None, last_activity: now }
    }

    /// Something changed (the node crossed its bound): look again soon.
    pub fn changed(&mut self) {
        self.tick_ms = TICK_MIN_MS;
    }

    /// A look moved the tunnel on at `now` (a kick, FIN passed on, bytes
    /// carried): activity, and look again soon.
    pub fn moved(&mut self, now: Instant) {
        self.tick_ms = TICK_MIN_MS;
        self.last_activity = now;
    }

    /// A socket report woke the watch; `copy_armed`: a socket was armed for
    /// readiness, with `progress` bytes moved by userspace then.
    pub fn reported(&mut self, copy_armed: bool, progress: u64) {
        if copy_armed {
            self.copy_fired_at = Some(progress);
        }
        self.tick_ms = TICK_MIN_MS;
    }

    /// The timer fired: readiness may help again, and the next wait is
    /// twice as long.
    pub fn timer(&mut self) {
        self.copy_stalled = false;
        self.tick_ms = self.tick_ms.saturating_mul(2).min(HELD_MAX_MS);
    }

    /// After a readiness report, `progress` says whether it helped; if it
    /// did not, the watch waits for the timer before arming for it again.
    pub fn judge_readiness(&mut self, progress: u64) {
        if let Some(before) = self.copy_fired_at.take() {
            self.copy_stalled = progress == before;
        }
    }

    /// Arm sockets for readiness: the last report led to progress.
    pub fn copy_ready(&self) -> bool {
        !self.copy_stalled
    }

    /// The idle deadline at `now`, or None: idle. Idleness is checked
    /// lazily, when the deadline comes: the sign (`sign`, two TCP_INFO
    /// calls) is read then, not on every wake; a tunnel closes between one
    /// and two idle timeouts after its last byte.
    pub fn idle_deadline(&mut self, now: Instant, timeout: Duration, sign: impl FnOnce() -> Sign) -> Option<Instant> {
        let mut deadline = self.last_activity + timeout;
        if now >= deadline {
            let sign = Some(sign());
            if sign != self.last_sign {
                self.last_sign = sign;
                self.last_activity = now;
                deadline = now + timeout;
            }
        }
        (now < deadline).then_some(deadline)
    }

    /// How long to wait at `now` for the next report: until the idle
    /// deadline when nothing is pending, else the tick, at most
    /// [`HELD_MAX`] (and never past the idle deadline) while a direction
    /// holds a budget, at most [`BUSY_MAX`] while busy.
    pub fn wait(&self, pending: Pending, idle_deadline: Instant, now: Instant) -> Duration {
        let to_deadline = idle_deadline.saturating_duration_since(now);
        let tick = Duration::from_millis(self.tick_ms.into());
        match pending {
            Pending::Nothing => to_deadline,
            Pending::Held => tick.min(to_deadline),
            Pending::Busy => tick.min(BUSY_MAX),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(10);
    const BUDGET: u64 = 1 << 20;

    #[test]
    fn only_stepping_aside_a_pending_fin_or_a_held_budget_start_the_timer() {
        assert_eq!(Pending::of(false, false, 0, BUDGET), Pending::Nothing);
        assert_eq!(Pending::of(false, false, BUDGET - 1, BUDGET), Pending::Nothing, "small messages: no timer");
        assert_eq!(Pending::of(false, false, BUDGET, BUDGET), Pending::Held);
        assert_eq!(Pending::of(true, false, 0, BUDGET), Pending::Busy);
        assert_eq!(Pending::of(false, true, BUDGET, BUDGET), Pending::Busy);
    }

    #[test]
    fn nothing_pending_waits_for_the_idle_deadline() {
        let t0 = Instant::now();
        let p = Pace::new(t0);
        assert_eq!(p.wait(Pending::Nothing, t0 + IDLE, t0), IDLE, "no tick");
        assert_eq!(p.wait(Pending::Nothing, t0 + IDLE, t0 + IDLE), Duration::ZERO);
        assert_eq!(p.wait(Pending::Nothing, t0, t0 + IDLE), Duration::ZERO, "never negative");
    }

    #[test]
    fn the_timer_backs_off_and_any_change_resets_it() {
        let t0 = Instant::now();
        let mut p = Pace::new(t0);
        let deadline = t0 + IDLE;
        assert_eq!(p.wait(Pending::Busy, deadline, t0), TICK_MIN);
        assert_eq!(p.wait(Pending::Held, deadline, t0), TICK_MIN);
        p.timer();
        p.timer();
        assert_eq!(p.wait(Pending::Held, deadline, t0), 4 * TICK_MIN);
        for _ in 0..10 {
            p.timer();
        }
        assert_eq!(p.wait(Pending::Busy, deadline, t0), BUSY_MAX, "busy: polled at least every 20 ms");
        assert_eq!(p.wait(Pending::Held, deadline, t0), HELD_MAX, "held: at least every 20 ms");
        assert_eq!(p.wait(Pending::Held, deadline, t0 + IDLE - TICK_MIN), TICK_MIN, "never past the idle deadline");
        p.changed();
        assert_eq!(p.wait(Pending::Busy, deadline, t0), TICK_MIN);
        p.timer();
        p.reported(false, 0);
        assert_eq!(p.wait(Pending::Busy, deadline, t0), TICK_MIN);
        p.timer();
        p.moved(t0);
        assert_eq!(p.wait(Pending::Busy, deadline, t0), TICK_MIN);
    }

    #[test]
    fn readiness_that_moved_nothing_waits_for_the_timer() {
        let mut p = Pace::new(Instant::now());
        assert!(p.copy_ready());
        p.reported(true, 100);
        p.judge_readiness(150);
        assert!(p.copy_ready(), "it helped");
        p.reported(true, 150);
        p.judge_readiness(150);
        assert!(!p.copy_ready(), "it did not");
        p.judge_readiness(150);
        assert!(!p.copy_ready(), "judged once per report");
        p.reported(false, 150);
        p.judge_readiness(150);
        assert!(!p.copy_ready(), "a report without readiness armed says nothing");
        p.timer();
        assert!(p.copy_ready());
    }

    #[test]
    fn idle_only_when_the_sign_did_not_change_by_the_deadline() {
        let t0 = Instant::now();
        let mut p = Pace::new(t0);
        let unread = || -> Sign { panic!("the sign is read at the deadline only") };
        assert_eq!(p.idle_deadline(t0 + IDLE / 2, IDLE, unread), Some(t0 + IDLE));
        let t1 = t0 + IDLE;
        assert_eq!(p.idle_deadline(t1, IDLE, || 10), Some(t1 + IDLE), "the first reading counts");
        let t2 = t1 + IDLE;
        assert_eq!(p.idle_deadline(t2, IDLE, || 11), Some(t2 + IDLE), "acknowledged bytes are activity");
        assert_eq!(p.idle_deadline(t2 + IDLE, IDLE, || 11), None, "nothing since");
    }

    #[test]
    fn a_look_that_moved_the_tunnel_is_activity() {
        let t0 = Instant::now();
        let mut p = Pace::new(t0);
        assert_eq!(p.idle_deadline(t0 + IDLE, IDLE, || 0), Some(t0 + 2 * IDLE));
        p.moved(t0 + IDLE + IDLE / 2);
        let unread = || -> Sign { panic!("not due") };
        assert_eq!(p.idle_deadline(t0 + 2 * IDLE, IDLE, unread), Some(t0 + 2 * IDLE + IDLE / 2));
        assert_eq!(Pace::new(t0).idle_deadline(t0, Duration::ZERO, || 1), None);
    }
}
