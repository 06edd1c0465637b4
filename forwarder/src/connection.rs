//! One accepted connection, from accept to its access-log line: an http
//! listener's handshake or a tcp listener's connect, then the hand-off of
//! the connection pair to the data planes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::access::AccessRecord;
use crate::config::{Protocol, ProxyProtocol};
use crate::dataplane::{Mode, Tunnel};
use crate::handshake::answer::{linger_close, Refusal};
use crate::handshake::{self, Next, Plan};
use crate::metrics::{self, ListenerLabels, TunnelLabels};
use crate::proxy;
use crate::state::Shared;
use crate::upstream::{BackendGuard, ConnectError, ConnectOpts};

/// A connection's view of the router: the shared state and its listener.
pub struct Session {
    pub shared: Arc<Shared>,
    pub listener: Arc<str>,
}

impl Session {
    /// Serves one accepted connection to its end and logs it: an access
    /// record per request (http) or per connection (tcp).
    pub async fn serve(self, mut client: TcpStream, peer: SocketAddr, protocol: Protocol) {
        let labels = ListenerLabels { listener: self.listener.to_string() };
        metrics::get().active.get_or_create(&labels).inc();
        let _ = client.set_nodelay(true);
        let Some(peer) = self.client_address(&mut client, peer).await else {
            metrics::get().active.get_or_create(&labels).dec();
            return;
        };
        // The address the client connected to (a PROXY header sent on says it).
        let local = client.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        match protocol {
            Protocol::Http => self.serve_http(client, peer, local).await,
            Protocol::Tcp => {
                let mut rec = AccessRecord::new(peer, self.listener.clone());
                if let Some(plan) = Box::pin(self.connect_tcp(client, local, &mut rec)).await {
                    self.tunnel(plan, &mut rec).await;
                }
                self.shared.access_log.write(&rec);
            }
        }
        metrics::get().active.get_or_create(&labels).dec();
    }

    /// The client's address: the TCP peer's, or — on a listener with
    /// `proxy_protocol` — the one its PROXY header states. None when the
    /// header is refused (the connection is closed and counted).
    async fn client_address(&self, client: &mut TcpStream, peer: SocketAddr) -> Option<SocketAddr> {
        let snap = self.shared.snapshot();
        let settings = snap.listener(&self.listener);
        if settings.proxy_protocol == ProxyProtocol::Off {
            return Some(peer);
        }
        let within = snap.config.limits.handshake_timeout;
        match proxy::accept(client, peer, settings.proxy_protocol, &settings.proxy_trusted_cidrs, within).await {
            Ok(address) => Some(address),
            Err(e) => {
                tracing::debug!(listener = %self.listener, %peer, "closed: {e}");
                metrics::proxy_error(&self.listener, e.reason());
                None
            }
        }
    }

    /// An http listener's connection: its requests one after another, each
    /// on the configuration in force when it starts and with its own
    /// access record, until one closes it or starts a tunnel.
    async fn serve_http(&self, client: TcpStream, peer: SocketAddr, local: SocketAddr) {
        let mut conn = handshake::Conn::new(client, peer, local);
        loop {
            let mut rec = AccessRecord::new(peer, self.listener.clone());
            // Boxed, so the handshake's state is freed before a tunnel runs:
            // only the (small) tunnel state stays for hours.
            let snap = self.shared.snapshot();
            let next = Box::pin(conn.serve(snap, &self.listener, &self.shared.draining, &mut rec)).await;
            let kept = match next {
                Next::Again(kept) => Some(kept),
                Next::Tunnel(plan) => {
                    self.tunnel(plan, &mut rec).await;
                    None
                }
                Next::Done => None,
                Next::Idle => return,
            };
            self.shared.access_log.write(&rec);
            let Some(kept) = kept else { return };
            conn = kept;
        }
    }

    /// A tcp listener: connect to its pool; the pair is relayed without
    /// reading a byte.
    async fn connect_tcp(&self, client: TcpStream, local: SocketAddr, rec: &mut AccessRecord) -> Option<Plan> {
        let snap = self.shared.snapshot();
        let pool_name = snap.listener(&self.listener).pool.clone().unwrap_or_default();
        let pool = snap.pool_named(&pool_name).expect("validated: tcp listener pools exist").clone();
        let opts =
            ConnectOpts { timeout: snap.config.limits.connect_timeout, reuse: false, client: Some((rec.peer, local)) };
        match pool.connect(opts).await {
            Ok(upstream) => {
                // Nothing more is seen of a tcp backend: a connect is its success.
                upstream.succeeded();
                let (backend, guard) = upstream.into_tunnel();
                rec.backend = Some(guard.addr());
                Some(Plan { client, backend, to_backend: Bytes::new(), to_client: Bytes::new(), status: 0, guard })
            }
            Err(e) => {
                // Nothing to answer in a protocol we do not parse: close.
                rec.reason = match e {
                    ConnectError::NoBackends(_) => "no_endpoints",
                    ConnectError::AllFailed { .. } => "endpoint_failure",
                    ConnectError::ConnLimit { .. } => "backend_connection_limit",
                };
                tracing::warn!(listener = %self.listener, "tcp listener: {e}");
                None
            }
        }
    }

    /// Hands a connection pair to the data planes and waits for it to end.
    /// Only what the wait needs is kept across it (this future lives as
    /// long as the tunnel): the relay, the backend guard and the labels.
    async fn tunnel(&self, plan: Plan, rec: &mut AccessRecord) {
        let (tunnel, guard) = self.open_tunnel(plan, rec);
        let planes = &self.shared.planes;
        let m = metrics::get();
        let labels = |mode: Mode| TunnelLabels { listener: self.listener.to_string(), data_plane: mode.to_string() };
        m.tunnels_active.get_or_create(&labels(planes.mode())).inc();
        let (mode, outcome) = planes
            .relay(tunnel, |from, _why| {
                metrics::fallback(from);
                // The tunnel moves to the next plane of the chain, and so
                // does its place in tunnels_active.
                m.tunnels_active.get_or_create(&labels(from)).dec();
                let chain = planes.planes();
                if let Some(next) = chain.iter().position(|p| p.mode() == from).and_then(|i| chain.get(i + 1)) {
                    m.tunnels_active.get_or_create(&labels(next.mode())).inc();
                }
            })
            .await;
        m.tunnels_active.get_or_create(&labels(mode)).dec();
        // By the plane that carried the tunnel to its end, not the first tried.
        m.tunnels.get_or_create(&labels(mode)).inc();
        drop(guard);
        rec.data_plane = Some(mode);
        rec.to_backend += outcome.to_backend;
        rec.to_client += outcome.to_client;
        rec.reason = outcome.reason.as_str();
    }

    /// Builds what the data planes take (and counts the 101).
    fn open_tunnel(&self, plan: Plan, rec: &AccessRecord) -> (Tunnel, BackendGuard) {
        let Plan { client, backend, to_backend, to_client, status, guard } = plan;
        if status != 0 {
            metrics::outcome(&self.listener, status, "", rec.started.elapsed());
        }
        let tunnel = Tunnel {
            client,
            backend,
            to_backend,
            to_client,
            idle_timeout: self.shared.snapshot().config.limits.idle_timeout,
            drain: self.shared.drain.child_token(),
        };
        (tunnel, guard)
    }
}

/// Answers a connection over `[limits] max_connections` with 503 and closes
/// it, bounded in time.
pub async fn refuse_over_limit(mut stream: TcpStream) {
    let answer = Refusal::over_limit().render();
    if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&answer)).await {
        linger_close(&mut stream).await;
    }
}
