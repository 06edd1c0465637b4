//! A keep-alive backend that records every byte it receives: it answers
//! every request it parses with `200` and its own name as the body, keeps
//! the connection open whatever `Connection` says (as many real backends
//! do), and can send more than its Content-Length says.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use upsplice::handshake::framing::ChunkedEnd;

#[derive(Clone)]
pub struct Recorder {
    pub name: &'static str,
    pub addr: SocketAddr,
    /// Bytes received, one entry per connection.
    pub conns: Arc<Mutex<Vec<Vec<u8>>>>,
    open: Arc<AtomicUsize>,
    /// Written after every answer, past its Content-Length.
    overrun: &'static str,
}

impl Recorder {
    pub async fn start(name: &'static str) -> Recorder {
        Recorder::start_overrunning(name, "").await
    }

    /// A recorder whose every answer is followed by `overrun`: bytes past
    /// its Content-Length that a proxy must never take for the answer to
    /// the client's next request.
    pub async fn start_overrunning(name: &'static str, overrun: &'static str) -> Recorder {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let rec =
            Recorder { name, addr: l.local_addr().unwrap(), conns: Arc::default(), open: Arc::default(), overrun };
        let r = rec.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let index = {
                    let mut c = r.conns.lock().unwrap();
                    c.push(Vec::new());
                    c.len() - 1
                };
                r.open.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                tokio::spawn(async move {
                    // Bounded: a connection lives at most 10 s here.
                    let _ = tokio::time::timeout(Duration::from_secs(10), r.serve(s, index)).await;
                    r.open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        rec
    }

    async fn serve(&self, mut s: TcpStream, index: usize) {
        let mut buf = Vec::new();
        let mut parsed = 0;
        let mut chunk = [0u8; 4096];
        loop {
            let n = match s.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            buf.extend_from_slice(&chunk[..n]);
            self.conns.lock().unwrap()[index].extend_from_slice(&chunk[..n]);
            // Answer every complete request, as a keep-alive server does.
            while let Some(end) = request_end(&buf[parsed..]) {
                parsed += end;
                let body = self.name;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: keep-alive\r\nKeep-Alive: timeout=30\r\n\r\n{body}{}",
                    body.len(),
                    self.overrun
                );
                if s.write_all(answer.as_bytes()).await.is_err() {
                    return;
                }
            }
        }
    }

    /// Everything received so far, all connections together.
    pub fn received(&self) -> String {
        let c = self.conns.lock().unwrap();
        c.iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect::<Vec<_>>()
            .join("\n--- next connection ---\n")
    }

    pub fn connections(&self) -> usize {
        self.conns.lock().unwrap().len()
    }

    /// Waits (bounded) until every connection to it was closed by its peer,
    /// so that nothing more can arrive on them.
    pub async fn wait_closed(&self) {
        let deadline = Instant::now() + Duration::from_secs(3);
        while self.open.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits (bounded) until every connection to it was closed, or nothing
    /// arrived for 300 ms: a proxy that pools its backend connections keeps
    /// them open.
    pub async fn settle(&self) {
        let deadline = Instant::now() + Duration::from_secs(3);
        let total = || self.conns.lock().unwrap().iter().map(Vec::len).sum::<usize>();
        let (mut seen, mut since) = (total(), Instant::now());
        while self.open.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            let now = total();
            if now != seen {
                (seen, since) = (now, Instant::now());
            } else if since.elapsed() >= Duration::from_millis(300) {
                break;
            }
        }
    }
}

/// The length of the first complete request (head and body) in `buf`, as
/// a lenient backend frames it: the first `Transfer-Encoding` line wins.
fn request_end(buf: &[u8]) -> Option<usize> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut req = httparse::Request::new(&mut headers);
    let head = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        _ => return None,
    };
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| String::from_utf8_lossy(h.value).trim().to_ascii_lowercase())
    };
    if header("transfer-encoding").is_some_and(|te| te.ends_with("chunked")) {
        return ChunkedEnd::default().feed(&buf[head..]).ok().flatten().map(|n| head + n);
    }
    // A list of identical values ("5, 5") is one length (RFC 9110 §8.6),
    // as the router frames it: read as 0, the recorder would answer before
    // the body and race the router's relay of it.
    let length: usize = header("content-length").and_then(|v| v.split(',').next()?.trim().parse().ok()).unwrap_or(0);
    (buf.len() >= head + length).then_some(head + length)
}
