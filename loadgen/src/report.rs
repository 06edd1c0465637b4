//! The run summary: one serialisable value printed as text and written as
//! JSON (schema `upsplice-loadgen/summary/v1`, documented in README.md).

use crate::recorder::{ErrorKind, Recorder};
use crate::rusage::CpuTime;
use crate::search::SearchStats;
use crate::timeline::Stalls;
use crate::watch::WatchReport;
use hdrhistogram::serialization::{Deserializer, Serializer, V2DeflateSerializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt::Write;

/// Schema identifier written into every JSON summary.
pub const SCHEMA: &str = "upsplice-loadgen/summary/v1";

/// Fraction of the target rate below which the run is reported as not reaching it.
pub const RATE_TOLERANCE: f64 = 0.98;

/// Percentiles of one histogram, in microseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Number of values.
    pub count: u64,
    /// Smallest value.
    pub min: u64,
    /// Mean.
    pub mean: f64,
    /// Standard deviation.
    pub stddev: f64,
    /// 50th percentile.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// 99.99th percentile.
    pub p9999: u64,
    /// Largest value.
    pub max: u64,
}

impl Percentiles {
    /// Percentiles of `h` (all zero when empty).
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        let q = |x: f64| h.highest_equivalent(h.value_at_quantile(x));
        Percentiles {
            count: h.len(),
            min: h.min(),
            mean: h.mean(),
            stddev: h.stdev(),
            p50: q(0.50),
            p90: q(0.90),
            p99: q(0.99),
            p999: q(0.999),
            p9999: q(0.9999),
            max: h.highest_equivalent(h.max()),
        }
    }
}

/// All latency distributions of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latencies {
    /// Round trip from the intended send time.
    pub corrected: Percentiles,
    /// Round trip from the actual write.
    pub uncorrected: Percentiles,
    /// Generator lateness: actual write minus intended send time (the part
    /// of `corrected` the generator itself may have caused).
    pub send_lag: Percentiles,
    /// TCP connect (and the PROXY header written, when sent).
    pub connect: Percentiles,
    /// TLS handshake after the connect; `count` is the number of full
    /// handshakes. Added in v1; absent in older files and empty without TLS.
    #[serde(default)]
    pub tls: Percentiles,
    /// Resumed TLS handshakes (`--resume` and the server took the ticket);
    /// `count` is the number of resumptions. Added in v1; absent in older
    /// files and empty without `--resume`.
    #[serde(default)]
    pub tls_resumed: Percentiles,
    /// WebSocket upgrade (request to 101).
    pub upgrade: Percentiles,
    /// Whole WebSocket handshake: connect started to 101 parsed, TLS included (added in v1; absent in older files).
    #[serde(default)]
    pub handshake: Percentiles,
}

/// What a `hold` run did with its idle connections.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct HoldStats {
    /// Connections opened per second asked for (0: as fast as `open_concurrency` allows).
    pub open_rate: f64,
    /// Handshakes in progress at most.
    pub open_concurrency: u64,
    /// Seconds the opening phase took (first connect to last handshake finished).
    pub open_s: f64,
    /// Seconds asked to hold.
    pub hold_s: f64,
    /// Seconds actually held (shorter when a signal ended the run).
    pub held_for_s: f64,
    /// Seconds between liveness messages per connection (0: none, fully idle).
    pub ping_interval_s: f64,
    /// Connections still open and upgraded when the hold ended.
    pub held: u64,
    /// Upgraded connections the peer closed (or broke) before we closed them.
    pub closed_early: u64,
    /// Liveness messages written.
    pub pings_sent: u64,
    /// Liveness messages echoed back.
    pub pings_echoed: u64,
    /// Liveness messages not echoed before the drain deadline (or lost with their connection).
    pub pings_unanswered: u64,
    /// SIGTERM/SIGINT ended the run early.
    pub stopped_by_signal: bool,
    /// The soft open-files limit the run had (after raising it to the hard limit).
    pub fd_limit: u64,
}

