//! The TOML configuration: parsing, defaults and validation.
//!
//! Key names are the user-facing contract (see README.md, "Configuration").
//! Unknown keys are errors. Every error names the file, the field and what is
//! wrong, e.g. `upsplice.toml: route[1].pool: no pool named "chat"`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;
use serde::Deserialize;

use crate::dataplane;
use crate::units::{de_duration, de_opt_duration, de_opt_size, de_size_usize};

/// A validated configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub data_plane: dataplane::Settings,
    #[serde(default)]
    pub limits: Limits,
    /// `[runtime]`: the threads that accept and serve connections.
    #[serde(default)]
    pub runtime: Runtime,
    #[serde(default)]
    pub admin: Option<Admin>,
    #[serde(default)]
    pub backends: BackendSettings,
    #[serde(default)]
    pub access_log: AccessLogConfig,
    /// `[backend_tls]`: node-wide material for TLS to backends.
    #[serde(default)]
    pub backend_tls: BackendTls,
    /// `[nats]`: routes announced on NATS, the way gorouter takes them.
    #[serde(default)]
    pub nats: Option<Nats>,
    /// `[route_services]`: gorouter's route services (its
    /// `route_services_*` keys); without `key` they are disabled.
    #[serde(default)]
    pub route_services: RouteServices,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<Listener>,
    #[serde(default, rename = "pool")]
    pub pools: Vec<Pool>,
    #[serde(default, rename = "route")]
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    #[serde(deserialize_with = "de_duration")]
    pub handshake_timeout: Duration,
    #[serde(deserialize_with = "de_size_usize")]
    pub max_header_bytes: usize,
    /// Most header fields in a request head (431 past it).
    pub max_headers: usize,
    #[serde(deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    /// On SIGTERM/SIGUSR1: how long the listeners keep accepting while
    /// `/healthz` already answers 503 (gorouter's `drain_wait`).
    #[serde(deserialize_with = "de_duration")]
    pub drain_wait: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub drain_timeout: Duration,
    #[serde(deserialize_with = "de_duration")]
    pub connect_timeout: Duration,
    pub max_connections: usize,
    /// How long a client connection may wait between requests (gorouter's
    /// `frontend_idle_timeout`).
    #[serde(deserialize_with = "de_duration")]
    pub keepalive_timeout: Duration,
    /// Requests served on one client connection; the last one's response
    /// says `Connection: close`. 1 turns client keep-alive off.
    pub max_requests_per_connection: usize,
    /// How long a backend may take to start its response to a plain
    /// request (gorouter's `endpoint_timeout`); 504 past it.
    #[serde(deserialize_with = "de_duration")]
    pub response_timeout: Duration,
    /// The largest request body: a larger Content-Length is answered 413
    /// before a backend is chosen; a chunked body that grows past it ends
    /// the exchange (413 if no response has started, else a reset).
    /// None: no limit.
    #[serde(deserialize_with = "de_opt_size")]
    pub max_request_body: Option<u64>,
    /// `TCP_USER_TIMEOUT` on every client and backend connection (HAProxy's
    /// `tcp-ut`): how long bytes sent may stay unacknowledged, or wait
    /// untransmitted behind a zero window, before the kernel gives the
    /// connection up and its tunnel is reset. It bounds a dead peer, a peer
    /// that stopped reading and a connection the kernel has wedged, each of
    /// which would otherwise hold a tunnel until the kernel's own
    /// retransmission limit (about 15 minutes) or `idle_timeout`. None:
    /// the kernel's behaviour.
    #[serde(deserialize_with = "de_opt_duration")]
    pub tcp_user_timeout: Option<Duration>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(5),
            max_header_bytes: 16384,
            max_headers: 128,
            idle_timeout: Duration::from_secs(3600),
            drain_wait: Duration::from_secs(20),
            drain_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(2),
            max_connections: 100_000,
            keepalive_timeout: Duration::from_secs(900),
            max_requests_per_connection: 1000,
            response_timeout: Duration::from_secs(60),
            max_request_body: None,
            tcp_user_timeout: None,
        }
    }
}

/// The largest request head `[limits] max_header_bytes` may allow.
const MAX_HEADER_BYTES: usize = 16 << 20;
/// The most header fields `[limits] max_headers` may allow.
const MAX_HEADERS: usize = 10_000;

impl Limits {
    fn validate(&self) -> Result<(), Invalid> {
        if !(64..=MAX_HEADER_BYTES).contains(&self.max_header_bytes) {
            return Err(("limits.max_header_bytes".into(), "must be between 64 and 16MiB".into()));
        }
        if !(1..=MAX_HEADERS).contains(&self.max_headers) {
            return Err(("limits.max_headers".into(), format!("must be between 1 and {MAX_HEADERS}")));
        }
        if self.max_connections == 0 {
            return Err(("limits.max_connections".into(), "must be at least 1".into()));
        }
        // The socket option is in milliseconds (a u32); below 100 ms one
        // retransmission timeout on a healthy path would end a connection.
        if let Some(t) = self.tcp_user_timeout {
            if !(Duration::from_millis(100)..=Duration::from_secs(86_400)).contains(&t) {
                return Err((
                    "limits.tcp_user_timeout".into(),
                    "must be between 100ms and 24h (leave it out: the kernel's behaviour)".into(),
                ));
            }
        }
        if self.max_requests_per_connection == 0 {
            return Err((
                "limits.max_requests_per_connection".into(),
                "must be at least 1 (1 turns client keep-alive off)".into(),
            ));
        }
        for (name, d) in [
            ("handshake_timeout", self.handshake_timeout),
            ("idle_timeout", self.idle_timeout),
            ("connect_timeout", self.connect_timeout),
            ("keepalive_timeout", self.keepalive_timeout),
            ("response_timeout", self.response_timeout),
        ] {
            if d.is_zero() {
                return Err((format!("limits.{name}"), "must be longer than 0".into()));
            }
        }
        Ok(())
    }
}

/// `[backends]`: how the router treats its backends, node-wide
/// (gorouter's `backends` section).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendSettings {
    /// Connections open to one backend at most (gorouter's
    /// `backends.max_conns`): past it, a request routed there gets 503
    /// `Connection Limit Reached`. 0: no cap.
    pub max_conns: usize,
    /// Idle keep-alive connections kept per backend for plain requests;
    /// 0 turns backend connection reuse off.
    pub max_idle_per_backend: usize,
    /// How long an idle backend connection is kept: shorter than the
    /// backends' own keep-alive timeout (Node.js closes after 5 s).
    #[serde(deserialize_with = "de_duration")]
    pub idle_conn_timeout: Duration,
    /// Passive health: a backend that refused, reset or timed out is
    /// skipped this long, doubling while it keeps failing ...
    #[serde(deserialize_with = "de_duration")]
    pub backoff: Duration,
    /// ... up to this.
    #[serde(deserialize_with = "de_duration")]
    pub max_backoff: Duration,
}

impl Default for BackendSettings {
    fn default() -> Self {
        BackendSettings {
            max_conns: 0,
            max_idle_per_backend: 16,
            idle_conn_timeout: Duration::from_secs(4),
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(30),
        }
    }
}

impl BackendSettings {
    fn validate(&self) -> Result<(), Invalid> {
        if self.idle_conn_timeout.is_zero() && self.max_idle_per_backend > 0 {
            return Err((
                "backends.idle_conn_timeout".into(),
                "must be longer than 0 (max_idle_per_backend = 0 turns reuse off)".into(),
            ));
        }
        if self.backoff.is_zero() {
            return Err(("backends.backoff".into(), "must be longer than 0".into()));
        }
        if self.max_backoff < self.backoff {
            return Err(("backends.max_backoff".into(), "must not be shorter than backends.backoff".into()));
        }
        Ok(())
    }
}

/// `[pool.check]`: an active health check of every backend of a pool.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Check {
    /// `tcp`: a connect succeeds; `http`: `GET path` answers 2xx or 3xx.
    pub kind: CheckKind,
    /// The path an http check requests.
    #[serde(default = "Check::default_path")]
    pub path: String,
    /// The Host header of an http check (default: the backend's address).
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default = "Check::default_interval", deserialize_with = "de_duration")]
    pub interval: Duration,
    #[serde(default = "Check::default_timeout", deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Consecutive passes that bring a backend back.
    #[serde(default = "Check::default_rise")]
    pub rise: u32,
    /// Consecutive failures that take a backend out.
    #[serde(default = "Check::default_fall")]
    pub fall: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckKind {
    Tcp,
    Http,
}

