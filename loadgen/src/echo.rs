//! The bundled backend: an RFC 6455 WebSocket echo server that answers plain
//! HTTP requests with a small `200`, and raw TCP echo / discard / source modes.
//!
//! An optional one-shot stall (`--stall-at`, `--stall-for`) freezes every reply
//! for a while; the tests use it to show what coordinated omission hides.

use crate::httphead::{self, has_token, header};
use crate::readbuf::ReadBuf;
use crate::wsproto::{self, opcode};
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

/// What the server does with each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum EchoMode {
    /// WebSocket echo, plain HTTP `200` for requests without an upgrade.
    Ws,
    /// Raw TCP echo.
    Tcp,
    /// Raw TCP: read and throw away (for one-way upload throughput).
    Discard,
    /// Raw TCP: write zeros as fast as possible (for one-way download throughput).
    Source,
}

/// Body of the plain HTTP answer.
pub const HTTP_BODY: &str = "upsplice-loadgen echo\n";

/// The whole plain HTTP answer on a kept-alive connection.
const HTTP_KEEP: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 22\r\n\r\nupsplice-loadgen echo\n";

/// The whole plain HTTP answer when the client asked to close.
const HTTP_CLOSE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 22\r\nConnection: close\r\n\r\nupsplice-loadgen echo\n";

/// Echo server settings.
#[derive(Debug, Clone)]
pub struct EchoConfig {
    /// Address to listen on (port 0 picks one).
    pub listen: SocketAddr,
    /// Connection behaviour.
    pub mode: EchoMode,
    /// Serve TLS with this configuration (`--tls-cert`, `--tls-key`).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// Stall all replies once, starting this long after the first accepted connection.
    pub stall_at: Option<Duration>,
    /// How long the stall lasts.
    pub stall_for: Duration,
}

/// The one-shot stall window, fixed when the first connection arrives.
struct Stall {
    at: Option<Duration>,
    len: Duration,
    window: OnceLock<(Instant, Instant)>,
}

impl Stall {
    fn arm(&self) {
        if let Some(at) = self.at {
            let now = Instant::now();
            let _ = self.window.set((now + at, now + at + self.len));
        }
    }

    /// Sleeps until the stall ends when called inside it.
    async fn wait(&self) {
        if let Some(&(from, to)) = self.window.get() {
            let now = Instant::now();
            if now >= from && now < to {
                tokio::time::sleep_until(to.into()).await;
            }
        }
    }
}

/// Listen backlog: connection ramps of thousands per second must not overflow
/// the accept queue (the kernel caps it at net.core.somaxconn).
const BACKLOG: u32 = 16384;

fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let sock = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
    sock.set_reuseaddr(true)?;
    sock.bind(addr)?;
    sock.listen(BACKLOG)
}

/// Binds, prints `listening on ADDR` to stdout and serves until SIGTERM/SIGINT.
pub async fn serve(cfg: EchoConfig) -> anyhow::Result<()> {
    let listener = listen(cfg.listen)?;
    {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", listener.local_addr()?)?;
        out.flush()?;
    }
    let stall = Arc::new(Stall { at: cfg.stall_at, len: cfg.stall_for, window: OnceLock::new() });
    let tls = cfg.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = tokio::signal::ctrl_c() => return Ok(()),
            acc = listener.accept() => {
                let (sock, _) = match acc {
                    Ok(a) => a,
                    // Out of descriptors and similar: back off instead of spinning.
                    Err(_) => { tokio::time::sleep(Duration::from_millis(10)).await; continue; }
                };
                stall.arm();
                let _ = sock.set_nodelay(true);
                let stall = stall.clone();
                let mode = cfg.mode;
                let tls = tls.clone();
                tokio::spawn(async move {
                    match tls {
                        // A failed handshake only ends that connection.
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(sock).await {
                                serve_conn(s, mode, &stall).await;
                            }
                        }
                        None => serve_conn(sock, mode, &stall).await,
                    }
                });
            }
        }
    }
}

/// Serves one connection (plain TCP or TLS) in `mode`.
async fn serve_conn<S: AsyncRead + AsyncWrite + Unpin>(sock: S, mode: EchoMode, stall: &Stall) {
    let _ = match mode {
        EchoMode::Ws => serve_http(sock, stall).await,
        EchoMode::Tcp => serve_tcp_echo(sock, stall).await,
        EchoMode::Discard => serve_discard(sock).await,
        EchoMode::Source => serve_source(sock).await,
    };
}

/// Writes `buf` and flushes it (TLS buffers what it encrypts).
async fn send<S: AsyncWrite + Unpin>(sock: &mut S, buf: &[u8]) -> std::io::Result<()> {
    sock.write_all(buf).await?;
    sock.flush().await
}

async fn serve_tcp_echo<S: AsyncRead + AsyncWrite + Unpin>(mut sock: S, stall: &Stall) -> std::io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = sock.read(&mut buf).await?;
        if n == 0 {
            return Ok(());
        }
        stall.wait().await;
        send(&mut sock, &buf[..n]).await?;
    }
}

async fn serve_discard<S: AsyncRead + Unpin>(mut sock: S) -> std::io::Result<()> {
    let mut buf = vec![0u8; 256 * 1024];
    while sock.read(&mut buf).await? != 0 {}
    Ok(())
}

async fn serve_source<S: AsyncWrite + Unpin>(mut sock: S) -> std::io::Result<()> {
    let buf = vec![0u8; 256 * 1024];
    loop {
        send(&mut sock, &buf).await?;
    }
}