/// What a `churn` run did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChurnStats {
    /// Cycles started per second asked for (0: as fast as `concurrency` allows).
    pub target_rate: f64,
    /// Cycles in progress at most.
    pub concurrency: u64,
    /// Cycle limit (0: only the duration limits the run).
    pub count_limit: u64,
    /// Cycles started.
    pub attempts: u64,
    /// Handshakes completed (101 with a valid accept key).
    pub handshakes: u64,
    /// Cycles that completed: upgrade, one echoed message, clean close.
    pub completed: u64,
    /// Seconds from the first cycle's start to the last cycle's end.
    pub elapsed_s: f64,
    /// `handshakes / elapsed_s`.
    pub handshakes_per_s: f64,
    /// `completed / elapsed_s`.
    pub cycles_per_s: f64,
    /// SIGTERM/SIGINT ended the run early.
    pub stopped_by_signal: bool,
}

/// The full histograms, base64 of HdrHistogram's V2+deflate encoding (the
/// `.hlog` histogram encoding), so other tools can recompute anything.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EncodedHistograms {
    /// Corrected latency, µs.
    pub corrected: String,
    /// Uncorrected latency, µs.
    pub uncorrected: String,
}

/// Raw TCP throughput figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    /// Bytes written in the measured window.
    pub bytes_out: u64,
    /// Bytes read in the measured window.
    pub bytes_in: u64,
    /// Upload rate, megabits per second.
    pub out_mbit_s: f64,
    /// Download rate, megabits per second.
    pub in_mbit_s: f64,
}

/// The generator's own CPU use.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Cpu {
    /// User CPU seconds.
    pub user_s: f64,
    /// System CPU seconds.
    pub system_s: f64,
    /// Wall-clock seconds of the whole run (including warm-up and drain).
    pub wall_s: f64,
    /// (user + system) / wall: cores kept busy on average.
    pub cores_busy: f64,
}

/// Everything a run reports.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Always [`SCHEMA`].
    pub schema: String,
    /// Subcommand: ws, http, tcp-pingpong, tcp-bulk or merge.
    pub mode: String,
    /// The run's name (`--label`; added in v1, null when not given); `plot`
    /// labels the run's curves with it.
    #[serde(default)]
    pub label: Option<String>,
    /// Target address (or the merged files).
    pub target: String,
    /// Connections asked for.
    pub connections: u64,
    /// Connections that were established (and upgraded).
    pub connections_ok: u64,
    /// Connections opened again after the target closed a keep-alive
    /// connection (`http`; added in v1, 0 in older files).
    #[serde(default)]
    pub reconnects: u64,
    /// Generator threads.
    pub threads: u64,
    /// Target rate, messages or requests per second (0 for bulk).
    pub target_rate: f64,
    /// Messages written during the measured window, per second of it.
    pub achieved_rate: f64,
    /// Replies recorded per second of the measured window.
    pub reply_rate: f64,
    /// Whether the achieved rate reached the target (within 2 %).
    pub rate_reached: bool,
    /// Measured seconds.
    pub duration_s: f64,
    /// Warm-up seconds (not recorded).
    pub warmup_s: f64,
    /// Message size in bytes.
    pub size: u64,
    /// Per-connection in-flight window.
    pub max_inflight: u64,
    /// Messages due in the measured window and written (possibly late).
    pub sent: u64,
    /// Of `sent`, those written before the window ended.
    pub sent_in_window: u64,
    /// Messages due in the window that were never written (generator overload).
    pub unsent: u64,
    /// Messages due in the window before their connection was ready (not sent).
    pub skipped: u64,
    /// Replies recorded.
    pub received: u64,
    /// Of `sent`, those that got no reply (`sent - received`): lost with
    /// their connection or still outstanding at the drain deadline (added in
    /// v1; 0 in older files).
    #[serde(default)]
    pub unanswered: u64,
    /// Errors by kind (every kind listed, zero included).
    pub errors: BTreeMap<String, u64>,
    /// Sum of `errors`.
    pub total_errors: u64,
    /// Latency percentiles, µs.
    pub latency_us: Latencies,
    /// Raw TCP throughput (bulk mode only).
    pub throughput: Option<Throughput>,
    /// `hold` mode only (added in v1; null otherwise).
    #[serde(default)]
    pub hold: Option<HoldStats>,
    /// `churn` mode only (added in v1; null otherwise).
    #[serde(default)]
    pub churn: Option<ChurnStats>,
    /// Generator CPU use.
    pub cpu: Cpu,
    /// `search` only: the steps and the answer (added in v1; null otherwise).
    #[serde(default)]
    pub search: Option<SearchStats>,
    /// The machine's busy CPU and the `--watch-pid` processes over the run
    /// (added in v1; null in older files and for `merge`).
    #[serde(default)]
    pub watch: Option<WatchReport>,
    /// Stretches of a second or more in which load was due (a message owed,
    /// bytes to move) and nothing moved (added in v1; zero in older files).
    #[serde(default)]
    pub stalls: Stalls,
    /// False when the figures cannot be trusted; see `problems`.
    pub valid: bool,
    /// Why the run is invalid, or warnings (rate not reached).
    pub problems: Vec<String>,
    /// Full histograms.
    pub histograms: EncodedHistograms,
}