impl Check {
    fn default_path() -> String {
        "/".into()
    }
    fn default_interval() -> Duration {
        Duration::from_secs(5)
    }
    fn default_timeout() -> Duration {
        Duration::from_secs(2)
    }
    fn default_rise() -> u32 {
        2
    }
    fn default_fall() -> u32 {
        3
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.interval.is_zero() {
            return Err(("interval", "must be longer than 0".into()));
        }
        if self.timeout.is_zero() || self.timeout > self.interval {
            return Err(("timeout", "must be longer than 0 and at most the interval".into()));
        }
        if self.rise == 0 {
            return Err(("rise", "must be at least 1".into()));
        }
        if self.fall == 0 {
            return Err(("fall", "must be at least 1".into()));
        }
        if !self.path.starts_with('/') || self.path.bytes().any(|b| b.is_ascii_control() || b == b' ') {
            return Err(("path", format!("{:?} must start with '/' and hold no spaces or control bytes", self.path)));
        }
        if self.host.as_deref().is_some_and(|h| h.is_empty() || h.bytes().any(|b| b.is_ascii_control() || b == b' ')) {
            return Err(("host", "must be a non-empty host without spaces or control bytes".into()));
        }
        Ok(())
    }
}

/// `[runtime]`: the threads that accept and serve connections. Read at
/// start (a reload that changes it is rejected).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Runtime {
    /// How many (0: one per core the process may run on).
    pub workers: usize,
    /// false: each worker is a thread of its own with its own listening
    /// socket per listener (SO_REUSEPORT), serving what it accepted for
    /// the connection's life; true: one tokio scheduler whose threads
    /// steal each other's tasks ([`crate::workers`]).
    pub work_stealing: bool,
}

/// The most `[runtime] workers` may ask for.
const MAX_WORKERS: usize = 1024;

impl Runtime {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.workers > MAX_WORKERS {
            return Err(("workers", format!("must be at most {MAX_WORKERS} (0: one per core)")));
        }
        Ok(())
    }

    /// The number of workers: `workers`, or one per core for 0.
    pub fn worker_count(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    /// How the workers serve, for the summary and the startup log.
    pub fn describe(&self) -> String {
        let n = self.worker_count();
        if self.work_stealing {
            format!("{n} workers sharing one work-stealing scheduler and one socket per listener")
        } else {
            format!("{n} workers, each with its own socket per listener (SO_REUSEPORT) and its connections for life")
        }
    }
}

/// `[access_log]`: where access records go and in which format. Read at
/// start; SIGHUP reopens the file but keeps the path and format.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// A file (appended to; `/dev/stdout` works); none: the diagnostic log.
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default)]
    pub format: crate::access::Format,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    #[serde(deserialize_with = "de_bind")]
    pub bind: SocketAddr,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Http,
    Tcp,
}

impl Protocol {
    /// As written in the config (`http`, `tcp`).
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Http => "http",
            Protocol::Tcp => "tcp",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: String,
    #[serde(deserialize_with = "de_bind")]
    pub bind: SocketAddr,
    pub protocol: Protocol,
    /// X-Forwarded-Proto set on requests that arrive here (http only;
    /// `http` when not given): see [`Listener::forwarded_proto`].
    #[serde(default, rename = "forwarded_proto")]
    pub forwarded_proto_setting: Option<String>,
    /// Peers whose X-Forwarded-For / X-Forwarded-Proto are kept (http only).
    #[serde(default, deserialize_with = "de_cidrs")]
    pub trusted_cidrs: Vec<IpNet>,
    /// The pool a tcp listener forwards to.
    #[serde(default)]
    pub pool: Option<String>,
    /// Whether connections start with a PROXY protocol header (a load
    /// balancer in TCP mode says who the client is).
    #[serde(default)]
    pub proxy_protocol: ProxyProtocol,
    /// The only peers that may send a PROXY header; required unless
    /// `proxy_protocol` is off.
    #[serde(default, deserialize_with = "de_cidrs")]
    pub proxy_trusted_cidrs: Vec<IpNet>,
    /// `[listener.tls]`: terminate TLS on this listener.
    #[serde(default)]
    pub tls: Option<ListenerTls>,
    /// X-Forwarded-Client-Cert handling (http only; gorouter's modes).
    #[serde(default, rename = "forwarded_client_cert")]
    pub forwarded_client_cert_setting: Option<ForwardedClientCert>,
    /// tcp only: route by the ClientHello's SNI without terminating TLS.
    #[serde(default)]
    pub sni_routes: Vec<SniRoute>,
}

/// `[listener.tls]`: TLS termination. Paths are relative to the config
/// file's directory; the files are read at start and on every SIGHUP.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTls {
    /// Chosen by SNI (the certificates' SAN names, exact and wildcard);
    /// the first is the default.
    pub certs: Vec<CertKey>,
    #[serde(default)]
    pub min_version: TlsVersion,
    /// Ask for client certificates signed by these CAs (mTLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: whether a client certificate is optional.
    #[serde(default)]
    pub client_cert: ClientCertMode,
    /// rustls cipher suite names (`TLS13_AES_128_GCM_SHA256`, …); none:
    /// rustls's default set.
    #[serde(default)]
    pub cipher_suites: Option<Vec<String>>,
    /// Session ticket keys shared by the nodes of a fleet: a file of
    /// base64 keys, one per line, at least 32 bytes each once decoded
    /// (the first encrypts, all decrypt; `tls/tickets.rs`), re-read on
    /// SIGHUP.
    /// None: each process makes its own and rotates them.
    #[serde(default)]
    pub ticket_keys: Option<PathBuf>,
}

impl ListenerTls {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.certs.is_empty() {
            return Err(("tls.certs", "at least one { cert = \"…\", key = \"…\" } is required".into()));
        }
        if self.client_cert == ClientCertMode::Require && self.client_ca.is_none() {
            return Err((
                "tls.client_cert",
                "\"require\" needs tls.client_ca (the CAs client certificates must chain to)".into(),
            ));
        }
        if self.cipher_suites.as_ref().is_some_and(Vec::is_empty) {
            return Err(("tls.cipher_suites", "must not be empty (leave it out for rustls's default set)".into()));
        }
        Ok(())
    }

    /// Every file it names, for resolving against the config's directory.
    fn paths_mut(&mut self) -> impl Iterator<Item = &mut PathBuf> {
        self.certs
            .iter_mut()
            .flat_map(|c| [&mut c.cert, &mut c.key])
            .chain(self.client_ca.as_mut())
            .chain(self.ticket_keys.as_mut())
    }
}

/// A certificate chain (PEM, leaf first) and its private key (PEM).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertKey {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// `min_version`: `"1.2"` or `"1.3"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
pub enum TlsVersion {
    #[default]
    #[serde(rename = "1.2")]
    V1_2,
    #[serde(rename = "1.3")]
    V1_3,
}

/// `client_cert`: `request` (optional) or `require`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientCertMode {
    #[default]
    Request,
    Require,
}

/// `forwarded_client_cert` (gorouter's `forwarded_client_cert`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForwardedClientCert {
    /// Pass the header through (kept only from `trusted_cidrs` peers).
    #[default]
    AlwaysForward,
    /// Remove it unless the client connection is mTLS.
    Forward,
    /// Always remove it; on mTLS, set the client's certificate.
    SanitizeSet,
}

impl ForwardedClientCert {
    pub fn as_str(self) -> &'static str {
        match self {
            ForwardedClientCert::AlwaysForward => "always_forward",
            ForwardedClientCert::Forward => "forward",
            ForwardedClientCert::SanitizeSet => "sanitize_set",
        }
    }
}

/// One `sni_routes` entry: connections whose ClientHello names
/// `server_name` (exact, or `*.example.com`) go to `pool`, still encrypted.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SniRoute {
    pub server_name: String,
    pub pool: String,
}

/// `[nats]`: the NATS servers that carry gorouter's `router.*` messages,
/// and gorouter's timings for them (its names and defaults). Read at
/// start: a reload that changes it is rejected.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Nats {
    /// `nats://host:port` URLs (credentials may ride in them:
    /// `nats://user:password@host:port`); the client reconnects to any.
    pub servers: Vec<String>,
    /// A token instead of URL credentials.
    #[serde(default)]
    pub token: Option<String>,
    /// TLS to the NATS servers, verified against `ca`.
    #[serde(default)]
    pub tls: Option<NatsTls>,
    /// This node's index: the start message's id is `"<index>-<uuid>"`.
    #[serde(default)]
    pub index: u32,
    /// An endpoint not re-registered within this is pruned (unless its
    /// registration says `stale_threshold_in_seconds`).
    #[serde(default = "Nats::default_stale", deserialize_with = "de_duration")]
    pub droplet_stale_threshold: Duration,
    /// How often stale endpoints are pruned.
    #[serde(default = "Nats::default_prune_interval", deserialize_with = "de_duration")]
    pub prune_stale_droplets_interval: Duration,
    /// The start message's `minimumRegisterIntervalInSeconds`; `/healthz`
    /// answers 503 until this long after the first `router.start`.
    #[serde(default = "Nats::default_start_delay", deserialize_with = "de_duration")]
    pub start_response_delay_interval: Duration,
    /// Keep the table while NATS is unreachable instead of pruning it.
    #[serde(default)]
    pub suspend_pruning_if_nats_unavailable: bool,
}

