//! The control plane of an http listener: one connection's first request,
//! from the bytes on the socket to a tunnel handed to a data plane, or to an
//! answer.
//!
//! ```text
//! read head (bounded, timed) → rewrite (XFF/XFP, hop-by-hop, h2c) → route
//!   → connect backend (timeout, failover) → forward head
//!   → relay the request body (framed, nothing past it) while reading the
//!     backend's head
//!   → upgrade: 101 → tunnel (with what followed the request), else relay
//!     that response and close
//!   → plain:   relay the response (framed, `Connection: close`) and close;
//!     what the client sent after its request is discarded, never relayed
//! ```

pub mod answer;
pub mod body;
pub mod framing;
pub mod h2;
pub mod head;
pub mod rewrite;
pub mod stream;

use std::net::SocketAddr;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::access::AccessRecord;
use crate::state::Snapshot;
use crate::upstream::{BackendGuard, ConnectError};
use answer::{linger_close, Refusal};
use body::BodyError;
use head::{HeadError, ReadError};
use rewrite::{Body, ClientInfo};
pub use stream::ClientStream;

/// Backend response heads may be larger than requests (cookies); this much
/// is always allowed.
const MIN_RESPONSE_HEAD: usize = 64 * 1024;

/// A connection pair ready for a data plane, as the handshake leaves it.
pub struct Plan<S = TcpStream> {
    pub client: S,
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

/// Why a handshake ends without a tunnel; answered in one place
/// (`Stop::answer`).
#[derive(Debug)]
pub enum Stop {
    /// Nothing final reached the client: the router answers this and closes.
    Refuse(Refusal),
    /// The backend's final response was relayed whole; the connection closes.
    Answered,
    /// A side failed or left midway; nothing more can be said. The access
    /// log's close reason.
    Gone(&'static str),
}

impl From<Refusal> for Stop {
    fn from(refusal: Refusal) -> Stop {
        Stop::Refuse(refusal)
    }
}

/// What the backend agreed to: everything of a [`Plan`] but the client.
struct Agreed {
    backend: TcpStream,
    to_backend: Bytes,
    to_client: Bytes,
    status: u16,
    guard: BackendGuard,
}

/// Handles one connection of an http listener to its end: returns the
/// connection pair to relay, or None when the connection is done
/// (answered, refused, or gone). `snap` is the configuration in force when
/// the connection was accepted; it is released before the pair is returned.
pub async fn serve<S: ClientStream>(
    mut client: S,
    peer: SocketAddr,
    snap: std::sync::Arc<Snapshot>,
    listener: &str,
    rec: &mut AccessRecord,
) -> Option<Plan<S>> {
    let started = Instant::now();
    let agreed = negotiate(&mut client, peer, &snap, listener, rec).await;
    // Nothing of the handshake stays allocated for the tunnel's life.
    drop(snap);
    match agreed {
        Ok(Agreed { backend, to_backend, to_client, status, guard }) => {
            Some(Plan { client, backend, to_backend, to_client, status, guard })
        }
        Err(stop) => {
            stop.answer(&mut client, listener, rec, started).await;
            None
        }
    }
}

/// The first request, from its head to a 101 whose head was written to
/// the client; any other end is a [`Stop`].
async fn negotiate<S: ClientStream>(
    client: &mut S,
    peer: SocketAddr,
    snap: &Snapshot,
    listener: &str,
    rec: &mut AccessRecord,
) -> Result<Agreed, Stop> {
    let limits = &snap.config.limits;
    let started = Instant::now();
    let mut buf = BytesMut::new();
    let read = head::read_head(client, &mut buf, limits.max_header_bytes, limits.handshake_timeout, |b, max| {
        head::parse_request_with(b, max, limits.max_headers)
    })
    .await;
    let request = match read {
        Ok(request) => request,
        Err(ReadError::Head(HeadError::Http2Preface)) => {
            // Refused in HTTP/2, on the stream the client opens.
            let stream = h2::first_stream(client, &mut buf, limits.max_header_bytes, limits.handshake_timeout).await;
            return Err(Refusal::http2_unsupported(stream).into());
        }
        Err(e) => return Err(request_head_failed(e)),
    };
    // Copied out so the head buffer is freed: a Bytes view would keep the
    // whole read buffer alive for the tunnel's life.
    let leftover = Bytes::copy_from_slice(&buf[request.head_len..]);
    drop(buf);

    rec.method = Some(request.method.clone());
    rec.target = Some(request.target.clone());
    rec.proto = Some(if request.version == 0 { "HTTP/1.0" } else { "HTTP/1.1" });
    let header = |name| head::values(&request.headers, name).next().map(|v| String::from_utf8_lossy(v).into_owned());
    rec.user_agent = header("user-agent");
    rec.referer = header("referer");

    let settings = snap.listener(listener);
    let request_id = uuid::Uuid::new_v4().hyphenated().to_string();
    let client_info = ClientInfo {
        request_id: &request_id,
        peer: peer.ip(),
        trusted: settings.trusted_cidrs.iter().any(|net| net.contains(&peer.ip())),
        forwarded_proto: settings.forwarded_proto(),
        now_ms: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0),
    };
    let fwd = rewrite::rewrite(&request, &client_info)?;
    rec.host = Some(fwd.host.clone());
    rec.x_forwarded_for = Some(fwd.x_forwarded_for.clone());
    rec.x_forwarded_proto = Some(fwd.x_forwarded_proto.clone());
    rec.request_id = Some(fwd.request_id.clone());
    let route = snap.router.lookup(&fwd.host, &fwd.path).ok_or_else(|| Refusal::unknown_route(&fwd.host))?;
    rec.route = Some(route.name.clone());
    if route.route_service.is_some() {
        // Nothing reaches the app around its route service (often its
        // authentication), whatever the kind of request.
        return Err(match fwd.upgrade {
            Some(_) => Refusal::route_service_unsupported(),
            None => Refusal::route_service_disabled(),
        }
        .into());
    }
    let (mut backend, guard) = snap.pools[route.pool].connect(limits.connect_timeout).await.map_err(|e| match e {
        ConnectError::NoBackends(_) => Refusal::no_endpoints(&fwd.host),
        e => Refusal::endpoint_failure(e.to_string()),
    })?;
    rec.backend = Some(guard.addr());
    backend.write_all(&fwd.head).await.map_err(|e| Refusal::endpoint_failure(format!("writing the request: {e}")))?;
    rec.to_backend += fwd.head.len() as u64;
    rec.forwarded = Some(rec.started.elapsed());