/// Encodes a histogram as base64 V2+deflate.
pub fn encode_histogram(h: &Histogram<u64>) -> String {
    use base64::Engine;
    let mut buf = Vec::new();
    V2DeflateSerializer::new().serialize(h, &mut buf).expect("serialising into a Vec cannot fail");
    base64::engine::general_purpose::STANDARD.encode(buf)
}

/// Decodes [`encode_histogram`]'s output.
pub fn decode_histogram(s: &str) -> anyhow::Result<Histogram<u64>> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD.decode(s.trim())?;
    Deserializer::new().deserialize(&mut bytes.as_slice()).map_err(|e| anyhow::anyhow!("bad histogram: {e:?}"))
}

/// What a run was asked to do, for the summary.
#[derive(Debug, Clone, Default)]
pub struct RunInfo {
    /// Subcommand.
    pub mode: String,
    /// Target.
    pub target: String,
    /// Connections.
    pub connections: u64,
    /// Threads.
    pub threads: u64,
    /// Target rate (0 for bulk).
    pub target_rate: f64,
    /// Measured seconds.
    pub duration_s: f64,
    /// Warm-up seconds.
    pub warmup_s: f64,
    /// Message size.
    pub size: u64,
    /// In-flight window.
    pub max_inflight: u64,
    /// What the run must move to be valid.
    pub expect: Expect,
}

/// What a run is meant to move; the validity rule ([`verdict`]) checks it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Expect {
    /// Messages answered by replies (`ws`, `http`, `tcp` ping-pong, `hold`
    /// with pings, `churn`).
    #[default]
    Replies,
    /// Nothing: idle connections (`hold` without pings).
    Nothing,
    /// Bytes (`tcp` bulk): written (`out`) and/or read (`inn`).
    Bytes {
        /// Bytes must have been written.
        out: bool,
        /// Bytes must have been read.
        inn: bool,
    },
    /// Values merged from interval logs (`merge`): no connections of its own.
    Merged,
}

/// Whether a run's figures can be trusted, and why not. The one rule every
/// mode applies: a run is invalid when no connection was established, when
/// it moved nothing it was meant to move (no reply, or no byte in a
/// direction asked for), when messages due in the window were never sent,
/// or when any error occurred. A missed target rate is a warning, not a
/// reason: the corrected figures are still right.
pub fn verdict(
    info: &RunInfo,
    rec: &Recorder,
    rate_reached: bool,
    achieved_rate: f64,
    stalls: &Stalls,
) -> (bool, Vec<String>) {
    let mut problems = Vec::new();
    let mut valid = true;
    let mut invalid = |why: String| {
        valid = false;
        problems.push(why);
    };
    if info.expect != Expect::Merged && rec.connections_ok == 0 {
        invalid("no connection could be established".to_string());
    } else {
        match info.expect {
            Expect::Replies if rec.received == 0 => invalid("no reply was recorded".to_string()),
            Expect::Merged if rec.received == 0 => invalid("the logs hold no values".to_string()),
            Expect::Bytes { out, inn } => {
                if out && rec.bytes_out == 0 {
                    invalid("no byte was sent in the measured window".to_string());
                }
                if inn && rec.bytes_in == 0 {
                    invalid("no byte was received in the measured window".to_string());
                }
            }
            _ => {}
        }
    }
    if rec.unsent > 0 {
        invalid(format!("{} messages due in the window were never sent: the generator could not keep up", rec.unsent));
    }
    let total_errors = rec.total_errors();
    if total_errors > 0 {
        invalid(format!("{total_errors} errors: the latency figures miss the failed messages"));
    }
    if let Some(why) = &rec.tls_error {
        problems.push(format!(
            "TLS handshake failed: {why} (check --ca, --sni and the target's certificate; --insecure skips verification)"
        ));
    }
    if stalls.count > 0 {
        problems.push(format!(
            "STALLED: {} time(s) nothing moved for a second or more while load was due, the longest for {:.2}s \
             ({:.2}s in all); the corrected latency includes the wait",
            stalls.count, stalls.longest_s, stalls.total_s
        ));
    }
    if rec.reconnects > 0 {
        problems.push(format!(
            "the target closed keep-alive connections {} times (Connection: close, or EOF after answering): each \
             was opened again at once, and the time that took is in the corrected latency of the requests due \
             meanwhile; use --close to measure a new connection per request",
            rec.reconnects
        ));
    }
    let closed = rec.errors.get(&ErrorKind::ClosedByPeer).copied().unwrap_or(0);
    if info.mode == "http" && rec.received == 0 && closed > 0 {
        problems.push(
            "the target closed keep-alive connections without answering a request: if it does not keep \
             connections alive, use --close (Connection: close, a new connection per request)"
                .to_string(),
        );
    }
    if !rate_reached {
        problems
            .push(format!("TARGET RATE NOT REACHED: {achieved_rate:.1}/s achieved of {:.1}/s asked", info.target_rate));
    }
    (valid, problems)
}

