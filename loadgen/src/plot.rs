//! Latency-by-percentile plots as hand-written SVG: x is 1/(1-p) on a log
//! scale (50 %, 90 %, 99 %, …), y is latency in milliseconds.

use hdrhistogram::Histogram;
use std::fmt::Write;
use std::path::{Path, PathBuf};

/// One curve: a label and a histogram in µs.
#[derive(Debug, Clone)]
pub struct Series {
    /// Legend text.
    pub label: String,
    /// Latencies in µs.
    pub histogram: Histogram<u64>,
    /// Draw dashed (used for uncorrected curves).
    pub dashed: bool,
}

const W: f64 = 900.0;
const H: f64 = 520.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 40.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 8] = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"];

/// Points (x = log10(1/(1-p)), y = ms) of a histogram's percentile curve.
fn points(h: &Histogram<u64>, x_max: f64) -> Vec<(f64, f64)> {
    h.iter_quantiles(5)
        .map(|v| {
            let q = v.quantile_iterated_to();
            let x = if q >= 1.0 { x_max } else { (1.0 / (1.0 - q)).log10().min(x_max) };
            (x, h.highest_equivalent(v.value_iterated_to()) as f64 / 1000.0)
        })
        .collect()
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// "Nice" upper bound for an axis.
fn nice_ceiling(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let mag = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 2.5, 5.0, 10.0] {
        if v <= m * mag {
            return m * mag;
        }
    }
    10.0 * mag
}

/// Renders the series into an SVG document.
pub fn render(title: &str, series: &[Series]) -> String {
    let max_count = series.iter().map(|s| s.histogram.len()).max().unwrap_or(1).max(10);
    // Enough decades to show the highest percentile the data resolves.
    let x_max = (max_count as f64).log10().ceil().clamp(2.0, 7.0);
    let y_max = nice_ceiling(
        series
            .iter()
            .filter(|s| !s.histogram.is_empty())
            .map(|s| s.histogram.highest_equivalent(s.histogram.max()) as f64 / 1000.0)
            .fold(0.0, f64::max),
    );
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let sx = |x: f64| LEFT + x / x_max * pw;
    let sy = |y: f64| TOP + ph - y / y_max * ph;
    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(o, r#"<text x="{}" y="22" text-anchor="middle" font-size="15">{}</text>"#, W / 2.0, escape(title));
    // Grid and axes.
    for d in 0..=(x_max as i32) {
        let x = sx(d as f64);
        let label = match d {
            0 => "0%".to_string(),
            1 => "90%".to_string(),
            _ => format!("{}%", 100.0 - 100.0 / 10f64.powi(d)),
        };
        let _ = writeln!(
            o,
            r##"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{:.1}" stroke="#ddd"/><text x="{x:.1}" y="{:.1}" text-anchor="middle">{label}</text>"##,
            TOP + ph,
            TOP + ph + 18.0
        );
    }
    for i in 0..=5 {
        let v = y_max * i as f64 / 5.0;
        let y = sy(v);
        let _ = writeln!(
            o,
            r##"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            y + 4.0,
            trim_float(v)
        );
    }
    let _ = writeln!(o, r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##);
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">Percentile (log scale of 1/(1-p))</text>"#,
        LEFT + pw / 2.0,
        H - 18.0
    );
    let _ = writeln!(
        o,
        r#"<text transform="translate(20,{:.1}) rotate(-90)" text-anchor="middle">Latency (ms)</text>"#,
        TOP + ph / 2.0
    );
    // Curves and legend.
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[(i / 2 + i % 2 * 4) % COLORS.len()];
        let dash = if s.dashed { r#" stroke-dasharray="6,4""# } else { "" };
        if !s.histogram.is_empty() {
            let pts: Vec<String> =
                points(&s.histogram, x_max).into_iter().map(|(x, y)| format!("{:.1},{:.1}", sx(x), sy(y))).collect();
            let _ = writeln!(
                o,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{}"/>"#,
                pts.join(" ")
            );
        }
        let ly = TOP + 16.0 + i as f64 * 18.0;
        let _ = writeln!(
            o,
            r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            LEFT + 12.0,
            LEFT + 42.0,
            LEFT + 48.0,
            ly + 4.0,
            escape(&s.label)
        );
    }
    o.push_str("</svg>\n");
    o
}

/// Legend names of the runs read from `files`: a run's own label (`--label`,
/// `own[i]`) when it has one, else its file's stem. Names that two runs
/// would share become the path as given, without its extension (`a/ws`,
/// `b/ws`), and are numbered if they still collide, so every curve can be
/// told apart.
pub fn run_names(files: &[PathBuf], own: &[Option<&str>]) -> Vec<String> {
    let stem = |f: &Path| f.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
    let mut names: Vec<String> = files
        .iter()
        .enumerate()
        .map(|(i, f)| own.get(i).copied().flatten().map_or_else(|| stem(f), String::from))
        .collect();
    let shared = |names: &[String], i: usize| names.iter().filter(|n| **n == names[i]).count() > 1;
    let clash: Vec<bool> = (0..names.len()).map(|i| shared(&names, i)).collect();
    for (i, f) in files.iter().enumerate() {
        if clash[i] && own.get(i).copied().flatten().is_none() {
            names[i] = f.with_extension("").to_string_lossy().to_string();
        }
    }
    let mut seen: Vec<String> = Vec::new();
    for name in names.iter_mut() {
        let n = seen.iter().filter(|s| *s == name).count();
        seen.push(name.clone());
        if n > 0 {
            *name = format!("{name} #{}", n + 1);
        }
    }
    names
}

fn trim_float(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recorder::new_histogram;

    #[test]
    fn svg_has_a_curve_per_series_and_escapes_labels() {
        let mut a = new_histogram();
        let mut b = new_histogram();
        for v in 1..=1000u64 {
            a.record(v * 100).unwrap();
            b.record(v * 50).unwrap();
        }
        let svg = render(
            "t<1>",
            &[
                Series { label: "a & b".into(), histogram: a, dashed: false },
                Series { label: "b".into(), histogram: b, dashed: true },
            ],
        );
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches("<polyline").count(), 2);
        assert!(svg.contains("a &amp; b"));
        assert!(svg.contains("t&lt;1&gt;"));
        assert!(svg.contains("99.9%"));
        assert_eq!(nice_ceiling(73.0), 100.0);
        assert_eq!(nice_ceiling(0.3), 0.5);
    }

    #[test]
    fn runs_are_named_by_label_then_file_and_never_share_a_name() {
        let files: Vec<PathBuf> = ["x/ws.json", "y/ws.json", "z/other.hlog", "x/ws.json", "q/labelled.json"]
            .iter()
            .map(PathBuf::from)
            .collect();
        let names = run_names(&files, &[None, None, None, None, Some("router")]);
        assert_eq!(names, ["x/ws", "y/ws", "other", "x/ws #2", "router"]);
        // Distinct stems stay short; equal labels are numbered.
        let names = run_names(&files[..2], &[Some("run"), Some("run")]);
        assert_eq!(names, ["run", "run #2"]);
        let files: Vec<PathBuf> = ["a.json", "b.json"].iter().map(PathBuf::from).collect();
        assert_eq!(run_names(&files, &[None, None]), ["a", "b"]);
    }
}
