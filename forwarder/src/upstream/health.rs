//! A backend's health as the router sees it, without clocks or I/O (the
//! caller passes `now`): passive back-off from failed requests, and the
//! active check's rise/fall verdict.

use std::time::{Duration, Instant};

use crate::config::BackendSettings;

/// How long a backend is skipped after its `n`th consecutive failure:
/// `[backends] backoff`, doubled per further failure, up to `max_backoff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

impl Backoff {
    pub fn from_settings(s: &BackendSettings) -> Backoff {
        Backoff { base: s.backoff, max: s.max_backoff }
    }

    /// The back-off after `failures` consecutive failures (at least 1).
    pub fn period(&self, failures: u32) -> Duration {
        let doublings = failures.saturating_sub(1).min(31);
        self.base.saturating_mul(1u32 << doublings).min(self.max)
    }
}

/// Whether a request may go to a backend now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// In service.
    Yes,
    /// Its back-off is over: this request probes it (and the next one
    /// waits another back-off period unless the probe's outcome comes
    /// first).
    Probe,
    /// Out: in back-off, or held down by the active check.
    No,
}

/// What a failure did to the backend's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failed {
    /// It was in service and is now skipped for this long.
    WentOut(Duration),
    /// It was out already (a probe or a last-resort try failed): skipped
    /// for this long now.
    StillOut(Duration),
}

/// Passive health: the streak of consecutive failures and the back-off it
/// earned.
#[derive(Debug, Default, Clone)]
pub struct Passive {
    failures: u32,
    /// The end of the current back-off (or of a probe's grace period).
    until: Option<Instant>,
}

impl Passive {
    pub fn in_service(&self) -> bool {
        self.failures == 0
    }

    /// Yes while in service; during a back-off No; after it, one request
    /// probes (it claims the probe by pushing `until` one period on, so a
    /// probe that never reports does not keep the backend out for good).
    pub fn admit(&mut self, now: Instant, backoff: Backoff) -> Admit {
        if self.failures == 0 {
            return Admit::Yes;
        }
        match self.until {
            Some(until) if now < until => Admit::No,
            _ => {
                self.until = Some(now + backoff.period(self.failures));
                Admit::Probe
            }
        }
    }

    pub fn failed(&mut self, now: Instant, backoff: Backoff) -> Failed {
        self.failures = self.failures.saturating_add(1);
        let period = backoff.period(self.failures);
        self.until = Some(now + period);
        if self.failures == 1 {
            Failed::WentOut(period)
        } else {
            Failed::StillOut(period)
        }
    }

    /// Ends the failure streak; true when that brings the backend back.
    pub fn succeeded(&mut self) -> bool {
        let was_out = self.failures > 0;
        self.failures = 0;
        self.until = None;
        was_out
    }
}

/// The active check's verdict: up until `fall` consecutive failures, then
/// down until `rise` consecutive passes. A backend starts up (as in
/// HAProxy), so a new config does not take every backend out at once.
#[derive(Debug, Clone)]
pub struct Active {
    up: bool,
    /// Consecutive results that disagree with `up`.
    streak: u32,
}

impl Default for Active {
    fn default() -> Active {
        Active { up: true, streak: 0 }
    }
}

impl Active {
    pub fn up(&self) -> bool {
        self.up
    }

    /// Counts one check result; Some(new state) when it flips.
    pub fn record(&mut self, passed: bool, rise: u32, fall: u32) -> Option<bool> {
        if passed == self.up {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        let needed = if self.up { fall } else { rise };
        if self.streak >= needed {
            self.up = passed;
            self.streak = 0;
            return Some(passed);
        }
        None
    }

    /// Back to up (the check was removed from the config).
    pub fn reset(&mut self) -> bool {
        let was_down = !self.up;
        *self = Active::default();
        was_down
    }
}

/// Both views together, as kept per backend.
#[derive(Debug, Default, Clone)]
pub struct Health {
    pub passive: Passive,
    pub active: Active,
}

impl Health {
    /// In service: not in back-off and not held down by the check.
    pub fn in_service(&self) -> bool {
        self.passive.in_service() && self.active.up()
    }

    pub fn admit(&mut self, now: Instant, backoff: Backoff) -> Admit {
        if !self.active.up() {
            return Admit::No;
        }
        self.passive.admit(now, backoff)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const B: Backoff = Backoff { base: Duration::from_secs(1), max: Duration::from_secs(5) };

    #[test]
    fn backoff_doubles_up_to_the_max() {
        let periods: Vec<u64> = (1..=6).map(|n| B.period(n).as_secs()).collect();
        assert_eq!(periods, vec![1, 2, 4, 5, 5, 5]);
        assert_eq!(B.period(u32::MAX), Duration::from_secs(5));
    }

    #[test]
    fn a_failure_takes_it_out_until_the_backoff_ends_then_one_request_probes() {
        let t0 = Instant::now();
        let mut p = Passive::default();
        assert_eq!(p.admit(t0, B), Admit::Yes);
        assert_eq!(p.failed(t0, B), Failed::WentOut(Duration::from_secs(1)));
        assert_eq!(p.admit(t0 + Duration::from_millis(999), B), Admit::No);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(p.admit(t1, B), Admit::Probe);
        // Only one request probes; the others still skip it.
        assert_eq!(p.admit(t1, B), Admit::No);
        // The probe fails: twice as long now.
        assert_eq!(p.failed(t1, B), Failed::StillOut(Duration::from_secs(2)));
        assert_eq!(p.admit(t1 + Duration::from_millis(1999), B), Admit::No);
        let t2 = t1 + Duration::from_secs(2);
        assert_eq!(p.admit(t2, B), Admit::Probe);
        // The probe succeeds: back in service.
        assert!(p.succeeded());
        assert_eq!(p.admit(t2, B), Admit::Yes);
        assert!(!p.succeeded());
        // A new streak starts from the base again.
        assert_eq!(p.failed(t2, B), Failed::WentOut(Duration::from_secs(1)));
    }

    #[test]
    fn a_probe_that_never_reports_lets_another_probe_after_a_period() {
        let t0 = Instant::now();
        let mut p = Passive::default();
        p.failed(t0, B);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(p.admit(t1, B), Admit::Probe);
        assert_eq!(p.admit(t1 + Duration::from_millis(500), B), Admit::No);
        assert_eq!(p.admit(t1 + Duration::from_secs(1), B), Admit::Probe);
    }

    #[test]
    fn active_check_falls_and_rises_by_thresholds() {
        let mut a = Active::default();
        assert!(a.up());
        assert_eq!(a.record(false, 2, 3), None);
        assert_eq!(a.record(false, 2, 3), None);
        // A pass in between restarts the count.
        assert_eq!(a.record(true, 2, 3), None);
        assert_eq!(a.record(false, 2, 3), None);
        assert_eq!(a.record(false, 2, 3), None);
        assert_eq!(a.record(false, 2, 3), Some(false));
        assert!(!a.up());
        assert_eq!(a.record(true, 2, 3), None);
        assert_eq!(a.record(false, 2, 3), None);
        assert_eq!(a.record(true, 2, 3), None);
        assert_eq!(a.record(true, 2, 3), Some(true));
        assert!(a.up());
    }

    #[test]
    fn a_backend_held_down_by_its_check_is_not_admitted() {
        let mut h = Health::default();
        h.active.record(false, 1, 1);
        assert!(!h.in_service());
        assert_eq!(h.admit(Instant::now(), B), Admit::No);
        assert!(h.active.reset());
        assert_eq!(h.admit(Instant::now(), B), Admit::Yes);
    }
}
