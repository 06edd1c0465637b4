//! `upsplice-loadgen` entry point: parses the command line and runs a subcommand.

use anyhow::{bail, Context};
use clap::Parser;
use std::io::IsTerminal;
use std::net::ToSocketAddrs;
use std::process::ExitCode;
use std::sync::Arc;
use upsplice_loadgen::cli::{
    ChurnArgs, Cli, Command, HoldArgs, HttpTarget, LifecycleArgs, LoadArgs, MergeArgs, NatsRegisterArgs, PlotArgs,
    SearchArgs, TcpMode, WireArgs,
};
use upsplice_loadgen::engine::{self, Proto, RunConfig};
use upsplice_loadgen::outputs::{self, Outputs};
use upsplice_loadgen::plot::{self, Series};
use upsplice_loadgen::recorder::Recorder;
use upsplice_loadgen::report::{self, Expect, RunInfo};
use upsplice_loadgen::rusage::CpuTime;
use upsplice_loadgen::target::{TargetSpec, Wire, ALPN_HTTP1};
use upsplice_loadgen::watch::Watch;
use upsplice_loadgen::{churn, echo, hlog, hold, lifecycle, net, progress, search, tcpbulk, ws};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("upsplice-loadgen: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Echo(a) => {
            net::raise_fd_limit();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(a.threads.unwrap_or_else(cores).max(1))
                .enable_all()
                .build()?;
            let tls = match (&a.tls_cert, &a.tls_key) {
                (Some(cert), Some(key)) => Some(upsplice_loadgen::tls::server_config(cert, key)?),
                _ => None,
            };
            rt.block_on(echo::serve(echo::EchoConfig {
                listen: a.listen,
                mode: a.mode,
                tls,
                stall_at: a.stall_at,
                stall_for: a.stall_for,
            }))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ws(a) => {
            check_size(a.size)?;
            let dest = Dest::http(&a.load.url, &a.load.target, &a.http, &a.load.wire)?;
            load(&a.load, plan(&a.load, Proto::Ws, "ws", dest, a.size, a.max_inflight)?)
        }
        Command::Http(a) => {
            let dest = Dest::http(&a.load.url, &a.load.target, &a.http, &a.load.wire)?;
            let proto = if a.close { Proto::HttpClose } else { Proto::HttpKeepAlive };
            let mode = if a.close { "http-close" } else { "http" };
            load(&a.load, plan(&a.load, proto, mode, dest, 0, a.max_inflight)?)
        }
        Command::Tcp(a) if a.mode == TcpMode::Pingpong => {
            check_size(a.size)?;
            let dest = Dest::tcp(&a.load)?;
            load(&a.load, plan(&a.load, Proto::Raw, "tcp-pingpong", dest, a.size, a.max_inflight)?)
        }
        Command::Tcp(a) => bulk(&a.load, Dest::tcp(&a.load)?, a.size, a.direction),
        Command::Hold(a) => hold(a),
        Command::Churn(a) => churn(a),
        Command::Search(a) => search(a),
        Command::Merge(a) => merge(a),
        Command::Plot(a) => plot_files(a),
        Command::NatsRegister(a) => nats_register(a),
    }
}

/// `nats-register`: a burst of registrations, or the register-to-routed loop; one JSON line.
fn nats_register(a: NatsRegisterArgs) -> anyhow::Result<ExitCode> {
    use upsplice_loadgen::nats;
    let json = match (a.first_route, a.backend) {
        (Some(router), Some(backend)) => serde_json::to_string(&nats::first_route(
            &a.server, router, backend, a.samples, &a.domain, &a.prefix, a.timeout,
        )?)?,
        _ => {
            let plan = nats::Plan {
                server: a.server,
                uris: a.uris,
                endpoints: a.endpoints,
                rate: a.rate.0,
                domain: a.domain,
                repeat_every: a.repeat_every,
                duration: a.duration,
                wait_metrics: a.wait_metrics,
                timeout: a.timeout,
            };
            let report = nats::burst(&plan)?;
            let absorbed = report.absorbed_s.is_some() || plan.wait_metrics.is_none();
            let json = serde_json::to_string(&report)?;
            if !absorbed {
                println!("{json}");
                bail!("the router did not show {} endpoints within {:?}", plan.endpoints, plan.timeout);
            }
            json
        }
    };
    println!("{json}");
    Ok(ExitCode::SUCCESS)
}