/// Builds the summary and decides validity.
pub fn summarize(info: &RunInfo, rec: &Recorder, cpu: CpuTime, wall_s: f64) -> Summary {
    let errors: BTreeMap<String, u64> =
        ErrorKind::ALL.iter().map(|k| (k.name().to_string(), rec.errors.get(k).copied().unwrap_or(0))).collect();
    let total_errors = rec.total_errors();
    let dur = info.duration_s.max(1e-9);
    let achieved_rate = rec.sent_in_window as f64 / dur;
    let bulk = matches!(info.expect, Expect::Bytes { .. });
    // A merge of interval logs has no rate target and no connections of its own.
    let merged = info.expect == Expect::Merged;
    let rate_reached = bulk || merged || achieved_rate >= info.target_rate * RATE_TOLERANCE;
    let stalls = rec.timeline.stalls();
    let (valid, problems) = verdict(info, rec, rate_reached, achieved_rate, &stalls);
    let user_s = cpu.user.as_secs_f64();
    let system_s = cpu.system.as_secs_f64();
    Summary {
        schema: SCHEMA.to_string(),
        mode: info.mode.clone(),
        label: None,
        target: info.target.clone(),
        connections: info.connections,
        connections_ok: rec.connections_ok,
        reconnects: rec.reconnects,
        threads: info.threads,
        target_rate: info.target_rate,
        achieved_rate,
        reply_rate: rec.received as f64 / dur,
        rate_reached,
        duration_s: info.duration_s,
        warmup_s: info.warmup_s,
        size: info.size,
        max_inflight: info.max_inflight,
        sent: rec.sent,
        sent_in_window: rec.sent_in_window,
        unsent: rec.unsent,
        skipped: rec.skipped,
        received: rec.received,
        unanswered: rec.sent.saturating_sub(rec.received),
        errors,
        total_errors,
        latency_us: Latencies {
            corrected: Percentiles::of(&rec.corrected),
            uncorrected: Percentiles::of(&rec.uncorrected),
            send_lag: Percentiles::of(&rec.send_lag),
            connect: Percentiles::of(&rec.connect),
            tls: Percentiles::of(&rec.tls),
            tls_resumed: Percentiles::of(&rec.tls_resumed),
            upgrade: Percentiles::of(&rec.upgrade),
            handshake: Percentiles::of(&rec.handshake),
        },
        throughput: bulk.then(|| Throughput {
            bytes_out: rec.bytes_out,
            bytes_in: rec.bytes_in,
            out_mbit_s: rec.bytes_out as f64 * 8.0 / 1e6 / dur,
            in_mbit_s: rec.bytes_in as f64 * 8.0 / 1e6 / dur,
        }),
        hold: None,
        churn: None,
        watch: None,
        search: None,
        cpu: Cpu { user_s, system_s, wall_s, cores_busy: (user_s + system_s) / wall_s.max(1e-9) },
        stalls,
        valid,
        problems,
        histograms: EncodedHistograms {
            corrected: encode_histogram(&rec.corrected),
            uncorrected: encode_histogram(&rec.uncorrected),
        },
    }
}

fn ms(us: u64) -> String {
    format!("{:.3} ms", us as f64 / 1000.0)
}