/// `tls` under `[nats]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsTls {
    pub ca: PathBuf,
}

impl Nats {
    fn default_stale() -> Duration {
        Duration::from_secs(120)
    }
    fn default_prune_interval() -> Duration {
        Duration::from_secs(30)
    }
    fn default_start_delay() -> Duration {
        Duration::from_secs(5)
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        if self.servers.is_empty() {
            return Err(("servers", "at least one nats://host:port is required".into()));
        }
        for s in &self.servers {
            let rest = s.strip_prefix("nats://").or_else(|| s.strip_prefix("tls://"));
            let Some(rest) = rest else {
                return Err(("servers", format!("{s:?} must start with nats:// (or tls://)")));
            };
            let host_port = rest.rsplit('@').next().unwrap_or(rest);
            if host_port.is_empty() || !host_port.contains(':') {
                return Err(("servers", format!("{s:?} needs host:port")));
            }
        }
        if self.droplet_stale_threshold.is_zero() {
            return Err(("droplet_stale_threshold", "must be longer than 0".into()));
        }
        if self.prune_stale_droplets_interval.is_zero() {
            return Err(("prune_stale_droplets_interval", "must be longer than 0".into()));
        }
        if self.start_response_delay_interval.as_secs() == 0 {
            return Err(("start_response_delay_interval", "must be at least 1s (it is sent in whole seconds)".into()));
        }
        Ok(())
    }
}

/// `[route_services]`: requests on a route with a `route_service` go
/// to that service first, carrying a token only routers holding `key`
/// can read; the service calls back through the router, which checks
/// the token and forwards to the app (gorouter's contract, token format
/// included, so a callback may land on any node or on a gorouter).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteServices {
    /// The secret every node of the foundation shares (gorouter's
    /// `route_services_secret`). Without it route services are disabled:
    /// plain requests on such routes get 502, upgrades 503.
    pub key: Option<String>,
    /// The previous secret during a rotation: tokens sealed with it are
    /// still accepted, never made (`route_services_secret_decrypt_only`).
    pub previous_key: Option<String>,
    /// How old a token may be when the service calls back
    /// (`route_services_timeout`).
    #[serde(deserialize_with = "de_duration")]
    pub timeout: Duration,
    /// Let WebSocket upgrades through route services too (recent
    /// gorouters allow it); otherwise they get 503.
    pub websockets: bool,
    /// The scheme of `X-CF-Forwarded-Url`: https, or the client's own
    /// (`route_services_recommend_https`).
    pub recommend_https: bool,
    /// CAs the route services' certificates may chain to, besides the
    /// system's trust store.
    pub ca: Option<PathBuf>,
}

impl Default for RouteServices {
    fn default() -> Self {
        RouteServices {
            key: None,
            previous_key: None,
            timeout: Duration::from_secs(60),
            websockets: false,
            recommend_https: true,
            ca: None,
        }
    }
}

impl RouteServices {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        for (name, k) in [("key", &self.key), ("previous_key", &self.previous_key)] {
            if k.as_deref().is_some_and(str::is_empty) {
                return Err((name, "must not be empty (leave it out to disable route services)".into()));
            }
        }
        if self.previous_key.is_some() && self.key.is_none() {
            return Err((
                "previous_key",
                "needs key: the previous key only reads tokens the current one cannot".into(),
            ));
        }
        if self.timeout.is_zero() {
            return Err(("timeout", "must be longer than 0".into()));
        }
        Ok(())
    }
}

/// `tls` on a pool: TLS to its backends, verified.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolTls {
    /// CAs the backends' certificates must chain to (default:
    /// `[backend_tls] ca`).
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// The name the backends' certificates must carry, sent as SNI
    /// (gorouter's `server_cert_domain_san`).
    pub server_name: String,
}

/// `[backend_tls]` (gorouter's `backends.cert_chain` / `private_key`
/// and CA): the CA for pools whose `tls` names none and for NATS endpoints
/// with a `tls_port`, and the client certificate every TLS backend
/// connection presents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendTls {
    #[serde(default)]
    pub ca: Option<PathBuf>,
    #[serde(default)]
    pub cert_chain: Option<PathBuf>,
    #[serde(default)]
    pub private_key: Option<PathBuf>,
}

/// `proxy_protocol` on a listener: which PROXY header versions a
/// connection must start with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    /// No header; the TCP peer is the client.
    #[default]
    Off,
    /// The text header (HAProxy `send-proxy`, gorouter's only one).
    V1,
    /// The binary header (HAProxy `send-proxy-v2`, AWS NLB).
    V2,
    /// Either version, told apart by its signature.
    Any,
}

impl ProxyProtocol {
    /// As written in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyProtocol::Off => "off",
            ProxyProtocol::V1 => "v1",
            ProxyProtocol::V2 => "v2",
            ProxyProtocol::Any => "any",
        }
    }
}

impl Listener {
    /// The X-Forwarded-Proto this listener sets: `forwarded_proto`, or
    /// `http`.
    pub fn forwarded_proto(&self) -> &str {
        self.forwarded_proto_setting.as_deref().unwrap_or("http")
    }

    /// How this listener treats X-Forwarded-Client-Cert (http only):
    /// `forwarded_client_cert`, or `always_forward`.
    pub fn forwarded_client_cert(&self) -> ForwardedClientCert {
        self.forwarded_client_cert_setting.unwrap_or_default()
    }

    /// What its protocol requires of it alone: Err((key, what is wrong)).
    fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(tls) = &self.tls {
            tls.validate()?;
            if !self.sni_routes.is_empty() {
                return Err((
                    "sni_routes",
                    "a listener either terminates TLS ([listener.tls]) or routes it by SNI unopened, not both".into(),
                ));
            }
        }
        for r in &self.sni_routes {
            crate::host::validate_route_host(&r.server_name).map_err(|m| ("sni_routes.server_name", m))?;
        }
        match (self.proxy_protocol, self.proxy_trusted_cidrs.is_empty()) {
            (ProxyProtocol::Off, false) => {
                return Err(("proxy_trusted_cidrs", "only with proxy_protocol = \"v1\", \"v2\" or \"any\"".into()))
            }
            (p, true) if p != ProxyProtocol::Off => {
                return Err((
                    "proxy_trusted_cidrs",
                    format!(
                        "required with proxy_protocol = {:?}: the load balancers allowed to send a PROXY header (anyone else could claim any client address)",
                        p.as_str()
                    ),
                ))
            }
            _ => {}
        }
        match self.protocol {
            Protocol::Tcp => {
                let only_http = "only http listeners take it: a tcp listener parses no request";
                if self.pool.is_none() && self.sni_routes.is_empty() {
                    return Err(("pool", "a tcp listener needs a pool (or sni_routes)".into()));
                }
                if self.forwarded_client_cert_setting.is_some() {
                    return Err(("forwarded_client_cert", only_http.into()));
                }
                if self.forwarded_proto_setting.is_some() {
                    return Err(("forwarded_proto", only_http.into()));
                }
                if !self.trusted_cidrs.is_empty() {
                    return Err(("trusted_cidrs", only_http.into()));
                }
                Ok(())
            }
            Protocol::Http if !self.sni_routes.is_empty() => Err((
                "sni_routes",
                "only tcp listeners route by SNI; an http listener terminates TLS with [listener.tls]".into(),
            )),
            Protocol::Http if self.pool.is_some() => {
                Err(("pool", "only tcp listeners take a pool; http listeners route by [[route]]".into()))
            }
            Protocol::Http => match self.forwarded_proto() {
                "http" | "https" => Ok(()),
                other => Err(("forwarded_proto", format!("{other:?}: must be \"http\" or \"https\""))),
            },
        }
    }
}

/// Parses CIDRs with errors an operator can act on: the prefix length
/// that is too long, or the network meant when host bits are set
/// (`10.0.0.1/8` is refused: "did you mean 10.0.0.0/8?").
fn de_cidrs<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    Vec::<String>::deserialize(d)?.iter().map(|s| parse_cidr(s).map_err(serde::de::Error::custom)).collect()
}

