//! Command-line interface (clap derive).

use crate::echo::EchoMode;
use crate::proxy::ProxyVersion;
use crate::tcpbulk::Direction;
use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

/// Top-level command line.
#[derive(Debug, Parser)]
#[command(
    name = "upsplice-loadgen",
    version,
    about = "Open-loop WebSocket/HTTP/TCP load generator with corrected latency",
    after_help = EXAMPLES
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Shown after `--help`.
const EXAMPLES: &str = "Examples:
  upsplice-loadgen echo --listen 127.0.0.1:9000
  upsplice-loadgen ws ws://127.0.0.1:8080/chat -c 100 -r 10000 -d 30s
  upsplice-loadgen ws wss://app.example.com/ws --ca ca.pem -c 100 -r 10000
  upsplice-loadgen http https://127.0.0.1:8443/ --insecure --sni app.example.com
  upsplice-loadgen tcp --target 127.0.0.1:8443 --tls --ca ca.pem --proxy-protocol v2
  upsplice-loadgen churn ws://127.0.0.1:8080/ --proxy-protocol v1 -r 500";

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the echo backend (WebSocket + plain HTTP, or raw TCP).
    Echo(EchoArgs),
    /// Open-loop WebSocket messages at a fixed rate.
    Ws(WsArgs),
    /// Open-loop HTTP/1.1 requests at a fixed rate.
    Http(HttpArgs),
    /// Raw TCP: small-message ping-pong latency or bulk throughput.
    Tcp(TcpArgs),
    /// Open N WebSocket connections at a bounded rate and hold them open and idle.
    Hold(HoldArgs),
    /// Connection churn: connect, upgrade, one echoed message, close; over and over.
    Churn(ChurnArgs),
    /// The highest WebSocket message rate whose latency percentile stays under a bound (bisection).
    Search(SearchArgs),
    /// Merge .hlog files from several generator nodes into one report.
    Merge(MergeArgs),
    /// Overlay several runs' JSON summaries or .hlog files in one SVG.
    Plot(PlotArgs),
    /// Publish gorouter's `router.register` messages to NATS (a route table at scale).
    NatsRegister(NatsRegisterArgs),
}

/// `echo` arguments.
#[derive(Debug, Args)]
pub struct EchoArgs {
    /// Address to listen on; port 0 picks a free port (printed as `listening on ADDR`).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: std::net::SocketAddr,
    /// ws: WebSocket echo + HTTP 200; tcp: raw echo; discard / source: one-way raw TCP.
    #[arg(long, value_enum, default_value = "ws")]
    pub mode: EchoMode,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Serve TLS with this certificate chain (PEM; needs --tls-key).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Fault injection: freeze all replies once, this long after the first connection.
    #[arg(long, value_parser = parse_duration)]
    pub stall_at: Option<Duration>,
    /// Length of the injected stall.
    #[arg(long, value_parser = parse_duration, default_value = "1s")]
    pub stall_for: Duration,
}

/// Arguments shared by the rate-driven modes.
#[derive(Debug, Args, Clone)]
pub struct LoadArgs {
    /// Target URL: ws://HOST[:PORT][/PATH], wss://, http:// or https:// (sets the
    /// address, Host header, path and TLS; resolved once).
    #[arg(value_name = "URL")]
    pub url: Option<String>,
    /// Target HOST:PORT instead of a URL (resolved once).
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "url", required_unless_present = "url")]
    pub target: Option<String>,
    /// Connections.
    #[arg(short = 'c', long, default_value_t = 10)]
    pub connections: usize,
    /// Total rate over all connections, per second (fractional per-connection rates are fine).
    #[arg(short = 'r', long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Measured duration (e.g. 30s, 2m, 500ms).
    #[arg(short = 'd', long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Warm-up before measuring: messages are sent but not recorded.
    #[arg(short = 'w', long, value_parser = parse_duration, default_value = "2s")]
    pub warmup: Duration,
    /// New connections per second (default: all at once).
    #[arg(long)]
    pub ramp_rate: Option<f64>,
    /// Source addresses, threads, connect timeout.
    #[command(flatten)]
    pub conn: ConnArgs,
    /// How long to wait for outstanding replies after the last send.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub drain: Duration,
    /// Processes to watch.
    #[command(flatten)]
    pub watch: WatchArgs,
    /// Output files.
    #[command(flatten)]
    pub out: OutputArgs,
    /// TLS and PROXY protocol.
    #[command(flatten)]
    pub wire: WireArgs,
}