fn row(out: &mut String, name: &str, p: &Percentiles) {
    if p.count == 0 {
        let _ = writeln!(out, "  {name:<12} (none)");
        return;
    }
    let _ = writeln!(
        out,
        "  {name:<12} p50 {:>11}  p90 {:>11}  p99 {:>11}  p99.9 {:>11}  p99.99 {:>11}  max {:>11}  (n={})",
        ms(p.p50),
        ms(p.p90),
        ms(p.p99),
        ms(p.p999),
        ms(p.p9999),
        ms(p.max),
        p.count
    );
}

fn render_watch(out: &mut String, w: &WatchReport) {
    let _ = writeln!(
        out,
        "machine cpu    {:.2}s busy of {:.2}s over {:.2}s = {:.2} cores busy",
        w.machine.busy_s, w.machine.total_s, w.window_s, w.machine.cores_busy
    );
    for p in &w.processes {
        let _ = writeln!(
            out,
            "watched        pid {} ({}): cpu user {:.2}s system {:.2}s = {:.2} cores busy | rss {} / peak {} / end {} KiB | \
             fds {} / peak {} / end {}{}",
            p.pid,
            p.name,
            p.user_s,
            p.system_s,
            p.cores_busy,
            p.rss_kib_start,
            p.rss_kib_peak,
            p.rss_kib_end,
            p.fds_start,
            p.fds_peak,
            p.fds_end,
            if p.gone { " (exited during the run)" } else { "" }
        );
    }
    if let Some(p) = &w.port {
        let _ = writeln!(
            out,
            "established    on local port {}: {} / peak {} / end {}",
            p.port, p.established_start, p.established_peak, p.established_end
        );
    }
}

/// What became of the messages due in the measured window, in terms that add
/// up: sent = answered + unanswered; not sent = unsent + skipped.
fn render_counts(out: &mut String, s: &Summary) {
    let noun = if s.mode.starts_with("http") { "requests" } else { "messages" };
    let _ = writeln!(
        out,
        "  {noun:<12} due in the window: sent {} = answered {} + unanswered {} | not sent {} = unsent {} + skipped {} \
         | sent late (after the window) {}",
        s.sent,
        s.received,
        s.unanswered,
        s.unsent + s.skipped,
        s.unsent,
        s.skipped,
        s.sent.saturating_sub(s.sent_in_window)
    );
}