fn check_size(size: usize) -> anyhow::Result<()> {
    if size < upsplice_loadgen::codec::SEQ_LEN {
        bail!("--size must be at least {} bytes (the sequence number)", upsplice_loadgen::codec::SEQ_LEN);
    }
    if size as u64 > upsplice_loadgen::wsproto::MAX_PAYLOAD {
        bail!("--size must be at most {} bytes", upsplice_loadgen::wsproto::MAX_PAYLOAD);
    }
    Ok(())
}

/// Where a mode connects and how: the address, what the summary calls the
/// target, the Host header and path, and the TLS and PROXY settings.
struct Dest {
    addr: std::net::SocketAddr,
    name: String,
    host: String,
    path: String,
    wire: Wire,
}

impl Dest {
    /// A URL or `--target` with `--host` and `--path` (ws, http, hold, churn, search).
    fn http(url: &Option<String>, target: &Option<String>, http: &HttpTarget, wire: &WireArgs) -> anyhow::Result<Dest> {
        Self::new(url, target, Some(http), wire, ALPN_HTTP1)
    }

    /// A URL or `--target` for raw TCP: no request, so no path.
    fn tcp(l: &LoadArgs) -> anyhow::Result<Dest> {
        let d = Self::new(&l.url, &l.target, None, &l.wire, &[])?;
        if d.path != "/" {
            bail!("tcp sends no request: the URL's path {} has no use, leave it out", d.path);
        }
        Ok(d)
    }

    fn new(
        url: &Option<String>,
        target: &Option<String>,
        http: Option<&HttpTarget>,
        wire: &WireArgs,
        alpn: &[&[u8]],
    ) -> anyhow::Result<Dest> {
        let spec = TargetSpec {
            url: url.as_deref(),
            target: target.as_deref(),
            host: http.and_then(|h| h.host.as_deref()),
            path: http.and_then(|h| h.path.as_deref()),
            tls: wire.tls,
        };
        let e = spec.endpoint()?;
        let wire = Wire::new(&e, wire, alpn)?;
        let name = url.clone().or_else(|| target.clone()).unwrap_or_default();
        Ok(Dest { addr: resolve(&e.addr)?, name, host: e.host, path: e.path, wire })
    }
}

fn resolve(target: &str) -> anyhow::Result<std::net::SocketAddr> {
    target
        .to_socket_addrs()
        .with_context(|| format!("resolving {target}"))?
        .next()
        .with_context(|| format!("{target} resolves to no address"))
}

fn validate(l: &LoadArgs) -> anyhow::Result<()> {
    if l.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if !(l.rate > 0.0 && l.rate.is_finite()) {
        bail!("--rate must be a positive number");
    }
    if l.duration.is_zero() {
        bail!("--duration must be positive");
    }
    if l.ramp_rate.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        bail!("--ramp-rate must be a positive number");
    }
    Ok(())
}

/// A rate-driven run: the engine's settings and what the summary says about them.
struct Plan {
    cfg: RunConfig,
    info: RunInfo,
}