fn parse_cidr(s: &str) -> Result<IpNet, String> {
    let (addr, len) = s.split_once('/').ok_or_else(|| format!("{s:?} is not a CIDR such as \"10.0.0.0/8\""))?;
    let addr: std::net::IpAddr = addr.parse().map_err(|_| format!("{s:?}: {addr:?} is not an IP address"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let len: u8 = len.parse().map_err(|_| format!("{s:?}: {len:?} is not a prefix length"))?;
    if len > max {
        return Err(format!("{s:?}: prefix length {len} is longer than {max}"));
    }
    let net = IpNet::new(addr, len).map_err(|e| format!("{s:?}: {e}"))?;
    if net.trunc() != net {
        return Err(format!("{s:?} has host bits set; did you mean {}?", net.trunc()));
    }
    Ok(net)
}

/// A pool's backends: `IP:PORT`, or `NAME:PORT` resolved when the config
/// is loaded (at start and on every SIGHUP; a name that resolves to
/// several addresses gives a backend each).
#[derive(Debug, Clone, Default)]
pub struct Backends {
    addrs: Vec<SocketAddr>,
    /// Each name as written and what it resolved to, for `check`.
    pub resolved: Vec<(String, Vec<SocketAddr>)>,
}

impl FromIterator<SocketAddr> for Backends {
    fn from_iter<I: IntoIterator<Item = SocketAddr>>(iter: I) -> Backends {
        Backends { addrs: iter.into_iter().collect(), resolved: Vec::new() }
    }
}

impl std::ops::Deref for Backends {
    type Target = [SocketAddr];
    fn deref(&self) -> &[SocketAddr] {
        &self.addrs
    }
}

impl<'de> Deserialize<'de> for Backends {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Backends, D::Error> {
        let mut out = Backends::default();
        for written in Vec::<String>::deserialize(d)? {
            match resolve(&written).map_err(serde::de::Error::custom)? {
                Resolved::Addr(a) => out.addrs.push(a),
                Resolved::Name(addrs) => {
                    out.addrs.extend(&addrs);
                    out.resolved.push((written, addrs));
                }
            }
        }
        Ok(out)
    }
}

/// A socket address as written in the config.
enum Resolved {
    Addr(SocketAddr),
    /// A `NAME:PORT`, resolved (at least one address).
    Name(Vec<SocketAddr>),
}

/// `IP:PORT` as is, `NAME:PORT` through the system resolver, with errors
/// that say which it was.
fn resolve(written: &str) -> Result<Resolved, String> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = written.parse::<SocketAddr>() {
        return Ok(Resolved::Addr(a));
    }
    let expected = "expected IP:PORT or NAME:PORT, e.g. \"10.0.0.1:8080\"";
    if written.parse::<std::net::IpAddr>().is_ok()
        || written.trim_start_matches('[').parse::<std::net::Ipv6Addr>().is_ok()
    {
        return Err(format!("{written:?}: {expected} (the port is missing)"));
    }
    let Some((name, port)) = written.rsplit_once(':') else {
        return Err(format!("{written:?}: {expected} (the port is missing)"));
    };
    if name.is_empty() || port.parse::<u16>().is_err() {
        return Err(format!("{written:?}: {expected}"));
    }
    let mut addrs: Vec<SocketAddr> = written
        .to_socket_addrs()
        .map_err(|e| format!("{written:?}: cannot resolve {name:?} ({e}); names are resolved at load and on SIGHUP"))?
        .collect();
    addrs.sort();
    addrs.dedup();
    if addrs.is_empty() {
        return Err(format!("{written:?}: {name:?} resolves to no address"));
    }
    Ok(Resolved::Name(addrs))
}

/// A bind address: `IP:PORT`, or `NAME:PORT` resolved at load (its first
/// address, IPv4 first).
fn de_bind<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let written = String::deserialize(d)?;
    match resolve(&written).map_err(serde::de::Error::custom)? {
        Resolved::Addr(a) => Ok(a),
        Resolved::Name(addrs) => Ok(addrs.iter().find(|a| a.is_ipv4()).copied().unwrap_or(addrs[0])),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Balance {
    #[default]
    RoundRobin,
    LeastConn,
}

impl fmt::Display for Balance {
    /// As written in the config (`round_robin`, `least_conn`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Balance::RoundRobin => "round_robin",
            Balance::LeastConn => "least_conn",
        })
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    pub name: String,
    #[serde(default)]
    pub backends: Backends,
    #[serde(default)]
    pub balance: Balance,
    /// An active health check of its backends (none: passive health only).
    #[serde(default)]
    pub check: Option<Check>,
    /// A PROXY protocol header at the start of every backend connection,
    /// stating the client (`off`, `v1`, `v2`).
    #[serde(default)]
    pub send_proxy: SendProxy,
    /// TLS to the backends, verified (none: plain TCP).
    #[serde(default)]
    pub tls: Option<PoolTls>,
}

/// `send_proxy` on a pool: which PROXY header its backend connections
/// start with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendProxy {
    #[default]
    Off,
    V1,
    V2,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub host: String,
    #[serde(default)]
    pub path: Option<String>,
    pub pool: String,
    #[serde(default)]
    pub route_service: Option<String>,
}

/// A validation failure: the field (`route[2].pool`) and what is wrong.
type Invalid = (String, String);

