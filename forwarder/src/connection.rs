//! One accepted connection: its access-log record, the tcp-listener path,
//! and the hand-off of a connection pair to the data planes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::config::Protocol;
use crate::dataplane::{Mode, Tunnel};
use crate::metrics::{self, ListenerLabels, TunnelLabels};
use crate::server::Shared;
use crate::upstream::{BackendGuard, ConnectError};

/// What the access log says about a connection when it ends.
#[derive(Debug)]
pub struct AccessRecord {
    pub peer: SocketAddr,
    pub listener: Arc<str>,
    pub host: Option<String>,
    pub route: Option<Arc<str>>,
    pub backend: Option<SocketAddr>,
    /// The status answered (101 for tunnels); 0 when none was seen (tcp
    /// listeners, a backend that never answered).
    pub status: u16,
    pub data_plane: Option<Mode>,
    pub to_backend: u64,
    pub to_client: u64,
    pub started: Instant,
    pub reason: &'static str,
}

impl AccessRecord {
    pub fn new(peer: SocketAddr, listener: Arc<str>) -> AccessRecord {
        AccessRecord {
            peer,
            listener,
            host: None,
            route: None,
            backend: None,
            status: 0,
            data_plane: None,
            to_backend: 0,
            to_client: 0,
            started: Instant::now(),
            reason: "done",
        }
    }

    /// Writes the access-log line (target `upsplice::access`).
    pub fn log(&self) {
        tracing::info!(
            target: "upsplice::access",
            client = %self.peer,
            listener = %self.listener,
            host = self.host.as_deref().unwrap_or("-"),
            route = self.route.as_deref().unwrap_or("-"),
            backend = %self.backend.map(|b| b.to_string()).unwrap_or_else(|| "-".into()),
            status = self.status,
            data_plane = self.data_plane.map(Mode::as_str).unwrap_or("-"),
            bytes_to_backend = self.to_backend,
            bytes_to_client = self.to_client,
            duration_ms = self.started.elapsed().as_millis() as u64,
            close = self.reason,
        );
    }
}

/// A connection's view of the router: the shared state and its listener.
pub struct Session {
    pub shared: Arc<Shared>,
    pub listener: Arc<str>,
}

impl Session {
    /// Serves one accepted connection to its end and logs it.
    pub async fn serve(self, client: TcpStream, peer: SocketAddr, protocol: Protocol) {
        let labels = ListenerLabels { listener: self.listener.to_string() };
        metrics::get().active.get_or_create(&labels).inc();
        let mut rec = AccessRecord::new(peer, self.listener.clone());
        let _ = client.set_nodelay(true);
        match protocol {
            Protocol::Http => {
                // Boxed, so the handshake's state is freed before the tunnel
                // runs: only the (small) tunnel state stays for hours.
                let plan = Box::pin(crate::handshake::serve(client, peer, &self, &mut rec)).await;
                if let Some(plan) = plan {
                    self.tunnel(plan, &mut rec).await;
                }
            }
            Protocol::Tcp => {
                if let Some(plan) = Box::pin(self.connect_tcp(client, &mut rec)).await {
                    self.tunnel(plan, &mut rec).await;
                }
            }
        }
        metrics::get().active.get_or_create(&labels).dec();
        rec.log();
    }

    /// A tcp listener: connect to its pool; the pair is relayed without
    /// reading a byte.
    async fn connect_tcp(&self, client: TcpStream, rec: &mut AccessRecord) -> Option<Plan> {
        let snap = self.shared.snapshot();
        let pool_name = snap.listener(&self.listener).pool.clone().unwrap_or_default();
        let pool = snap.pool_named(&pool_name).expect("validated: tcp listener pools exist").clone();
        match pool.connect(snap.config.limits.connect_timeout).await {
            Ok((backend, guard)) => {
                rec.backend = Some(guard.addr());
                Some(Plan { client, backend, to_backend: Bytes::new(), to_client: Bytes::new(), status: 0, guard })
            }
            Err(e) => {
                // Nothing to answer in a protocol we do not parse: close.
                rec.reason = match e {
                    ConnectError::NoBackends(_) => "no_endpoints",
                    ConnectError::AllFailed { .. } => "endpoint_failure",
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
        let (tunnel, guard, labels) = self.open_tunnel(plan, rec);
        let (mode, outcome) = self.shared.planes.relay(tunnel).await;
        metrics::get().tunnels_active.get_or_create(&labels).dec();
        drop(guard);
        rec.data_plane = Some(mode);
        rec.to_backend += outcome.to_backend;
        rec.to_client += outcome.to_client;
        rec.reason = outcome.reason.as_str();
    }

    /// Counts a new tunnel and builds what the data planes take.
    fn open_tunnel(&self, plan: Plan, rec: &AccessRecord) -> (Tunnel, BackendGuard, TunnelLabels) {
        let Plan { client, backend, to_backend, to_client, status, guard } = plan;
        if status != 0 {
            metrics::outcome(&self.listener, status, "", rec.started.elapsed());
        }
        let labels =
            TunnelLabels { listener: self.listener.to_string(), data_plane: self.shared.planes.mode().to_string() };
        let m = metrics::get();
        m.tunnels.get_or_create(&labels).inc();
        m.tunnels_active.get_or_create(&labels).inc();
        let tunnel = Tunnel {
            client,
            backend,
            to_backend,
            to_client,
            idle_timeout: self.shared.snapshot().config.limits.idle_timeout,
            drain: self.shared.drain.child_token(),
        };
        (tunnel, guard, labels)
    }
}

/// A connection pair ready for a data plane, as the handshake leaves it.
pub struct Plan {
    pub client: TcpStream,
    pub backend: TcpStream,
    /// Bytes read from the client past its head.
    pub to_backend: Bytes,
    /// Bytes read from the backend past its response head.
    pub to_client: Bytes,
    /// The status the backend answered (101 for tunnels; 0 when not read).
    pub status: u16,
    /// Keeps the backend's active count up for least_conn.
    pub guard: BackendGuard,
}

/// Closes a connection after the router's own answer so that the answer is
/// not lost: shut the write side, then read and discard what the client
/// still sends (bounded in bytes and time) before the socket is dropped.
/// Dropping a socket with unread bytes sends RST, which can discard the
/// answer in flight.
pub async fn linger_close(client: &mut TcpStream) {
    let _ = client.shutdown().await;
    let drain = async {
        // On the heap: an array here would sit in every connection's future.
        let mut sink = vec![0u8; 4096];
        let mut total = 0usize;
        while total < 256 * 1024 {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}
