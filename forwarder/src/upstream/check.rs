//! Active health checks (`[pool.check]`): one task per checked backend,
//! a TCP connect or `GET path` every `interval`, its verdict kept by the
//! backend's [`Active`](super::health::Active) state with rise/fall.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::backend::Backend;
use crate::config::{Check, CheckKind, SendProxy};

/// The most of a check's answer that is read: its status line must fit.
const MAX_STATUS_LINE: usize = 4096;

/// Checks `backend` every `check.interval` (the first at once) until
/// `stop` fires.
pub(super) fn spawn(backend: Arc<Backend>, pool: String, check: Check, send_proxy: SendProxy, stop: CancellationToken) {
    tokio::spawn(async move {
        loop {
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                r = probe(backend.addr, &check, send_proxy) => r,
            };
            backend.checked(&pool, result, check.rise, check.fall);
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(check.interval) => {}
            }
        }
    });
}

/// One check: Ok when it passes, else why not. A backend of a pool with
/// `send_proxy` expects a PROXY header: it gets one that says the
/// connection is the router's own (v2 `LOCAL`, v1 `UNKNOWN`), as the spec
/// has load balancers do for health checks.
pub async fn probe(addr: SocketAddr, check: &Check, send_proxy: SendProxy) -> Result<(), String> {
    match tokio::time::timeout(check.timeout, probe_untimed(addr, check, send_proxy)).await {
        Ok(result) => result,
        Err(_) => Err(format!("no answer within {:?}", check.timeout)),
    }
}

async fn probe_untimed(addr: SocketAddr, check: &Check, send_proxy: SendProxy) -> Result<(), String> {
    let mut stream = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
    if let Some(header) = crate::proxy::local_header(send_proxy) {
        stream.write_all(&header).await.map_err(|e| format!("writing the PROXY header: {e}"))?;
    }
    if check.kind == CheckKind::Tcp {
        return Ok(());
    }
    let host = check.host.clone().unwrap_or_else(|| addr.to_string());
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: upsplice-health-check\r\nConnection: close\r\n\r\n",
        check.path
    );
    stream.write_all(request.as_bytes()).await.map_err(|e| format!("writing the request: {e}"))?;
    let mut buf = Vec::with_capacity(256);
    let mut chunk = [0u8; 512];
    let line = loop {
        if let Some(end) = buf.windows(2).position(|w| w == b"\r\n") {
            break &buf[..end];
        }
        if buf.len() >= MAX_STATUS_LINE {
            return Err("status line too long".into());
        }
        let n = stream.read(&mut chunk).await.map_err(|e| format!("reading the answer: {e}"))?;
        if n == 0 {
            return Err("closed before answering".into());
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    match status(line) {
        Some(code) if (200..400).contains(&code) => Ok(()),
        Some(code) => Err(format!("GET {} answered {code}", check.path)),
        None => Err(format!("not an HTTP status line: {:?}", String::from_utf8_lossy(line))),
    }
}

/// The status code of `HTTP/1.x NNN reason`.
fn status(line: &[u8]) -> Option<u16> {
    let rest = line.strip_prefix(b"HTTP/1.")?;
    let (_minor, rest) = rest.split_first()?;
    let code = rest.strip_prefix(b" ")?.get(..3)?;
    std::str::from_utf8(code).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::TcpListener;

    use super::*;

    fn check(kind: CheckKind) -> Check {
        Check {
            kind,
            path: "/healthz".into(),
            host: Some("app.internal".into()),
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 1,
            fall: 1,
        }
    }

    /// A backend that answers one request with `answer` and reports the head it read.
    async fn answering(answer: &'static [u8]) -> (SocketAddr, tokio::task::JoinHandle<String>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut head = Vec::new();
            let mut chunk = [0u8; 1024];
            while !head.ends_with(b"\r\n\r\n") {
                let n = s.read(&mut chunk).await.unwrap();
                head.extend_from_slice(&chunk[..n]);
            }
            s.write_all(answer).await.unwrap();
            String::from_utf8(head).unwrap()
        });
        (addr, task)
    }

    #[test]
    fn reads_the_status_code() {
        assert_eq!(status(b"HTTP/1.1 204 No Content"), Some(204));
        assert_eq!(status(b"HTTP/1.0 302"), Some(302));
        assert_eq!(status(b"HTTP/2 200"), None);
        assert_eq!(status(b"garbage"), None);
    }

    #[tokio::test]
    async fn http_check_sends_get_with_host_and_close_and_passes_on_2xx_3xx() {
        let (addr, head) = answering(b"HTTP/1.1 301 Moved\r\nContent-Length: 0\r\n\r\n").await;
        assert_eq!(probe(addr, &check(CheckKind::Http), SendProxy::Off).await, Ok(()));
        let head = head.await.unwrap();
        assert!(head.starts_with("GET /healthz HTTP/1.1\r\n"), "{head}");
        assert!(head.contains("\r\nHost: app.internal\r\n"), "{head}");
        assert!(head.contains("\r\nConnection: close\r\n"), "{head}");
    }

    #[tokio::test]
    async fn http_check_fails_on_5xx_and_tcp_check_passes_on_connect() {
        let (addr, _) = answering(b"HTTP/1.1 500 Internal Server Error\r\n\r\n").await;
        let err = probe(addr, &check(CheckKind::Http), SendProxy::Off).await.unwrap_err();
        assert!(err.contains("500"), "{err}");
        let (addr, _) = answering(b"").await;
        assert_eq!(probe(addr, &check(CheckKind::Tcp), SendProxy::Off).await, Ok(()));
    }

    #[tokio::test]
    async fn a_refused_or_silent_backend_fails() {
        let dead = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        assert!(probe(dead_addr, &check(CheckKind::Tcp), SendProxy::Off).await.unwrap_err().starts_with("connect"));
        let silent = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let err = probe(silent.local_addr().unwrap(), &check(CheckKind::Http), SendProxy::Off).await.unwrap_err();
        assert!(err.starts_with("no answer within"), "{err}");
    }
}