/// Other processes to measure over the run, beside the machine's CPU.
#[derive(Debug, Args, Clone, Default)]
pub struct WatchArgs {
    /// Process to measure over the run (CPU time, RSS, open fds; into the
    /// summary's `watch`); repeatable or comma-separated.
    #[arg(long = "watch-pid", value_name = "PID", value_delimiter = ',')]
    pub pids: Vec<u32>,
    /// Count the established TCP connections with this local port (a
    /// listener's accepted connections) at the start, peak and end.
    #[arg(long = "watch-port", value_name = "PORT")]
    pub port: Option<u16>,
}

/// How the generator opens connections; shared by every connecting mode.
#[derive(Debug, Args, Clone)]
pub struct ConnArgs {
    /// Local source address or IPv4 range (a.b.c.d-a.b.c.e); repeatable.
    #[arg(long)]
    pub source_ip: Vec<String>,
    /// Generator threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Limit for connect + TLS + upgrade (churn: also for the echo).
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub connect_timeout: Duration,
}

/// Help heading of [`WireArgs`].
const WIRE: &str = "TLS and PROXY protocol";

/// TLS and the PROXY protocol header, for every connection a mode opens.
#[derive(Debug, Args, Clone, Default)]
pub struct WireArgs {
    /// Speak TLS to a --target HOST:PORT (a wss:// or https:// URL implies it).
    /// Every connection makes a full handshake, timed apart from the connect.
    #[arg(help_heading = WIRE, long)]
    pub tls: bool,
    /// Resume TLS sessions: each new connection offers a ticket (or session
    /// id) an earlier connection of the run received; resumed and full
    /// handshakes are counted apart.
    #[arg(help_heading = WIRE, long)]
    pub resume: bool,
    /// Verify the target's certificate against the CA certificates in this PEM file.
    #[arg(help_heading = WIRE, long, value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Do not verify the target's certificate (tests only; never the default).
    #[arg(help_heading = WIRE, long, conflicts_with = "ca")]
    pub insecure: bool,
    /// Server name sent (SNI) and verified (default: the Host header's host name).
    #[arg(help_heading = WIRE, long, value_name = "NAME")]
    pub sni: Option<String>,
    /// Send a PROXY protocol header first on every connection, before TLS,
    /// with the connection's own source and destination addresses.
    #[arg(help_heading = WIRE, long, value_enum, value_name = "VERSION")]
    pub proxy_protocol: Option<ProxyVersion>,
}

/// Output files.
#[derive(Debug, Args, Clone, Default)]
pub struct OutputArgs {
    /// Write the summary as JSON (schema in README.md).
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the corrected percentile distribution (HdrHistogram .hgrm, ms).
    #[arg(long)]
    pub hgrm: Option<PathBuf>,
    /// Write an interval log (.hlog), one corrected histogram per second.
    #[arg(long)]
    pub hlog: Option<PathBuf>,
    /// Write an SVG plot of latency by percentile.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Name of this run, kept in the JSON summary; `plot` labels its curves with it.
    #[arg(long)]
    pub label: Option<String>,
}

/// Host header and request path of `ws` upgrades and `http` requests.
#[derive(Debug, Args, Clone)]
pub struct HttpTarget {
    /// Host header (default: the URL's host[:port], or the --target as given).
    #[arg(long)]
    pub host: Option<String>,
    /// Request path (default: the URL's path, or /).
    #[arg(long)]
    pub path: Option<String>,
}

/// `ws` arguments.
#[derive(Debug, Args)]
pub struct WsArgs {
    /// Common load options.
    #[command(flatten)]
    pub load: LoadArgs,
    /// Host header and path.
    #[command(flatten)]
    pub http: HttpTarget,
    /// Message payload size in bytes (at least 8: the sequence number).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Messages outstanding per connection before the writer must wait.
    #[arg(long, default_value_t = 128)]
    pub max_inflight: usize,
}

/// `search` arguments: a `ws` run per step, at rates chosen by bisection.
#[derive(Debug, Args)]
pub struct SearchArgs {
    /// The `ws` options of every step (`--rate` is not used: the steps' rates
    /// come from --floor, --ceiling and the bisection; the outputs describe
    /// the step that gave the answer, or the last step if none passed).
    #[command(flatten)]
    pub ws: WsArgs,
    /// Lowest rate tried, messages per second over all connections.
    #[arg(long, default_value_t = 1000.0)]
    pub floor: f64,
    /// Highest rate tried.
    #[arg(long, default_value_t = 100_000.0)]
    pub ceiling: f64,
    /// The corrected-latency percentile that must stay under --below.
    #[arg(long, default_value_t = 99.0)]
    pub percentile: f64,
    /// The bound (e.g. 1ms, 500us).
    #[arg(long, value_parser = parse_duration, default_value = "1ms")]
    pub below: Duration,
    /// Stop when the bracket's ends are within this fraction of each other.
    #[arg(long, default_value_t = 0.1)]
    pub resolution: f64,
    /// Most steps (retries included).
    #[arg(long, default_value_t = 10)]
    pub max_steps: u32,
    /// No step starts after this much time.
    #[arg(long, value_parser = parse_duration, default_value = "5m")]
    pub max_time: Duration,
    /// Extra attempts of a failing step before it counts as failed.
    #[arg(long, default_value_t = 0)]
    pub retries: u32,
}

