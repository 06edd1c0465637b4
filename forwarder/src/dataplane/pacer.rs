//! Paces the node's promotions (`[data_plane] promote_rate`): at most so
//! many tunnels per second move to the promotion plane, whatever the number
//! of tunnels that earned it at once.
//!
//! Measured (docs/adaptive/benchmarks.md, and by hand with
//! `upsplice-loadgen ws -c 1000 -r 20000`): 1,000 tunnels moved within one
//! to two seconds made the p99 of every message through the router 39–77 ms
//! (uring beside it 2.5 ms) while the router process itself was nearly
//! idle — the cost is the kernel's, per sockmap handoff; the same 1,000
//! moved over five to ten seconds gave a p99 of 0.82 ms (uring 2.66 ms).
//!
//! The generic cell rate algorithm on one atomic: a promotion moves the
//! theoretical arrival time (`tat`) `interval` on, and is allowed while
//! that keeps it at most `burst` ahead of now. No lock, no timer, no task: a tunnel
//! that finds no room is judged again a window later.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// A node-wide pace of promotions.
#[derive(Debug)]
pub struct Pacer {
    /// Nanoseconds between two promotions at the steady rate.
    interval: u64,
    /// How far ahead of now the schedule may run: a burst of
    /// `burst / interval` promotions (a tenth of a second's worth).
    burst: u64,
    /// The theoretical arrival time of the next promotion, in nanoseconds
    /// since [`origin`].
    tat: AtomicU64,
}

/// The clock's zero for every pacer of the process.
fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

impl Pacer {
    /// At most `per_second` promotions per second (at least 1), in bursts
    /// of up to a tenth of a second's worth.
    pub const fn new(per_second: u32) -> Pacer {
        let per_second = if per_second == 0 { 1 } else { per_second as u64 };
        let interval = 1_000_000_000 / per_second;
        let burst_count = if per_second / 10 == 0 { 1 } else { per_second / 10 };
        Pacer { interval, burst: interval * burst_count, tat: AtomicU64::new(0) }
    }

    /// Takes room for one promotion at `now`: false when the pace is used up.
    pub fn take(&self, now: Instant) -> bool {
        let now = now.saturating_duration_since(origin()).as_nanos() as u64;
        let mut tat = self.tat.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now) + self.interval;
            if next > now + self.burst {
                return false;
            }
            match self.tat.compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(current) => tat = current,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_burst_then_the_steady_rate() {
        let pacer = Pacer::new(100);
        let t0 = origin() + Duration::from_secs(10);
        // A tenth of a second's worth at once: 10.
        let burst = (0..50).filter(|_| pacer.take(t0)).count();
        assert_eq!(burst, 10);
        // Then one per 10 ms.
        assert!(!pacer.take(t0 + Duration::from_millis(5)));
        assert!(pacer.take(t0 + Duration::from_millis(10)));
        assert!(!pacer.take(t0 + Duration::from_millis(10)));
        // A second later: 100 more at most over that second.
        let later = t0 + Duration::from_secs(2);
        let granted = (0..1000).filter(|i| pacer.take(later + Duration::from_micros(*i))).count();
        assert_eq!(granted, 10, "a burst, not the time it was idle");
    }

    #[test]
    fn a_slow_rate_still_grants_one() {
        let pacer = Pacer::new(0);
        let t0 = origin() + Duration::from_secs(10);
        assert!(pacer.take(t0));
        assert!(!pacer.take(t0 + Duration::from_millis(500)));
        assert!(pacer.take(t0 + Duration::from_secs(1)));
    }
}
