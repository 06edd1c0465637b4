//! The fixed send schedule (wrk2's way): message `k` of a connection is due at
//! `phase + k / rate`, decided before the run starts, whatever the target does.

/// One connection's schedule, in nanoseconds since the run's zero instant.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    phase_ns: f64,
    interval_ns: f64,
}

impl Schedule {
    /// Schedule for connection `index` of `connections` sharing a total rate of
    /// `total_rate` messages/s. The per-connection rate is kept fractional (it
    /// never rounds to zero, wrk2 #147) and connections are offset by
    /// `1 / total_rate` so the aggregate stream is evenly spaced.
    pub fn new(index: usize, connections: usize, total_rate: f64) -> Self {
        assert!(total_rate > 0.0 && connections > 0, "rate and connections must be positive");
        let per_conn = total_rate / connections as f64;
        Schedule { phase_ns: index as f64 * 1e9 / total_rate, interval_ns: 1e9 / per_conn }
    }

    /// Intended send time of message `k`.
    pub fn due_ns(&self, k: u64) -> u64 {
        (self.phase_ns + k as f64 * self.interval_ns) as u64
    }

    /// First message whose intended time is at or after `t_ns`.
    pub fn first_at_or_after(&self, t_ns: u64) -> u64 {
        if (t_ns as f64) <= self.phase_ns {
            return 0;
        }
        let k = ((t_ns as f64 - self.phase_ns) / self.interval_ns).ceil() as u64;
        // Guard against float rounding at the boundary.
        if k > 0 && self.due_ns(k - 1) >= t_ns {
            k - 1
        } else {
            k
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fractional_per_connection_rate_keeps_total_rate() {
        // 5 msg/s over 10 connections: 0.5 msg/s each, never zero.
        let c = 10;
        let window_ns = 20_000_000_000u64;
        let mut total = 0;
        for i in 0..c {
            let s = Schedule::new(i, c, 5.0);
            total += (0..).take_while(|&k| s.due_ns(k) < window_ns).count();
        }
        assert_eq!(total, 100);
    }

    #[test]
    fn aggregate_is_evenly_spaced() {
        let c = 4;
        let mut dues: Vec<u64> = (0..c)
            .flat_map(|i| {
                let s = Schedule::new(i, c, 1000.0);
                (0..10).map(move |k| s.due_ns(k))
            })
            .collect();
        dues.sort();
        for w in dues.windows(2) {
            assert!((w[1] - w[0]).abs_diff(1_000_000) <= 1, "{:?}", w);
        }
    }

    #[test]
    fn first_at_or_after_is_exact() {
        let s = Schedule::new(3, 7, 333.0);
        for t in [0u64, 1, 5_000_000, 123_456_789, 9_999_999_999] {
            let k = s.first_at_or_after(t);
            assert!(s.due_ns(k) >= t);
            assert!(k == 0 || s.due_ns(k - 1) < t);
        }
    }
}
