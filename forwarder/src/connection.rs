//! One accepted connection, from accept to its access-log line: the
//! PROXY header and TLS handshake (where the listener takes them), an http
//! listener's handshake or a tcp listener's connect (by the ClientHello's
//! SNI on a passthrough listener), then the hand-off of
//! the connection pair to the data planes (or, for TLS, the kTLS relay
//! where the kernel takes the session, the stream relay where not).

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::Either;
use futures_util::FutureExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::access::{AccessRecord, Text};
use crate::config::{Protocol, ProxyProtocol};
use crate::dataplane::stream::{Stream, StreamTunnel};
use crate::dataplane::{CloseReason, Legs, Mode, Relayed, Tunnel};
use crate::handshake::answer::{linger_close, Refusal};
use crate::handshake::{self, ClientStream, Next, Plan, TlsClient};
use crate::metrics::{self, ListenerLabels, TunnelLabels};
use crate::proxy;
use crate::sni;
use crate::socket::LocalAddr;
use crate::state::{ActiveGuard, Shared};
use crate::tls::ktls::Offload;
use crate::tls::records::Records;
use crate::tls::ClientCert;
use crate::upstream::{BackendStream, ConnectError, ConnectOpts, Pool};

/// A connection's view of the router: the shared state and its listener,
/// and what keeps it counted while it lives.
pub struct Session {
    pub shared: Arc<Shared>,
    pub listener: Arc<str>,
    /// Its place in `[limits] max_connections`.
    pub admitted: ActiveGuard,
}

/// The relay of a pair with a TLS side (boxed: the plain path's future
/// stays the planes' size).
type OtherRelay<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = Relayed> + Send + 'a>>;

/// A connection that became a tunnel: the pair and the request's record,
/// which is written when the tunnel ends (boxed: it moves from the
/// handshake to the tunnel's task, and an async fn keeps each argument
/// it was given for its whole life, so a record passed inline would be
/// kept twice).
struct Tunneling {
    plan: Plan<Client>,
    rec: Box<AccessRecord>,
}

impl Session {
    /// Serves one accepted connection to its end and logs it: an access
    /// record per request (http) or per connection (tcp).
    ///
    /// The handshake's task ends where a tunnel starts: the tunnel goes on
    /// in a task of its own that holds only what the tunnel needs, so an
    /// idle tunnel does not keep the largest handshake's state (the TLS
    /// accept, a ClientHello read, a request's rewrite) for hours.
    ///
    /// `tracker` is what the drain waits for: the tunnel's own task is
    /// tracked there too. Not a field: the tunnel's task does not need it,
    /// and 8 bytes less there keep its task a 256-byte allocation.
    pub async fn serve(self, client: TcpStream, peer: SocketAddr, protocol: Protocol, tracker: TaskTracker) {
        metrics::get().active.get_or_create(&self.listener_labels()).inc();
        // Boxed: this task's own future is then a pointer while it runs,
        // and the handshake's state is freed before the tunnel's task starts.
        match Box::pin(self.handshake(client, peer, protocol)).await {
            Some(tunneling) => {
                // The tracker keeps the drain waiting for the tunnel.
                tracker.spawn(self.tunnel(tunneling));
            }
            None => {
                metrics::get().active.get_or_create(&self.listener_labels()).dec();
            }
        }
    }

    fn listener_labels(&self) -> ListenerLabels {
        ListenerLabels { listener: self.listener.clone() }
    }

    /// Everything before the data: the PROXY header, TLS, then an http
    /// listener's requests or a tcp listener's connect. Some when the
    /// connection becomes a tunnel.
    async fn handshake(&self, mut client: TcpStream, peer: SocketAddr, protocol: Protocol) -> Option<Tunneling> {
        let limits = &self.shared.snapshot().config.limits;
        // Best effort on the client's side: its connection works without.
        let _ = crate::socket::for_relay(&client, limits.tcp_user_timeout);
        // The PROXY header and the TLS handshake share handshake_timeout.
        let deadline = Instant::now() + limits.handshake_timeout;
        let peer = self.client_address(&mut client, peer).await?;
        // The address the client connected to (a PROXY header sent on says
        // it), read only if one is sent.
        let local = LocalAddr::of(&client);
        let tls = self.shared.snapshot().listener_tls(&self.listener).cloned();
        match (tls, protocol) {
            (None, Protocol::Http) => self.serve_http(handshake::Conn::new(client, peer, local), peer).await,
            (None, Protocol::Tcp) if self.shared.snapshot().listener_sni(&self.listener).is_some() => {
                self.serve_sni(client, peer, local, deadline).await
            }
            (None, Protocol::Tcp) => self.serve_tcp(client, peer, local).await,
            (Some(config), protocol) => {
                let client = self.accept_tls(client, config, peer, deadline).await?;
                match protocol {
                    Protocol::Http => {
                        let cert = ClientCert::of(client.get_ref().1);
                        let conn = handshake::Conn::new(client, peer, local).with_client_cert(cert);
                        self.serve_http(conn, peer).await
                    }
                    Protocol::Tcp => self.serve_tcp(client, peer, local).await,
                }
            }
        }
    }