fn plan(l: &LoadArgs, proto: Proto, mode: &str, dest: Dest, size: usize, max_inflight: usize) -> anyhow::Result<Plan> {
    validate(l)?;
    let fds = net::raise_fd_limit();
    if l.connections as u64 + 64 > fds {
        eprintln!(
            "upsplice-loadgen: WARNING: {} connections but only {fds} open files allowed (ulimit -n); \
             connections past it will fail",
            l.connections
        );
    }
    let cfg = RunConfig {
        proto,
        target: dest.addr,
        wire: dest.wire,
        host: dest.host,
        path: dest.path,
        connections: l.connections,
        rate: l.rate,
        duration: l.duration,
        warmup: l.warmup,
        size,
        max_inflight: max_inflight.max(1),
        ramp_rate: l.ramp_rate,
        source_ips: net::parse_source_ips(&l.conn.source_ip)?,
        threads: l.conn.threads.unwrap_or_else(cores).max(1),
        connect_timeout: l.conn.connect_timeout,
        drain: l.drain,
        keep_intervals: l.out.hlog.is_some(),
    };
    let info = RunInfo {
        mode: mode.to_string(),
        target: dest.name,
        connections: l.connections as u64,
        threads: cfg.threads.min(cfg.connections) as u64,
        target_rate: l.rate,
        duration_s: l.duration.as_secs_f64(),
        warmup_s: l.warmup.as_secs_f64(),
        size: size as u64,
        max_inflight: cfg.max_inflight as u64,
        expect: Expect::Replies,
    };
    Ok(Plan { cfg, info })
}

/// Runs the engine once (with the live progress line on a terminal) and summarizes.
fn drive(p: &Plan) -> (report::Summary, engine::RunOutput) {
    let cpu0 = CpuTime::now();
    let live = std::io::stderr().is_terminal().then(|| Arc::new(progress::Live::default()));
    let printer = live.clone().map(|lv| progress::Printer::start(lv, p.cfg.warmup, p.cfg.rate, "msg"));
    let out = engine::run(&p.cfg, live);
    drop(printer);
    let cpu = CpuTime::now().since(cpu0);
    (report::summarize(&p.info, &out.recorder, cpu, out.wall.as_secs_f64()), out)
}

fn load(l: &LoadArgs, p: Plan) -> anyhow::Result<ExitCode> {
    let w = Watch::start(&l.watch.pids, l.watch.port)?;
    let (mut summary, out) = drive(&p);
    summary.watch = Some(w.finish());
    let intervals = outputs::intervals_from(out.start_unix, &out.recorder.intervals);
    finish(&l.out, summary, &out.recorder, Some(&out.recorder.uncorrected), &intervals)
}

