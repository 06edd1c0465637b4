//! The control plane of an http listener: one client connection's
//! requests, each from the bytes on the socket to an answer, or to a
//! tunnel handed to a data plane.
//!
//! ```text
//! wait for a request (keepalive_timeout between requests; the drain ends it)
//!   → read head (bounded, timed) → rewrite (XFF/XFP, hop-by-hop, h2c) → route
//!   → connect backend (timeout, failover) → forward head
//!   → relay the request body (framed, nothing past it) while reading the
//!     backend's head (response_timeout)
//!   → upgrade: 101 → tunnel (with what followed the request), else relay
//!     that response
//!   → plain:   relay the response, framed by its own length or chunks
//!   → keep-alive: the next request is read from what followed this one,
//!     parsed, routed and rewritten on its own; else `Connection: close`
//! ```

pub mod answer;
pub mod body;
pub mod framing;
pub mod h2;
pub mod head;
pub mod rewrite;
pub mod route_service;
pub mod stream;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::access::{AccessRecord, Lap, Proto, Text};
use crate::socket::LocalAddr;
use crate::state::Snapshot;
use crate::tls::client::Failure;
use crate::tls::ClientCert;
use crate::upstream::{BackendGuard, BackendStream, ConnectError, ConnectOpts};
use answer::{linger_close, Refusal};
use body::BodyError;
use framing::Framing;
use head::{HeadError, ReadError};
use rewrite::{Body, ClientInfo};
use stream::write_flushed;
pub use stream::{ClientStream, TlsClient};

/// Backend response heads may be larger than requests (cookies); this much
/// is always allowed.
const MIN_RESPONSE_HEAD: usize = 64 * 1024;

/// A client's read buffer at most this large is kept for its next request
/// (a tunnel drops it with the connection); a larger one, grown by a large
/// head, is freed once the head is parsed.
const KEPT_READ_BUFFER: usize = 4096;

/// A connection pair ready for a data plane, as the handshake leaves it.
pub struct Plan<S = TcpStream> {
    pub client: S,
    pub backend: BackendStream,
    /// Bytes read from the client past its head.
    pub to_backend: Bytes,
    /// Bytes read from the backend past its response head.
    pub to_client: Bytes,
    /// The status the backend answered (101 for tunnels; 0 when not read).
    pub status: u16,
    /// Keeps the backend's active count up for least_conn.
    pub guard: BackendGuard,
}

/// A client connection of an http listener, between two requests.
pub struct Conn<S> {
    client: S,
    /// The client's address (the PROXY header's, if the listener takes one).
    peer: SocketAddr,
    /// The address the client connected to (for a PROXY header sent on).
    local: LocalAddr,
    /// What the client sent past its last request (pipelined requests):
    /// the start of the next one.
    buf: BytesMut,
    /// Requests answered on this connection so far.
    served: usize,
    /// The certificate the client presented (an mTLS connection).
    client_cert: Option<ClientCert>,
}

/// How one request on a connection ended.
pub enum Next<S> {
    /// Answered; the connection stays open for the next request.
    Again(Conn<S>),
    /// Upgraded: the pair goes to a data plane.
    Tunnel(Plan<S>),
    /// Answered, refused or gone: the connection is closed (the record
    /// says how).
    Done,
    /// No request came (the client closed, `keepalive_timeout` passed, or
    /// the drain started) on a connection that had served one: closed,
    /// with nothing to record.
    Idle,
}

