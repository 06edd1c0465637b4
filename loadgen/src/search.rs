//! `search`: the highest rate whose latency percentile stays under a bound.
//! The floor is measured first (if it fails there is no answer), then the
//! ceiling (if it passes it is the answer), then the bracket is bisected at
//! its geometric middle (rates span decades) until the bracket is narrower
//! than the resolution, the step limit is used up, or the time budget is.
//!
//! A step passes when its run is valid, reached its rate, and the chosen
//! percentile of corrected latency is under the bound. A failing step may be
//! measured again (`retries`): a shared machine has hiccups that are nobody's
//! fault. The measuring itself is the caller's (a closure), so the bisection
//! is tested here without a network.

use serde::{Deserialize, Serialize};
use std::time::{Duration, Instant};

/// Bounds of a search.
#[derive(Debug, Clone)]
pub struct SearchConfig {
    /// Lowest rate tried.
    pub floor: f64,
    /// Highest rate tried.
    pub ceiling: f64,
    /// Stop when ceiling-side / floor-side of the bracket ≤ 1 + this.
    pub resolution: f64,
    /// Most measurements (retries included).
    pub max_steps: u32,
    /// No measurement starts after this.
    pub max_time: Duration,
    /// Extra attempts of a failing step.
    pub retries: u32,
}

/// One measurement.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Step {
    /// Rate asked for, per second.
    pub rate: f64,
    /// Rate achieved, per second.
    pub achieved_rate: f64,
    /// The chosen percentile of corrected latency, µs.
    pub latency_us: u64,
    /// The run was valid (no errors, nothing unsent).
    pub valid: bool,
    /// The achieved rate reached the target.
    pub rate_reached: bool,
    /// Valid, rate reached and latency under the bound.
    pub pass: bool,
}

/// Why a search ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stop {
    /// The floor failed: no rate passes.
    FloorFails,
    /// The ceiling passed.
    CeilingPasses,
    /// The bracket is narrower than the resolution.
    Resolution,
    /// `max_steps` measurements were made.
    Steps,
    /// `max_time` ran out.
    Time,
}

impl Stop {
    /// The name used in the JSON summary.
    pub fn name(self) -> &'static str {
        match self {
            Stop::FloorFails => "floor_fails",
            Stop::CeilingPasses => "ceiling_passes",
            Stop::Resolution => "resolution",
            Stop::Steps => "steps",
            Stop::Time => "time",
        }
    }
}

/// What a search found.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchStats {
    /// The percentile searched on (e.g. 99).
    pub percentile: f64,
    /// Its bound, µs.
    pub bound_us: u64,
    /// Lowest rate tried.
    pub floor: f64,
    /// Highest rate tried.
    pub ceiling: f64,
    /// The highest passing rate (0: none passed).
    pub answer_rate: f64,
    /// The lowest failing rate above it (0: none failed).
    pub failing_rate: f64,
    /// Why the search stopped.
    pub stopped_by: Stop,
    /// Every measurement, in order.
    pub steps: Vec<Step>,
}

/// Rounds to three significant digits (steps with readable rates).
fn round3(x: f64) -> f64 {
    if x <= 0.0 {
        return x;
    }
    let p = 10f64.powi(x.log10().floor() as i32 - 2);
    (x / p).round() * p
}

