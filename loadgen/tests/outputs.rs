//! Output formats: .hgrm in the reference printer's layout, .hlog readable by
//! the hdrhistogram crate, `merge` of two logs equal to both runs together,
//! and the SVG plots.

mod common;
use common::{bin, run, tmpdir, Server};
use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
use hdrhistogram::serialization::Deserializer;
use hdrhistogram::Histogram;
use std::path::Path;
use std::process::Command;
use upsplice_loadgen::report::decode_histogram;

/// Reads an .hlog with the hdrhistogram crate's reader and adds up its intervals.
fn read_hlog(path: &Path) -> (Histogram<u64>, usize) {
    use base64::Engine;
    let text = std::fs::read(path).unwrap();
    let mut total = Histogram::<u64>::new_with_bounds(1, 3_600_000_000, 3).unwrap();
    let mut n = 0;
    for e in IntervalLogIterator::new(&text) {
        if let LogEntry::Interval(iv) = e.expect("parseable interval log") {
            let bytes = base64::engine::general_purpose::STANDARD.decode(iv.encoded_histogram()).unwrap();
            let h: Histogram<u64> = Deserializer::new().deserialize(&mut bytes.as_slice()).unwrap();
            assert!(iv.duration().as_secs_f64() > 0.99 && iv.duration().as_secs_f64() < 1.01);
            total.add(&h).unwrap();
            n += 1;
        }
    }
    (total, n)
}

/// Checks the reference layout column by column.
fn check_hgrm_layout(text: &str, total: u64) {
    let mut lines = text.lines();
    assert_eq!(lines.next().unwrap(), "       Value     Percentile TotalCount 1/(1-Percentile)");
    assert_eq!(lines.next().unwrap(), "");
    let rows: Vec<&str> = text.lines().filter(|l| !l.is_empty() && !l.starts_with('#')).skip(1).collect();
    assert!(rows.len() > 20, "{text}");
    for (i, r) in rows.iter().enumerate() {
        // %12.3f %2.12f %10d %14.2f: fixed widths 12 + 1 + 14 + 1 + 10 (+ 1 + 14).
        let last = i == rows.len() - 1;
        assert_eq!(r.len(), if last { 38 } else { 53 }, "row {r:?}");
        let f: Vec<&str> = r.split_whitespace().collect();
        assert_eq!(f.len(), if last { 3 } else { 4 }, "row {r:?}");
        assert_eq!(f[0].split('.').nth(1).unwrap().len(), 3);
        assert_eq!(f[1].split('.').nth(1).unwrap().len(), 12);
    }
    assert!(rows.last().unwrap().contains("1.000000000000"));
    let footer: Vec<&str> = text.lines().filter(|l| l.starts_with("#[")).collect();
    assert_eq!(footer.len(), 3);
    assert!(footer[0].starts_with("#[Mean    = ") && footer[0].contains(", StdDeviation   = "));
    assert!(footer[1].starts_with("#[Max     = ") && footer[1].ends_with(&format!("Total count    = {total:>12}]")));
    assert!(footer[2].starts_with("#[Buckets = ") && footer[2].contains(", SubBuckets     = "));
    let parsed = upsplice_loadgen::hgrm::parse(text).unwrap();
    assert_eq!(parsed.total_count, total);
}

