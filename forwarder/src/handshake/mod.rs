//! The control plane of an http listener: one connection's first request,
//! from the bytes on the socket to a tunnel handed to a data plane, or to an
//! answer.
//!
//! ```text
//! read head (bounded, timed) → rewrite (XFF/XFP, hop-by-hop, h2c) → route
//!   → connect backend (timeout, failover) → forward head
//!   → upgrade: read backend head; 101 → tunnel, else relay that response
//!   → plain:   read backend head (no request body) → tunnel for the rest
//! ```

pub mod answer;
pub mod framing;
pub mod head;
pub mod rewrite;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::connection::{AccessRecord, Plan, Session};
use answer::Refusal;
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
    if fwd.upgrade.is_some() && route.route_service.is_some() {
        return refuse(&mut client, Refusal::route_service_unsupported(), session, rec, started).await;
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

    // An upgrade that carries a body: the backend may wait for it before it
    // answers, so what came with the head goes now, in order, instead of
    // after the 101. (Without a body, pipelined bytes wait for the tunnel.)
    let mut leftover = leftover;
    if fwd.upgrade.is_some() && fwd.body != Body::None && !leftover.is_empty() {
        if let Err(e) = backend.write_all(&leftover).await {
            let refusal = Refusal::endpoint_failure(&format!("writing the request body: {e}"));
            return refuse(&mut client, refusal, session, rec, started).await;
        }
        rec.to_backend += leftover.len() as u64;
        leftover = Bytes::new();
    }

    // A plain request with a body: the body flows through the data plane
    // while the backend answers, so the status is not read here.
    if fwd.upgrade.is_none() && fwd.body != Body::None {
        return Some(Plan { client, backend, to_backend: leftover, to_client: Bytes::new(), status: 0, guard });
    }

    let max_response = limits.max_header_bytes.max(MIN_RESPONSE_HEAD);
    let response_timeout = if fwd.upgrade.is_some() { limits.handshake_timeout } else { limits.idle_timeout };
    let mut rbuf = BytesMut::new();
    let response =
        loop {
            let response =
                match head::read_head(&mut backend, &mut rbuf, max_response, response_timeout, head::parse_response)
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        return refuse(
                            &mut client,
                            Refusal::endpoint_failure(&format!("backend response: {e}")),
                            session,
                            rec,
                            started,
                        )
                        .await
                    }
                };
            // Informational answers (100, 102, 103) go through; the final one follows.
            if (100..200).contains(&response.status) && response.status != 101 {
                let info = rbuf.split_to(response.head_len);
                if client.write_all(&info).await.is_err() {
                    rec.reason = "client_error";
                    return None;
                }
                rec.to_client += info.len() as u64;
                continue;
            }
            break response;
        };
    rec.status = response.status;

    if fwd.upgrade.is_some() && response.status != 101 {
        // Refused upgrade: relay the answer as it is, framed, then close.
        let framing = framing::framing(&response, &request.method);
        let result =
            framing::relay_response(&mut backend, &mut client, &rbuf, response.head_len, framing, limits.idle_timeout)
                .await;
        rec.reason = "upgrade_refused";
        match result {
            Ok(n) => rec.to_client += n,
            Err(e) => {
                tracing::debug!("relaying a refused upgrade's response: {e}");
                rec.reason = "backend_error";
            }
        }
        crate::metrics::outcome(&session.listener, response.status, "", started.elapsed());
        return None;
    }
    // 101 (or a plain response): the head goes out now, what came after it
    // is delivered first by the data plane, in order.
    let rest = Bytes::copy_from_slice(&rbuf[response.head_len..]);
    rbuf.truncate(response.head_len);
    if let Err(e) = client.write_all(&rbuf).await {
        tracing::debug!("writing the response head to the client: {e}");
        rec.reason = "client_error";
        return None;
    }
    rec.to_client += rbuf.len() as u64;
    let status = response.status;
    // Nothing of the handshake stays allocated for the tunnel's life.
    drop((rbuf, response, fwd, request, pool, snap));
    Some(Plan { client, backend, to_backend: leftover, to_client: rest, status, guard })
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