/// HTTP/1.1 requests on one connection until one asks to upgrade to WebSocket.
async fn serve_http<S: AsyncRead + AsyncWrite + Unpin>(mut sock: S, stall: &Stall) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(4096);
    let mut out = Vec::with_capacity(4096);
    loop {
        let head_len = match httphead::read_head(&mut sock, &mut buf).await {
            Ok(n) => n,
            Err(httphead::HeadError::Eof) if buf.is_empty() => return Ok(()),
            Err(_) => {
                send(&mut sock, b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await?;
                return Ok(());
            }
        };
        let mut hdrs = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut hdrs);
        if !matches!(req.parse(&buf[..head_len]), Ok(httparse::Status::Complete(_))) {
            send(&mut sock, b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await?;
            return Ok(());
        }
        let upgrade = has_token(header(req.headers, "connection"), "upgrade")
            && header(req.headers, "upgrade").is_some_and(|v| v.eq_ignore_ascii_case(b"websocket"));
        if upgrade {
            let Some(key) = header(req.headers, "sec-websocket-key") else {
                send(&mut sock, b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").await?;
                return Ok(());
            };
            let accept = wsproto::accept_key(&String::from_utf8_lossy(key));
            let resp = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            out.extend_from_slice(resp.as_bytes());
            send(&mut sock, &out).await?;
            buf.drain(..head_len);
            return serve_ws(sock, buf, stall).await;
        }
        let close = req.version == Some(0) && !has_token(header(req.headers, "connection"), "keep-alive")
            || has_token(header(req.headers, "connection"), "close");
        let body_len = header(req.headers, "content-length")
            .and_then(|v| std::str::from_utf8(v).ok()?.trim().parse::<usize>().ok())
            .unwrap_or(0);
        // Skip a request body, if any.
        let mut need = head_len + body_len;
        while buf.len() < need {
            let old = buf.len();
            buf.resize(need.max(old + 4096), 0);
            let n = sock.read(&mut buf[old..]).await?;
            buf.truncate(old + n);
            if n == 0 {
                return Ok(());
            }
        }
        need = need.min(buf.len());
        buf.drain(..need);
        out.extend_from_slice(if close { HTTP_CLOSE } else { HTTP_KEEP });
        // Pipelined requests already buffered are answered with one write.
        if !close && httphead::head_end(&buf).is_some() {
            continue;
        }
        stall.wait().await;
        send(&mut sock, &out).await?;
        out.clear();
        if close {
            return Ok(());
        }
    }
}

/// Answers a framing violation with close code 1002 and ends the connection.
async fn close_protocol_error<S: AsyncWrite + Unpin>(sock: &mut S, out: &mut Vec<u8>) -> std::io::Result<()> {
    out.clear();
    wsproto::encode_frame(out, opcode::CLOSE, &1002u16.to_be_bytes(), None);
    let _ = send(sock, out).await;
    Ok(())
}

/// Echoes WebSocket frames until close. `leftover` holds bytes read past the handshake.
async fn serve_ws<S: AsyncRead + AsyncWrite + Unpin>(
    mut sock: S,
    leftover: Vec<u8>,
    stall: &Stall,
) -> std::io::Result<()> {
    // Small to start so that many idle connections stay cheap; both grow on demand.
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    let mut rb = ReadBuf::with_leftover(leftover, 4096);
    loop {
        // Answer every complete frame read so far with one write.
        let mut closing = false;
        while !closing {
            let head = match wsproto::parse_head(rb.data()) {
                Ok(Some(h)) => h,
                Ok(None) => break,
                Err(_) => return close_protocol_error(&mut sock, &mut out).await,
            };
            // Clients must mask (RFC 6455 §5.1).
            let Some(mask) = head.mask else {
                return close_protocol_error(&mut sock, &mut out).await;
            };
            if rb.data().len() < head.total_len() {
                rb.reserve(head.total_len());
                break;
            }
            let payload = &mut rb.data_mut()[head.header_len..head.total_len()];
            wsproto::apply_mask(payload, mask, 0);
            match head.opcode {
                opcode::PING => wsproto::encode_frame(&mut out, opcode::PONG, payload, None),
                opcode::PONG => {}
                opcode::CLOSE => {
                    // Echo the status code (if any), then close.
                    let code = &payload[..payload.len().min(2)];
                    wsproto::encode_frame(&mut out, opcode::CLOSE, code, None);
                    closing = true;
                }
                op => {
                    // Data frames (and continuations) go back as they came, unmasked.
                    let o = out.len();
                    out.resize(o + wsproto::header_len(head.payload_len, false), 0);
                    wsproto::write_header(&mut out[o..], op, head.payload_len, None);
                    if !head.fin {
                        out[o] &= 0x7F;
                    }
                    out.extend_from_slice(payload);
                }
            }
            rb.consume(head.total_len());
        }
        if !out.is_empty() {
            stall.wait().await;
            send(&mut sock, &out).await?;
            out.clear();
        }
        if closing {
            let _ = sock.shutdown().await;
            return Ok(());
        }
        if rb.read_from(&mut sock).await? == 0 {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canned_answers_match_the_body() {
        let keep = std::str::from_utf8(HTTP_KEEP).unwrap();
        assert!(keep.ends_with(HTTP_BODY));
        assert!(keep.contains(&format!("Content-Length: {}\r\n", HTTP_BODY.len())));
        let close = std::str::from_utf8(HTTP_CLOSE).unwrap();
        assert!(close.ends_with(HTTP_BODY));
        assert!(close.contains(&format!("Content-Length: {}\r\n", HTTP_BODY.len())));
    }
}