/// Why a handshake ends without a tunnel and without keeping the
/// connection; answered in one place (`Stop::answer`).
#[derive(Debug)]
pub enum Stop {
    /// Nothing final reached the client: the router answers this and closes.
    Refuse(Refusal),
    /// A side failed or left midway; nothing more can be said. The access
    /// log's close reason.
    Gone(&'static str),
}

impl From<Refusal> for Stop {
    fn from(refusal: Refusal) -> Stop {
        Stop::Refuse(refusal)
    }
}

/// How a request that was not refused ended.
enum Outcome {
    /// The backend agreed to an upgrade: everything of a [`Plan`] but the
    /// client.
    Upgraded(Agreed),
    /// The backend's final response was relayed whole; `keep_alive` when
    /// it said the connection stays open.
    Answered { keep_alive: bool },
}

struct Agreed {
    backend: BackendStream,
    to_backend: Bytes,
    to_client: Bytes,
    status: u16,
    guard: BackendGuard,
}

impl<S: ClientStream> Conn<S> {
    pub fn new(client: S, peer: SocketAddr, local: LocalAddr) -> Conn<S> {
        Conn { client, peer, local, buf: BytesMut::new(), served: 0, client_cert: None }
    }

    /// The connection is mTLS: the client presented `cert`.
    pub fn with_client_cert(self, cert: Option<ClientCert>) -> Conn<S> {
        Conn { client_cert: cert, ..self }
    }

    /// Serves the connection's next request to its end. `snap` is the
    /// configuration in force when the request started; it is released
    /// before a tunnel's pair is returned. `draining` ends the wait for a
    /// next request and the keep-alive of the one in flight.
    pub async fn serve(
        mut self,
        snap: Arc<Snapshot>,
        listener: &str,
        draining: &CancellationToken,
        rec: &mut AccessRecord,
    ) -> Next<S> {
        if self.served > 0 {
            if !self.await_request(snap.config.limits.keepalive_timeout, draining).await {
                return Next::Idle;
            }
            // The record's clock starts with the request, not the connection.
            rec.restart();
        }
        let started = Instant::now();
        let keep_alive_allowed = self.served + 1 < snap.config.limits.max_requests_per_connection;
        let ctx = Context {
            peer: self.peer,
            local: self.local,
            snap: &snap,
            listener,
            draining,
            keep_alive_allowed,
            client_cert: self.client_cert.as_ref(),
        };
        let outcome = ctx.request(&mut self.client, &mut self.buf, rec).await;
        // Nothing of the handshake stays allocated for the tunnel's life.
        drop(snap);
        match outcome {
            Ok(Outcome::Upgraded(Agreed { backend, to_backend, to_client, status, guard })) => {
                Next::Tunnel(Plan { client: self.client, backend, to_backend, to_client, status, guard })
            }
            Ok(Outcome::Answered { keep_alive: true }) => {
                self.served += 1;
                Next::Again(self)
            }
            Ok(Outcome::Answered { keep_alive: false }) => {
                // Whatever the client sent after this request is read and
                // discarded, never relayed.
                linger_close(&mut self.client).await;
                Next::Done
            }
            Err(stop) => {
                stop.answer(&mut self.client, listener, rec, started).await;
                Next::Done
            }
        }
    }

    /// Waits for the first byte of a next request (unless a pipelined one
    /// is buffered already): false when the client closes, `idle` passes
    /// or the drain starts first.
    async fn await_request(&mut self, idle: Duration, draining: &CancellationToken) -> bool {
        if !self.buf.is_empty() {
            return true;
        }
        self.buf.reserve(2048);
        let read = tokio::select! {
            r = tokio::time::timeout(idle, self.client.read_buf(&mut self.buf)) => r,
            _ = draining.cancelled() => return false,
        };
        matches!(read, Ok(Ok(n)) if n > 0)
    }
}

/// What one request is served with.
struct Context<'a> {
    peer: SocketAddr,
    local: LocalAddr,
    snap: &'a Snapshot,
    listener: &'a str,
    draining: &'a CancellationToken,
    /// False for the last request `max_requests_per_connection` allows.
    keep_alive_allowed: bool,
    client_cert: Option<&'a ClientCert>,
}