#[test]
fn hgrm_hlog_merge_and_plot() {
    let echo = Server::echo(&[]);
    let dir = tmpdir();
    let p = |n: &str| dir.path().join(n).to_string_lossy().to_string();
    let mut runs = Vec::new();
    for name in ["a", "b"] {
        let (hgrm, hlog, svg) = (p(&format!("{name}.hgrm")), p(&format!("{name}.hlog")), p(&format!("{name}.svg")));
        let r = run(
            &[
                "ws", "--target", &echo.addr, "-c", "3", "-r", "600", "-d", "3s", "-w", "500ms", "--hgrm", &hgrm,
                "--hlog", &hlog, "--plot", &svg,
            ],
            dir.path(),
            name,
        );
        assert!(r.output.status.success(), "{}", r.stdout);
        let corrected = decode_histogram(&r.summary.histograms.corrected).unwrap();
        assert_eq!(corrected.len(), r.summary.received);
        // .hgrm: reference layout, counts match.
        check_hgrm_layout(&std::fs::read_to_string(&hgrm).unwrap(), r.summary.received);
        // .hlog: the crate's reader gets back exactly the run's corrected histogram.
        let (total, intervals) = read_hlog(Path::new(&hlog));
        assert!((3..=5).contains(&intervals), "{intervals} intervals");
        assert_eq!(total, corrected);
        let svg = std::fs::read_to_string(&svg).unwrap();
        assert_eq!(svg.matches("<polyline").count(), 2);
        runs.push(corrected);
    }
    // merge: equals the two runs' histograms added.
    let (mjson, mhgrm, mhlog) = (p("m.json"), p("m.hgrm"), p("m.hlog"));
    let out = Command::new(bin())
        .args(["merge", &p("a.hlog"), &p("b.hlog"), "--json", &mjson, "--hgrm", &mhgrm, "--hlog", &mhlog])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m: upsplice_loadgen::report::Summary = serde_json::from_str(&std::fs::read_to_string(&mjson).unwrap()).unwrap();
    let mut both = runs[0].clone();
    both.add(&runs[1]).unwrap();
    assert_eq!(decode_histogram(&m.histograms.corrected).unwrap(), both);
    assert_eq!(m.latency_us.corrected.count, both.len());
    assert_eq!(m.latency_us.corrected.max, both.highest_equivalent(both.max()));
    assert_eq!(m.latency_us.corrected.p99, both.highest_equivalent(both.value_at_quantile(0.99)));
    check_hgrm_layout(&std::fs::read_to_string(&mhgrm).unwrap(), both.len());
    assert_eq!(read_hlog(Path::new(&mhlog)).0, both);
    // plot: overlay of two JSON runs and a log.
    let svg = p("cmp.svg");
    let out =
        Command::new(bin()).args(["plot", &p("a.json"), &p("b.json"), &p("m.hlog"), "-o", &svg]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert_eq!(svg.matches("<polyline").count(), 5);
    assert!(svg.contains("a corrected") && svg.contains("b uncorrected") && svg.contains(">m<"));
}

/// A `ws` summary whose corrected latencies are all `us` µs, written to `dir/name`.
fn write_ws_summary(dir: &Path, name: &str, us: u64, label: Option<&str>) -> String {
    use upsplice_loadgen::recorder::Recorder;
    use upsplice_loadgen::report::{summarize, RunInfo};
    let mut rec = Recorder::new(false);
    rec.connections_ok = 1;
    rec.count_sent(100, true);
    for _ in 0..100 {
        rec.reply(us * 1000, us * 1000, 0);
    }
    let info = RunInfo { mode: "ws".into(), target: "t".into(), connections: 1, duration_s: 1.0, ..Default::default() };
    let mut s = summarize(&info, &rec, Default::default(), 1.0);
    s.label = label.map(String::from);
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_vec(&s).unwrap()).unwrap();
    path.to_string_lossy().to_string()
}

#[test]
fn plot_names_two_runs_of_the_same_mode_apart() {
    let dir = tmpdir();
    let a = write_ws_summary(&dir.path().join("before"), "ws.json", 200, None);
    let b = write_ws_summary(&dir.path().join("after"), "ws.json", 900, None);
    let c = write_ws_summary(dir.path(), "c.json", 500, Some("router <tuned>"));
    let svg = dir.path().join("cmp.svg");
    let out = Command::new(bin()).args(["plot", &a, &b, &c, "-o"]).arg(&svg).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let svg = std::fs::read_to_string(&svg).unwrap();
    let legend: Vec<&str> =
        svg.lines().filter_map(|l| l.rsplit_once("\">")).map(|(_, t)| t.trim_end_matches("</text>")).collect();
    let names: Vec<&&str> = legend.iter().filter(|t| t.ends_with("corrected")).collect();
    assert_eq!(names.len(), 6, "{legend:?}");
    let mut unique = names.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), 6, "two curves share a label: {legend:?}");
    let (before, after) = (a.trim_end_matches(".json"), b.trim_end_matches(".json"));
    assert!(legend.contains(&format!("{before} corrected").as_str()), "{legend:?}");
    assert!(legend.contains(&format!("{after} uncorrected").as_str()), "{legend:?}");
    // A run's own label wins over its file name.
    assert!(legend.contains(&"router &lt;tuned&gt; corrected"), "{legend:?}");
}

#[test]
fn churn_hlogs_from_two_generators_merge() {
    let echo = Server::echo(&[]);
    let dir = tmpdir();
    let p = |n: &str| dir.path().join(n).to_string_lossy().to_string();
    let mut runs = Vec::new();
    for name in ["c1", "c2"] {
        let hlog = p(&format!("{name}.hlog"));
        let r = run(
            &["churn", "--target", &echo.addr, "-r", "100", "-n", "150", "-c", "8", "-d", "10s", "--hlog", &hlog],
            dir.path(),
            name,
        );
        assert!(r.output.status.success(), "{}", r.stdout);
        let corrected = decode_histogram(&r.summary.histograms.corrected).unwrap();
        assert_eq!(corrected.len(), 150, "{}", r.stdout);
        // One interval per second the cycles ended in (due over 1.5 s: at
        // least two), adding up to the run's histogram.
        let (total, intervals) = read_hlog(Path::new(&hlog));
        assert!(intervals >= 2, "{intervals} intervals");
        assert_eq!(total, corrected);
        runs.push(corrected);
    }
    let mjson = p("m.json");
    let out = Command::new(bin()).args(["merge", &p("c1.hlog"), &p("c2.hlog"), "--json", &mjson]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m: upsplice_loadgen::report::Summary = serde_json::from_str(&std::fs::read_to_string(&mjson).unwrap()).unwrap();
    let mut both = runs[0].clone();
    both.add(&runs[1]).unwrap();
    assert_eq!(decode_histogram(&m.histograms.corrected).unwrap(), both);
}
