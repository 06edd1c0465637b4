//! Process-wide metrics, rendered in the Prometheus text format by the admin
//! endpoint (`GET /metrics`).
//!
//! One global registry: every connection task records into it without
//! threading a handle through each call. Byte counters are not recorded per
//! write: each data plane keeps its own totals (sockmap's live in an eBPF
//! per-CPU map) and they are read when `/metrics` is scraped.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::dataplane::{Cause, DataPlanes, Mode, Move, Plane};

/// A listener's series. Shared strings, not owned ones: every connection
/// and tunnel looks its series up, and an owned label set cost it an
/// allocation per label per lookup (callgrind, docs/performance.md §6).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TunnelLabels {
    pub listener: Arc<str>,
    pub data_plane: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub listener: String,
    pub status: u16,
    /// The X-Cf-Routererror reason, or "" for answers from a backend.
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProxyErrorLabels {
    pub listener: String,
    /// [`crate::proxy::ProxyError::reason`].
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub pool: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabels {
    pub pool: String,
    /// The backend's IP:PORT.
    pub backend: String,
}

impl BackendLabels {
    fn new(pool: &str, backend: SocketAddr) -> BackendLabels {
        BackendLabels { pool: pool.to_string(), backend: backend.to_string() }
    }
}

/// A NATS message kind (`upsplice_nats_messages_total`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NatsKindLabels {
    pub kind: String,
}

/// Why a NATS message or endpoint was dropped.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NatsReasonLabels {
    pub reason: String,
}

/// A kTLS handoff's listener and result (`upsplice_ktls_handoffs_total`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KtlsLabels {
    pub listener: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PlaneLabels {
    pub data_plane: String,
}

/// A tunnel's move between data planes: `kind` promotion, demotion or
/// fallback; `reason` a fixed word per kind (`dataplane::Cause`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MoveLabels {
    pub from: &'static str,
    pub to: &'static str,
    pub kind: &'static str,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    /// `accept` (a listener's) or `connect` (to a backend).
    pub op: &'static str,
    /// [`crate::socket::shortage`]'s name of the errno.
    pub error: &'static str,
}