impl Context<'_> {
    /// One request, from its head (the start of which may be in `buf`)
    /// to a relayed response or a 101 whose head was written to the
    /// client; any other end is a [`Stop`]. What the client sent past the
    /// request is left in `buf`.
    async fn request<S: ClientStream>(
        &self,
        client: &mut S,
        buf: &mut BytesMut,
        rec: &mut AccessRecord,
    ) -> Result<Outcome, Stop> {
        let Context { peer, snap, listener, .. } = *self;
        let limits = &snap.config.limits;
        let started = Instant::now();
        let read = head::read_head(client, buf, limits.max_header_bytes, limits.handshake_timeout, |b, max| {
            head::parse_request_with(b, max, limits.max_headers)
        })
        .await;
        let request = match read {
            Ok(request) => request,
            Err(ReadError::Head(HeadError::Http2Preface)) => {
                // Refused in HTTP/2, on the stream the client opens.
                let stream = h2::first_stream(client, buf, limits.max_header_bytes, limits.handshake_timeout).await;
                return Err(Refusal::http2_unsupported(stream).into());
            }
            Err(e) => return Err(request_head_failed(e)),
        };
        // Copied out so the head buffer is not shared: a Bytes view would keep
        // the whole read buffer alive for the tunnel's life. A small buffer
        // stays for the next request, without its bytes.
        let leftover = Bytes::copy_from_slice(&buf[request.head_len..]);
        match buf.capacity() <= KEPT_READ_BUFFER {
            true => buf.clear(),
            false => *buf = BytesMut::new(),
        }

        rec.texts.set(Text::Method, request.method());
        rec.texts.set(Text::Target, request.target());
        rec.proto = Some(if request.version == 0 { Proto::Http10 } else { Proto::Http11 });
        let header = |name| head::values(&request.headers, name).next().map(String::from_utf8_lossy);
        rec.texts.set_opt(Text::UserAgent, header("user-agent").as_deref());
        rec.texts.set_opt(Text::Referer, header("referer").as_deref());

        let settings = snap.listener(listener);
        let mut request_id = uuid::Uuid::encode_buffer();
        let client_info = ClientInfo {
            request_id: uuid::Uuid::new_v4().hyphenated().encode_lower(&mut request_id),
            peer: peer.ip(),
            trusted: settings.trusted_cidrs.iter().any(|net| net.contains(&peer.ip())),
            forwarded_proto: settings.forwarded_proto(),
            now_ms: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0),
            forwarded_client_cert: settings.forwarded_client_cert(),
            client_cert: self.client_cert.map(|c| &c.0[..]),
        };
        // A plain HTTP/1.1 request's backend connection may serve another
        // request after it (HTTP/1.0 backends close after each).
        let is_upgrade_request = head::tokens(&request.headers, "upgrade").next().is_some();
        let keep_backend = snap.config.backends.max_idle_per_backend > 0 && request.version >= 1 && !is_upgrade_request;
        let mut fwd = rewrite::rewrite(&request, &client_info, keep_backend)?;
        // The log's copies are the rewrite's own (the host is routed by below).
        rec.texts.set(Text::Host, &fwd.host);
        rec.texts.set(Text::XForwardedFor, &fwd.x_forwarded_for);
        rec.texts.set(Text::XForwardedProto, &fwd.x_forwarded_proto);
        rec.texts.set(Text::RequestId, &fwd.request_id);
        if let (Body::Length(n), Some(max)) = (fwd.body, limits.max_request_body) {
            if n > max {
                return Err(Refusal::body_too_large(max).into());
            }
        }
        let route = snap.router.lookup(&fwd.host, &fwd.path).ok_or_else(|| Refusal::unknown_route(&fwd.host))?;
        rec.route = Some(route.name.clone());
        let instance = match header("x-cf-app-instance").filter(|v| !v.is_empty()) {
            None => None,
            Some(value) => Some(app_instance(&route.pool, &fwd.host, &value)?),
        };
        let mut pool = &route.pool;
        let service;
        if let Some(url) = &route.route_service {
            // Nothing reaches the app around its route service (often its
            // authentication), whatever the kind of request.
            let rs = &snap.config.route_services;
            let decide = route_service::Decide {
                keys: snap.route_services.as_deref().map(|r| &r.keys),
                timeout: rs.timeout,
                websockets: rs.websockets,
                router: &snap.router,
            };
            let scheme = match rs.recommend_https {
                true => "https",
                false => rec.texts.get(Text::XForwardedProto).unwrap_or_default(),
            };
            let forwarded_url = || fwd.forwarded_url(scheme);
            let now = time::OffsetDateTime::now_utc();
            match decide.leg(route, url, &request.headers, fwd.upgrade.is_some(), forwarded_url, now)? {
                route_service::Leg::App => fwd.strip_route_service_headers(),
                route_service::Leg::Service { url, forwarded_url, sealed } => {
                    let services = &snap.route_services.as_ref().expect("a service leg has route services").services;
                    service = services.get(&url).await.map_err(|e| Refusal::endpoint_failure(e.to_string()))?;
                    fwd.to_route_service(&service.target, &service.host, &forwarded_url, &sealed);
                    rec.texts.set(Text::RouteService, &url);
                    pool = &service.pool;
                }
            }
        }
        // The request body (if any) goes to the backend while its answer is
        // read: a backend may answer before the whole body (an early 413), or
        // only after it. Nothing past the body is sent before the answer.
        let upgrade = fwd.upgrade.is_some();
        let exchange = Exchange {
            upgrade,
            method: request.method(),
            client_version: request.version,
            keep_alive: self.keep_alive_allowed && wants_keep_alive(&request),
            draining: self.draining,
            max_head: limits.max_header_bytes.max(MIN_RESPONSE_HEAD),
            response_timeout: if upgrade { limits.handshake_timeout } else { limits.response_timeout },
            idle: limits.idle_timeout,
            max_body: limits.max_request_body,
            keep_backend,
            listener,
            started,
        };
        // A request with no body that may be sent twice is retried when its
        // backend connection closed or reset before any response byte: a
        // reused one that turned out closed (the backend closed it while
        // idle) is not the backend's failure, a new one is (passive health;
        // the next attempt goes to the next backend) — up to MAX_ATTEMPTS in
        // all, never after response_timeout or a broken response (the
        // backend may have acted on the request).
        let retryable = fwd.body == Body::None && is_idempotent(request.method());
        // The instance asked for is the app's: a route service's leg goes
        // to its own pool.
        let only = instance.filter(|_| std::ptr::eq(pool, &route.pool));
        let mut attempt = 0;
        let (upstream, exchanged) = loop {
            attempt += 1;
            let opts = ConnectOpts {
                timeout: limits.connect_timeout,
                user_timeout: limits.tcp_user_timeout,
                reuse: keep_backend && attempt == 1,
                client: Some((peer, self.local)),
                only,
            };
            let mut upstream = pool.connect(opts).await.map_err(|e| match e {
                ConnectError::NoBackends(_) => Refusal::no_endpoints(&fwd.host),
                ConnectError::ConnLimit { .. } => Refusal::connection_limit(&fwd.host),
                ConnectError::AllFailed { tls: Some(failure), .. } => Refusal::backend_tls(failure, e.to_string()),
                e => Refusal::endpoint_failure(e.to_string()),
            })?;
            rec.backend = Some(upstream.addr());
            // The access log names the app instance of the last attempt's backend.
            rec.instance = upstream.instance().cloned();
            // Each attempt's head tells its own backend's app instance.
            let head = fwd.head_to(upstream.instance().map(|i| &**i), upstream.addr());
            // Flushed: a TLS backend's stream may keep what it took (see
            // `stream::write_flushed`).
            let failure = match write_flushed(&mut upstream.stream, &head).await {
                Err(e) => ReadError::Io(e),
                Ok(()) => {
                    rec.to_backend += head.len() as u64;
                    rec.forwarded = Some(Lap::of(rec.started.elapsed()));
                    match exchange.run(client, &mut upstream.stream, &leftover, fwd.body, rec).await? {
                        Exchanged::NoResponse(e) => e,
                        Exchanged::Final(last) => break (upstream, last),
                    }
                }
            };
            // The connection failed (closed, reset): the request may go again.
            // A timeout or a broken response is no connection failure: the
            // backend may have acted on the request.
            let connection_failed = matches!(failure, ReadError::Closed(_) | ReadError::Io(_));
            let idle_close = upstream.reused && connection_failed;
            if idle_close {
                tracing::debug!(backend = %upstream.addr(), "a reused connection gave no response: {failure}");
            } else {
                upstream.failed(&failure.to_string());
            }
            if !(retryable && connection_failed && attempt < MAX_ATTEMPTS && rec.to_client == 0) {
                return Err(match failure {
                    ReadError::Timeout(t) => Refusal::endpoint_timeout(t),
                    // TLS 1.3: a backend refuses the router's client
                    // certificate after the handshake, on the first read.
                    ReadError::Io(e) => match Failure::of_alert(&e) {
                        Some(refused) => Refusal::backend_tls(refused, format!("backend response: {e}")),
                        None => Refusal::endpoint_failure(format!("backend response: read failed: {e}")),
                    },
                    e => Refusal::endpoint_failure(format!("backend response: {e}")),
                }
                .into());
            }
        };
        upstream.succeeded();
        let (response, rbuf, after) = match exchanged {
            Final::Switched { response, rbuf, after } => (response, rbuf, after),
            Final::Answered { keep_alive, after, reusable } => {
                if reusable {
                    upstream.release();
                }
                // The next request starts with what followed this one.
                buf.extend_from_slice(&after);
                return Ok(Outcome::Answered { keep_alive });
            }
        };
        let (backend, guard) = upstream.into_tunnel();
        // 101: the head goes out now; what came after it on either side is
        // delivered first by the data plane, in order.
        let to_client = Bytes::copy_from_slice(&rbuf[response.head_len..]);
        if let Err(e) = write_flushed(client, &rbuf[..response.head_len]).await {
            tracing::debug!("writing the response head to the client: {e}");
            return Err(Stop::Gone("client_error"));
        }
        rec.to_client += response.head_len as u64;
        rec.upgraded = Some(Lap::of(rec.started.elapsed()));
        Ok(Outcome::Upgraded(Agreed { backend, to_backend: after, to_client, status: response.status, guard }))
    }
}