/// A configuration error: the file, the field (when known) and what is wrong.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{}: {}: {}", self.file.display(), field, self.message),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl ConfigError {
    /// The error on one line, for logs that ship line by line: toml's caret
    /// diagram (`3 | colour = "blue"` / `  |     ^`) is left out.
    pub fn one_line(&self) -> String {
        let diagram = |l: &str| {
            let t = l.trim_start();
            t.is_empty() || t.trim_start_matches(|c: char| c.is_ascii_digit()).trim_start().starts_with('|')
        };
        let message: Vec<&str> = self.message.lines().filter(|l| !diagram(l)).map(str::trim).collect();
        ConfigError { file: self.file.clone(), field: self.field.clone(), message: message.join(": ") }.to_string()
    }
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            field: None,
            message: format!("cannot read: {e}"),
        })?;
        Config::parse(path, &text)
    }

    /// Parses and validates `text`; `path` is only used in error messages.
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            field: None,
            // toml's message names the key and shows the offending line.
            message: e.to_string().trim_end().to_string(),
        })?;
        config.validate().map_err(|(field, message)| ConfigError {
            file: path.to_path_buf(),
            field: Some(field),
            message,
        })?;
        let mut config = config;
        config.resolve_paths(path.parent().unwrap_or(Path::new("")));
        Ok(config)
    }

    /// Makes every relative certificate, key and CA path relative to
    /// `dir` (the config file's directory), so that the router reads the
    /// same files whatever its working directory.
    fn resolve_paths(&mut self, dir: &Path) {
        let listeners = self.listeners.iter_mut().filter_map(|l| l.tls.as_mut()).flat_map(ListenerTls::paths_mut);
        let pools = self.pools.iter_mut().filter_map(|p| p.tls.as_mut()).filter_map(|t| t.ca.as_mut());
        let b = &mut self.backend_tls;
        let node = b.ca.iter_mut().chain(b.cert_chain.iter_mut()).chain(b.private_key.iter_mut());
        let nats = self.nats.iter_mut().filter_map(|n| n.tls.as_mut()).map(|t| &mut t.ca);
        let rs = self.route_services.ca.iter_mut();
        for p in listeners.chain(pools).chain(node).chain(nats).chain(rs) {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
    }

    /// Checks every section, then what ties them together (names that
    /// must exist, binds that must differ). Err((field, what is wrong)).
    fn validate(&self) -> Result<(), Invalid> {
        if self.listeners.is_empty() {
            return Err(("listener".into(), "at least one [[listener]] is required".into()));
        }
        if self.access_log.path.is_none() && self.access_log.format != crate::access::Format::Text {
            return Err((
                "access_log.format".into(),
                "json and gorouter need access_log.path (the diagnostic log writes key=value; \"/dev/stdout\" works)"
                    .into(),
            ));
        }
        self.limits.validate()?;
        self.runtime.validate().map_err(|(field, m)| (format!("runtime.{field}"), m))?;
        self.backends.validate()?;
        if let Some(n) = &self.nats {
            n.validate().map_err(|(field, m)| (format!("nats.{field}"), m))?;
        }
        self.route_services.validate().map_err(|(field, m)| (format!("route_services.{field}"), m))?;
        if self.backend_tls.cert_chain.is_some() != self.backend_tls.private_key.is_some() {
            return Err((
                "backend_tls".into(),
                "cert_chain and private_key go together (the client certificate backends may require)".into(),
            ));
        }
        self.data_plane.validate().map_err(|(field, m)| (format!("data_plane.{field}"), m))?;
        let pools = self.validate_pools()?;
        self.validate_listeners(&pools)?;
        self.validate_routes(&pools)
    }

    /// Pool names are unique and not empty, and so are a pool's backends;
    /// returns the pool names.
    fn validate_pools(&self) -> Result<HashSet<&str>, Invalid> {
        let mut pools = HashSet::new();
        for (i, p) in self.pools.iter().enumerate() {
            if p.name.is_empty() {
                return Err((format!("pool[{i}].name"), "must not be empty".into()));
            }
            if !pools.insert(p.name.as_str()) {
                return Err((format!("pool[{i}].name"), format!("duplicate pool name {:?}", p.name)));
            }
            if let Some(check) = &p.check {
                check.validate().map_err(|(name, m)| (format!("pool[{i}].check.{name}"), m))?;
                if check.kind == CheckKind::Http && p.tls.is_some() {
                    return Err((
                        format!("pool[{i}].check.kind"),
                        "\"http\" checks speak plain HTTP, and this pool's backends speak TLS: use \"tcp\"".into(),
                    ));
                }
            }
            if let Some(tls) = &p.tls {
                if tls.ca.is_none() && self.backend_tls.ca.is_none() {
                    return Err((
                        format!("pool[{i}].tls.ca"),
                        "required unless [backend_tls] ca is set: the CAs the backends' certificates must chain to"
                            .into(),
                    ));
                }
                crate::host::validate_route_host(&tls.server_name)
                    .map_err(|m| (format!("pool[{i}].tls.server_name"), m))?;
            }
            let mut seen = HashSet::new();
            for (j, b) in p.backends.iter().enumerate() {
                if !seen.insert(b) {
                    return Err((format!("pool[{i}].backends[{j}]"), format!("duplicate backend {b}")));
                }
            }
        }
        Ok(pools)
    }

    /// Listener names are unique, binds do not overlap ([`overlaps`]);
    /// each listener is whole for its protocol.
    fn validate_listeners(&self, pools: &HashSet<&str>) -> Result<(), Invalid> {
        let mut names = HashSet::new();
        let mut binds = HashMap::new();
        for (i, lst) in self.listeners.iter().enumerate() {
            let field = |name: &str| format!("listener[{i}].{name}");
            if lst.name.is_empty() {
                return Err((field("name"), "must not be empty".into()));
            }
            if !names.insert(lst.name.as_str()) {
                return Err((field("name"), format!("duplicate listener name {:?}", lst.name)));
            }
            if let Some((_, other)) = binds.iter().find(|(b, _)| overlaps(**b, lst.bind)) {
                return Err((field("bind"), format!("{} is already bound by listener {other:?}", lst.bind)));
            }
            binds.insert(lst.bind, lst.name.as_str());
            if self.admin.as_ref().is_some_and(|a| overlaps(a.bind, lst.bind)) {
                return Err((field("bind"), format!("{} is already bound by [admin]", lst.bind)));
            }
            lst.validate().map_err(|(name, m)| (field(name), m))?;
            if let Some(p) = &lst.pool {
                if !pools.contains(p.as_str()) {
                    return Err((field("pool"), format!("no pool named {p:?}")));
                }
            }
            // Passthrough forwards the client's own TLS, to the routes'
            // pools and the listener's: a pool that speaks TLS to its
            // backends would wrap it twice.
            let passthrough =
                lst.sni_routes.iter().enumerate().map(|(j, r)| (format!("sni_routes[{j}].pool"), &r.pool));
            let passthrough =
                passthrough.chain(lst.pool.iter().filter(|_| !lst.sni_routes.is_empty()).map(|p| ("pool".into(), p)));
            for (name, pool) in passthrough {
                if self.pools.iter().any(|p| &p.name == pool && p.tls.is_some()) {
                    return Err((
                        field(&name),
                        format!("pool {pool:?} has tls: SNI passthrough forwards the client's TLS unopened"),
                    ));
                }
            }
            let mut names = HashSet::new();
            for (j, r) in lst.sni_routes.iter().enumerate() {
                if !pools.contains(r.pool.as_str()) {
                    return Err((field(&format!("sni_routes[{j}].pool")), format!("no pool named {:?}", r.pool)));
                }
                if !names.insert(crate::host::normalize(&r.server_name)) {
                    return Err((
                        field(&format!("sni_routes[{j}].server_name")),
                        format!("duplicate server_name {:?}", r.server_name),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Route hosts and paths are well formed, their pools exist, and no
    /// two routes have the same host and (normalised) path.
    fn validate_routes(&self, pools: &HashSet<&str>) -> Result<(), Invalid> {
        let mut route_keys = HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            let field = |name: &str| format!("route[{i}].{name}");
            crate::host::validate_route_host(&r.host).map_err(|m| (field("host"), m))?;
            if let Some(path) = &r.path {
                if !path.starts_with('/') {
                    return Err((field("path"), format!("{path:?} must start with '/'")));
                }
            }
            if !pools.contains(r.pool.as_str()) {
                return Err((field("pool"), format!("no pool named {:?}", r.pool)));
            }
            if let Some(rs) = &r.route_service {
                if !(rs.starts_with("https://") || rs.starts_with("http://")) {
                    return Err((field("route_service"), format!("{rs:?} is not an http(s) URL")));
                }
            }
            let key = (crate::host::normalize(&r.host), crate::path::normalize_prefix(r.path.as_deref()));
            if !route_keys.insert(key) {
                return Err((
                    format!("route[{i}]"),
                    format!("duplicate route for host {:?} and path {:?}", r.host, r.path.as_deref().unwrap_or("/")),
                ));
            }
        }
        Ok(())
    }

    /// What is valid but probably not meant: pools without backends
    /// (requests routed there get 503 no_endpoints) and pools nothing
    /// routes or forwards to. Printed by `check`, logged by `run` and on
    /// reload.
    pub fn warnings(&self) -> Vec<String> {
        let used: HashSet<&str> = self
            .routes
            .iter()
            .map(|r| r.pool.as_str())
            .chain(self.listeners.iter().filter_map(|l| l.pool.as_deref()))
            .chain(self.listeners.iter().flat_map(|l| l.sni_routes.iter().map(|r| r.pool.as_str())))
            .collect();
        let mut out = Vec::new();
        for (i, p) in self.pools.iter().enumerate() {
            if p.backends.is_empty() {
                out.push(format!("pool[{i}] {:?} has no backends: requests routed to it get 503", p.name));
            }
            if !used.contains(p.name.as_str()) {
                out.push(format!("pool[{i}] {:?} is not used by any route or tcp listener", p.name));
            }
        }
        out
    }

    /// A short human summary, printed by `upsplice check`.
    pub fn summary(&self) -> String {
        use std::fmt::Write;
        let mut s = String::new();
        let _ = writeln!(s, "data plane: {}", self.data_plane.mode);
        let _ = writeln!(s, "runtime: {}", self.runtime.describe());
        if let Some(a) = &self.admin {
            let _ = writeln!(s, "admin: {}", a.bind);
        }
        if let Some(n) = &self.nats {
            // Servers without their credentials: the summary is printed.
            let servers: Vec<&str> = n
                .servers
                .iter()
                .map(|u| u.split_once("://").map_or(u.as_str(), |(_, rest)| rest))
                .map(|u| u.rsplit('@').next().unwrap_or(u))
                .collect();
            let _ = writeln!(
                s,
                "nats: {} (index {}; prune after {:?} every {:?}{}; routes wanted {:?} after start)",
                servers.join(", "),
                n.index,
                n.droplet_stale_threshold,
                n.prune_stale_droplets_interval,
                if n.suspend_pruning_if_nats_unavailable { ", not while NATS is down" } else { "" },
                n.start_response_delay_interval
            );
        }
        let rs = &self.route_services;
        if rs.key.is_some() {
            // Never the keys themselves: the summary is printed.
            let _ = writeln!(
                s,
                "route services: on (token valid {:?}{}; upgrades {})",
                rs.timeout,
                if rs.previous_key.is_some() { ", previous key still read" } else { "" },
                if rs.websockets { "through the service too" } else { "refused with 503" }
            );
        }
        let _ = writeln!(s, "listeners ({}):", self.listeners.len());
        for l in &self.listeners {
            let proxy = match l.proxy_protocol {
                ProxyProtocol::Off => String::new(),
                p => format!(" proxy_protocol={} from {} cidrs", p.as_str(), l.proxy_trusted_cidrs.len()),
            };
            match l.protocol {
                Protocol::Http => {
                    let _ = writeln!(
                        s,
                        "  {:<12} {:<22} http  proto={} trusted={}{proxy}",
                        l.name,
                        l.bind,
                        l.forwarded_proto(),
                        l.trusted_cidrs.len()
                    );
                }
                Protocol::Tcp if !l.sni_routes.is_empty() => {
                    let routes: Vec<String> =
                        l.sni_routes.iter().map(|r| format!("{} -> {}", r.server_name, r.pool)).collect();
                    let other = l.pool.as_deref().map_or("closed".to_string(), |p| format!("-> pool {p}"));
                    let _ = writeln!(
                        s,
                        "  {:<12} {:<22} tcp   SNI passthrough: {}; other names {other}{proxy}",
                        l.name,
                        l.bind,
                        routes.join(", ")
                    );
                }
                Protocol::Tcp => {
                    let _ = writeln!(
                        s,
                        "  {:<12} {:<22} tcp   -> pool {}{proxy}",
                        l.name,
                        l.bind,
                        l.pool.as_deref().unwrap_or("?")
                    );
                }
            }
        }
        let _ = writeln!(s, "pools ({}):", self.pools.len());
        for p in &self.pools {
            let backends: Vec<String> = p.backends.iter().map(|b| b.to_string()).collect();
            let send_proxy = match p.send_proxy {
                SendProxy::Off => "",
                SendProxy::V1 => " send_proxy=v1",
                SendProxy::V2 => " send_proxy=v2",
            };
            let check = p.check.as_ref().map_or(String::new(), |c| match c.kind {
                CheckKind::Tcp => format!(" check=tcp every {:?}", c.interval),
                CheckKind::Http => format!(" check=http GET {} every {:?}", c.path, c.interval),
            });
            let _ = writeln!(s, "  {:<12} {} [{}]{send_proxy}{check}", p.name, p.balance, backends.join(", "));
            for (name, addrs) in &p.backends.resolved {
                let addrs: Vec<String> = addrs.iter().map(|a| a.to_string()).collect();
                let _ = writeln!(s, "  {:<12} {name} resolved to {}", "", addrs.join(", "));
            }
        }
        let _ = writeln!(s, "routes ({}):", self.routes.len());
        for r in &self.routes {
            let _ = writeln!(
                s,
                "  {}{} -> {}{}",
                r.host,
                r.path.as_deref().unwrap_or(""),
                r.pool,
                r.route_service.as_deref().map(|u| format!(" (route service {u})")).unwrap_or_default()
            );
        }
        s
    }
}

/// Would binding both fail with EADDRINUSE? The same port, and the same
/// address or a wildcard on either side (`[::]` takes IPv4 too: the
/// sockets are dual-stack). Port 0 asks the kernel for a free port, so it
/// never collides.
fn overlaps(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// The built-in configuration used by `run` without `--config` (and so
/// by `scripts/demo`): one http listener, one tcp listener, one echo pool.
pub const DEMO_CONFIG: &str = include_str!("../demo.toml");

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::Mode;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("t.toml"), text)
    }

    const BASE: &str = r#"
[[listener]]
name = "web"
bind = "127.0.0.1:8080"
protocol = "http"

[[pool]]
name = "chat"
backends = ["127.0.0.1:9001"]

[[route]]
host = "chat.example.com"
pool = "chat"
"#;

    #[test]
    fn demo_config_is_valid() {
        parse(DEMO_CONFIG).unwrap();
    }

    #[test]
    fn human_durations_and_sizes() {
        let c = parse(&format!(
            "[limits]\nhandshake_timeout = \"250ms\"\nmax_header_bytes = \"8KiB\"\n[data_plane]\nmode = \"splice\"\npipe_size = \"256KiB\"\n{BASE}"
        ))
        .unwrap();
        assert_eq!(c.limits.handshake_timeout, Duration::from_millis(250));
        assert_eq!(c.limits.max_header_bytes, 8192);
        assert_eq!(c.data_plane.pipe_size, Some(256 * 1024));
        assert_eq!(c.data_plane.mode, Mode::Splice);
    }

    #[test]
    fn adaptive_reads_its_policy() {
        let c = parse(&format!(
            "[data_plane]\nmode = \"adaptive\"\npromote_after = \"250ms\"\npromote_message_size = \"1KiB\"\npromote_rate = 50\n{BASE}"
        ))
        .unwrap();
        assert_eq!(c.data_plane.mode, Mode::Adaptive);
        assert_eq!(c.data_plane.promote_after, Duration::from_millis(250));
        assert_eq!(c.data_plane.promote_message_size, 1024);
        assert_eq!(c.data_plane.promote_rate, 50);
        let e = parse(&format!("[data_plane]\npromote_rate = 0\n{BASE}")).unwrap_err().to_string();
        assert_eq!(e, "t.toml: data_plane.promote_rate: must be between 1 and 1000000 (promotions per second)");
        let e = parse(&format!("[data_plane]\nmode = \"adaptive\"\npromote_after = \"1ms\"\n{BASE}"))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "t.toml: data_plane.promote_after: must be between 10ms and 1h");
        let e = parse(&format!("[data_plane]\npromote_message_size = 0\n{BASE}")).unwrap_err().to_string();
        assert_eq!(e, "t.toml: data_plane.promote_message_size: must be between 1 byte and 16MiB");
        assert_eq!(c.data_plane.demote_rate, 32 << 20, "the default");
        let c = parse(&format!("[data_plane]\ndemote_rate = \"100MiB\"\n{BASE}")).unwrap();
        assert_eq!(c.data_plane.demote_rate, 100 << 20);
        assert_eq!(parse(&format!("[data_plane]\ndemote_rate = 0\n{BASE}")).unwrap().data_plane.demote_rate, 0, "off");
        let e = parse(&format!("[data_plane]\ndemote_rate = \"1KiB\"\n{BASE}")).unwrap_err().to_string();
        assert_eq!(e, "t.toml: data_plane.demote_rate: must be 0 (off) or between 64KiB and 1TiB (bytes per second)");
    }

    #[test]
    fn errors_name_file_field_and_problem() {
        let e = parse(&BASE.replace("pool = \"chat\"\n", "pool = \"nope\"\n")).unwrap_err().to_string();
        assert_eq!(e, "t.toml: route[0].pool: no pool named \"nope\"");

        let e = parse(&format!("{BASE}\n[[listener]]\nname = \"b\"\nbind = \"127.0.0.1:8080\"\nprotocol = \"http\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("listener[1].bind") && e.contains("already bound"), "{e}");

        let e = parse(&BASE.replace("protocol = \"http\"", "protocol = \"http\"\ntrusted_cidrs = [\"10.0.0.0/33\"]"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("t.toml: ") && e.contains("trusted_cidrs"), "{e}");

        let e = parse(&BASE.replace("protocol = \"http\"", "protocol = \"http\"\ncolour = \"blue\""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `colour`"), "{e}");

        let e = parse(&format!("[limits]\nidle_timeout = \"forever\"\n{BASE}")).unwrap_err().to_string();
        assert!(e.contains("idle_timeout") && e.contains("not a duration"), "{e}");

        let e = parse(&format!("{BASE}\n[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:8443\"\nprotocol = \"tcp\"\n"))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "t.toml: listener[1].pool: a tcp listener needs a pool (or sni_routes)");

        let e = parse(&BASE.replace("chat.example.com", "*.*.example.com")).unwrap_err().to_string();
        assert!(e.contains("route[0].host"), "{e}");
    }

    #[test]
    fn port_zero_binds_never_collide() {
        let two = format!("{BASE}\n[[listener]]\nname = \"w2\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\n")
            .replace("127.0.0.1:8080", "127.0.0.1:0");
        parse(&format!("[admin]\nbind = \"127.0.0.1:0\"\n{two}")).unwrap();
    }

    /// What was accepted silently or worded for Rust rather than for an
    /// operator: refused, saying what was probably meant.
    #[test]
    fn operator_mistakes_are_refused_with_what_was_meant() {
        let http = |extra: &str| BASE.replace("protocol = \"http\"", &format!("protocol = \"http\"\n{extra}"));
        let tcp = |extra: &str| {
            format!("{BASE}\n[[listener]]\nname = \"t\"\nbind = \"127.0.0.1:8443\"\nprotocol = \"tcp\"\npool = \"chat\"\n{extra}")
        };
        let cases = [
            (http("forwarded_proto = \"ftp\""), "listener[0].forwarded_proto: \"ftp\": must be \"http\" or \"https\""),
            (tcp("forwarded_proto = \"https\""), "listener[1].forwarded_proto: only http listeners take it"),
            (tcp("trusted_cidrs = [\"10.0.0.0/8\"]"), "listener[1].trusted_cidrs: only http listeners take it"),
            (http("trusted_cidrs = [\"10.0.0.1/8\"]"), "\"10.0.0.1/8\" has host bits set; did you mean 10.0.0.0/8?"),
            (http("trusted_cidrs = [\"10.0.0.0/33\"]"), "\"10.0.0.0/33\": prefix length 33 is longer than 32"),
            (http("trusted_cidrs = [\"fd00::/129\"]"), "prefix length 129 is longer than 128"),
            (http("trusted_cidrs = [\"10.0.0.0\"]"), "is not a CIDR such as"),
            (http("proxy_protocol = \"v2\""), "listener[0].proxy_trusted_cidrs: required with proxy_protocol = \"v2\""),
            (
                http("proxy_trusted_cidrs = [\"10.0.0.0/8\"]"),
                "listener[0].proxy_trusted_cidrs: only with proxy_protocol",
            ),
            (http("proxy_protocol = \"v3\""), "unknown variant `v3`"),
            (
                format!("[access_log]\nformat = \"json\"\n{BASE}"),
                "access_log.format: json and gorouter need access_log.path",
            ),
            (
                BASE.replace("127.0.0.1:9001", "10.0.0.1"),
                "\"10.0.0.1\": expected IP:PORT or NAME:PORT, e.g. \"10.0.0.1:8080\" (the port is missing)",
            ),
            (
                format!("[limits]\nmax_header_bytes = 100000000000\n{BASE}"),
                "limits.max_header_bytes: must be between 64 and 16MiB",
            ),
            (
                format!("{BASE}\n[[listener]]\nname = \"any\"\nbind = \"0.0.0.0:8080\"\nprotocol = \"http\"\n"),
                "listener[1].bind: 0.0.0.0:8080 is already bound by listener \"web\"",
            ),
            (
                format!("{BASE}\n[[listener]]\nname = \"v6\"\nbind = \"[::]:8080\"\nprotocol = \"http\"\n"),
                "listener[1].bind: [::]:8080 is already bound by listener \"web\"",
            ),
            (
                format!("{BASE}\n[[route]]\nhost = \"Chat.Example.com.\"\npath = \"/\"\npool = \"chat\"\n"),
                "route[1]: duplicate route for host \"Chat.Example.com.\" and path \"/\"",
            ),
        ];
        for (text, expected) in cases {
            let e = parse(&text).map(|_| ()).unwrap_err().to_string();
            assert!(e.contains(expected), "expected {expected:?} in {e:?}");
        }
        let c = parse(&tcp("proxy_protocol = \"any\"\nproxy_trusted_cidrs = [\"10.0.0.0/8\"]")).unwrap();
        assert_eq!(c.listeners[1].proxy_protocol, ProxyProtocol::Any);
        // Still accepted: the same port on two different addresses, https.
        parse(&format!("{BASE}\n[[listener]]\nname = \"b\"\nbind = \"127.0.0.2:8080\"\nprotocol = \"http\"\nforwarded_proto = \"https\"\n"))
            .unwrap();
    }

    #[test]
    fn tcp_user_timeout_is_off_unless_set_and_bounded() {
        assert_eq!(parse(BASE).unwrap().limits.tcp_user_timeout, None);
        let c = parse(&format!("[limits]\ntcp_user_timeout = \"30s\"\n{BASE}")).unwrap();
        assert_eq!(c.limits.tcp_user_timeout, Some(Duration::from_secs(30)));
        for bad in ["0s", "50ms", "2days"] {
            let e = parse(&format!("[limits]\ntcp_user_timeout = \"{bad}\"\n{BASE}")).unwrap_err().to_string();
            assert!(e.contains("limits.tcp_user_timeout") && e.contains("between 100ms and 24h"), "{bad}: {e}");
        }
    }

    #[test]
    fn keep_alive_backend_and_check_keys() {
        let c = parse(BASE).unwrap();
        assert_eq!(c.limits.keepalive_timeout, Duration::from_secs(900));
        assert_eq!((c.limits.max_requests_per_connection, c.limits.max_request_body), (1000, None));
        assert_eq!(c.limits.response_timeout, Duration::from_secs(60));
        assert_eq!((c.backends.max_conns, c.backends.max_idle_per_backend), (0, 16));
        assert!(c.pools[0].check.is_none());
        let c = parse(&format!(
            "[limits]\nmax_request_body = \"10MiB\"\n[backends]\nmax_conns = 500\nbackoff = \"2s\"\n{BASE}\n[pool.check]\nkind = \"http\"\npath = \"/health\"\n"
        ))
        .unwrap();
        assert_eq!((c.limits.max_request_body, c.backends.max_conns), (Some(10 << 20), 500));
        let check = c.pools[0].check.as_ref().unwrap();
        assert_eq!((check.kind, check.path.as_str(), check.rise, check.fall), (CheckKind::Http, "/health", 2, 3));
        assert!(c.summary().contains("check=http GET /health every 5s"), "{}", c.summary());
        let cases = [
            ("[limits]\nmax_requests_per_connection = 0\n", "limits.max_requests_per_connection: must be at least 1"),
            ("[limits]\nresponse_timeout = \"0s\"\n", "limits.response_timeout: must be longer than 0"),
            ("[backends]\nbackoff = \"10s\"\nmax_backoff = \"1s\"\n", "backends.max_backoff: must not be shorter"),
        ];
        for (extra, expected) in cases {
            let e = parse(&format!("{extra}{BASE}")).map(|_| ()).unwrap_err().to_string();
            assert!(e.contains(expected), "expected {expected:?} in {e:?}");
        }
        let e = parse(&format!("{BASE}\n[pool.check]\nkind = \"http\"\npath = \"health\"\n")).unwrap_err().to_string();
        assert!(e.contains("pool[0].check.path"), "{e}");
        let e = parse(&format!("{BASE}\n[pool.check]\nkind = \"tcp\"\ninterval = \"1s\"\ntimeout = \"2s\"\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("pool[0].check.timeout"), "{e}");
    }

    /// The TLS, SNI passthrough, backend TLS and XFCC keys of the
    /// TLS/PROXY issue: defaults, paths relative to the config file, and
    /// the combinations refused.
    #[test]
    fn tls_sni_and_backend_tls_keys() {
        let text = r#"
[backend_tls]
ca = "/etc/upsplice/backend-ca.pem"
cert_chain = "certs/router.pem"
private_key = "certs/router.key"

[[listener]]
name = "wss"
bind = "127.0.0.1:0"
protocol = "http"
forwarded_proto = "https"
forwarded_client_cert = "sanitize_set"
[listener.tls]
certs = [ { cert = "certs/apps.pem", key = "certs/apps.key" }, { cert = "/abs/sys.pem", key = "/abs/sys.key" } ]
min_version = "1.3"
client_ca = "certs/clients.pem"
client_cert = "require"

[[listener]]
name = "passthrough"
bind = "127.0.0.1:0"
protocol = "tcp"
sni_routes = [ { server_name = "*.ws.example.com", pool = "ws-tls" } ]

[[pool]]
name = "ws-tls"
backends = ["127.0.0.1:9443"]
send_proxy = "v2"

[[pool]]
name = "apps-tls"
backends = ["127.0.0.1:8443"]
tls = { server_name = "app.internal" }

[[route]]
host = "app.example.com"
pool = "apps-tls"
"#;
        let mut c: Config = toml::from_str(text).unwrap();
        c.validate_listeners(&c.validate_pools().unwrap()).unwrap();
        c.resolve_paths(Path::new("/etc/upsplice"));
        let tls = c.listeners[0].tls.as_ref().unwrap();
        assert_eq!(tls.certs[0].cert, Path::new("/etc/upsplice/certs/apps.pem"));
        assert_eq!(tls.certs[1].key, Path::new("/abs/sys.key"));
        assert_eq!((tls.min_version, tls.client_cert), (TlsVersion::V1_3, ClientCertMode::Require));
        assert_eq!(tls.client_ca.as_deref(), Some(Path::new("/etc/upsplice/certs/clients.pem")));
        assert_eq!(c.listeners[0].forwarded_client_cert(), ForwardedClientCert::SanitizeSet);
        assert_eq!(c.listeners[1].sni_routes[0].pool, "ws-tls");
        assert_eq!(c.backend_tls.private_key.as_deref(), Some(Path::new("/etc/upsplice/certs/router.key")));
        assert_eq!(c.pools[1].tls.as_ref().unwrap().server_name, "app.internal");
        assert!(c.warnings().is_empty(), "{:?}", c.warnings());
        let summary = c.summary();
        assert!(summary.contains("tcp   SNI passthrough: *.ws.example.com -> ws-tls; other names closed"), "{summary}");
        // Defaults.
        let c = parse(BASE).unwrap();
        assert_eq!(c.listeners[0].forwarded_client_cert(), ForwardedClientCert::AlwaysForward);
        assert!(c.listeners[0].tls.is_none() && c.backend_tls == BackendTls::default());
        let web = "[[listener]]\nname = \"w\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\n";
        let raw = "[[listener]]\nname = \"r\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\n";
        let pool = "[[pool]]\nname = \"p\"\nbackends = [\"127.0.0.1:1\"]\n";
        let cases = [
            (format!("{web}[listener.tls]\ncerts = []\n{pool}"), "listener[0].tls.certs: at least one"),
            (
                format!("{web}[listener.tls]\ncerts = [{{ cert = \"a\", key = \"b\" }}]\nclient_cert = \"require\"\n{pool}"),
                "listener[0].tls.client_cert: \"require\" needs tls.client_ca",
            ),
            (
                format!("{web}[listener.tls]\ncerts = [{{ cert = \"a\", key = \"b\" }}]\nmin_version = \"1.1\"\n{pool}"),
                "min_version",
            ),
            (format!("{web}sni_routes = [{{ server_name = \"a.example\", pool = \"p\" }}]\n{pool}"), "only tcp listeners route by SNI"),
            (format!("{raw}forwarded_client_cert = \"forward\"\npool = \"p\"\n{pool}"), "listener[0].forwarded_client_cert: only http"),
            (format!("{raw}sni_routes = [{{ server_name = \"a.example\", pool = \"q\" }}]\n{pool}"), "sni_routes[0].pool: no pool named \"q\""),
            (
                format!("{raw}sni_routes = [{{ server_name = \"a.example\", pool = \"p\" }}, {{ server_name = \"A.example\", pool = \"p\" }}]\n{pool}"),
                "sni_routes[1].server_name: duplicate",
            ),
            (
                format!("{raw}sni_routes = [{{ server_name = \"a.example\", pool = \"p\" }}]\n[listener.tls]\ncerts = [{{ cert = \"a\", key = \"b\" }}]\n{pool}"),
                "either terminates TLS",
            ),
            (format!("{raw}pool = \"p\"\n{pool}tls = {{ server_name = \"x.internal\" }}\n"), "pool[0].tls.ca: required unless [backend_tls] ca"),
            (
                format!("{raw}pool = \"p\"\n{pool}tls = {{ ca = \"ca.pem\", server_name = \"x.internal\" }}\n[pool.check]\nkind = \"http\"\n"),
                "pool[0].check.kind: \"http\" checks speak plain HTTP",
            ),
            (
                format!("[backend_tls]\nca = \"ca.pem\"\n{raw}sni_routes = [{{ server_name = \"a.example\", pool = \"p\" }}]\n{pool}tls = {{ server_name = \"x.internal\" }}\n"),
                "sni_routes[0].pool: pool \"p\" has tls",
            ),
            (
                format!("[backend_tls]\nca = \"ca.pem\"\n{raw}sni_routes = [{{ server_name = \"a.example\", pool = \"q\" }}]\npool = \"p\"\n{pool}tls = {{ server_name = \"x.internal\" }}\n[[pool]]\nname = \"q\"\n"),
                "listener[0].pool: pool \"p\" has tls",
            ),
            (format!("[backend_tls]\ncert_chain = \"c.pem\"\n{raw}pool = \"p\"\n{pool}"), "backend_tls: cert_chain and private_key go together"),
        ];
        for (text, expected) in cases {
            let e = parse(&text).map(|_| ()).unwrap_err().to_string();
            assert!(e.contains(expected), "expected {expected:?} in {e:?}");
        }
    }

    #[test]
    fn nats_keys_with_gorouter_defaults() {
        let text = format!("[nats]\nservers = [\"nats://u:p@127.0.0.1:4222\", \"nats://127.0.0.2:4222\"]\nindex = 2\ntls = {{ ca = \"nats-ca.pem\" }}\n{BASE}");
        let mut c: Config = toml::from_str(&text).unwrap();
        c.resolve_paths(Path::new("/etc/upsplice"));
        let n = c.nats.as_ref().unwrap();
        n.validate().unwrap();
        assert_eq!(n.droplet_stale_threshold, Duration::from_secs(120));
        assert_eq!(n.prune_stale_droplets_interval, Duration::from_secs(30));
        assert_eq!(n.start_response_delay_interval, Duration::from_secs(5));
        assert!(!n.suspend_pruning_if_nats_unavailable && n.index == 2);
        assert_eq!(n.tls.as_ref().unwrap().ca, Path::new("/etc/upsplice/nats-ca.pem"));
        let summary = c.summary();
        assert!(
            summary.contains("nats: 127.0.0.1:4222, 127.0.0.2:4222 (index 2; prune after 120s every 30s"),
            "{summary}"
        );
        assert!(!summary.contains("u:p"), "credentials never printed: {summary}");
        for (nats, expected) in [
            ("servers = []", "nats.servers: at least one"),
            ("servers = [\"127.0.0.1:4222\"]", "must start with nats://"),
            ("servers = [\"nats://host\"]", "needs host:port"),
            (
                "servers = [\"nats://h:1\"]\nprune_stale_droplets_interval = \"0s\"",
                "nats.prune_stale_droplets_interval",
            ),
            ("servers = [\"nats://h:1\"]\nstart_response_delay_interval = \"500ms\"", "at least 1s"),
        ] {
            let e = parse(&format!("[nats]\n{nats}\n{BASE}")).map(|_| ()).unwrap_err().to_string();
            assert!(e.contains(expected), "expected {expected:?} in {e:?}");
        }
    }

    #[test]
    fn route_services_keys_with_gorouter_defaults() {
        let c = parse(BASE).unwrap();
        assert_eq!(c.route_services, RouteServices::default());
        assert!(c.route_services.key.is_none() && c.route_services.recommend_https);
        assert_eq!(c.route_services.timeout, Duration::from_secs(60));
        let text = format!(
            "[route_services]\nkey = \"s3cret\"\nprevious_key = \"old\"\ntimeout = \"30s\"\nwebsockets = true\nca = \"rs-ca.pem\"\n{BASE}"
        );
        let mut c: Config = toml::from_str(&text).unwrap();
        c.resolve_paths(Path::new("/etc/upsplice"));
        c.route_services.validate().unwrap();
        assert_eq!(c.route_services.ca.as_deref(), Some(Path::new("/etc/upsplice/rs-ca.pem")));
        let summary = c.summary();
        assert!(summary.contains("route services: on (token valid 30s, previous key still read; upgrades through"));
        assert!(!summary.contains("s3cret") && !summary.contains("old\""), "keys never printed: {summary}");
        for (rs, expected) in [
            ("key = \"\"", "route_services.key: must not be empty"),
            ("previous_key = \"old\"", "route_services.previous_key: needs key"),
            ("key = \"k\"\ntimeout = \"0s\"", "route_services.timeout"),
        ] {
            let e = parse(&format!("[route_services]\n{rs}\n{BASE}")).map(|_| ()).unwrap_err().to_string();
            assert!(e.contains(expected), "expected {expected:?} in {e:?}");
        }
    }

    #[test]
    fn empty_and_unused_pools_are_warned_about() {
        let c = parse(&format!("{BASE}\n[[pool]]\nname = \"spare\"\n")).unwrap();
        assert_eq!(
            c.warnings(),
            [
                "pool[1] \"spare\" has no backends: requests routed to it get 503",
                "pool[1] \"spare\" is not used by any route or tcp listener"
            ]
        );
        assert!(parse(BASE).unwrap().warnings().is_empty());
    }

    #[test]
    fn toml_errors_fit_on_one_line_for_logs() {
        let e = parse(&BASE.replace("protocol = \"http\"", "protocol = \"http\"\ncolour = \"blue\"")).unwrap_err();
        assert!(e.to_string().lines().count() > 2, "{e}");
        let line = e.one_line();
        assert!(!line.contains('\n') && line.starts_with("t.toml: TOML parse error at line"), "{line}");
        assert!(line.contains("unknown field `colour`"), "{line}");
    }

    #[test]
    fn names_resolve_at_load_for_backends_and_binds() {
        let c = parse(&BASE.replace("127.0.0.1:9001", "localhost:9001").replace("127.0.0.1:8080", "localhost:8080"))
            .unwrap();
        assert!(c.pools[0].backends.contains(&"127.0.0.1:9001".parse().unwrap()), "{:?}", c.pools[0].backends);
        assert_eq!(c.pools[0].backends.resolved[0].0, "localhost:9001");
        assert_eq!(c.listeners[0].bind, "127.0.0.1:8080".parse().unwrap());
        assert!(c.summary().contains("localhost:9001 resolved to "), "{}", c.summary());
        let e = parse(&BASE.replace("127.0.0.1:9001", "no-such-host.invalid:9001")).unwrap_err().to_string();
        assert!(e.contains("cannot resolve \"no-such-host.invalid\"") && e.contains("at load and on SIGHUP"), "{e}");
        let e = parse(&BASE.replace("127.0.0.1:9001", "db:http")).unwrap_err().to_string();
        assert!(e.contains("expected IP:PORT or NAME:PORT"), "{e}");
    }
}
