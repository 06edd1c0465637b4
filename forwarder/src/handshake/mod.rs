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
pub mod head;
pub mod rewrite;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::connection::{AccessRecord, Plan, Session};
use answer::Refusal;
use body::BodyError;
use head::{HeadError, ReadError};
use rewrite::{Body, ClientInfo};

/// Backend response heads may be larger than requests (cookies); this much
/// is always allowed.
const MIN_RESPONSE_HEAD: usize = 64 * 1024;

/// Handles one connection of an http listener to its end.
/// Returns the connection pair to relay, or None when the connection is
/// done (answered, refused, or gone).
pub async fn serve(mut client: TcpStream, peer: SocketAddr, session: &Session, rec: &mut AccessRecord) -> Option<Plan> {
    let snap = session.shared.snapshot();
    let limits = &snap.config.limits;
    let started = Instant::now();
    let mut buf = BytesMut::new();

    let request = match head::read_head(
        &mut client,
        &mut buf,
        limits.max_header_bytes,
        limits.handshake_timeout,
        head::parse_request,
    )
    .await
    {
        Ok(r) => r,
        Err(e) => {
            let refusal = match e {
                ReadError::Head(HeadError::TooLarge(max)) => Refusal::too_large(max),
                ReadError::Head(HeadError::TooManyHeaders) => Refusal::too_large(limits.max_header_bytes),
                ReadError::Head(HeadError::Http2Preface) => Refusal::http2_unsupported(),
                ReadError::Head(HeadError::Malformed(m)) => {
                    Refusal::bad_request(format!("malformed request head ({m})"))
                }
                ReadError::Timeout(_) => Refusal::timeout(),
                ReadError::Closed(_) | ReadError::Io(_) => {
                    rec.reason = if matches!(e, ReadError::Closed(0)) { "client_closed" } else { "client_error" };
                    return None;
                }
            };
            return refuse(&mut client, refusal, session, rec, started).await;
        }
    };
    // Copied out so the head buffer is freed: a Bytes view would keep the
    // whole read buffer alive for the tunnel's life.
    let leftover = Bytes::copy_from_slice(&buf[request.head_len..]);
    drop(buf);

    let listener = snap.listener(&session.listener);
    let client_info = ClientInfo {
        peer: peer.ip(),
        trusted: listener.trusted_cidrs.iter().any(|net| net.contains(&peer.ip())),
        forwarded_proto: &listener.forwarded_proto,
        now_ms: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0),
    };
    let fwd = match rewrite::rewrite(&request, &client_info) {
        Ok(f) => f,
        Err(refusal) => return refuse(&mut client, refusal, session, rec, started).await,
    };
    rec.host = Some(fwd.host.clone());
    let Some(route) = snap.router.lookup(&fwd.host, &fwd.path) else {
        return refuse(&mut client, Refusal::unknown_route(&fwd.host), session, rec, started).await;
    };
    rec.route = Some(route.name.clone());
    if route.route_service.is_some() {
        // Nothing reaches the app around its route service (often its
        // authentication), whatever the kind of request.
        let refusal = match fwd.upgrade {
            Some(_) => Refusal::route_service_unsupported(),
            None => Refusal::route_service_disabled(),
        };
        return refuse(&mut client, refusal, session, rec, started).await;
    }
    let pool = snap.pools[route.pool].clone();
    let (mut backend, guard) = match pool.connect(limits.connect_timeout).await {
        Ok(c) => c,
        Err(crate::upstream::ConnectError::NoBackends(_)) => {
            return refuse(&mut client, Refusal::no_endpoints(&fwd.host), session, rec, started).await;
        }
        Err(e) => return refuse(&mut client, Refusal::endpoint_failure(&e.to_string()), session, rec, started).await,
    };
    rec.backend = Some(guard.addr());
    if let Err(e) = backend.write_all(&fwd.head).await {
        return refuse(
            &mut client,
            Refusal::endpoint_failure(&format!("writing the request: {e}")),
            session,
            rec,
            started,
        )
        .await;
    }
    rec.to_backend += fwd.head.len() as u64;

    // The request body (if any) goes to the backend while its answer is
    // read: a backend may answer before the whole body (an early 413), or
    // only after it. Nothing past the body is sent before the answer.
    let upgrade = fwd.upgrade.is_some();
    let response_timeout = if upgrade { limits.handshake_timeout } else { limits.idle_timeout };
    let exchange = Exchange {
        upgrade,
        method: &request.method,
        max_head: limits.max_header_bytes.max(MIN_RESPONSE_HEAD),
        response_timeout,
        idle: limits.idle_timeout,
        listener: &session.listener,
        started,
    };
    let outcome = exchange.run(&mut client, &mut backend, &leftover, fwd.body, rec).await;
    drop(leftover);
    match outcome {
        Outcome::Tunnel { response, rbuf, after } => {
            // 101: the head goes out now; what came after it on either side
            // is delivered first by the data plane, in order.
            let rest = Bytes::copy_from_slice(&rbuf[response.head_len..]);
            if let Err(e) = client.write_all(&rbuf[..response.head_len]).await {
                tracing::debug!("writing the response head to the client: {e}");
                rec.reason = "client_error";
                return None;
            }
            rec.to_client += response.head_len as u64;
            let status = response.status;
            // Nothing of the handshake stays allocated for the tunnel's life.
            drop((rbuf, response, fwd, request, pool, snap));
            Some(Plan { client, backend, to_backend: after, to_client: rest, status, guard })
        }
        Outcome::Answered => {
            // The backend is done with: closed now, not after the linger.
            drop((backend, guard));
            // One request per connection (for now): whatever the client
            // sent after this request is read and discarded, never relayed.
            crate::connection::linger_close(&mut client).await;
            None
        }
        Outcome::Refuse(refusal) => refuse(&mut client, refusal, session, rec, started).await,
        Outcome::Gone => None,
    }
}