pub struct Metrics {
    registry: Registry,
    pub accepted: Family<ListenerLabels, Counter>,
    pub active: Family<ListenerLabels, Gauge>,
    pub rejected_over_limit: Family<ListenerLabels, Counter>,
    pub tunnels: Family<TunnelLabels, Counter>,
    pub tunnels_active: Family<TunnelLabels, Gauge>,
    pub outcomes: Family<OutcomeLabels, Counter>,
    pub handshake_seconds: Histogram,
    pub connect_failures: Family<PoolLabels, Counter>,
    pub backend_up: Family<BackendLabels, Gauge>,
    pub backend_failures: Family<BackendLabels, Counter>,
    pub backend_reused: Family<PoolLabels, Counter>,
    pub fallbacks: Family<PlaneLabels, Counter>,
    pub moves: Family<MoveLabels, Counter>,
    pub access_log_dropped: Counter,
    pub proxy_errors: Family<ProxyErrorLabels, Counter>,
    pub nats: NatsMetrics,
    pub tls_errors: Family<ProxyErrorLabels, Counter>,
    pub sni_errors: Family<ProxyErrorLabels, Counter>,
    pub ktls_handoffs: Family<KtlsLabels, Counter>,
    pub resource_errors: Family<ResourceLabels, Counter>,
    planes: OnceLock<Arc<DataPlanes>>,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("upsplice");
        let accepted = Family::default();
        registry.register("connections_accepted", "Connections accepted, by listener", accepted.clone());
        let active = Family::default();
        registry.register("connections_active", "Connections open now, by listener", active.clone());
        let rejected_over_limit = Family::default();
        registry.register(
            "connections_over_limit",
            "Connections refused because limits.max_connections was reached",
            rejected_over_limit.clone(),
        );
        let tunnels = Family::default();
        registry.register(
            "tunnels",
            "Connection pairs relayed to their end, by the data plane that carried them to the end",
            tunnels.clone(),
        );
        let tunnels_active = Family::default();
        registry.register("tunnels_active", "Connection pairs relayed by a data plane now", tunnels_active.clone());
        let outcomes = Family::default();
        registry.register(
            "handshakes",
            "Requests by the status answered (101 for tunnels) and X-Cf-Routererror reason",
            outcomes.clone(),
        );
        let handshake_seconds =
            Histogram::new([0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0]);
        registry.register(
            "handshake_duration_seconds",
            "From a request's start to its tunnel (or its answer) being ready",
            handshake_seconds.clone(),
        );
        let connect_failures = Family::default();
        registry.register(
            "backend_connect_failures",
            "Backend connects that failed or timed out, by pool",
            connect_failures.clone(),
        );
        let backend_up = Family::default();
        registry.register(
            "backend_up",
            "1 while a backend is in service, 0 while it is in back-off after a failure or held down by its health check",
            backend_up.clone(),
        );
        let backend_failures = Family::default();
        registry.register(
            "backend_failures",
            "Requests a backend failed (connect refused or timed out, reset or no response in time), by pool and backend",
            backend_failures.clone(),
        );
        let backend_reused = Family::default();
        registry.register(
            "backend_reused",
            "Requests served on an idle keep-alive backend connection instead of a new one, by pool",
            backend_reused.clone(),
        );
        let fallbacks = Family::default();
        registry.register(
            "dataplane_fallbacks",
            "Tunnels a data plane could not take or keep (refused, or stepped aside) and handed to the next one",
            fallbacks.clone(),
        );
        let moves = Family::default();
        registry.register(
            "dataplane_moves",
            "Tunnels moved from one data plane to another, by from, to, kind (promotion, demotion, fallback) and reason",
            moves.clone(),
        );
        let access_log_dropped = Counter::default();
        registry.register(
            "access_log_dropped",
            "Access-log lines dropped because the writer's queue was full",
            access_log_dropped.clone(),
        );
        let proxy_errors = Family::default();
        registry.register(
            "proxy_protocol_errors",
            "Connections closed before their first byte was served because of their PROXY protocol header, by listener and reason",
            proxy_errors.clone(),
        );
        let nats = NatsMetrics::register(&mut registry);
        let tls_errors = Family::default();
        registry.register(
            "tls_handshake_errors",
            "TLS handshakes on a listener that failed or timed out, by listener and reason",
            tls_errors.clone(),
        );
        let ktls_handoffs = Family::default();
        registry.register(
            "ktls_handoffs",
            "TLS tunnels offered to the kernel (kTLS), by listener and result: offloaded, or kept on the userspace tls relay and why, or failed (the tunnel was reset)",
            ktls_handoffs.clone(),
        );
        let sni_errors = Family::default();
        registry.register(
            "sni_errors",
            "Connections to an SNI passthrough listener closed before reaching a backend because of their ClientHello (or its server name routing nowhere), by listener and reason",
            sni_errors.clone(),
        );
        let resource_errors = Family::default();
        registry.register(
            "resource_errors",
            "Accepts and backend connects that failed because the router ran short of file descriptors, socket buffers or memory, by operation and errno",
            resource_errors.clone(),
        );
        for op in ["accept", "connect"] {
            for error in crate::socket::shortage_names() {
                let _ = resource_errors.get_or_create(&ResourceLabels { op, error });
            }
        }
        Metrics {
            resource_errors,
            nats,
            tls_errors,
            sni_errors,
            ktls_handoffs,
            access_log_dropped,
            proxy_errors,
            registry,
            accepted,
            active,
            rejected_over_limit,
            tunnels,
            tunnels_active,
            outcomes,
            handshake_seconds,
            connect_failures,
            backend_up,
            backend_failures,
            backend_reused,
            fallbacks,
            moves,
            planes: OnceLock::new(),
        }
    }

    /// Renders everything in the Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        // The data planes' byte totals are read now, not pushed per write.
        let body_end = out.rfind("# EOF").unwrap_or(out.len());
        out.truncate(body_end);
        if let Some(planes) = self.planes.get() {
            out.push_str("# HELP upsplice_relayed_bytes Bytes relayed through upgraded tunnels and plain requests, by data plane and direction.\n");
            out.push_str("# TYPE upsplice_relayed_bytes counter\n");
            let stream = (Mode::Tls, planes.stream.bytes_relayed());
            let ktls = planes.ktls.as_ref().map(|k| (Mode::Ktls, k.bytes_relayed()));
            for (m, (to_backend, to_client)) in
                planes.planes().map(|p| (p.mode(), p.bytes_relayed())).chain([stream]).chain(ktls)
            {
                let _ = writeln!(
                    out,
                    "upsplice_relayed_bytes_total{{data_plane=\"{m}\",direction=\"to_backend\"}} {to_backend}"
                );
                let _ = writeln!(
                    out,
                    "upsplice_relayed_bytes_total{{data_plane=\"{m}\",direction=\"to_client\"}} {to_client}"
                );
            }
            for plane in planes.planes() {
                if let Plane::Sockmap(p) = plane {
                    out.push_str("# HELP upsplice_sockmap_trimmed_bytes Retransmitted bytes the sockmap program cut off segments that TCP queued overlapping bytes already relayed.\n");
                    out.push_str("# TYPE upsplice_sockmap_trimmed_bytes counter\n");
                    let _ = writeln!(out, "upsplice_sockmap_trimmed_bytes_total {}", p.bytes_trimmed());
                    let (_, _, failed) = p.kernel_counters();
                    out.push_str("# HELP upsplice_sockmap_redirect_failed_bytes Bytes the kernel refused to redirect to a tunnel's peer socket (the peer's psock stopped); the tunnel is reset.\n");
                    out.push_str("# TYPE upsplice_sockmap_redirect_failed_bytes counter\n");
                    let _ = writeln!(out, "upsplice_sockmap_redirect_failed_bytes_total {failed}");
                    let (handed_over, reset) = p.step_asides();
                    out.push_str("# HELP upsplice_sockmap_step_asides Tunnels that left the sockmap plane because a direction reached its bound, by result: handed over to the next plane with every byte accounted for, or reset because that could not be done exactly.\n");
                    out.push_str("# TYPE upsplice_sockmap_step_asides counter\n");
                    let _ = writeln!(out, "upsplice_sockmap_step_asides_total{{result=\"handed_over\"}} {handed_over}");
                    let _ = writeln!(out, "upsplice_sockmap_step_asides_total{{result=\"reset\"}} {reset}");
                    let (held, limit) = p.held();
                    out.push_str("# HELP upsplice_sockmap_held_bytes Bytes sockmap tunnels hold now in kernel queues and userspace buffers.\n");
                    out.push_str("# TYPE upsplice_sockmap_held_bytes gauge\n");
                    let _ = writeln!(out, "upsplice_sockmap_held_bytes {held}");
                    out.push_str("# HELP upsplice_sockmap_held_limit_bytes The node-wide bound of upsplice_sockmap_held_bytes (data_plane.sockmap_node_limit).\n");
                    out.push_str("# TYPE upsplice_sockmap_held_limit_bytes gauge\n");
                    let _ = writeln!(out, "upsplice_sockmap_held_limit_bytes {limit}");
                }
            }
        }
        out.push_str("# EOF\n");
        out
    }
}