/// Attempts at a request in all (gorouter's `backends.max_attempts`).
const MAX_ATTEMPTS: u32 = 3;

/// gorouter's `X-CF-APP-INSTANCE: APP_GUID:APP_INDEX`: the backend of
/// `pool` registered as that instance, or gorouter's 400 (a value that is
/// not two non-empty parts around one `:`, or an instance the route does
/// not have).
fn app_instance(pool: &crate::upstream::Pool, host: &str, value: &str) -> Result<usize, Refusal> {
    let (app_id, index) = parse_app_instance(value).ok_or_else(Refusal::invalid_app_instance_header)?;
    pool.find_instance(app_id, index).ok_or_else(|| Refusal::unknown_app_instance(host, app_id, index))
}

/// `APP_GUID:APP_INDEX`, both non-empty, one `:` (as gorouter splits it).
fn parse_app_instance(value: &str) -> Option<(&str, &str)> {
    let (app_id, index) = value.split_once(':')?;
    (!app_id.is_empty() && !index.is_empty() && !index.contains(':')).then_some((app_id, index))
}

/// Methods a request may be sent twice with (RFC 9110 §9.2.2).
fn is_idempotent(method: &str) -> bool {
    ["GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"].iter().any(|m| method.eq_ignore_ascii_case(m))
}

