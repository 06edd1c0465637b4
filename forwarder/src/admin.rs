//! The admin endpoint: `GET /metrics` (Prometheus/OpenMetrics text),
//! `GET /healthz` (200 while accepting; 503 while draining, and with
//! `[nats]` until the routes had time to arrive) and `GET /routes` (the
//! routing table as JSON, in gorouter's shape).

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use serde_json::{json, Map, Value};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::handshake::head;
use crate::nats;
use crate::state::Shared;

/// Admin requests are tiny; anything bigger or slower is dropped.
const MAX_HEAD: usize = 8192;
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn serve(listener: TcpListener, shared: Arc<Shared>, nats: Option<Arc<nats::Status>>) {
    let mut reserve = Reserve::open();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(answer(stream, shared.clone(), nats.clone()));
            }
            Err(e) => match crate::socket::shortage(&e) {
                // Out of fds: the moment `/metrics` matters most. The
                // reserve's fd goes to one connection, answered here before
                // the next accept, then the reserve is taken again.
                Some(error) if reserve.release() => {
                    crate::metrics::resource_error("accept", error);
                    tracing::warn!("admin accept failed: {e}; answering on the reserved fd");
                    match listener.accept().await {
                        Ok((stream, _)) => answer(stream, shared.clone(), nats.clone()).await,
                        Err(e) => tracing::warn!("admin accept failed on the reserved fd too: {e}"),
                    }
                    reserve.restore();
                }
                shortage => {
                    if let Some(error) = shortage {
                        crate::metrics::resource_error("accept", error);
                    }
                    tracing::warn!("admin accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    reserve.restore();
                }
            },
        }
    }
}

/// One fd the admin endpoint holds in reserve (`/dev/null`, open), so that
/// a router out of fds can still be asked why: closed to make room for one
/// accept, then opened again. Another thread may take the freed fd first;
/// then the endpoint backs off as before.
struct Reserve(Option<std::fs::File>);

impl Reserve {
    fn open() -> Reserve {
        Reserve(std::fs::File::open("/dev/null").ok())
    }

    /// Frees the reserved fd; false if there was none to free.
    fn release(&mut self) -> bool {
        self.0.take().is_some()
    }

    /// Takes the reserve again if it is not held (it may fail while the
    /// process is still out of fds: the next shortage tries again).
    fn restore(&mut self) {
        if self.0.is_none() {
            self.0 = std::fs::File::open("/dev/null").ok();
        }
    }
}

async fn answer(mut stream: TcpStream, shared: Arc<Shared>, nats: Option<Arc<nats::Status>>) {
    let mut buf = BytesMut::new();
    let Ok(req) = head::read_head(&mut stream, &mut buf, MAX_HEAD, HEAD_TIMEOUT, head::parse_request).await else {
        return;
    };
    let path = req.target().split('?').next().unwrap_or("");
    // HEAD answers as GET does, without the body (load balancers check
    // health with either).
    let head = req.method() == "HEAD";
    let (status, content_type, body) = match (req.method(), path) {
        ("GET" | "HEAD", "/metrics") => {
            ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", crate::metrics::get().render())
        }
        ("GET" | "HEAD", "/healthz") if shared.draining.is_cancelled() => {
            ("503 Service Unavailable", "text/plain", "draining\n".to_string())
        }
        ("GET" | "HEAD", "/healthz") if nats.as_ref().is_some_and(|n| !n.ready()) => (
            "503 Service Unavailable",
            "text/plain",
            "waiting for routes from NATS (router.start, then start_response_delay_interval)\n".to_string(),
        ),
        ("GET" | "HEAD", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET" | "HEAD", "/routes") => ("200 OK", "application/json", routes(&shared, nats.as_deref()).await),
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "try /metrics, /healthz or /routes\n".to_string()),
        _ => ("405 Method Not Allowed", "text/plain", "GET or HEAD only\n".to_string()),
    };
    let allow = if status.starts_with("405") { "Allow: GET, HEAD\r\n" } else { "" };
    let mut response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
        body.len()
    );
    if !head {
        response.push_str(&body);
    }
    let _ = stream.write_all(response.as_bytes()).await;
    let _ = stream.shutdown().await;
}

/// The routing table as gorouter's `/routes` shows it: each URI (`host`
/// or `host/path`) with its endpoints (`address`, `tls`, `ttl` in seconds,
/// `tags`, and `route_service_url`, `isolation_segment`,
/// `private_instance_id`, `server_cert_domain_san` when set). The
/// config's routes come first with `ttl` 0 (they never expire); a NATS
/// URI they shadow is not shown.
async fn routes(shared: &Shared, nats: Option<&nats::Status>) -> String {
    let snap = shared.snapshot();
    let mut table = Map::new();
    for route in &snap.config.routes {
        let uri = format!("{}{}", crate::host::normalize(&route.host), route.path.as_deref().unwrap_or(""));
        let uri = uri.trim_end_matches('/').to_string();
        let pool = snap.pool_named(&route.pool).expect("validated: routes name pools");
        let tls = snap.config.pools.iter().any(|p| p.name == route.pool && p.tls.is_some());
        let endpoints = pool.backends.iter().map(|b| {
            let mut e = json!({ "address": b.addr.to_string(), "tls": tls, "ttl": 0, "tags": {} });
            if let Some(rs) = &route.route_service {
                e["route_service_url"] = rs.as_str().into();
            }
            e
        });
        table.insert(uri, Value::Array(endpoints.collect()));
    }
    let default_ttl = snap.config.nats.as_ref().map(|n| n.droplet_stale_threshold).unwrap_or_default();
    let view = match nats {
        Some(n) => n.view().await.unwrap_or_default(),
        None => Vec::new(),
    };
    for (uri, endpoints) in view {
        if table.contains_key(&*uri) {
            continue;
        }
        let endpoints = endpoints.iter().map(|e| {
            let ttl = e.stale_threshold.map_or(default_ttl, |own| own.min(default_ttl));
            let mut o = json!({
                "address": e.addr.to_string(),
                "protocol": e.protocol,
                "tls": e.tls,
                "ttl": ttl.as_secs(),
                "tags": e.tags,
            });
            let optional = [
                ("route_service_url", e.route_service_url.as_deref().unwrap_or("")),
                ("isolation_segment", &e.isolation_segment),
                ("private_instance_id", &e.instance.instance_id),
                ("server_cert_domain_san", &e.server_cert_domain_san),
                ("availability_zone", &e.availability_zone),
            ];
            for (key, value) in optional.into_iter().filter(|(_, v)| !v.is_empty()) {
                o[key] = value.into();
            }
            o
        });
        table.insert(uri.to_string(), Value::Array(endpoints.collect()));
    }
    let mut body = Value::Object(table).to_string();
    body.push('\n');
    body
}