/// Runs the search; `measure(rate)` makes one measurement.
pub fn search(cfg: &SearchConfig, percentile: f64, bound_us: u64, mut measure: impl FnMut(f64) -> Step) -> SearchStats {
    let t0 = Instant::now();
    let mut steps = Vec::new();
    let out_of = |steps: &Vec<Step>| {
        if steps.len() as u32 >= cfg.max_steps {
            Some(Stop::Steps)
        } else if t0.elapsed() >= cfg.max_time {
            Some(Stop::Time)
        } else {
            None
        }
    };
    // One rate, retried while it fails; Err when a limit stopped it before any attempt.
    let mut try_rate = |rate: f64, steps: &mut Vec<Step>| -> Result<bool, Stop> {
        for attempt in 0..=cfg.retries {
            if let Some(stop) = out_of(steps) {
                return if attempt == 0 { Err(stop) } else { Ok(false) };
            }
            let s = measure(rate);
            let pass = s.pass;
            steps.push(s);
            if pass {
                return Ok(true);
            }
        }
        Ok(false)
    };
    // lo: the highest rate that passed, hi: the lowest that failed (0: none yet).
    let (mut lo, mut hi): (f64, f64) = (0.0, 0.0);
    let stopped_by = loop {
        let rate = if lo == 0.0 {
            cfg.floor
        } else if hi == 0.0 {
            cfg.ceiling
        } else {
            let mid = round3((lo * hi).sqrt());
            if hi / lo <= 1.0 + cfg.resolution || mid <= lo || mid >= hi {
                break Stop::Resolution;
            }
            mid
        };
        match try_rate(rate, &mut steps) {
            Err(stop) => break stop,
            Ok(true) if rate >= cfg.ceiling => {
                lo = rate;
                break Stop::CeilingPasses;
            }
            Ok(true) => lo = rate,
            Ok(false) if rate <= cfg.floor => {
                hi = rate;
                break Stop::FloorFails;
            }
            Ok(false) => hi = rate,
        }
    };
    SearchStats {
        percentile,
        bound_us,
        floor: cfg.floor,
        ceiling: cfg.ceiling,
        answer_rate: lo,
        failing_rate: hi,
        stopped_by,
        steps,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SearchConfig {
        SearchConfig {
            floor: 1000.0,
            ceiling: 1_000_000.0,
            resolution: 0.05,
            max_steps: 30,
            max_time: Duration::from_secs(60),
            retries: 0,
        }
    }

    /// A target whose latency grows with the rate and passes up to `knee`.
    fn model(knee: f64) -> impl FnMut(f64) -> Step {
        move |rate| Step {
            rate,
            achieved_rate: rate,
            latency_us: 0,
            valid: true,
            rate_reached: true,
            pass: rate <= knee,
        }
    }

    #[test]
    fn bisection_brackets_the_knee_within_the_resolution() {
        let s = search(&cfg(), 99.0, 1000, model(37_000.0));
        assert_eq!(s.stopped_by, Stop::Resolution);
        assert!(s.answer_rate <= 37_000.0 && s.failing_rate > 37_000.0, "{s:?}");
        assert!(s.failing_rate / s.answer_rate <= 1.05 + 1e-9, "{s:?}");
        assert_eq!(s.steps[0].rate, 1000.0);
        assert_eq!(s.steps[1].rate, 1_000_000.0);
        assert_eq!(s.steps[2].rate, 31_600.0);
        assert!(s.steps.len() <= 12, "{}", s.steps.len());
    }

    #[test]
    fn ends_at_the_floor_or_the_ceiling() {
        let s = search(&cfg(), 99.0, 1000, model(10.0));
        assert_eq!((s.stopped_by, s.answer_rate, s.steps.len()), (Stop::FloorFails, 0.0, 1));
        let s = search(&cfg(), 99.0, 1000, model(1e9));
        assert_eq!((s.stopped_by, s.answer_rate, s.steps.len()), (Stop::CeilingPasses, 1_000_000.0, 2));
    }

    #[test]
    fn steps_and_retries_are_bounded() {
        let s = search(&SearchConfig { max_steps: 4, ..cfg() }, 99.0, 1000, model(37_000.0));
        assert_eq!((s.stopped_by, s.steps.len()), (Stop::Steps, 4));
        assert!(s.answer_rate >= 1000.0 && s.answer_rate <= 37_000.0);
        // A failing step is measured 1 + retries times; a hiccup that passes on retry counts as a pass.
        let mut calls = 0;
        let s = search(&SearchConfig { retries: 1, ..cfg() }, 99.0, 1000, |rate| {
            calls += 1;
            Step { rate, pass: calls != 1 && rate <= 37_000.0, ..Step::default() }
        });
        assert_eq!((s.steps[0].pass, s.steps[1].pass, s.steps[1].rate), (false, true, 1000.0));
        assert_eq!(s.steps[2].rate, 1_000_000.0);
        assert_eq!(s.steps[3].rate, 1_000_000.0);
        let s = search(&SearchConfig { max_time: Duration::ZERO, ..cfg() }, 99.0, 1000, model(37_000.0));
        assert_eq!((s.stopped_by, s.steps.len()), (Stop::Time, 0));
    }
}