/// Whether the client asked to keep its connection: HTTP/1.1 unless it
/// said `Connection: close`; HTTP/1.0 only with `Connection: keep-alive`.
fn wants_keep_alive(req: &head::Request) -> bool {
    let has = |token: &[u8]| head::tokens(&req.headers, "connection").any(|t| t.eq_ignore_ascii_case(token));
    !has(b"close") && (req.version >= 1 || has(b"keep-alive"))
}

/// The answer to a request head that could not be read.
fn request_head_failed(e: ReadError) -> Stop {
    match e {
        ReadError::Head(HeadError::TooLarge(max)) => Refusal::too_large(max).into(),
        ReadError::Head(HeadError::TooManyHeaders(max)) => Refusal::too_many_headers(max).into(),
        ReadError::Head(HeadError::Http2Preface) => Refusal::http2_unsupported(None).into(),
        ReadError::Head(HeadError::TlsHandshake) => Refusal::tls_unsupported().into(),
        ReadError::Head(HeadError::Malformed(m)) => {
            Refusal::bad_request(format!("malformed request head ({m})")).into()
        }
        ReadError::Timeout(_) => Refusal::timeout().into(),
        ReadError::Closed(0) => Stop::Gone("client_closed"),
        ReadError::Closed(_) | ReadError::Io(_) => Stop::Gone("client_error"),
    }
}

