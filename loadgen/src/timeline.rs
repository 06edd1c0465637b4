//! Progress over a run's time, to tell a stalled run: in 10 ms buckets since
//! the run's start, whether anything moved (a reply, an echo, bytes) and how
//! many messages were owed (due, or written, and not yet answered). A stall
//! is a stretch of at least [`STALL_MIN`] in which something was owed and
//! nothing moved, so a low message rate's natural pauses are not stalls.
//!
//! Each thread keeps its own timeline; [`Timeline::merge`] adds them, so a
//! run stalls only when nothing moved anywhere.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Width of one bucket.
pub const BUCKET_NS: u64 = 10_000_000;

/// Shortest stretch without progress that counts as a stall.
pub const STALL_MIN: Duration = Duration::from_secs(1);

/// Per-bucket progress and owed messages since the run's start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Timeline {
    /// Progress events (replies, byte transfers) per bucket.
    moved: Vec<u32>,
    /// Owed messages as a difference array: +1 where a wait begins, −1 where it ends.
    owed: Vec<i32>,
}

/// The stalls of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Stalls {
    /// Stretches of at least 1 s with something owed and nothing moving.
    pub count: u64,
    /// The longest of them, seconds (0 without any).
    pub longest_s: f64,
    /// All of them together, seconds.
    pub total_s: f64,
}

fn bucket(ns: u64) -> usize {
    (ns / BUCKET_NS) as usize
}

impl Timeline {
    fn reach(&mut self, b: usize) {
        if self.moved.len() <= b {
            self.moved.resize(b + 1, 0);
            self.owed.resize(b + 1, 0);
        }
    }

    /// Something moved at `at_ns` (a reply arrived, bytes were read or written).
    pub fn moved(&mut self, at_ns: u64) {
        let b = bucket(at_ns);
        self.reach(b);
        self.moved[b] = self.moved[b].saturating_add(1);
    }

    /// A message was owed from `from_ns` until `to_ns` (due until answered,
    /// or until the run gave up on it).
    pub fn owed(&mut self, from_ns: u64, to_ns: u64) {
        let (from, to) = (bucket(from_ns), bucket(to_ns));
        if from >= to {
            return;
        }
        self.reach(to);
        self.owed[from] += 1;
        self.owed[to] -= 1;
    }

    /// A message due at `due_ns` was answered at `at_ns`.
    pub fn answered(&mut self, due_ns: u64, at_ns: u64) {
        self.owed(due_ns, at_ns);
        self.moved(at_ns);
    }

    /// Adds another thread's timeline into this one.
    pub fn merge(&mut self, other: &Timeline) {
        if let Some(last) = other.moved.len().checked_sub(1) {
            self.reach(last);
        }
        for (a, b) in self.moved.iter_mut().zip(&other.moved) {
            *a = a.saturating_add(*b);
        }
        for (a, b) in self.owed.iter_mut().zip(&other.owed) {
            *a += b;
        }
    }

    /// The stretches of at least [`STALL_MIN`] in which something was owed
    /// and nothing moved.
    pub fn stalls(&self) -> Stalls {
        let min = (STALL_MIN.as_nanos() as u64).div_ceil(BUCKET_NS);
        let mut s = Stalls::default();
        let mut owed = 0i64;
        let mut run = 0u64;
        let close = |run: u64, s: &mut Stalls| {
            if run >= min {
                let secs = (run * BUCKET_NS) as f64 / 1e9;
                s.count += 1;
                s.total_s += secs;
                s.longest_s = s.longest_s.max(secs);
            }
        };
        for (moved, delta) in self.moved.iter().zip(&self.owed) {
            owed += i64::from(*delta);
            if owed > 0 && *moved == 0 {
                run += 1;
            } else {
                close(run, &mut s);
                run = 0;
            }
        }
        close(run, &mut s);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    /// Replies every 5 ms from `from` to `to` (ms), each answered 1 ms after it was due.
    fn steady(t: &mut Timeline, from: u64, to: u64) {
        for due in (from..to).step_by(5) {
            t.answered(due * MS, (due + 1) * MS);
        }
    }

    #[test]
    fn a_pause_with_messages_owed_is_a_stall() {
        let mut t = Timeline::default();
        steady(&mut t, 0, 1000);
        // Due at 1000 ms, answered only at 2500 ms; nothing else moved meanwhile.
        t.answered(1000 * MS, 2500 * MS);
        steady(&mut t, 2500, 3000);
        let s = t.stalls();
        assert_eq!(s.count, 1, "{s:?}");
        assert!((s.longest_s - 1.5).abs() <= 0.011, "{s:?}");
        assert_eq!(s.total_s, s.longest_s);
    }

    #[test]
    fn idle_time_and_short_pauses_are_not_stalls() {
        let mut t = Timeline::default();
        // One message every 2 s, each answered at once: long gaps, nothing owed.
        for k in 0..5 {
            t.answered(k * 2000 * MS, k * 2000 * MS + 100_000);
        }
        // A 900 ms wait is shorter than a stall.
        t.answered(11_000 * MS, 11_900 * MS);
        assert_eq!(t.stalls(), Stalls::default());
    }

    #[test]
    fn progress_on_another_thread_ends_a_stall_and_lost_messages_owe_to_the_end() {
        let mut a = Timeline::default();
        a.answered(0, 3000 * MS);
        let mut b = Timeline::default();
        steady(&mut b, 0, 3000);
        a.merge(&b);
        assert_eq!(a.stalls().count, 0, "b made progress all along");
        // Two stalls: a message never answered until the run gave up, after a 1.2 s one.
        let mut c = Timeline::default();
        steady(&mut c, 0, 500);
        c.answered(500 * MS, 1700 * MS);
        steady(&mut c, 1700, 2000);
        c.owed(2000 * MS, 4000 * MS);
        let s = c.stalls();
        assert_eq!(s.count, 2, "{s:?}");
        assert!((s.longest_s - 2.0).abs() <= 0.011 && (s.total_s - 3.2).abs() <= 0.021, "{s:?}");
    }
}