/// The human-readable summary.
pub fn render(s: &Summary) -> String {
    let mut out = String::new();
    let label = s.label.as_ref().map(|l| format!(" ({l})")).unwrap_or_default();
    let _ = writeln!(out, "upsplice-loadgen {} -> {}{label}", s.mode, s.target);
    if s.mode == "merge" {
        let _ = writeln!(out, "  {} values over {:.1}s of intervals ({:.1}/s)", s.received, s.duration_s, s.reply_rate);
        row(&mut out, "corrected", &s.latency_us.corrected);
        let _ = writeln!(out, "result         {}", if s.valid { "VALID" } else { "INVALID" });
        return out;
    }
    let _ = writeln!(
        out,
        "  connections {} established of {}{} | threads {} | duration {:.1}s after {:.1}s warm-up | size {} B | max-inflight {}",
        s.connections_ok,
        s.connections,
        if s.reconnects > 0 { format!(" (+{} reconnects)", s.reconnects) } else { String::new() },
        s.threads,
        s.duration_s,
        s.warmup_s,
        s.size,
        s.max_inflight
    );
    if let Some(h) = &s.hold {
        let _ = writeln!(
            out,
            "  hold         {} held of {} | closed early {} | opened in {:.2}s ({} open/s, {} at once) | held {:.1}s of {:.1}s{}",
            h.held,
            s.connections,
            h.closed_early,
            h.open_s,
            if h.open_rate > 0.0 { format!("{:.0}", h.open_rate) } else { "max".into() },
            h.open_concurrency,
            h.held_for_s,
            h.hold_s,
            if h.stopped_by_signal { " (stopped by signal)" } else { "" }
        );
        if h.ping_interval_s > 0.0 {
            let _ = writeln!(
                out,
                "  pings        every {:.2}s: {} sent, {} echoed, {} unanswered",
                h.ping_interval_s, h.pings_sent, h.pings_echoed, h.pings_unanswered
            );
            let _ = writeln!(out, "latency of the liveness messages (from scheduled / actual send):");
            row(&mut out, "corrected", &s.latency_us.corrected);
            row(&mut out, "uncorrected", &s.latency_us.uncorrected);
        } else {
            let _ = writeln!(out, "  pings        none (idle)");
        }
    } else if let Some(c) = &s.churn {
        let _ = writeln!(
            out,
            "  churn        {} cycles started, {} handshakes, {} completed in {:.2}s = {:.1} handshakes/s, {:.1} cycles/s \
             (target {}, {} at once{}){}",
            c.attempts,
            c.handshakes,
            c.completed,
            c.elapsed_s,
            c.handshakes_per_s,
            c.cycles_per_s,
            if c.target_rate > 0.0 { format!("{:.1}/s", c.target_rate) } else { "max".into() },
            c.concurrency,
            if c.count_limit > 0 { format!(", limit {}", c.count_limit) } else { String::new() },
            if c.stopped_by_signal { " (stopped by signal)" } else { "" }
        );
        let _ = writeln!(
            out,
            "cycle latency, connect to echo (corrected = from intended start; uncorrected = from actual):"
        );
        row(&mut out, "corrected", &s.latency_us.corrected);
        row(&mut out, "uncorrected", &s.latency_us.uncorrected);
    } else if let Some(t) = &s.throughput {
        let _ = writeln!(
            out,
            "  throughput   out {:.1} Mbit/s ({} B)  in {:.1} Mbit/s ({} B)",
            t.out_mbit_s, t.bytes_out, t.in_mbit_s, t.bytes_in
        );
    } else {
        let _ = writeln!(
            out,
            "  rate         {:.1}/s achieved of {:.1}/s target ({:.1} %), replies {:.1}/s",
            s.achieved_rate,
            s.target_rate,
            100.0 * s.achieved_rate / s.target_rate.max(1e-9),
            s.reply_rate,
        );
        render_counts(&mut out, s);
        let _ = writeln!(out, "latency (corrected = from intended send time; uncorrected = from actual write):");
        row(&mut out, "corrected", &s.latency_us.corrected);
        row(&mut out, "uncorrected", &s.latency_us.uncorrected);
        row(&mut out, "send lag", &s.latency_us.send_lag);
    }
    row(&mut out, "connect", &s.latency_us.connect);
    if s.latency_us.tls.count > 0 {
        row(&mut out, "tls (full)", &s.latency_us.tls);
    }
    if s.latency_us.tls_resumed.count > 0 {
        row(&mut out, "tls (resumed)", &s.latency_us.tls_resumed);
    }
    row(&mut out, "upgrade", &s.latency_us.upgrade);
    row(&mut out, "handshake", &s.latency_us.handshake);
    if s.stalls.count > 0 {
        let _ = writeln!(
            out,
            "stalls         {} of 1s or more with load due and nothing moving: longest {:.2}s, {:.2}s in all",
            s.stalls.count, s.stalls.longest_s, s.stalls.total_s
        );
    }
    let errs: Vec<String> = s.errors.iter().filter(|(_, v)| **v > 0).map(|(k, v)| format!("{k} {v}")).collect();
    let _ = writeln!(out, "errors         {}", if errs.is_empty() { "none".to_string() } else { errs.join(", ") });
    let _ = writeln!(
        out,
        "generator cpu  user {:.2}s system {:.2}s over {:.2}s wall = {:.2} cores busy",
        s.cpu.user_s, s.cpu.system_s, s.cpu.wall_s, s.cpu.cores_busy
    );
    if let Some(w) = &s.watch {
        render_watch(&mut out, w);
    }
    if let Some(x) = &s.search {
        let _ = writeln!(
            out,
            "search         p{} < {:.3} ms: {} ({} step(s) in {:.0}..{:.0}/s, stopped: {}{})",
            x.percentile,
            x.bound_us as f64 / 1e3,
            if x.answer_rate > 0.0 { format!("{:.0}/s", x.answer_rate) } else { "no rate passed".into() },
            x.steps.len(),
            x.floor,
            x.ceiling,
            x.stopped_by.name(),
            if x.failing_rate > 0.0 { format!(", {:.0}/s failed", x.failing_rate) } else { String::new() }
        );
    }
    for p in &s.problems {
        let _ = writeln!(out, "!!! {p}");
    }
    let _ = writeln!(out, "result         {}", if s.valid { "VALID" } else { "INVALID" });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> RunInfo {
        RunInfo {
            mode: "ws".into(),
            target: "t".into(),
            connections: 1,
            threads: 1,
            target_rate: 100.0,
            duration_s: 1.0,
            warmup_s: 0.0,
            size: 16,
            max_inflight: 1,
            expect: Expect::Replies,
        }
    }

    #[test]
    fn missed_rate_is_loud_but_errors_invalidate() {
        let mut r = Recorder::new(false);
        r.connections_ok = 1;
        r.count_sent(50, true);
        for _ in 0..50 {
            r.reply(1_000_000, 1_000_000, 0);
        }
        let s = summarize(&info(), &r, CpuTime::default(), 1.0);
        assert!(s.valid);
        assert!(!s.rate_reached);
        assert!(render(&s).contains("TARGET RATE NOT REACHED"));
        r.error(ErrorKind::ClosedByPeer);
        let s = summarize(&info(), &r, CpuTime::default(), 1.0);
        assert!(!s.valid);
        assert_eq!(s.errors["closed_by_peer"], 1);
        assert_eq!(s.errors["bad_accept"], 0);
    }

    #[test]
    fn summaries_written_before_hold_and_churn_still_parse() {
        let mut r = Recorder::new(false);
        r.connections_ok = 1;
        r.reply(5_000_000, 2_000_000, 0);
        let mut v = serde_json::to_value(summarize(&info(), &r, CpuTime::default(), 1.0)).unwrap();
        let o = v.as_object_mut().unwrap();
        o.remove("hold");
        o.remove("churn");
        o.remove("watch");
        o.remove("search");
        o["latency_us"].as_object_mut().unwrap().remove("handshake");
        let back: Summary = serde_json::from_value(v).unwrap();
        assert!(back.hold.is_none() && back.churn.is_none());
        assert_eq!(back.latency_us.handshake.count, 0);
    }

    #[test]
    fn idle_runs_need_no_replies() {
        let mut r = Recorder::new(false);
        r.connections_ok = 3;
        let hold = RunInfo { mode: "hold".into(), target_rate: 0.0, expect: Expect::Nothing, ..info() };
        assert!(summarize(&hold, &r, CpuTime::default(), 1.0).valid);
        let busy = RunInfo { expect: Expect::Replies, ..hold };
        assert!(!summarize(&busy, &r, CpuTime::default(), 1.0).valid);
    }

    #[test]
    fn json_round_trips_with_histograms() {
        let mut r = Recorder::new(false);
        r.connections_ok = 1;
        r.reply(5_000_000, 2_000_000, 0);
        let s = summarize(&info(), &r, CpuTime::default(), 1.0);
        let j = serde_json::to_string(&s).unwrap();
        let back: Summary = serde_json::from_str(&j).unwrap();
        assert_eq!(back, s);
        assert_eq!(decode_histogram(&back.histograms.corrected).unwrap(), r.corrected);
        assert!(r.corrected.equivalent(back.latency_us.corrected.max, 5000));
    }

    fn bulk(out: bool, inn: bool) -> RunInfo {
        RunInfo { mode: "tcp-bulk".into(), target_rate: 0.0, expect: Expect::Bytes { out, inn }, ..info() }
    }

    #[test]
    fn a_run_that_moved_nothing_is_never_valid() {
        // Bulk: connected, no error, but no byte in a direction asked for.
        let mut r = Recorder::new(false);
        r.connections_ok = 1;
        r.bytes_in = 1 << 20;
        let s = summarize(&bulk(true, true), &r, CpuTime::default(), 1.0);
        assert!(!s.valid && s.problems.iter().any(|p| p.contains("no byte was sent")), "{:?}", s.problems);
        assert!(render(&s).contains("INVALID"));
        // The same bytes are enough when only the download was asked for.
        assert!(summarize(&bulk(false, true), &r, CpuTime::default(), 1.0).valid);
        // Bytes moved but no connection counted as established: never valid.
        r.bytes_out = 1 << 20;
        r.connections_ok = 0;
        let s = summarize(&bulk(true, true), &r, CpuTime::default(), 1.0);
        assert!(!s.valid && s.problems[0].contains("no connection"), "{:?}", s.problems);
        // Messages: connections that all failed, or no reply at all.
        let mut r = Recorder::new(false);
        r.count_sent(10, true);
        r.error_n(ErrorKind::Connect, 4);
        assert!(!summarize(&info(), &r, CpuTime::default(), 1.0).valid);
        r.connections_ok = 1;
        r.errors.clear();
        let s = summarize(&info(), &r, CpuTime::default(), 1.0);
        assert!(!s.valid && s.problems[0] == "no reply was recorded", "{:?}", s.problems);
        // A merge of empty logs shows nothing either.
        let merged = RunInfo { mode: "merge".into(), expect: Expect::Merged, ..RunInfo::default() };
        assert!(!summarize(&merged, &Recorder::new(false), CpuTime::default(), 1.0).valid);
    }

    #[test]
    fn bulk_report_says_established_beside_throughput() {
        let mut r = Recorder::new(false);
        r.connections_ok = 1;
        r.bytes_out = 138_612_500;
        r.bytes_in = 138_612_500;
        let s = summarize(&bulk(true, true), &r, CpuTime::default(), 1.0);
        let text = render(&s);
        assert!(s.valid, "{text}");
        assert!(text.contains("connections 1 established of 1"), "{text}");
        assert!(text.contains("throughput   out 1108.9 Mbit/s"), "{text}");
    }

    #[test]
    fn message_counts_add_up_in_the_labels() {
        // A saturated ws run: 128 messages still in flight at the drain deadline.
        let mut r = Recorder::new(false);
        r.connections_ok = 1;
        r.count_sent(50_000, true);
        r.count_sent(665, false);
        r.unsent = 7;
        r.skipped = 3;
        for _ in 0..50_537 {
            r.reply(1_000_000, 1_000_000, 0);
        }
        r.error_n(ErrorKind::Unanswered, 128);
        let s = summarize(&info(), &r, CpuTime::default(), 1.0);
        assert_eq!(s.unanswered, 128);
        assert_eq!(s.sent, s.received + s.unanswered);
        assert_eq!(s.unanswered, s.errors["unanswered"]);
        let text = render(&s);
        assert!(
            text.contains(
                "messages     due in the window: sent 50665 = answered 50537 + unanswered 128 \
                 | not sent 10 = unsent 7 + skipped 3 | sent late (after the window) 665"
            ),
            "{text}"
        );
        let http = RunInfo { mode: "http".into(), ..info() };
        assert!(render(&summarize(&http, &r, CpuTime::default(), 1.0)).contains("  requests     due in the window"));
    }

    #[test]
    fn a_stall_is_flagged_with_its_length_but_does_not_invalidate() {
        let ms = 1_000_000u64;
        let mut r = Recorder::new(false);
        r.connections_ok = 1;
        r.count_sent(100, true);
        // Every 10 ms an answer 1 ms after it was due, except that the one
        // due at 500 ms takes until 1700 ms and nothing else moves meanwhile.
        let mut answer = |due: u64, at: u64| {
            r.reply(at - due, at - due, 0);
            r.timeline.answered(due, at);
        };
        for due in (0..500).step_by(10) {
            answer(due * ms, (due + 1) * ms);
        }
        answer(500 * ms, 1700 * ms);
        for due in (1700..2000).step_by(10) {
            answer(due * ms, (due + 1) * ms);
        }
        let s = summarize(&info(), &r, CpuTime::default(), 1.0);
        assert_eq!(s.stalls.count, 1, "{:?}", s.stalls);
        assert!((s.stalls.longest_s - 1.2).abs() < 0.02, "{:?}", s.stalls);
        assert!(s.valid, "a stall is in the corrected latency, the figures stand: {:?}", s.problems);
        let text = render(&s);
        assert!(
            text.contains("stalls         1 of 1s or more with load due and nothing moving: longest 1.20s"),
            "{text}"
        );
        assert!(text.contains("!!! STALLED: 1 time(s)"), "{text}");
        let back: Summary = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back.stalls, s.stalls);
        // Without the wait: no stall, no line.
        let mut r = Recorder::new(false);
        r.connections_ok = 1;
        r.reply(ms, ms, 0);
        r.timeline.answered(0, ms);
        let s = summarize(&info(), &r, CpuTime::default(), 1.0);
        assert_eq!(s.stalls, Stalls::default());
        assert!(!render(&s).contains("stalls ") && !s.problems.iter().any(|p| p.contains("STALLED")));
    }
}