fn search(a: SearchArgs) -> anyhow::Result<ExitCode> {
    check_size(a.ws.size)?;
    let ok = |x: f64| x > 0.0 && x.is_finite();
    if !(ok(a.floor) && ok(a.ceiling) && a.ceiling >= a.floor) {
        bail!("--floor and --ceiling must be positive, the ceiling at least the floor");
    }
    if !(a.percentile > 0.0 && a.percentile < 100.0) {
        bail!("--percentile must be between 0 and 100");
    }
    if !(a.resolution > 0.0 && a.resolution.is_finite()) || a.max_steps == 0 {
        bail!("--resolution and --max-steps must be positive");
    }
    let l = &a.ws.load;
    let dest = Dest::http(&l.url, &l.target, &a.ws.http, &l.wire)?;
    let mut p = plan(l, Proto::Ws, "ws", dest, a.ws.size, a.ws.max_inflight)?;
    let bound_us = a.below.as_micros() as u64;
    let cfg = search::SearchConfig {
        floor: a.floor,
        ceiling: a.ceiling,
        resolution: a.resolution,
        max_steps: a.max_steps,
        max_time: a.max_time,
        retries: a.retries,
    };
    println!(
        "upsplice-loadgen search -> {}: highest rate in {}..{}/s with corrected p{} < {:.3} ms",
        p.info.target,
        a.floor,
        a.ceiling,
        a.percentile,
        bound_us as f64 / 1e3
    );
    let w = Watch::start(&l.watch.pids, l.watch.port)?;
    // The outputs describe the step that gave the answer, else the last one.
    let mut answer: Option<(report::Summary, engine::RunOutput)> = None;
    let mut last: Option<(report::Summary, engine::RunOutput)> = None;
    let mut n = 0;
    let stats = search::search(&cfg, a.percentile, bound_us, |rate| {
        p.cfg.rate = rate;
        p.info.target_rate = rate;
        let (s, out) = drive(&p);
        let latency_us = out.recorder.corrected.value_at_quantile(a.percentile / 100.0);
        let latency_us = out.recorder.corrected.highest_equivalent(latency_us);
        let pass = s.valid && s.rate_reached && latency_us < bound_us;
        n += 1;
        println!(
            "step {n:>2}: {rate:>10.0}/s asked, {:>10.0}/s achieved, p{} {:>9.3} ms, {} errors: {}",
            s.achieved_rate,
            a.percentile,
            latency_us as f64 / 1e3,
            s.total_errors,
            if pass {
                "pass"
            } else if !s.valid {
                "fail (invalid run)"
            } else if !s.rate_reached {
                "fail (rate not reached)"
            } else {
                "fail"
            }
        );
        let step = search::Step {
            rate,
            achieved_rate: s.achieved_rate,
            latency_us,
            valid: s.valid,
            rate_reached: s.rate_reached,
            pass,
        };
        if pass && answer.as_ref().is_none_or(|(b, _)| b.target_rate < rate) {
            answer = Some((s, out));
        } else {
            last = Some((s, out));
        }
        step
    });
    let found = stats.answer_rate > 0.0;
    let Some((mut summary, out)) = answer.or(last) else {
        bail!("the search made no step (--max-time too short?)");
    };
    summary.watch = Some(w.finish());
    summary.search = Some(stats);
    let intervals = outputs::intervals_from(out.start_unix, &out.recorder.intervals);
    let code = finish(&l.out, summary, &out.recorder, Some(&out.recorder.uncorrected), &intervals)?;
    Ok(if found { code } else { ExitCode::from(1) })
}

