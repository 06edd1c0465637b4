//! Interval logs (`.hlog`, HdrHistogram `HistogramLogWriter` format 1.3):
//! writing one corrected histogram per second, reading them back, and merging
//! logs from several generator nodes.

use crate::recorder::new_histogram;
use hdrhistogram::serialization::interval_log::{IntervalLogIterator, IntervalLogWriterBuilder, LogEntry};
use hdrhistogram::serialization::{Deserializer, V2DeflateSerializer};
use hdrhistogram::Histogram;
use std::io::Write;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A failure reading or writing an interval log.
#[derive(Debug, thiserror::Error)]
pub enum HlogError {
    /// File or stream error.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The log does not parse.
    #[error("malformed interval log near byte {0}")]
    Parse(usize),
    /// A histogram in the log does not decode.
    #[error("bad histogram in interval log: {0}")]
    Decode(String),
    /// A histogram could not be encoded.
    #[error("cannot encode histogram: {0}")]
    Encode(String),
}

/// One interval of a log, with its absolute start.
#[derive(Debug, Clone)]
pub struct Interval {
    /// Start of the interval.
    pub start: SystemTime,
    /// Length of the interval.
    pub length: Duration,
    /// Latencies in µs.
    pub histogram: Histogram<u64>,
}

/// Writes intervals as an interval log. Each interval's start is given as an
/// absolute time; the log's BaseTime is `base`, the first interval's start.
pub fn write<W: Write>(out: &mut W, base: SystemTime, intervals: &[Interval]) -> Result<(), HlogError> {
    let secs = base.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs_f64();
    writeln!(out, "#[Histogram log format version 1.3]")?;
    writeln!(out, "#[Latency values in microseconds; Interval_Max in milliseconds]")?;
    writeln!(out, "#[StartTime: {secs:.3} (seconds since epoch)]")?;
    writeln!(out, "#[BaseTime: {secs:.3} (seconds since epoch)]")?;
    writeln!(out, "\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\"")?;
    let mut ser = V2DeflateSerializer::new();
    let mut w = IntervalLogWriterBuilder::new().with_max_value_divisor(1000.0).begin_log_with(out, &mut ser)?;
    for iv in intervals {
        let offset = iv.start.duration_since(base).unwrap_or_default();
        w.write_histogram(&iv.histogram, offset, iv.length, None).map_err(|e| HlogError::Encode(e.to_string()))?;
    }
    Ok(())
}

/// Reads every interval of a log, resolving StartTime/BaseTime to absolute times.
pub fn read(text: &[u8]) -> Result<Vec<Interval>, HlogError> {
    let mut base = Duration::ZERO;
    let mut start_time: Option<Duration> = None;
    let mut out = Vec::new();
    let mut de = Deserializer::new();
    for entry in IntervalLogIterator::new(text) {
        match entry.map_err(|e| match e {
            hdrhistogram::serialization::interval_log::LogIteratorError::ParseError { offset } => {
                HlogError::Parse(offset)
            }
        })? {
            LogEntry::BaseTime(b) => base = b,
            LogEntry::StartTime(s) => start_time = Some(s),
            LogEntry::Interval(iv) => {
                let encoded = iv.encoded_histogram();
                let bytes = base64_decode(encoded)?;
                let h: Histogram<u64> =
                    de.deserialize(&mut bytes.as_slice()).map_err(|e| HlogError::Decode(format!("{e:?}")))?;
                // Without BaseTime, a StartTime-relative log (Java's heuristic:
                // timestamps far smaller than StartTime are offsets).
                let eff_base = if base > Duration::ZERO {
                    base
                } else {
                    match start_time {
                        Some(s) if iv.start_timestamp() + Duration::from_secs(365 * 86400) < s => s,
                        _ => Duration::ZERO,
                    }
                };
                let mut hist = new_histogram();
                hist.add(&h).map_err(|e| HlogError::Decode(format!("{e:?}")))?;
                out.push(Interval {
                    start: UNIX_EPOCH + eff_base + iv.start_timestamp(),
                    length: iv.duration(),
                    histogram: hist,
                });
            }
        }
    }
    Ok(out)
}

fn base64_decode(s: &str) -> Result<Vec<u8>, HlogError> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s.trim()).map_err(|e| HlogError::Decode(e.to_string()))
}

/// Merges logs: intervals are binned by whole seconds since the earliest
/// start; returns the merged intervals and the total histogram.
pub fn merge(logs: &[Vec<Interval>]) -> (Vec<Interval>, Histogram<u64>) {
    let mut total = new_histogram();
    let Some(t0) = logs.iter().flatten().map(|i| i.start).min() else {
        return (Vec::new(), total);
    };
    let mut bins: Vec<Histogram<u64>> = Vec::new();
    for iv in logs.iter().flatten() {
        let idx = iv.start.duration_since(t0).unwrap_or_default().as_secs() as usize;
        while bins.len() <= idx {
            bins.push(new_histogram());
        }
        bins[idx].add(&iv.histogram).expect("same bounds");
        total.add(&iv.histogram).expect("same bounds");
    }
    let merged = bins
        .into_iter()
        .enumerate()
        .filter(|(_, h)| !h.is_empty())
        .map(|(i, h)| Interval {
            start: t0 + Duration::from_secs(i as u64),
            length: Duration::from_secs(1),
            histogram: h,
        })
        .collect();
    (merged, total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iv(start_s: u64, values: &[u64]) -> Interval {
        let mut h = new_histogram();
        for v in values {
            h.record(*v).unwrap();
        }
        Interval {
            start: UNIX_EPOCH + Duration::from_secs(1_700_000_000 + start_s),
            length: Duration::from_secs(1),
            histogram: h,
        }
    }

    #[test]
    fn write_read_round_trip() {
        let ivs = vec![iv(0, &[10, 20, 30]), iv(1, &[1000, 5000])];
        let mut buf = Vec::new();
        write(&mut buf, ivs[0].start, &ivs).unwrap();
        let text = String::from_utf8(buf.clone()).unwrap();
        assert!(text.starts_with("#[Histogram log format version 1.3]\n"));
        assert!(text
            .contains("\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\"\n"));
        let back = read(&buf).unwrap();
        assert_eq!(back.len(), 2);
        for (a, b) in ivs.iter().zip(&back) {
            assert_eq!(a.start, b.start);
            assert_eq!(a.histogram, b.histogram);
        }
    }

    #[test]
    fn merge_bins_by_second_and_sums() {
        let a = vec![iv(0, &[10]), iv(1, &[20])];
        let b = vec![iv(1, &[30, 40]), iv(2, &[50])];
        let (m, total) = merge(&[a, b]);
        assert_eq!(m.len(), 3);
        assert_eq!(m[1].histogram.len(), 3);
        assert_eq!(total.len(), 5);
        assert_eq!(total.max(), 50);
    }
}
