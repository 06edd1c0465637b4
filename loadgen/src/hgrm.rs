//! The `.hgrm` percentile distribution in the layout of HdrHistogram's
//! `outputPercentileDistribution` (which the Rust crate lacks), and a parser
//! for it.

use hdrhistogram::Histogram;
use std::fmt::Write;

/// Writes `h` (values in µs) as a percentile distribution with values scaled
/// by `1/scale` (1000.0 prints milliseconds), 5 ticks per half distance.
pub fn format(h: &Histogram<u64>, scale: f64) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{:>12} {:>14} {:>10} {:>14}\n", "Value", "Percentile", "TotalCount", "1/(1-Percentile)");
    let mut total = 0u64;
    if !h.is_empty() {
        for v in h.iter_quantiles(5) {
            total += v.count_since_last_iteration();
            let q = v.quantile_iterated_to();
            let value = h.highest_equivalent(v.value_iterated_to()) as f64 / scale;
            if q < 1.0 {
                let _ = writeln!(out, "{value:12.3} {q:2.12} {total:10} {:14.2}", 1.0 / (1.0 - q));
            } else {
                let _ = writeln!(out, "{value:12.3} {q:2.12} {total:10}");
            }
        }
    }
    let _ = writeln!(out, "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]", h.mean() / scale, h.stdev() / scale);
    let _ = writeln!(out, "#[Max     = {:12.3}, Total count    = {:12}]", h.max() as f64 / scale, h.len());
    let _ = writeln!(out, "#[Buckets = {:12}, SubBuckets     = {:12}]", h.buckets(), sub_bucket_count(h));
    out
}

/// One row of a percentile distribution.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Row {
    /// Latency value (in the file's unit).
    pub value: f64,
    /// Percentile as a fraction 0..=1.
    pub percentile: f64,
    /// Cumulative count.
    pub total_count: u64,
}

/// A `.hgrm` file that does not follow the reference layout.
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {msg}")]
pub struct ParseError {
    /// 1-based line number.
    pub line: usize,
    /// What was wrong.
    pub msg: &'static str,
}

/// Parsed `.hgrm`: the rows plus the footer's mean, max and total count.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    /// Percentile rows.
    pub rows: Vec<Row>,
    /// `#[Mean = …]`.
    pub mean: f64,
    /// `#[Max = …]`.
    pub max: f64,
    /// `Total count`.
    pub total_count: u64,
}

/// Parses the reference layout: header, blank line, 3- or 4-column rows, footer.
pub fn parse(text: &str) -> Result<Parsed, ParseError> {
    let mut lines = text.lines().enumerate();
    let err = |line: usize, msg| ParseError { line: line + 1, msg };
    let (i, header) = lines.next().ok_or(err(0, "empty"))?;
    let cols: Vec<&str> = header.split_whitespace().collect();
    if cols != ["Value", "Percentile", "TotalCount", "1/(1-Percentile)"] {
        return Err(err(i, "bad header"));
    }
    let mut rows = Vec::new();
    let (mut mean, mut max, mut total) = (None, None, None);
    for (i, l) in lines {
        let l = l.trim();
        if l.is_empty() {
            continue;
        }
        if let Some(f) = l.strip_prefix("#[") {
            let f = f.trim_end_matches(']');
            for kv in f.split(',') {
                let (k, v) = kv.split_once('=').ok_or(err(i, "bad footer"))?;
                let v = v.trim();
                match k.trim() {
                    "Mean" => mean = Some(v.parse().map_err(|_| err(i, "bad mean"))?),
                    "Max" => max = Some(v.parse().map_err(|_| err(i, "bad max"))?),
                    "Total count" => total = Some(v.parse().map_err(|_| err(i, "bad count"))?),
                    "StdDeviation" | "Buckets" | "SubBuckets" => {}
                    _ => return Err(err(i, "unknown footer field")),
                }
            }
            continue;
        }
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() != 3 && f.len() != 4 {
            return Err(err(i, "row must have 3 or 4 columns"));
        }
        let row = Row {
            value: f[0].parse().map_err(|_| err(i, "bad value"))?,
            percentile: f[1].parse().map_err(|_| err(i, "bad percentile"))?,
            total_count: f[2].parse().map_err(|_| err(i, "bad count"))?,
        };
        if let Some(prev) = rows.last() {
            let prev: &Row = prev;
            if row.percentile < prev.percentile || row.total_count < prev.total_count || row.value < prev.value {
                return Err(err(i, "rows must not decrease"));
            }
        }
        rows.push(row);
    }
    Ok(Parsed {
        rows,
        mean: mean.ok_or(err(0, "missing Mean footer"))?,
        max: max.ok_or(err(0, "missing Max footer"))?,
        total_count: total.ok_or(err(0, "missing Total count footer"))?,
    })
}

/// HdrHistogram's `subBucketCount`: the power of two that holds
/// `2 * 10^sigfig` values at unit resolution.
fn sub_bucket_count(h: &Histogram<u64>) -> u64 {
    (2 * 10u64.pow(u32::from(h.sigfig()))).next_power_of_two()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recorder::new_histogram;

    #[test]
    fn layout_round_trips() {
        let mut h = new_histogram();
        for v in 1..=10_000u64 {
            h.record(v * 10).unwrap();
        }
        let text = format(&h, 1000.0);
        assert!(text.starts_with("       Value     Percentile TotalCount 1/(1-Percentile)\n\n"));
        let p = parse(&text).unwrap();
        assert_eq!(p.total_count, 10_000);
        assert_eq!(p.rows.last().unwrap().total_count, 10_000);
        assert_eq!(p.rows.last().unwrap().percentile, 1.0);
        assert!((p.max - 100.0).abs() < 0.1, "{}", p.max);
        assert!((p.mean - 50.005).abs() < 0.1, "{}", p.mean);
        // Median row near 50 ms.
        let med = p.rows.iter().find(|r| r.percentile >= 0.5).unwrap();
        assert!((med.value - 50.0).abs() < 0.1, "{}", med.value);
    }

    #[test]
    fn rejects_other_layouts() {
        assert!(parse("Value Percentile\n").is_err());
        assert!(parse("Value Percentile TotalCount 1/(1-Percentile)\n1.0 0.5\n").is_err());
    }
}