/// Routes from NATS (`upsplice_nats_*`).
pub struct NatsMetrics {
    /// Endpoints in the NATS table now (one per URI and address).
    pub endpoints: Gauge,
    /// URIs in the NATS table now.
    pub routes: Gauge,
    /// NATS routes left out because a config route has the same host and path.
    pub shadowed: Gauge,
    /// Messages taken, by kind: register, unregister, greet.
    pub messages: Family<NatsKindLabels, Counter>,
    /// Endpoints pruned because they were not re-registered in time.
    pub pruned: Counter,
    /// Messages dropped, by reason.
    pub bad: Family<NatsReasonLabels, Counter>,
    /// Endpoints of valid registrations not taken, by reason: a
    /// `tls_port` without `[backend_tls] ca` or without a usable
    /// `server_cert_domain_san`.
    pub skipped: Family<NatsReasonLabels, Counter>,
    /// 1 while connected to a NATS server.
    pub connected: Gauge,
    /// Connections to NATS after the first.
    pub reconnects: Counter,
    /// Messages the client dropped because the router fell behind (its
    /// subscription buffer was full: a NATS "slow consumer").
    pub dropped: Counter,
}

impl NatsMetrics {
    fn register(registry: &mut Registry) -> NatsMetrics {
        let m = NatsMetrics {
            endpoints: Gauge::default(),
            routes: Gauge::default(),
            shadowed: Gauge::default(),
            messages: Family::default(),
            pruned: Counter::default(),
            bad: Family::default(),
            skipped: Family::default(),
            connected: Gauge::default(),
            reconnects: Counter::default(),
            dropped: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("nats");
        r.register(
            "endpoints",
            "Endpoints in the table learned from NATS (one per URI and address)",
            m.endpoints.clone(),
        );
        r.register("routes", "URIs in the table learned from NATS", m.routes.clone());
        r.register(
            "routes_shadowed",
            "URIs learned from NATS left out because a config route has the same host and path",
            m.shadowed.clone(),
        );
        r.register("messages", "router.* messages taken, by kind (register, unregister, greet)", m.messages.clone());
        r.register(
            "pruned",
            "Endpoints pruned because they were not re-registered within their stale threshold",
            m.pruned.clone(),
        );
        r.register("bad_messages", "router.register/unregister messages dropped, by reason", m.bad.clone());
        r.register("endpoints_skipped", "Endpoints of valid registrations not taken, by reason", m.skipped.clone());
        r.register("connected", "1 while connected to a NATS server", m.connected.clone());
        r.register("reconnects", "Connections to NATS after the first", m.reconnects.clone());
        r.register(
            "dropped_messages",
            "router.* messages dropped by the NATS client because the router fell behind (slow consumer; a lower bound)",
            m.dropped.clone(),
        );
        for kind in ["register", "unregister", "greet"] {
            let _ = m.messages.get_or_create(&NatsKindLabels { kind: kind.into() });
        }
        m
    }

    pub fn message(&self, kind: &str) {
        self.messages.get_or_create(&NatsKindLabels { kind: kind.to_string() }).inc();
    }

    pub fn bad(&self, reason: &str) {
        self.bad.get_or_create(&NatsReasonLabels { reason: reason.to_string() }).inc();
    }

    pub fn skipped(&self, reason: &str) {
        self.skipped.get_or_create(&NatsReasonLabels { reason: reason.to_string() }).inc();
    }
}

/// The process's metrics.
pub fn get() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Makes the data planes' byte counters part of `/metrics`.
/// Creates every per-listener series at 0 before the first connection,
/// so that `rate()` and `absent()` alerts work from the start: accepted,
/// active, over-limit, and the tunnel series for each plane that may
/// carry a tunnel (the chosen one and its fallbacks).
pub fn declare_listener(listener: &str, planes: &DataPlanes) {
    let m = get();
    let labels = ListenerLabels { listener: listener.into() };
    let _ = m.accepted.get_or_create(&labels);
    let _ = m.active.get_or_create(&labels);
    let _ = m.rejected_over_limit.get_or_create(&labels);
    for plane in planes.planes() {
        let labels = TunnelLabels { listener: labels.listener.clone(), data_plane: plane.mode().as_str() };
        let _ = m.tunnels.get_or_create(&labels);
        let _ = m.tunnels_active.get_or_create(&labels);
    }
}

/// Counts a connection closed for its PROXY header.
pub fn proxy_error(listener: &str, reason: &str) {
    get().proxy_errors.get_or_create(&ProxyErrorLabels { listener: listener.into(), reason: reason.into() }).inc();
}

/// Counts a connection closed because its TLS handshake failed.
pub fn tls_error(listener: &str, reason: &str) {
    get().tls_errors.get_or_create(&ProxyErrorLabels { listener: listener.into(), reason: reason.into() }).inc();
}

/// Counts a TLS tunnel offered to the kernel, by result.
pub fn ktls_handoff(listener: &str, result: &str) {
    get().ktls_handoffs.get_or_create(&KtlsLabels { listener: listener.into(), result: result.into() }).inc();
}

/// Counts a passthrough connection closed for its ClientHello.
pub fn sni_error(listener: &str, reason: &str) {
    get().sni_errors.get_or_create(&ProxyErrorLabels { listener: listener.into(), reason: reason.into() }).inc();
}

/// Creates a pool's connect-failure and reuse series at 0 (at start and on reload).
pub fn declare_pool(pool: &str) {
    let labels = PoolLabels { pool: pool.to_string() };
    let _ = get().connect_failures.get_or_create(&labels);
    let _ = get().backend_reused.get_or_create(&labels);
}

/// A pool's `upsplice_backend_reused_total` counter, kept by the pool so a
/// reused connection costs no label lookup.
pub fn reused_counter(pool: &str) -> Counter {
    get().backend_reused.get_or_create(&PoolLabels { pool: pool.to_string() }).clone()
}

/// Sets a backend's `upsplice_backend_up` in one pool (and creates its
/// failure series at 0).
pub fn backend_up(pool: &str, backend: SocketAddr, up: bool) {
    let m = get();
    let labels = BackendLabels::new(pool, backend);
    m.backend_up.get_or_create(&labels).set(i64::from(up));
    let _ = m.backend_failures.get_or_create(&labels);
}

pub fn backend_failure(pool: &str, backend: SocketAddr) {
    get().backend_failures.get_or_create(&BackendLabels::new(pool, backend)).inc();
}

/// A reload took the backend out of the pool: its series go.
pub fn forget_backend(pool: &str, backend: SocketAddr) {
    let m = get();
    let labels = BackendLabels::new(pool, backend);
    m.backend_up.remove(&labels);
    m.backend_failures.remove(&labels);
}

pub fn set_planes(planes: Arc<DataPlanes>) {
    let _ = get().planes.set(planes);
}

/// Counts a tunnel's move between planes; every move but a promotion is
/// also a fallback (`dataplane_fallbacks`, by the plane that let go).
pub fn moved(m: &Move) {
    let metrics = get();
    let labels =
        MoveLabels { from: m.from.as_str(), to: m.to.as_str(), kind: m.cause.kind(), reason: m.cause.reason() };
    metrics.moves.get_or_create(&labels).inc();
    if !matches!(m.cause, Cause::Promoted(_)) {
        metrics.fallbacks.get_or_create(&PlaneLabels { data_plane: m.from.to_string() }).inc();
    }
}

pub fn outcome(listener: &str, status: u16, reason: &str, elapsed: Duration) {
    let m = get();
    m.outcomes
        .get_or_create(&OutcomeLabels { listener: listener.to_string(), status, reason: reason.to_string() })
        .inc();
    m.handshake_seconds.observe(elapsed.as_secs_f64());
}

/// An accept or a backend connect failed for the router's own shortage
/// (`op`: "accept" or "connect"; `error`: [`crate::socket::shortage`]).
pub fn resource_error(op: &'static str, error: &'static str) {
    get().resource_errors.get_or_create(&ResourceLabels { op, error }).inc();
}

pub fn connect_failure(pool: &str) {
    get().connect_failures.get_or_create(&PoolLabels { pool: pool.to_string() }).inc();
}