/// `http` arguments.
#[derive(Debug, Args)]
pub struct HttpArgs {
    /// Common load options.
    #[command(flatten)]
    pub load: LoadArgs,
    /// Host header and path.
    #[command(flatten)]
    pub http: HttpTarget,
    /// Send `Connection: close` and open a new connection per request.
    #[arg(long)]
    pub close: bool,
    /// Requests outstanding (pipelined) per keep-alive connection.
    #[arg(long, default_value_t = 1)]
    pub max_inflight: usize,
}

/// Raw TCP sub-mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum TcpMode {
    /// Small messages at a fixed rate, latency recorded.
    Pingpong,
    /// Throughput, as fast as possible.
    Bulk,
}

/// `tcp` arguments.
#[derive(Debug, Args)]
pub struct TcpArgs {
    /// Common load options (`--rate` is ignored in bulk mode).
    #[command(flatten)]
    pub load: LoadArgs,
    /// Ping-pong latency or bulk throughput.
    #[arg(long, value_enum, default_value = "pingpong")]
    pub mode: TcpMode,
    /// Message size (ping-pong, at least 8) or write chunk size (bulk).
    #[arg(long, default_value_t = 64)]
    pub size: usize,
    /// Bulk direction.
    #[arg(long, value_enum, default_value = "both")]
    pub direction: Direction,
    /// Ping-pong messages outstanding per connection.
    #[arg(long, default_value_t = 1)]
    pub max_inflight: usize,
}

/// Options shared by the connection-lifecycle modes (`hold`, `churn`).
#[derive(Debug, Args, Clone)]
pub struct LifecycleArgs {
    /// Target URL: ws://HOST[:PORT][/PATH] or wss:// (sets the address, Host
    /// header, path and TLS; resolved once).
    #[arg(value_name = "URL")]
    pub url: Option<String>,
    /// Target HOST:PORT instead of a URL (resolved once).
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "url", required_unless_present = "url")]
    pub target: Option<String>,
    /// Host header and path of the upgrade requests.
    #[command(flatten)]
    pub http: HttpTarget,
    /// Source addresses, threads, connect timeout.
    #[command(flatten)]
    pub conn: ConnArgs,
    /// Message payload size in bytes (at least 8: the sequence number).
    #[arg(long, default_value_t = 16)]
    pub size: usize,
    /// Processes to watch.
    #[command(flatten)]
    pub watch: WatchArgs,
    /// Output files.
    #[command(flatten)]
    pub out: OutputArgs,
    /// TLS and PROXY protocol.
    #[command(flatten)]
    pub wire: WireArgs,
}

/// `hold` arguments.
#[derive(Debug, Args)]
pub struct HoldArgs {
    /// Target, headers, threads, outputs.
    #[command(flatten)]
    pub common: LifecycleArgs,
    /// Connections to open and hold.
    #[arg(short = 'c', long, default_value_t = 100)]
    pub connections: usize,
    /// New connections per second (default: as fast as --open-concurrency allows).
    #[arg(long)]
    pub open_rate: Option<f64>,
    /// Handshakes in progress at most.
    #[arg(long, default_value_t = 256)]
    pub open_concurrency: usize,
    /// How long to hold once all connections are open (SIGTERM/SIGINT ends it early).
    #[arg(short = 'd', long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Send one message per connection this often and count the echoes (default: fully idle).
    #[arg(long, value_parser = parse_duration)]
    pub ping_every: Option<Duration>,
    /// How long to wait for outstanding echoes after the hold.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub drain: Duration,
}

/// `churn` arguments.
#[derive(Debug, Args)]
pub struct ChurnArgs {
    /// Target, headers, threads, outputs.
    #[command(flatten)]
    pub common: LifecycleArgs,
    /// Cycles in progress at most.
    #[arg(short = 'c', long, default_value_t = 10)]
    pub concurrency: usize,
    /// Cycles started per second (default: as fast as possible).
    #[arg(short = 'r', long)]
    pub rate: Option<f64>,
    /// No cycle starts after this.
    #[arg(short = 'd', long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,
    /// Stop after this many cycles (default: only --duration limits).
    #[arg(short = 'n', long)]
    pub count: Option<u64>,
    /// A cycle is only connect, PROXY header and TLS handshake, then the
    /// close (close_notify, FIN, the peer's EOF): no upgrade, no message.
    #[arg(long)]
    pub connect_only: bool,
}

