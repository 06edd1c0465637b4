//! When the watch looks at a tunnel again, and when the tunnel is idle:
//! the watch's clock, as pure state (the caller passes the time).
//!
//! The watch wakes on socket reports, on ring-buffer events, on the idle
//! deadline, and on a timer while something is pending (a tunnel stepping
//! aside, a FIN waiting for its bytes to drain). The timer starts at
//! [`TICK_MIN`] after anything happened and doubles while nothing does.

use std::time::{Duration, Instant};

/// Shortest wait between checks while something is pending.
pub(super) const TICK_MIN: Duration = Duration::from_millis(1);
/// Longest wait between checks while something is pending.
const TICK_BUSY_MAX: Duration = Duration::from_millis(20);
/// The timer's doubling stops here (the idle deadline comes first).
const TICK_MAX: Duration = Duration::from_secs(3600);

/// What idleness is measured on: bytes moved, and bytes acknowledged by
/// each destination's reader, either way.
pub(super) type Sign = (u64, u64, u64, u64);

/// The watch's clock for one tunnel.
pub(super) struct Pace {
    tick: Duration,
    /// The last readiness report moved nothing: wait for the timer once.
    copy_stalled: bool,
    /// Bytes userspace had moved when a readiness report woke the watch,
    /// until the next pass compares ([`Pace::judge_readiness`]).
    copy_fired_at: Option<u64>,
    last_sign: Sign,
    last_activity: Instant,
}

impl Pace {
    pub fn new(sign: Sign, now: Instant) -> Pace {
        Pace { tick: TICK_MIN, copy_stalled: false, copy_fired_at: None, last_sign: sign, last_activity: now }
    }

    /// Something changed (a check moved a direction on, the node crossed
    /// its bound): look again soon.
    pub fn changed(&mut self) {
        self.tick = TICK_MIN;
    }

    /// A socket report woke the watch; `copy_armed`: a socket was armed for
    /// readiness, with `progress` bytes moved by userspace then.
    pub fn reported(&mut self, copy_armed: bool, progress: u64) {
        if copy_armed {
            self.copy_fired_at = Some(progress);
        }
        self.tick = TICK_MIN;
    }

    /// The timer fired: readiness may help again, and the next wait is
    /// twice as long.
    pub fn timer(&mut self) {
        self.copy_stalled = false;
        self.tick = (self.tick * 2).min(TICK_MAX);
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
            let sign = sign();
            if sign != self.last_sign {
                self.last_sign = sign;
                self.last_activity = now;
                deadline = now + timeout;
            }
        }
        (now < deadline).then_some(deadline)
    }

    /// How long to wait at `now` for the next report: the tick, at most
    /// [`TICK_BUSY_MAX`] while something is pending (`busy`), else at most
    /// until the idle deadline.
    pub fn wait(&self, busy: bool, idle_deadline: Instant, now: Instant) -> Duration {
        if busy {
            self.tick.min(TICK_BUSY_MAX)
        } else {
            self.tick.min(idle_deadline - now)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: Duration = Duration::from_secs(10);

    #[test]
    fn the_timer_backs_off_and_any_change_resets_it() {
        let t0 = Instant::now();
        let mut p = Pace::new((0, 0, 0, 0), t0);
        let deadline = t0 + IDLE;
        assert_eq!(p.wait(false, deadline, t0), TICK_MIN);
        p.timer();
        p.timer();
        assert_eq!(p.wait(false, deadline, t0), 4 * TICK_MIN);
        for _ in 0..10 {
            p.timer();
        }
        assert_eq!(p.wait(true, deadline, t0), TICK_BUSY_MAX, "pending: polled at least every 20 ms");
        assert_eq!(p.wait(false, deadline, t0 + IDLE - TICK_MIN), TICK_MIN, "never past the idle deadline");
        for _ in 0..40 {
            p.timer();
        }
        assert_eq!(p.wait(false, t0 + 2 * TICK_MAX, t0), TICK_MAX);
        p.changed();
        assert_eq!(p.wait(false, deadline, t0), TICK_MIN);
        p.timer();
        p.reported(false, 0);
        assert_eq!(p.wait(false, deadline, t0), TICK_MIN);
    }

    #[test]
    fn readiness_that_moved_nothing_waits_for_the_timer() {
        let mut p = Pace::new((0, 0, 0, 0), Instant::now());
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
        let mut p = Pace::new((1, 2, 3, 4), t0);
        let unread = || -> Sign { panic!("the sign is read at the deadline only") };
        assert_eq!(p.idle_deadline(t0 + IDLE / 2, IDLE, unread), Some(t0 + IDLE));
        let t1 = t0 + IDLE;
        assert_eq!(p.idle_deadline(t1, IDLE, || (1, 2, 3, 5)), Some(t1 + IDLE), "acknowledged bytes are activity");
        assert_eq!(p.idle_deadline(t1 + IDLE, IDLE, || (1, 2, 3, 5)), None, "nothing since");
        assert_eq!(Pace::new((0, 0, 0, 0), t0).idle_deadline(t0, Duration::ZERO, || (1, 0, 0, 0)), None);
    }
}