    // The request body (if any) goes to the backend while its answer is
    // read: a backend may answer before the whole body (an early 413), or
    // only after it. Nothing past the body is sent before the answer.
    let upgrade = fwd.upgrade.is_some();
    let exchange = Exchange {
        upgrade,
        method: &request.method,
        max_head: limits.max_header_bytes.max(MIN_RESPONSE_HEAD),
        response_timeout: if upgrade { limits.handshake_timeout } else { limits.idle_timeout },
        idle: limits.idle_timeout,
        listener,
        started,
    };
    let Switched { response, rbuf, after } = exchange.run(client, &mut backend, &leftover, fwd.body, rec).await?;
    // 101: the head goes out now; what came after it on either side is
    // delivered first by the data plane, in order.
    let to_client = Bytes::copy_from_slice(&rbuf[response.head_len..]);
    if let Err(e) = client.write_all(&rbuf[..response.head_len]).await {
        tracing::debug!("writing the response head to the client: {e}");
        return Err(Stop::Gone("client_error"));
    }
    rec.to_client += response.head_len as u64;
    rec.upgraded = Some(rec.started.elapsed());
    Ok(Agreed { backend, to_backend: after, to_client, status: response.status, guard })
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
    /// own answer is written and counted, then the connection lingers so
    /// that the answer is not lost to a reset; a relayed answer lingers too.
    async fn answer<S: AsyncRead + AsyncWrite + Unpin>(
        self,
        client: &mut S,
        listener: &str,
        rec: &mut AccessRecord,
        started: Instant,
    ) {
        match self {
            Stop::Gone(reason) => rec.reason = reason,
            // One request per connection (for now): whatever the client
            // sent after this request is read and discarded, never relayed.
            Stop::Answered => linger_close(client).await,
            Stop::Refuse(refusal) => {
                if refusal.detail.is_some() {
                    // A backend failed: the operator needs to know which and why.
                    tracing::warn!(listener, host = rec.host.as_deref().unwrap_or("-"), "refused: {refusal}");
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

/// A 101 from the backend: its head (in `rbuf`) is still to be written;
/// `after` holds what the client sent past the request.
struct Switched {
    response: head::Response,
    rbuf: BytesMut,
    after: Bytes,
}

/// One request's exchange with its backend, after its head was forwarded.
struct Exchange<'a> {
    upgrade: bool,
    method: &'a str,
    max_head: usize,
    response_timeout: std::time::Duration,
    idle: std::time::Duration,
    listener: &'a str,
    started: Instant,
}

/// What the response side of an exchange came to.
enum Respond {
    /// 101 to an upgrade: the head (in `rbuf`) is not written yet.
    Switching { response: head::Response, rbuf: BytesMut },
    /// A final response relayed to the client whole.
    Relayed,
    /// No final response head from the backend.
    HeadFailed(String),
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
    /// backend's answer; relays a final answer whole with `Connection:
    /// close`, or returns a 101 for the tunnel.
    async fn run<S: ClientStream>(
        &self,
        client: &mut S,
        backend: &mut TcpStream,
        early: &[u8],
        body: Body,
        rec: &mut AccessRecord,
    ) -> Result<Switched, Stop> {
        let ended = {
            let (mut client_rd, mut client_wr) = client.halves();
            let (mut backend_rd, mut backend_wr) = backend.split();
            let body_sent = body::relay_body(early, &mut client_rd, &mut backend_wr, body, self.idle);
            let answered = self.respond(&mut backend_rd, &mut client_wr, rec);
            tokio::pin!(body_sent, answered);
            let mut sent = None;
            let mut body_done = false;
            loop {
                tokio::select! {
                    r = &mut body_sent, if !body_done => {
                        body_done = true;
                        match r {
                            Ok(s) => sent = Some(s),
                            // The backend stopped reading: its answer may still come.
                            Err(BodyError::Backend(e)) => tracing::debug!("request body: {e}"),
                            Err(e) => break Ended::BodyFailed(e),
                        }
                    }
                    r = &mut answered => {
                        // A tunnel starts after the whole body (it is the
                        // request's, not the tunnel's).
                        if matches!(r, Respond::Switching { .. }) && !body_done {
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
                    // Nothing final went to the client yet: it gets a 400.
                    BodyError::Framing(m) if rec.status == 0 => {
                        Err(Refusal::bad_request(format!("invalid chunked request body ({m})")).into())
                    }
                    _ => Err(Stop::Gone("client_error")),
                }
            }
            Ended::Answer(respond, sent) => {
                rec.to_backend += sent.as_ref().map_or(0, |s| s.bytes);
                match respond {
                    Respond::Switching { response, rbuf } => match sent {
                        Some(sent) => Ok(Switched { response, rbuf, after: sent.after }),
                        None => Err(Stop::Gone("backend_error")),
                    },
                    Respond::Relayed => Err(Stop::Answered),
                    Respond::HeadFailed(m) => Err(Refusal::endpoint_failure(m).into()),
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
    /// with `Connection: close` and framed by its own length or chunks.
    async fn respond<R, W>(&self, backend: &mut R, client: &mut W, rec: &mut AccessRecord) -> Respond
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
                    Err(e) => return Respond::HeadFailed(format!("backend response: {e}")),
                };
            rec.first_byte.get_or_insert_with(|| rec.started.elapsed());
            // Informational answers (100, 102, 103) go through; the final one follows.
            if (100..200).contains(&response.status) && response.status != 101 {
                let info = rbuf.split_to(response.head_len);
                if client.write_all(&info).await.is_err() {
                    return Respond::ClientFailed;
                }
                rec.to_client += info.len() as u64;
                continue;
            }
            break response;
        };
        rec.status = response.status;
        if self.upgrade && response.status == 101 {
            return Respond::Switching { response, rbuf };
        }
        // Counted before the answer goes out: the client may act on it at once.
        crate::metrics::outcome(self.listener, response.status, "", self.started.elapsed());
        if self.upgrade {
            rec.reason = "upgrade_refused";
        }
        let framing = framing::framing(&response, self.method);
        let head = rewrite::response_head(&response);
        let rest = &rbuf[response.head_len..];
        match framing::relay_response(backend, client, &head, rest, framing, self.idle).await {
            Ok(n) => {
                rec.to_client += n;
                Respond::Relayed
            }
            Err(e) => Respond::RelayFailed(e),
        }
    }
}
