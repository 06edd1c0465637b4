//! The `upsplice` command line: `run` the router, `check` a config.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use upsplice::config::{Config, DEMO_CONFIG};
use upsplice::dataplane;

/// A router for WebSocket and other HTTP/1.1 Upgrade traffic: it routes the
/// first request by Host, checks the backend's 101, then hands the tunnel
/// to a kernel data plane (sockmap, io_uring or splice).
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log level (error, warn, info, debug, trace) or a full filter such as
    /// "info,upsplice::access=off". RUST_LOG is used when this is not given.
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the router until SIGTERM/SIGINT (then drain); SIGHUP reloads
    /// routes and pools from the same file.
    Run {
        /// The TOML config (`upsplice default-config` prints a starting point).
        #[arg(long, short, value_name = "FILE", required_unless_present = "demo")]
        config: Option<PathBuf>,
        /// Run the built-in demo config instead: http on 127.0.0.1:8080,
        /// tcp on 127.0.0.1:8443, echo backend expected on 127.0.0.1:9001,
        /// admin on 127.0.0.1:9100. Never on a router node.
        #[arg(long, conflicts_with = "config")]
        demo: bool,
    },
    /// Validate a config, print a summary and which data planes can run
    /// here; exit non-zero naming the file, the field and what is wrong.
    Check {
        /// The TOML config to validate.
        #[arg(long, short, value_name = "FILE")]
        config: PathBuf,
        /// Print only problems (warnings, planes that cannot run) and a
        /// one-line summary, not every listener, pool and route.
        #[arg(long, short)]
        quiet: bool,
    },
    /// Print the built-in demo config (a starting point for your own).
    DefaultConfig,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = match &cli.log_level {
        Some(level) => log_filter(level),
        None => EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new("info")).map_err(|e| e.to_string()),
    };
    let filter = match filter {
        Ok(f) => f,
        Err(e) => {
            eprintln!("upsplice: --log-level: {e}");
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();

    let result = match cli.command {
        Command::Run { config, demo: _ } => run(config.as_deref()),
        Command::Check { config, quiet } => check(&config, quiet),
        Command::DefaultConfig => {
            print!("{DEMO_CONFIG}");
            Ok(())
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("upsplice: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The levels a bare word in `--log-level` may name.
const LEVELS: [&str; 6] = ["off", "error", "warn", "info", "debug", "trace"];

/// Parses `--log-level`. A bare word that is not a level (`warning`,
/// `verbose`) is refused: tracing would read it as a target name and turn
/// off every log line, errors and the access log included. Targets are
/// named with `=` (`upsplice::access=off`) or as a module path.
fn log_filter(spec: &str) -> Result<EnvFilter, String> {
    for directive in spec.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        let bare = !directive.contains('=') && !directive.contains("::") && !directive.contains('[');
        if bare && !LEVELS.contains(&directive.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{directive:?} is not a level; use one of {} or TARGET=LEVEL (e.g. info,upsplice::access=off)",
                LEVELS.join(", ")
            ));
        }
    }
    EnvFilter::try_new(spec).map_err(|e| e.to_string())
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease").map_or_else(|_| "unknown".into(), |s| s.trim().to_owned())
}

fn run(path: Option<&Path>) -> anyhow::Result<()> {
    let config = match path {
        Some(p) => Config::load(p)?,
        None => {
            tracing::info!("--demo: running the built-in demo config (see `upsplice default-config`)");
            Config::parse(Path::new("<built-in demo config>"), DEMO_CONFIG)?
        }
    };
    let runtime = upsplice::workers::Workers::main_runtime(&config.runtime).context("starting the tokio runtime")?;
    runtime.block_on(upsplice::server::run(config, path.map(Path::to_path_buf)))
}

/// Each TLS listener's certificates (names, expiry), built as `run` would
/// build them (a bad file fails the check); a warning for one that expires
/// within 30 days.
fn check_tls(config: &Config, quiet: bool) -> anyhow::Result<()> {
    const SOON: std::time::Duration = std::time::Duration::from_secs(30 * 24 * 3600);
    for l in &config.listeners {
        let Some(tls) = &l.tls else { continue };
        upsplice::tls::server_config(tls, l.protocol == upsplice::config::Protocol::Http)
            .with_context(|| format!("listener {:?}", l.name))?;
        for ck in &tls.certs {
            let info =
                upsplice::tls::info::CertInfo::load(&ck.cert).with_context(|| format!("listener {:?}", l.name))?;
            let expires = humantime::format_rfc3339_seconds(info.expires);
            if !quiet {
                println!("listener {:?}: {} ({}), expires {expires}", l.name, ck.cert.display(), info.names.join(", "));
            }
            if info.remaining() < SOON {
                let days = info.remaining().as_secs() / (24 * 3600);
                println!("warning: listener {:?}: {} expires in {days} days ({expires})", l.name, ck.cert.display());
            }
        }
    }
    Ok(())
}

fn check(path: &Path, quiet: bool) -> anyhow::Result<()> {
    use dataplane::{Mode, PlaneCheck};
    let config = Config::load(path)?;
    let chosen = config.data_plane.mode;
    if !quiet {
        print!("{}", config.summary());
    }
    for w in config.warnings() {
        println!("warning: {w}");
    }
    check_tls(&config, quiet)?;
    let planes = dataplane::check_all(&config.data_plane);
    let passed = |m: &Mode| planes.iter().any(|(mode, state)| mode == m && matches!(state, PlaneCheck::Passed(_)));
    let auto = dataplane::AUTO_ORDER.iter().find(|m| passed(m));
    if !quiet {
        println!("data planes on this machine (kernel {}; each started and self-tested):", kernel_release());
    }
    for (mode, state) in &planes {
        // --quiet: only the planes that matter and cannot run.
        let needed = *mode == chosen
            || chosen == Mode::Auto
            || (chosen == Mode::Adaptive && matches!(mode, Mode::Splice | Mode::Sockmap));
        let problem = !passed(mode) && needed;
        if quiet && !problem {
            continue;
        }
        match state {
            PlaneCheck::Passed(report) => {
                println!("  {mode:<8} available, {report}");
                if *mode == Mode::Sockmap {
                    println!("  {:<8} {}", "", dataplane::SOCKMAP_NOT_AUTO);
                }
            }
            PlaneCheck::Failed(why) => println!("  {mode:<8} FAILED: {why}"),
            PlaneCheck::Unavailable(why) => println!("  {mode:<8} unavailable: {why}"),
        }
    }
    let ktls = config.data_plane.ktls;
    let ktls_line = match ktls {
        dataplane::ktls::KtlsMode::Off => Ok("ktls = \"off\": TLS tunnels run on the userspace tls relay".to_string()),
        _ => dataplane::ktls::KtlsRelay::start(&config.data_plane)
            .map(|r| format!("available, TLS tunnels go to the kernel: {}", r.startup_report()))
            .map_err(|e| dataplane::error::chain(&e)),
    };
    match &ktls_line {
        Ok(line) if !quiet => println!("  {:<8} {line}", "ktls"),
        Ok(_) => {}
        Err(why) if ktls == dataplane::ktls::KtlsMode::On => println!("  {:<8} FAILED: {why}", "ktls"),
        Err(why) if !quiet => {
            println!("  {:<8} unavailable (TLS tunnels run on the userspace tls relay): {why}", "ktls")
        }
        Err(_) => {}
    }
    if ktls == dataplane::ktls::KtlsMode::On && ktls_line.is_err() {
        anyhow::bail!("{}: data_plane.ktls = \"on\" cannot run here (see above); `run` would refuse", path.display());
    }
    // adaptive runs on splice and sockmap: both must pass.
    let needs: Vec<Mode> = match chosen {
        Mode::Adaptive => vec![Mode::Splice, Mode::Sockmap],
        Mode::Auto => vec![],
        mode => vec![mode],
    };
    if let Some(missing) = needs.iter().find(|m| !passed(m)) {
        // `run` refuses to start on a plane that cannot run: so does check.
        anyhow::bail!(
            "{}: data_plane.mode = \"{chosen}\" cannot run here ({missing}: see above); `run` would refuse",
            path.display()
        );
    }
    if chosen == Mode::Adaptive && !quiet {
        let dp = &config.data_plane;
        let policy = dataplane::describe_policy(
            Mode::Splice,
            Mode::Sockmap,
            dp.promote_after,
            dp.promote_message_size,
            (dp.promote_rate, dp.demote_rate),
        );
        println!("{policy}");
    }
    match auto.filter(|_| !quiet) {
        Some(mode) if chosen == Mode::Auto => println!("auto picks: {mode}"),
        // Said so that it is not read as the plane this config runs.
        Some(mode) => println!("mode = \"auto\" would pick {mode} here; this config runs {chosen}"),
        None => {}
    }
    let (l, p, r) = (config.listeners.len(), config.pools.len(), config.routes.len());
    let plane =
        if chosen == Mode::Auto { auto.map_or("none".into(), |m| format!("auto → {m}")) } else { chosen.to_string() };
    println!("{}: ok ({l} listeners, {p} pools, {r} routes; data plane {plane})", path.display());
    Ok(())
}