impl Stop {
    /// Ends the connection as this stop says, and records it: the router's
    /// own answer is written and counted (it says `Connection: close`),
    /// then the connection lingers so that the answer is not lost to a
    /// reset.
    async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
        self,
        client: &mut S,
        listener: &str,
        rec: &mut AccessRecord,
        started: Instant,
    ) {
        match self {
            Stop::Gone(reason) => rec.reason = reason,
            Stop::Refuse(refusal) => {
                if refusal.detail.is_some() {
                    // A backend failed: the operator needs to know which and why.
                    tracing::warn!(listener, host = rec.texts.get(Text::Host).unwrap_or("-"), "refused: {refusal}");
                } else {
                    tracing::debug!(listener, "refused: {refusal}");
                }
                let bytes = refusal.render();
                rec.status = refusal.status;
                rec.reason = refusal.reason;
                rec.router_error = refusal.cf_error;
                // Counted before the answer goes out: the client may act on it at once.
                crate::metrics::outcome(
                    listener,
                    refusal.status,
                    refusal.cf_error.unwrap_or(refusal.reason),
                    started.elapsed(),
                );
                if client.write_all(&bytes).await.is_ok() {
                    rec.to_client += bytes.len() as u64;
                    linger_close(client).await;
                }
            }
        }
    }
}

/// How an exchange with the backend ended, short of a [`Stop`].
enum Exchanged {
    /// The backend's last word on the request.
    Final(Final),
    /// No response head from the backend, and nothing of this request
    /// reached the client but informational answers: the caller may retry
    /// or answer.
    NoResponse(ReadError),
}

/// A backend's final answer to a request.
enum Final {
    /// A 101: its head (in `rbuf`) is still to be written.
    Switched { response: head::Response, rbuf: BytesMut, after: Bytes },
    /// A final response relayed whole; `keep_alive` when its head told the
    /// client the connection stays open; `reusable` when the backend
    /// connection may carry another request.
    Answered { keep_alive: bool, after: Bytes, reusable: bool },
}

/// One request's exchange with its backend, after its head was forwarded.
struct Exchange<'a> {
    upgrade: bool,
    method: &'a str,
    /// The client's HTTP minor version (a 1.0 client is told `keep-alive`).
    client_version: u8,
    /// The client and the configuration allow keeping the connection; the
    /// response decides (framing, drain, a body not read to its end).
    keep_alive: bool,
    draining: &'a CancellationToken,
    max_head: usize,
    response_timeout: Duration,
    idle: Duration,
    max_body: Option<u64>,
    /// The request was sent without `Connection: close`: the backend
    /// connection may be reused if the response allows it.
    keep_backend: bool,
    listener: &'a str,
    started: Instant,
}

/// What the response side of an exchange came to.
enum Respond {
    /// 101 to an upgrade: the head (in `rbuf`) is not written yet.
    Switching { response: head::Response, rbuf: BytesMut },
    /// A final response relayed to the client whole.
    Relayed { keep_alive: bool, reusable: bool },
    /// No final response head from the backend.
    HeadFailed(ReadError),
    /// Writing to the client failed.
    ClientFailed,
    /// The backend's response broke off midway.
    RelayFailed(std::io::Error),
}