    /// A TLS listener's handshake, by `deadline`; None when it fails (the
    /// connection is closed and counted).
    async fn accept_tls(
        &self,
        client: TcpStream,
        config: Arc<rustls::ServerConfig>,
        peer: SocketAddr,
        deadline: Instant,
    ) -> Option<TlsClient> {
        let accept = tokio_rustls::TlsAcceptor::from(config).accept(Records::new(client));
        let reason = match tokio::time::timeout_at(deadline, accept).await {
            Ok(Ok(stream)) => return Some(Box::new(stream)),
            Ok(Err(e)) => {
                tracing::debug!(listener = %self.listener, %peer, "TLS handshake failed: {e}");
                tls_failure(&e)
            }
            Err(_) => {
                tracing::debug!(listener = %self.listener, %peer, "TLS handshake: handshake_timeout passed");
                "timeout"
            }
        };
        metrics::tls_error(&self.listener, reason);
        None
    }

    /// A tcp listener's connection: connected to its pool.
    async fn serve_tcp<S: Into<Client>>(&self, client: S, peer: SocketAddr, local: LocalAddr) -> Option<Tunneling> {
        let rec = AccessRecord::new(peer, self.listener.clone());
        let snap = self.shared.snapshot();
        let pool = snap.listener(&self.listener).pool.as_deref().and_then(|p| snap.pool_named(p)).cloned();
        drop(snap);
        match pool {
            Some(pool) => self.forward_tcp(client, pool, Bytes::new(), local, rec).await,
            // Only when a reload gave the listener sni_routes and no pool
            // since this connection was told apart.
            None => {
                self.no_route(rec);
                None
            }
        }
    }

    /// An SNI passthrough listener's connection: its ClientHello read by
    /// `deadline`, routed by its server name (the snapshot's table then),
    /// and forwarded still encrypted. A bad, slow or unroutable
    /// ClientHello closes the connection and is counted.
    ///
    /// The bytes read to find the name are handed to the tunnel as
    /// `to_backend`, which every plane writes to the backend first, exactly
    /// once (the conformance suite's pipelined bytes), after the PROXY
    /// header `send_proxy` puts on the connection. Reading them, rather
    /// than peeking with MSG_PEEK and leaving them for the kernel to move,
    /// costs one copy of at most 16 KiB per connection and avoids what a
    /// peek brings: readiness that stays set while the bytes sit in the
    /// queue (a spin, or SO_RCVLOWAT per record to dodge it) and a
    /// ClientHello over several records that a peek must reparse whole.
    async fn serve_sni(
        &self,
        mut client: TcpStream,
        peer: SocketAddr,
        local: LocalAddr,
        deadline: Instant,
    ) -> Option<Tunneling> {
        let hello = match tokio::time::timeout_at(deadline, sni::read_client_hello(&mut client)).await {
            Ok(Ok(hello)) => hello,
            Ok(Err(e)) => return self.sni_refused(peer, &e),
            Err(_) => return self.sni_refused(peer, &sni::HelloError::Timeout),
        };
        let mut rec = AccessRecord::new(peer, self.listener.clone());
        let snap = self.shared.snapshot();
        let name = match snap.listener_sni(&self.listener) {
            Some(table) => table.pool(hello.server_name.as_deref()).cloned(),
            // A reload took the listener's sni_routes away meanwhile.
            None => snap.listener(&self.listener).pool.as_deref().map(Arc::from),
        };
        let pool = name.as_deref().and_then(|p| snap.pool_named(p)).cloned();
        drop(snap);
        rec.texts.set_opt(Text::Host, hello.server_name.as_deref());
        rec.route = name;
        match pool {
            Some(pool) => self.forward_tcp(client, pool, hello.bytes, local, rec).await,
            None => {
                self.no_route(rec);
                None
            }
        }
    }

    /// Closes (by dropping) a passthrough connection whose ClientHello was refused.
    fn sni_refused(&self, peer: SocketAddr, e: &sni::HelloError) -> Option<Tunneling> {
        tracing::debug!(listener = %self.listener, %peer, "closed: {e}");
        metrics::sni_error(&self.listener, e.reason());
        None
    }