/// How one request's exchange with its backend ended.
enum Outcome {
    /// The backend switched protocols: its head (in `rbuf`) is still to be
    /// written; `after` holds what the client sent past the request.
    Tunnel { response: head::Response, rbuf: BytesMut, after: Bytes },
    /// A final response was relayed to the client whole.
    Answered,
    /// Nothing final reached the client: answer this instead.
    Refuse(Refusal),
    /// A side failed midway; nothing more can be said (logged in the record).
    Gone,
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
    async fn run(
        &self,
        client: &mut TcpStream,
        backend: &mut TcpStream,
        early: &[u8],
        body: Body,
        rec: &mut AccessRecord,
    ) -> Outcome {
        let ended = {
            let (mut client_rd, mut client_wr) = client.split();
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
                        Outcome::Refuse(Refusal::bad_request(format!("invalid chunked request body ({m})")))
                    }
                    _ => {
                        rec.reason = "client_error";
                        Outcome::Gone
                    }
                }
            }
            Ended::Answer(respond, sent) => {
                rec.to_backend += sent.as_ref().map_or(0, |s| s.bytes);
                match respond {
                    Respond::Switching { response, rbuf } => match sent {
                        Some(sent) => Outcome::Tunnel { response, rbuf, after: sent.after },
                        None => {
                            rec.reason = "backend_error";
                            Outcome::Gone
                        }
                    },
                    Respond::Relayed => Outcome::Answered,
                    Respond::HeadFailed(m) => Outcome::Refuse(Refusal::endpoint_failure(&m)),
                    Respond::ClientFailed => {
                        rec.reason = "client_error";
                        Outcome::Gone
                    }
                    Respond::RelayFailed(e) => {
                        tracing::debug!("relaying the backend's response: {e}");
                        rec.reason = "backend_error";
                        Outcome::Gone
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

/// Writes the router's own answer and records it; there is nothing to
/// relay after it (always None). Boxed: its future (with
/// the linger) would otherwise be part of every connection's, tunnels too.
fn refuse<'a>(
    client: &'a mut TcpStream,
    refusal: Refusal,
    session: &'a Session,
    rec: &'a mut AccessRecord,
    started: Instant,
) -> Pin<Box<dyn Future<Output = Option<Plan>> + Send + 'a>> {
    Box::pin(async move {
        tracing::debug!(listener = %session.listener, "refused: {refusal}");
        let bytes = refusal.render();
        rec.status = refusal.status;
        rec.reason = refusal.reason;
        // Counted before the answer goes out: the client may act on it at once.
        crate::metrics::outcome(&session.listener, refusal.status, refusal.cf_error.unwrap_or(""), started.elapsed());
        if client.write_all(&bytes).await.is_ok() {
            rec.to_client += bytes.len() as u64;
            // Let the answer reach the client before the close: a close with
            // unread request bytes would send RST and could discard it.
            crate::connection::linger_close(client).await;
        }
        None
    })
}