/// The two sides of an exchange as they ended.
enum Ended {
    Answer(Respond, Option<body::Sent>),
    BodyFailed(BodyError),
}

impl Exchange<'_> {
    /// Relays the request body (framed, nothing past it) while reading the
    /// backend's answer; relays a final answer whole, or returns a 101 for
    /// the tunnel.
    async fn run<S: ClientStream>(
        &self,
        client: &mut S,
        backend: &mut BackendStream,
        early: &[u8],
        body: Body,
        rec: &mut AccessRecord,
    ) -> Result<Exchanged, Stop> {
        // Set when the whole body was relayed: a response written before
        // that closes the connection (the rest of the body is unread). No
        // body is done from the start (the backend may have answered before
        // the body's future is first polled).
        let body_done = AtomicBool::new(body == Body::None);
        let ended = {
            let (mut client_rd, mut client_wr) = client.halves();
            let (mut backend_rd, mut backend_wr) = backend.halves();
            let body_sent = async {
                let r = body::relay_body(early, &mut client_rd, &mut backend_wr, body, self.idle, self.max_body).await;
                body_done.store(r.is_ok(), Ordering::Relaxed);
                r
            };
            let answered = self.respond(&mut backend_rd, &mut client_wr, &body_done, rec);
            tokio::pin!(body_sent, answered);
            let mut sent = None;
            let mut body_over = false;
            loop {
                tokio::select! {
                    r = &mut body_sent, if !body_over => {
                        body_over = true;
                        match r {
                            Ok(s) => sent = Some(s),
                            // The backend stopped reading: its answer may still come.
                            Err(BodyError::Backend(e)) => tracing::debug!("request body: {e}"),
                            Err(e) => break Ended::BodyFailed(e),
                        }
                    }
                    r = &mut answered => {
                        // A tunnel starts after the whole body (it is the
                        // request's, not the tunnel's); a kept connection's
                        // next request starts after it (the body was read
                        // to its end, or there is none: this is at once).
                        let after_body = matches!(r, Respond::Switching { .. } | Respond::Relayed { keep_alive: true, .. });
                        if after_body && !body_over {
                            match (&mut body_sent).await {
                                Ok(s) => sent = Some(s),
                                Err(e) => break Ended::BodyFailed(e),
                            }
                        }
                        break Ended::Answer(r, sent);
                    }
                }
            }
        };
        match ended {
            Ended::BodyFailed(e) => {
                tracing::debug!("request body: {e}");
                match e {
                    // Nothing final went to the client yet: it gets an answer.
                    BodyError::Framing(m) if rec.status == 0 => {
                        Err(Refusal::bad_request(format!("invalid chunked request body ({m})")).into())
                    }
                    BodyError::TooLarge(max) if rec.status == 0 => Err(Refusal::body_too_large(max).into()),
                    BodyError::TooLarge(_) => Err(Stop::Gone("body_too_large")),
                    _ => Err(Stop::Gone("client_error")),
                }
            }
            Ended::Answer(respond, sent) => {
                rec.to_backend += sent.as_ref().map_or(0, |s| s.bytes);
                match respond {
                    Respond::Switching { response, rbuf } => match sent {
                        Some(sent) => Ok(Exchanged::Final(Final::Switched { response, rbuf, after: sent.after })),
                        None => Err(Stop::Gone("backend_error")),
                    },
                    Respond::Relayed { keep_alive, reusable } => match sent {
                        Some(sent) => Ok(Exchanged::Final(Final::Answered { keep_alive, after: sent.after, reusable })),
                        // The response said close (the body was not read to its
                        // end); the backend may still be reading it.
                        None => Ok(Exchanged::Final(Final::Answered {
                            keep_alive: false,
                            after: Bytes::new(),
                            reusable: false,
                        })),
                    },
                    Respond::HeadFailed(e) => Ok(Exchanged::NoResponse(e)),
                    Respond::ClientFailed => Err(Stop::Gone("client_error")),
                    Respond::RelayFailed(e) => {
                        tracing::debug!("relaying the backend's response: {e}");
                        Err(Stop::Gone("backend_error"))
                    }
                }
            }
        }
    }

    /// Reads the backend's answer (informational ones are passed on) and,
    /// unless it is a 101 to an upgrade, relays it whole to the client,
    /// framed by its own length or chunks, keeping the connection when it
    /// can: the client and the configuration allow it, the router is not
    /// draining, the request body was read to its end (`body_done`), and
    /// the response is not delimited by the backend's close.
    async fn respond<R, W>(
        &self,
        backend: &mut R,
        client: &mut W,
        body_done: &AtomicBool,
        rec: &mut AccessRecord,
    ) -> Respond
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut rbuf = BytesMut::new();
        let response = loop {
            let response =
                match head::read_head(backend, &mut rbuf, self.max_head, self.response_timeout, head::parse_response)
                    .await
                {
                    Ok(r) => r,
                    Err(e) => return Respond::HeadFailed(e),
                };
            rec.first_byte.get_or_insert_with(|| Lap::of(rec.started.elapsed()));
            // Informational answers (100, 102, 103) go through; the final one follows.
            if (100..200).contains(&response.status) && response.status != 101 {
                let info = rbuf.split_to(response.head_len);
                // Flushed: a client that sent `Expect: 100-continue` waits
                // for it before the body.
                if write_flushed(client, &info).await.is_err() {
                    return Respond::ClientFailed;
                }
                rec.to_client += info.len() as u64;
                continue;
            }
            break response;
        };
        if self.upgrade && response.status == 101 {
            rec.status = response.status;
            return Respond::Switching { response, rbuf };
        }
        let framing = match framing::framing(&response, self.method) {
            Ok(framing) => framing,
            // Nothing of it is relayed: the client gets a 502.
            Err(m) => return Respond::HeadFailed(ReadError::Head(HeadError::Malformed(m.into()))),
        };
        rec.status = response.status;
        // Counted before the answer goes out: the client may act on it at once.
        crate::metrics::outcome(self.listener, response.status, "", self.started.elapsed());
        if self.upgrade {
            rec.reason = "upgrade_refused";
        }
        // After a refused upgrade the connection closes: a client may have
        // sent the new protocol's first bytes already, and they are no
        // HTTP request.
        let keep_alive = self.keep_alive
            && !self.upgrade
            && body_done.load(Ordering::Relaxed)
            && framing != Framing::UntilClose
            && !self.draining.is_cancelled();
        let head = rewrite::response_head(&response, keep_alive, self.client_version);
        let rest = &rbuf[response.head_len..];
        // The backend connection may serve another request when it was
        // asked to, answered in HTTP/1.1 without saying close, framed its
        // response, and sent nothing past it.
        let backend_closes = response.version == 0
            || head::tokens(&response.headers, "connection").any(|t| t.eq_ignore_ascii_case(b"close"));
        let reusable = self.keep_backend && !backend_closes && framing != Framing::UntilClose;
        match framing::relay_response(backend, client, &head, rest, framing, self.idle).await {
            Ok((n, clean)) => {
                rec.to_client += n;
                Respond::Relayed { keep_alive, reusable: reusable && clean }
            }
            Err(e) => Respond::RelayFailed(e),
        }
    }
}

#[cfg(test)]
mod app_instance_tests {
    use super::parse_app_instance;

    /// As gorouter splits the value: two non-empty parts around one `:`.
    #[test]
    fn an_app_instance_header_is_guid_colon_index() {
        assert_eq!(
            parse_app_instance("5cdc7595-2e9b-4f62-8d5a-a86b92f2df0e:9"),
            Some(("5cdc7595-2e9b-4f62-8d5a-a86b92f2df0e", "9"))
        );
        for bad in ["", "guid", "guid:", ":0", "a:b:c", ":"] {
            assert_eq!(parse_app_instance(bad), None, "{bad:?}");
        }
    }
}