/// `merge` arguments.
#[derive(Debug, Args)]
pub struct MergeArgs {
    /// Interval logs to merge.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Output files (`--hlog` writes the merged log, 1 s bins).
    #[command(flatten)]
    pub out: OutputArgs,
}

/// `plot` arguments.
#[derive(Debug, Args)]
pub struct PlotArgs {
    /// JSON summaries (corrected and uncorrected curves) or .hlog files.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// SVG file to write.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Plot title.
    #[arg(long, default_value = "Latency by percentile")]
    pub title: String,
}

/// `nats-register` arguments.
#[derive(Debug, Args)]
pub struct NatsRegisterArgs {
    /// The NATS server (`nats://[user:password@|token@]host:port`).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub server: String,
    /// URIs the endpoints are spread over (`app-<n>.<domain>`).
    #[arg(long, default_value_t = 50_000)]
    pub uris: u32,
    /// Endpoints (one registration each, each with its own address `10.x.y.z:61000`).
    #[arg(long, default_value_t = 100_000)]
    pub endpoints: u32,
    /// Registrations per second, or `max`.
    #[arg(long, default_value = "max", value_parser = parse_rate)]
    pub rate: Rate,
    /// The URIs' domain.
    #[arg(long, default_value = "nats.bench")]
    pub domain: String,
    /// Register every endpoint again this often (a route emitter's refresh), until --duration.
    #[arg(long, value_parser = parse_duration)]
    pub repeat_every: Option<Duration>,
    /// Upper bound of the whole run.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// After the first round, poll this `/metrics` URL until `upsplice_nats_endpoints` reaches --endpoints.
    #[arg(long)]
    pub wait_metrics: Option<String>,
    /// How long --wait-metrics and each --first-route sample may wait.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Instead of a burst: register one new URI at a time and time the requests through this
    /// router address until it routes it.
    #[arg(long, requires = "backend")]
    pub first_route: Option<std::net::SocketAddr>,
    /// --first-route: the backend the new URIs point at.
    #[arg(long)]
    pub backend: Option<std::net::SocketAddr>,
    /// --first-route: how many URIs, one after another.
    #[arg(long, default_value_t = 20)]
    pub samples: usize,
    /// --first-route: a prefix for the URIs' names (`first-<prefix><i>.<domain>`), so runs differ.
    #[arg(long, default_value = "")]
    pub prefix: String,
}

/// `--rate`: registrations per second, or None for `max`.
#[derive(Debug, Clone, Copy)]
pub struct Rate(pub Option<u32>);

fn parse_rate(s: &str) -> Result<Rate, String> {
    match s {
        "max" => Ok(Rate(None)),
        n => n.parse().map(|r| Rate(Some(r))).map_err(|_| format!("bad rate {s:?} (a number or `max`)")),
    }
}

/// Parses `1.5s`, `250ms`, `2m`, `1h`, `10us` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let v: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit.trim() {
        "" | "s" => v,
        "ms" => v / 1e3,
        "us" | "µs" => v / 1e6,
        "m" | "min" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("bad duration unit in {s:?} (use us, ms, s, m, h)")),
    };
    if !secs.is_finite() || secs < 0.0 {
        return Err(format!("bad duration {s:?}"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("3").unwrap(), Duration::from_secs(3));
        assert!(parse_duration("3 weeks").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_url_or_target_and_not_both() {
        let parse = |args: &[&str]| Cli::try_parse_from(args);
        let cli = parse(&["lg", "ws", "wss://h:1/x", "--insecure", "--proxy-protocol", "v2"]).unwrap();
        let Command::Ws(a) = cli.command else { panic!() };
        assert_eq!(a.load.url.as_deref(), Some("wss://h:1/x"));
        assert_eq!(a.load.wire.proxy_protocol, Some(ProxyVersion::V2));
        assert!(parse(&["lg", "tcp", "--target", "h:1", "--tls", "--ca", "ca.pem"]).is_ok());
        let both = parse(&["lg", "ws", "ws://h:1/", "--target", "h:1"]).unwrap_err().to_string();
        assert!(both.contains("cannot be used with"), "{both}");
        let neither = parse(&["lg", "http"]).unwrap_err().to_string();
        assert!(neither.contains("--target"), "{neither}");
        let conflict = parse(&["lg", "churn", "wss://h/", "--ca", "x", "--insecure"]).unwrap_err().to_string();
        assert!(conflict.contains("cannot be used with"), "{conflict}");
    }
}
