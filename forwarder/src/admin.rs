//! The admin endpoint: `GET /metrics` (Prometheus/OpenMetrics text) and
//! `GET /healthz` (200 while accepting, 503 while draining).

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use crate::handshake::head;
use crate::state::Shared;

/// Admin requests are tiny; anything bigger or slower is dropped.
const MAX_HEAD: usize = 8192;
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn serve(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(answer(stream, shared.clone()));
            }
            Err(e) => {
                tracing::warn!("admin accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn answer(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut buf = BytesMut::new();
    let Ok(req) = head::read_head(&mut stream, &mut buf, MAX_HEAD, HEAD_TIMEOUT, head::parse_request).await else {
        return;
    };
    let path = req.target.split('?').next().unwrap_or("");
    // HEAD answers as GET does, without the body (load balancers check
    // health with either).
    let head = req.method == "HEAD";
    let (status, content_type, body) = match (req.method.as_str(), path) {
        ("GET" | "HEAD", "/metrics") => {
            ("200 OK", "application/openmetrics-text; version=1.0.0; charset=utf-8", crate::metrics::get().render())
        }
        ("GET" | "HEAD", "/healthz") if shared.draining.is_cancelled() => {
            ("503 Service Unavailable", "text/plain", "draining\n".to_string())
        }
        ("GET" | "HEAD", "/healthz") => ("200 OK", "text/plain", "ok\n".to_string()),
        ("GET" | "HEAD", _) => ("404 Not Found", "text/plain", "try /metrics or /healthz\n".to_string()),
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
