//! Writing a run's optional output files (--json, --hgrm, --hlog, --plot).

use crate::cli::OutputArgs;
use crate::hlog::{self, Interval};
use crate::plot::{self, Series};
use crate::report::Summary;
use anyhow::Context;
use hdrhistogram::Histogram;
use std::path::Path;
use std::time::{Duration, SystemTime};

/// What there is to write.
pub struct Outputs<'a> {
    /// The summary (JSON).
    pub summary: &'a Summary,
    /// Corrected latency, µs.
    pub corrected: &'a Histogram<u64>,
    /// Uncorrected latency, µs (not drawn when `None`, e.g. after a merge).
    pub uncorrected: Option<&'a Histogram<u64>>,
    /// Per-second corrected histograms.
    pub intervals: &'a [Interval],
}

/// Per-second recorder histograms as log intervals starting at `start`.
pub fn intervals_from(start: SystemTime, hs: &[Histogram<u64>]) -> Vec<Interval> {
    hs.iter()
        .enumerate()
        .map(|(i, h)| Interval {
            start: start + Duration::from_secs(i as u64),
            length: Duration::from_secs(1),
            histogram: h.clone(),
        })
        .collect()
}

fn write_file(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    std::fs::write(path, data).with_context(|| format!("writing {}", path.display()))
}

/// Writes every file asked for.
pub fn write_all(args: &OutputArgs, o: &Outputs) -> anyhow::Result<()> {
    if let Some(p) = &args.json {
        let mut j = serde_json::to_vec_pretty(o.summary)?;
        j.push(b'\n');
        write_file(p, &j)?;
    }
    if let Some(p) = &args.hgrm {
        write_file(p, crate::hgrm::format(o.corrected, 1000.0).as_bytes())?;
    }
    if let Some(p) = &args.hlog {
        let base = o.intervals.first().map(|i| i.start).unwrap_or_else(SystemTime::now);
        let mut buf = Vec::new();
        hlog::write(&mut buf, base, o.intervals)?;
        write_file(p, &buf)?;
    }
    if let Some(p) = &args.plot {
        let mut series = vec![Series { label: "corrected".into(), histogram: o.corrected.clone(), dashed: false }];
        if let Some(u) = o.uncorrected {
            series.push(Series { label: "uncorrected".into(), histogram: u.clone(), dashed: true });
        }
        let title = format!(
            "{} {} - {:.0}/s target, {:.0}/s achieved",
            o.summary.mode, o.summary.target, o.summary.target_rate, o.summary.achieved_rate
        );
        write_file(p, plot::render(&title, &series).as_bytes())?;
    }
    Ok(())
}