fn finish(
    args: &upsplice_loadgen::cli::OutputArgs,
    mut summary: report::Summary,
    rec: &Recorder,
    uncorrected: Option<&hdrhistogram::Histogram<u64>>,
    intervals: &[hlog::Interval],
) -> anyhow::Result<ExitCode> {
    summary.label.clone_from(&args.label);
    let summary = &summary;
    print!("{}", report::render(summary));
    for p in &summary.problems {
        eprintln!("upsplice-loadgen: WARNING: {p}");
    }
    outputs::write_all(args, &Outputs { summary, corrected: &rec.corrected, uncorrected, intervals })?;
    Ok(if summary.valid { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

fn bulk(l: &LoadArgs, dest: Dest, size: usize, direction: tcpbulk::Direction) -> anyhow::Result<ExitCode> {
    if l.connections == 0 || l.duration.is_zero() {
        bail!("--connections and --duration must be positive");
    }
    let cfg = tcpbulk::BulkConfig {
        target: dest.addr,
        wire: dest.wire,
        connections: l.connections,
        duration: l.duration,
        warmup: l.warmup,
        size: size.max(1),
        direction,
        source_ips: net::parse_source_ips(&l.conn.source_ip)?,
        threads: l.conn.threads.unwrap_or_else(cores),
        connect_timeout: l.conn.connect_timeout,
    };
    let w = Watch::start(&l.watch.pids, l.watch.port)?;
    let cpu0 = CpuTime::now();
    let t = std::time::Instant::now();
    let rec = tcpbulk::run(&cfg)?;
    let info = RunInfo {
        mode: "tcp-bulk".into(),
        target: dest.name,
        connections: l.connections as u64,
        threads: cfg.threads as u64,
        target_rate: 0.0,
        duration_s: l.duration.as_secs_f64(),
        warmup_s: l.warmup.as_secs_f64(),
        size: size as u64,
        max_inflight: 0,
        expect: Expect::Bytes { out: direction != tcpbulk::Direction::Down, inn: direction != tcpbulk::Direction::Up },
    };
    let mut summary = report::summarize(&info, &rec, CpuTime::now().since(cpu0), t.elapsed().as_secs_f64());
    summary.watch = Some(w.finish());
    finish(&l.out, summary, &rec, None, &[])
}

/// What `hold` and `churn` share: the upgrade target, message size,
/// source addresses and threads.
fn lifecycle(c: &LifecycleArgs) -> anyhow::Result<(lifecycle::LifecycleConfig, String)> {
    check_size(c.size)?;
    if c.conn.connect_timeout.is_zero() {
        bail!("--connect-timeout must be positive");
    }
    let dest = Dest::http(&c.url, &c.target, &c.http, &c.wire)?;
    let cfg = lifecycle::LifecycleConfig {
        target: ws::WsTarget {
            addr: dest.addr,
            host: dest.host,
            path: dest.path,
            timeout: c.conn.connect_timeout,
            wire: dest.wire,
        },
        size: c.size,
        source_ips: net::parse_source_ips(&c.conn.source_ip)?,
        threads: c.conn.threads.unwrap_or_else(cores).max(1),
    };
    Ok((cfg, dest.name))
}

fn positive_rate(name: &str, r: Option<f64>) -> anyhow::Result<()> {
    if r.is_some_and(|r| !(r > 0.0 && r.is_finite())) {
        bail!("{name} must be a positive number");
    }
    Ok(())
}

fn hold(a: HoldArgs) -> anyhow::Result<ExitCode> {
    let c = &a.common;
    if a.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if a.open_concurrency == 0 {
        bail!("--open-concurrency must be at least 1");
    }
    positive_rate("--open-rate", a.open_rate)?;
    if a.ping_every.is_some_and(|d| d < std::time::Duration::from_millis(1)) {
        bail!("--ping-every must be at least 1ms");
    }
    let fd_limit = lifecycle::ensure_fds(a.connections as u64, "--connections")?;
    let (common, target) = lifecycle(c)?;
    let cfg = hold::HoldConfig {
        common,
        connections: a.connections,
        open_rate: a.open_rate,
        open_concurrency: a.open_concurrency,
        duration: a.duration,
        ping_every: a.ping_every,
        drain: a.drain,
    };
    let w = Watch::start(&c.watch.pids, c.watch.port)?;
    let cpu0 = CpuTime::now();
    let out = hold::run(&cfg)?;
    let info = RunInfo {
        mode: "hold".into(),
        target,
        connections: a.connections as u64,
        threads: cfg.common.threads as u64,
        target_rate: 0.0,
        duration_s: out.stats.held_for_s,
        warmup_s: 0.0,
        size: c.size as u64,
        max_inflight: 0,
        expect: if out.stats.pings_sent == 0 { Expect::Nothing } else { Expect::Replies },
    };
    let mut summary = report::summarize(&info, &out.recorder, CpuTime::now().since(cpu0), out.wall.as_secs_f64());
    summary.hold = Some(report::HoldStats { fd_limit, ..out.stats });
    summary.watch = Some(w.finish());
    finish(&c.out, summary, &out.recorder, Some(&out.recorder.uncorrected), &[])
}

fn churn(a: ChurnArgs) -> anyhow::Result<ExitCode> {
    let c = &a.common;
    if a.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if a.count == Some(0) {
        bail!("--count must be at least 1");
    }
    if a.duration.is_zero() {
        bail!("--duration must be positive");
    }
    positive_rate("--rate", a.rate)?;
    lifecycle::ensure_fds(a.concurrency as u64, "--concurrency")?;
    let (common, target) = lifecycle(c)?;
    let cfg = churn::ChurnConfig {
        common,
        rate: a.rate,
        concurrency: a.concurrency,
        duration: a.duration,
        count: a.count,
        connect_only: a.connect_only,
    };
    let w = Watch::start(&c.watch.pids, c.watch.port)?;
    let cpu0 = CpuTime::now();
    let out = churn::run(&cfg)?;
    let info = RunInfo {
        mode: "churn".into(),
        target,
        connections: out.stats.attempts,
        threads: cfg.common.threads as u64,
        target_rate: a.rate.unwrap_or(0.0),
        duration_s: out.dispatch_s,
        warmup_s: 0.0,
        size: c.size as u64,
        max_inflight: 1,
        expect: Expect::Replies,
    };
    let mut summary = report::summarize(&info, &out.recorder, CpuTime::now().since(cpu0), out.wall.as_secs_f64());
    summary.churn = Some(out.stats);
    summary.watch = Some(w.finish());
    let intervals = outputs::intervals_from(out.start_unix, &out.recorder.intervals);
    finish(&c.out, summary, &out.recorder, Some(&out.recorder.uncorrected), &intervals)
}

fn merge(a: MergeArgs) -> anyhow::Result<ExitCode> {
    let cpu0 = CpuTime::now();
    let t = std::time::Instant::now();
    let mut logs = Vec::new();
    for f in &a.files {
        let text = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        logs.push(hlog::read(&text).with_context(|| format!("parsing {}", f.display()))?);
    }
    let (intervals, total) = hlog::merge(&logs);
    let span = match (intervals.first(), intervals.last()) {
        (Some(a), Some(b)) => (b.start + b.length).duration_since(a.start).unwrap_or_default(),
        _ => std::time::Duration::ZERO,
    };
    let mut rec = Recorder::new(false);
    rec.corrected = total;
    rec.received = rec.corrected.len();
    rec.sent = rec.received;
    rec.sent_in_window = rec.received;
    let info = RunInfo {
        mode: "merge".into(),
        target: a.files.iter().map(|f| f.display().to_string()).collect::<Vec<_>>().join(" + "),
        duration_s: span.as_secs_f64(),
        expect: Expect::Merged,
        ..RunInfo::default()
    };
    let summary = report::summarize(&info, &rec, CpuTime::now().since(cpu0), t.elapsed().as_secs_f64());
    finish(&a.out, summary, &rec, None, &intervals)
}

fn plot_files(a: PlotArgs) -> anyhow::Result<ExitCode> {
    /// One file's curves before they are named.
    enum Run {
        Summary(Box<report::Summary>),
        Log(hdrhistogram::Histogram<u64>),
    }
    let mut runs = Vec::new();
    for f in &a.files {
        let text = std::fs::read(f).with_context(|| format!("reading {}", f.display()))?;
        if text.trim_ascii_start().starts_with(b"{") {
            let s: report::Summary =
                serde_json::from_slice(&text).with_context(|| format!("parsing {}", f.display()))?;
            runs.push(Run::Summary(Box::new(s)));
        } else {
            let log = hlog::read(&text).with_context(|| format!("parsing {}", f.display()))?;
            runs.push(Run::Log(hlog::merge(&[log]).1));
        }
    }
    let own: Vec<Option<&str>> = runs
        .iter()
        .map(|r| match r {
            Run::Summary(s) => s.label.as_deref(),
            Run::Log(_) => None,
        })
        .collect();
    let names = plot::run_names(&a.files, &own);
    let mut series = Vec::new();
    for (run, name) in runs.into_iter().zip(names) {
        match run {
            Run::Summary(s) => {
                series.push(Series {
                    label: format!("{name} corrected"),
                    histogram: report::decode_histogram(&s.histograms.corrected)?,
                    dashed: false,
                });
                series.push(Series {
                    label: format!("{name} uncorrected"),
                    histogram: report::decode_histogram(&s.histograms.uncorrected)?,
                    dashed: true,
                });
            }
            Run::Log(histogram) => series.push(Series { label: name, histogram, dashed: false }),
        }
    }
    std::fs::write(&a.output, plot::render(&a.title, &series))
        .with_context(|| format!("writing {}", a.output.display()))?;
    println!("wrote {}", a.output.display());
    Ok(ExitCode::SUCCESS)
}