    /// Closes a passthrough connection whose server name no pool takes;
    /// counted, and logged with the name.
    fn no_route(&self, mut rec: AccessRecord) {
        let name = rec.texts.get(Text::Host).unwrap_or("-");
        tracing::debug!(listener = %self.listener, peer = %rec.peer, server_name = name, "closed: no pool takes it");
        metrics::sni_error(&self.listener, "no_route");
        rec.reason = "no_route";
        self.shared.access_log.write(&rec);
    }

    /// Connects `client` to `pool` for a tunnel, `first` going to the
    /// backend ahead of the client's stream; logs `rec` when it cannot.
    async fn forward_tcp<S: Into<Client>>(
        &self,
        client: S,
        pool: Arc<Pool>,
        first: Bytes,
        local: LocalAddr,
        mut rec: AccessRecord,
    ) -> Option<Tunneling> {
        match Box::pin(self.connect_tcp(client, pool, first, local, &mut rec)).await {
            Some(plan) => Some(Tunneling { plan: plan.into_client(), rec: Box::new(rec) }),
            None => {
                self.shared.access_log.write(&rec);
                None
            }
        }
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
    async fn serve_http<S: ClientStream + Into<Client>>(
        &self,
        mut conn: handshake::Conn<S>,
        peer: SocketAddr,
    ) -> Option<Tunneling> {
        loop {
            let mut rec = AccessRecord::new(peer, self.listener.clone());
            // Boxed: one request's state at a time, freed after it.
            let snap = self.shared.snapshot();
            let next = Box::pin(conn.serve(snap, &self.listener, &self.shared.draining, &mut rec)).await;
            let kept = match next {
                Next::Again(kept) => kept,
                Next::Tunnel(plan) => return Some(Tunneling { plan: plan.into_client(), rec: Box::new(rec) }),
                Next::Done => {
                    self.shared.access_log.write(&rec);
                    return None;
                }
                Next::Idle => return None,
            };
            self.shared.access_log.write(&rec);
            conn = kept;
        }
    }

    /// A tcp listener: connect to `pool` (of the snapshot that chose it);
    /// the pair is relayed without reading a byte more (`to_backend`: those
    /// already read).
    async fn connect_tcp<S>(
        &self,
        client: S,
        pool: Arc<Pool>,
        to_backend: Bytes,
        local: LocalAddr,
        rec: &mut AccessRecord,
    ) -> Option<Plan<S>> {
        let limits = &self.shared.snapshot().config.limits;
        let opts = ConnectOpts {
            timeout: limits.connect_timeout,
            user_timeout: limits.tcp_user_timeout,
            reuse: false,
            client: Some((rec.peer, local)),
            only: None,
        };
        match pool.connect(opts).await {
            Ok(upstream) => {
                // Nothing more is seen of a tcp backend: a connect is its success.
                upstream.succeeded();
                let (backend, guard) = upstream.into_tunnel();
                rec.backend = Some(guard.addr());
                Some(Plan { client, backend, to_backend, to_client: Bytes::new(), status: 0, guard })
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

    /// A tunnel's task: hands the pair to a data plane and waits for it to
    /// end (a plain pair to the planes, one with a TLS side to the stream
    /// relay), then writes its access record and releases the connection's
    /// counts. This future lives as long as the tunnel, so it is one
    /// function (an async fn keeps its arguments for its whole life: a
    /// function per step would keep the pair once per step) and keeps
    /// only what the wait needs across it: the relay, the backend guard
    /// and the labels.
    ///
    /// Not an `async fn`: a coroutine keeps room for each of its arguments
    /// for its whole life, even once moved out, so the handshake's `Plan`
    /// was kept beside its own parts (a 488 B future, a 768 B task). The
    /// arguments are taken apart here and the async block keeps each part
    /// once, the pair boxed, and awaits no relay inside a match (136 B, a
    /// 256 B task: see the test below).
    fn tunnel(self, tunneling: Tunneling) -> impl std::future::Future<Output = ()> + Send {
        let Tunneling { plan, mut rec } = tunneling;
        // The record stays for the tunnel's life: no spare room in it.
        rec.texts.shrink();
        let Plan { client, backend, to_backend, to_client, status, guard } = plan;
        if status != 0 {
            metrics::outcome(&self.listener, status, "", rec.started.elapsed());
        }
        // Boxed: an async block keeps room for what it captured for its
        // whole life, even once moved out, and the pair and its leftovers
        // (128 B) move into the relay at once. The box goes when they do.
        let pair = Box::new((client, backend, to_backend, to_client));
        async move {
            // Moved into a block's own binding, so that the box is freed
            // here (moving out of the captured one would free it last).
            let (client, backend, to_backend, to_client) = {
                let pair = pair;
                *pair
            };
            let idle_timeout = self.shared.snapshot().config.limits.idle_timeout;
            // The node's token itself, not a child: nothing cancels one tunnel
            // alone, and a child is a tree node (~120 B) kept for the tunnel's life.
            let drain = self.shared.drain.clone();
            // The match only makes the relay's future; it is awaited after
            // the match: rustc (1.95) keeps a match's scrutinee, here the
            // pair (72 B), across an await inside an arm. Matched without
            // a guard for the same reason.
            let ktls = self.shared.planes.ktls.is_some();
            let relaying = match (client, backend, ktls) {
                (Client::Plain(client), BackendStream::Plain(backend), _) => {
                    let tunnel = Tunnel { client, backend, to_backend, to_client, idle_timeout, drain, promote: None };
                    Either::Left(self.relay_planes(tunnel))
                }
                // Boxed: the plain path's future stays the planes' size.
                (Client::Plain(client), BackendStream::Tls(backend), _) => {
                    let tunnel = StreamTunnel { client, backend, to_backend, to_client, idle_timeout, drain };
                    Either::Right(Box::pin(self.relay_stream(tunnel)) as OtherRelay<'_>)
                }
                (Client::Tls(client), BackendStream::Plain(backend), true) => {
                    let tunnel = StreamTunnel { client, backend, to_backend, to_client, idle_timeout, drain };
                    Either::Right(Box::pin(self.relay_ktls(tunnel)) as OtherRelay<'_>)
                }
                (Client::Tls(client), backend, _) => {
                    let tunnel = StreamTunnel { client, backend, to_backend, to_client, idle_timeout, drain };
                    Either::Right(Box::pin(self.relay_stream(tunnel)) as OtherRelay<'_>)
                }
            };
            let Relayed { mode, outcome, legs } = relaying.await;
            rec.planes = legs;
            // By the plane that carried the tunnel to its end, not the first tried.
            metrics::get().tunnels.get_or_create(&self.labels(mode)).inc();
            drop(guard);
            rec.data_plane = Some(mode);
            rec.to_backend += outcome.to_backend;
            rec.to_client += outcome.to_client;
            rec.reason = outcome.reason.as_str();
            self.shared.access_log.write(&rec);
            metrics::get().active.get_or_create(&self.listener_labels()).dec();
        }
    }

    /// Relays a plain pair through the data planes, counted in
    /// `tunnels_active` on the plane it is on. Not an `async fn`: its
    /// future is the planes' own (56 B) and a closure, not the tunnel kept
    /// beside them.
    fn relay_planes(&self, tunnel: Tunnel) -> impl std::future::Future<Output = Relayed> + Send + '_ {
        let planes = &self.shared.planes;
        metrics::get().tunnels_active.get_or_create(&self.labels(planes.mode())).inc();
        let relaying = planes.relay(tunnel, |moved| {
            metrics::moved(moved);
            // The tunnel's place in tunnels_active moves with it.
            let m = metrics::get();
            m.tunnels_active.get_or_create(&self.labels(moved.from)).dec();
            m.tunnels_active.get_or_create(&self.labels(moved.to)).inc();
        });
        relaying.map(|relayed| {
            metrics::get().tunnels_active.get_or_create(&self.labels(relayed.mode)).dec();
            relayed
        })
    }

    /// Relays a pair with a TLS side (decrypted in userspace) on the stream relay.
    async fn relay_stream<C: Stream, B: Stream>(&self, tunnel: StreamTunnel<C, B>) -> Relayed {
        let m = metrics::get();
        m.tunnels_active.get_or_create(&self.labels(Mode::Tls)).inc();
        let outcome = self.shared.planes.stream.relay(tunnel).await;
        m.tunnels_active.get_or_create(&self.labels(Mode::Tls)).dec();
        Relayed { mode: Mode::Tls, outcome, legs: Legs::default() }
    }

    /// Offers a TLS client's session to the kernel (kTLS) and relays the
    /// pair on the kTLS relay; on the userspace relay when the handoff
    /// cannot be made exactly (`tls::ktls`).
    async fn relay_ktls(&self, tunnel: StreamTunnel<TlsClient, TcpStream>) -> Relayed {
        let relay = self.shared.planes.ktls.as_ref().expect("checked by the caller");
        let StreamTunnel { client, backend, to_backend, to_client, idle_timeout, drain } = tunnel;
        let first = |plaintext: Bytes| {
            if plaintext.is_empty() {
                to_backend.clone()
            } else {
                [to_backend.clone(), plaintext].concat().into()
            }
        };
        match crate::tls::ktls::offload(client, relay) {
            Offload::Kernel { socket, plaintext, cipher } => {
                metrics::ktls_handoff(&self.listener, "offloaded");
                tracing::debug!(listener = %self.listener, cipher = cipher.name(), "TLS tunnel handed to the kernel (kTLS)");
                let tunnel = Tunnel {
                    client: socket,
                    backend,
                    to_backend: first(plaintext),
                    to_client,
                    idle_timeout,
                    drain,
                    promote: None,
                };
                let m = metrics::get();
                m.tunnels_active.get_or_create(&self.labels(Mode::Ktls)).inc();
                let outcome = relay.relay(tunnel).await;
                m.tunnels_active.get_or_create(&self.labels(Mode::Ktls)).dec();
                Relayed { mode: Mode::Ktls, outcome, legs: Legs::default() }
            }
            Offload::Userspace { stream, plaintext, why } => {
                metrics::ktls_handoff(&self.listener, why);
                tracing::debug!(listener = %self.listener, "TLS tunnel stays on the userspace relay: {why}");
                let to_backend = first(plaintext);
                self.relay_stream(StreamTunnel { client: stream, backend, to_backend, to_client, idle_timeout, drain })
                    .await
            }
            Offload::Failed { socket, why } => {
                metrics::ktls_handoff(&self.listener, "failed");
                tracing::warn!(listener = %self.listener, "TLS tunnel reset: kTLS handoff failed: {why}");
                crate::dataplane::abort(socket.as_raw_fd());
                crate::dataplane::abort(backend.as_raw_fd());
                let outcome = crate::dataplane::Outcome { to_backend: 0, to_client: 0, reason: CloseReason::Error };
                Relayed { mode: Mode::Ktls, outcome, legs: Legs::default() }
            }
        }
    }

    fn labels(&self, mode: Mode) -> TunnelLabels {
        TunnelLabels { listener: self.listener.clone(), data_plane: mode.as_str() }
    }
}

/// A client connection as a tunnel takes it: a plain socket goes to the
/// data planes (unless its backend is TLS), a TLS stream (decrypted in
/// userspace) to the stream relay.
pub enum Client {
    Plain(TcpStream),
    Tls(TlsClient),
}

impl From<TcpStream> for Client {
    fn from(s: TcpStream) -> Client {
        Client::Plain(s)
    }
}

impl From<TlsClient> for Client {
    fn from(s: TlsClient) -> Client {
        Client::Tls(s)
    }
}

impl<S: Into<Client>> Plan<S> {
    /// The plan with its client as a tunnel takes it.
    fn into_client(self) -> Plan<Client> {
        let Plan { client, backend, to_backend, to_client, status, guard } = self;
        Plan { client: client.into(), backend, to_backend, to_client, status, guard }
    }
}

/// The `reason` label of a failed TLS handshake.
fn tls_failure(e: &std::io::Error) -> &'static str {
    use rustls::Error as E;
    match e.get_ref().and_then(|inner| inner.downcast_ref::<E>()) {
        Some(E::InvalidMessage(_) | E::InappropriateHandshakeMessage { .. } | E::InappropriateMessage { .. }) => {
            "bad_message"
        }
        Some(E::NoApplicationProtocol) => "no_application_protocol",
        Some(E::PeerIncompatible(_)) => "incompatible",
        Some(E::NoCertificatesPresented) => "no_client_certificate",
        Some(E::InvalidCertificate(_)) => "bad_client_certificate",
        Some(E::AlertReceived(_)) => "alert_received",
        Some(_) => "other",
        None if e.kind() == std::io::ErrorKind::UnexpectedEof => "closed",
        None => "io",
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The tunnel's future lives in its task for the tunnel's whole life.
    /// tokio allocates a task as one cell aligned to 128 bytes: header
    /// (32), scheduler and id (16), the future in its stage (tracked: + 8
    /// for the tracker's token, + 8 for the stage's tag) and trailer (48).
    /// Up to 144 bytes of future the cell is 256 bytes; the future was 200
    /// (rustc 1.95) and its cell 384, for every tunnel on every plane.
    /// Measured by type: making one needs a router.
    #[test]
    fn a_tunnel_s_task_is_a_256_byte_cell() {
        fn size<F: std::future::Future>(_tunnel: impl FnOnce(Session, Tunneling) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let size = size(Session::tunnel);
        assert!(size <= 144, "the tunnel's future is {size} bytes: its task would be a 384-byte cell");
    }
}
