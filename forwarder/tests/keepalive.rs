//! Client keep-alive (issue 12): every request on a persistent client
//! connection is parsed, routed and rewritten on its own, responses are
//! framed exactly and come back in order, and the router says
//! `Connection: close` whenever it will close. Real peers: Python's
//! `requests` and `http.client` (both pool connections), curl with several
//! URLs in one command, raw pipelined requests, and a keep-alive backend
//! scripted per path.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The size of `/big`.
const BIG: usize = 50_000_000;

/// A keep-alive HTTP/1.1 backend scripted by path; it counts the
/// connections it accepted and the requests it answered.
///
/// * `/slow/MS`: answers after MS milliseconds;
/// * `/until-close`: a body delimited by the backend's close;
/// * `/chunked`: a chunked body with a trailer;
/// * `/204`, `/304`: no body;
/// * `/upgrade`: 101, then echoes raw bytes;
/// * `/big`: 200 with a [`BIG`]-byte patterned body;
/// * `/bye`: 200 with `Content-Length` (keep-alive), then the backend
///   closes the connection, as one does at its own idle timeout;
/// * anything else: 200, `Content-Length`, body `NAME METHOD PATH HOST XFF`.
#[derive(Clone)]
struct Scripted {
    name: &'static str,
    addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    requests: Arc<AtomicUsize>,
}

impl Scripted {
    async fn start(name: &'static str) -> Scripted {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let me =
            Scripted { name, addr: l.local_addr().unwrap(), connections: Arc::default(), requests: Arc::default() };
        let b = me.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                b.connections.fetch_add(1, Ordering::SeqCst);
                let b = b.clone();
                // Bounded: a connection lives at most 20 s here.
                tokio::spawn(async move {
                    let _ = tokio::time::timeout(Duration::from_secs(20), b.serve(s)).await;
                });
            }
        });
        me
    }

    async fn serve(&self, mut s: TcpStream) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            // One complete request head (these requests carry no body
            // unless Content-Length says so).
            let (head_len, method, path, host, xff, mut length, upgrade, expect, chunked) = loop {
                let mut headers = [httparse::EMPTY_HEADER; 64];
                let mut req = httparse::Request::new(&mut headers);
                if let Ok(httparse::Status::Complete(n)) = req.parse(&buf) {
                    let h = |name: &str| {
                        req.headers
                            .iter()
                            .find(|h| h.name.eq_ignore_ascii_case(name))
                            .map(|h| String::from_utf8_lossy(h.value).into_owned())
                            .unwrap_or_default()
                    };
                    let length: usize = h("content-length").parse().unwrap_or(0);
                    let chunked = h("transfer-encoding").contains("chunked");
                    let upgrade = !h("upgrade").is_empty();
                    let expect = h("expect").eq_ignore_ascii_case("100-continue");
                    break (
                        n,
                        req.method.unwrap().to_string(),
                        req.path.unwrap().to_string(),
                        h("host"),
                        h("x-forwarded-for"),
                        length,
                        upgrade,
                        expect,
                        chunked,
                    );
                }
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            };
            if expect && s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.is_err() {
                return;
            }
            // A chunked body: read to its last chunk.
            if chunked {
                length = loop {
                    let mut end = upsplice::handshake::framing::ChunkedEnd::default();
                    if let Ok(Some(n)) = end.feed(&buf[head_len..]) {
                        break n;
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
            }
            while buf.len() < head_len + length {
                match s.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            buf.drain(..head_len + length);
            self.requests.fetch_add(1, Ordering::SeqCst);
            let answer = match path.as_str() {
                p if p.starts_with("/slow/") => {
                    tokio::time::sleep(Duration::from_millis(p[6..].parse().unwrap())).await;
                    "HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nslow".to_string()
                }
                "/until-close" => {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nall of it").await;
                    return;
                }
                "/chunked" => {
                    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Sum\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nX-Sum: 5\r\n\r\n"
                        .to_string()
                }
                "/204" => "HTTP/1.1 204 No Content\r\n\r\n".to_string(),
                "/big" => {
                    let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {BIG}\r\n\r\n");
                    if s.write_all(head.as_bytes()).await.is_err() || s.write_all(&pattern(7, BIG)).await.is_err() {
                        return;
                    }
                    continue;
                }
                "/bye" => {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nbye").await;
                    return;
                }
                "/304" => "HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\n\r\n".to_string(),
                "/upgrade" if upgrade => {
                    let _ = s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n").await;
                    let (mut r, mut w) = s.split();
                    if !buf.is_empty() {
                        let _ = w.write_all(&buf).await;
                    }
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                    return;
                }
                _ => {
                    let body = format!("{} {method} {path} {host} {xff}", self.name);
                    let head_only = method == "HEAD";
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nKeep-Alive: timeout=30\r\n\r\n{}",
                        body.len(),
                        if head_only { "" } else { &body }
                    )
                }
            };
            if s.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    }
}

/// A router (copy plane: this is about the request path) with `a.test` →
/// backend a, `b.test` → backend b, and `limits` added to `[limits]`.
async fn setup(limits: &str) -> (Router, Scripted, Scripted) {
    let a = Scripted::start("a").await;
    let b = Scripted::start("b").await;
    let routing = format!(
        "{}[[pool]]\nname = \"b\"\nbackends = [\"{}\"]\n[[route]]\nhost = \"b.test\"\npool = \"b\"\n",
        main_pool(&[a.addr], "a.test"),
        b.addr
    );
    let limits = format!("handshake_timeout = \"2s\"\nconnect_timeout = \"1s\"\n{limits}");
    let router = Router::start(Setup { mode: "copy", limits: &limits, routing, extra: "" });
    (router, a, b)
}

/// Reads one response (head and its body, framed by Content-Length or
/// chunked, or nothing for HEAD/204/304) from `s`; returns the head and
/// the body. `leftover` carries bytes read past it to the next call.
async fn read_response(s: &mut TcpStream, leftover: &mut Vec<u8>, head_request: bool) -> (String, Vec<u8>) {
    let mut chunk = [0u8; 8192];
    let work = async {
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut headers);
            if let Ok(httparse::Status::Complete(n)) = resp.parse(leftover) {
                let code = resp.code.unwrap();
                let header = |name: &str| {
                    resp.headers
                        .iter()
                        .find(|h| h.name.eq_ignore_ascii_case(name))
                        .map(|h| String::from_utf8_lossy(h.value).into_owned())
                };
                let chunked = header("transfer-encoding").is_some_and(|t| t.contains("chunked"));
                let length: Option<usize> = header("content-length").and_then(|v| v.parse().ok());
                let head = String::from_utf8_lossy(&leftover[..n]).into_owned();
                let mut rest = leftover.split_off(n);
                std::mem::swap(leftover, &mut rest);
                let body_len = if head_request || code == 204 || code == 304 || (100..200).contains(&code) {
                    Some(0)
                } else if chunked {
                    None
                } else {
                    length
                };
                let body = match body_len {
                    Some(len) => {
                        while leftover.len() < len {
                            let n = s.read(&mut chunk).await.unwrap();
                            assert!(n > 0, "closed inside a body");
                            leftover.extend_from_slice(&chunk[..n]);
                        }
                        let rest = leftover.split_off(len);
                        std::mem::replace(leftover, rest)
                    }
                    None if chunked => loop {
                        let mut end = upsplice::handshake::framing::ChunkedEnd::default();
                        if let Ok(Some(len)) = end.feed(leftover) {
                            let rest = leftover.split_off(len);
                            break std::mem::replace(leftover, rest);
                        }
                        let n = s.read(&mut chunk).await.unwrap();
                        assert!(n > 0, "closed inside a chunked body");
                        leftover.extend_from_slice(&chunk[..n]);
                    },
                    None => {
                        // Until the close.
                        s.read_to_end(leftover).await.unwrap();
                        std::mem::take(leftover)
                    }
                };
                return (head, body);
            }
            let n = s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "closed before a response head: {:?}", String::from_utf8_lossy(leftover));
            leftover.extend_from_slice(&chunk[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(10), work).await.expect("response did not arrive in time")
}

/// True when the router closed `s` within `within` (EOF or reset).
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut one = [0u8; 1];
    matches!(tokio::time::timeout(within, s.read(&mut one)).await, Ok(Ok(0)) | Ok(Err(_)))
}

fn accepted(r: &Router) -> f64 {
    r.metric("upsplice_connections_accepted_total{listener=\"web\"}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_connection_carries_requests_to_several_pools_in_order() {
    let (r, a, b) = setup("").await;
    let mut s = TcpStream::connect(r.http).await.unwrap();
    let mut left = Vec::new();
    // One after another, then three pipelined in one write.
    for (host, who) in [("a.test", "a"), ("b.test", "b"), ("a.test", "a")] {
        let req = format!("GET /one HTTP/1.1\r\nHost: {host}\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let (head, body) = read_response(&mut s, &mut left, false).await;
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n") && !head.contains("Connection"), "{head}");
        assert!(!head.contains("Keep-Alive"), "the backend's hop-by-hop header reached the client: {head}");
        assert_eq!(String::from_utf8(body).unwrap(), format!("{who} GET /one {host} 127.0.0.1"));
    }
    s.write_all(
        b"GET /p1 HTTP/1.1\r\nHost: b.test\r\n\r\nHEAD /p2 HTTP/1.1\r\nHost: a.test\r\n\r\nGET /p3 HTTP/1.1\r\nHost: b.test\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let (_, body) = read_response(&mut s, &mut left, false).await;
    assert_eq!(body, b"b GET /p1 b.test 127.0.0.1");
    let (head, body) = read_response(&mut s, &mut left, true).await;
    let length = "a HEAD /p2 a.test 127.0.0.1".len();
    assert!(head.contains(&format!("\r\nContent-Length: {length}\r\n")) && body.is_empty(), "{head}");
    let (head, body) = read_response(&mut s, &mut left, false).await;
    assert!(head.contains("\r\nConnection: close\r\n"), "the last response says close: {head}");
    assert_eq!(body, b"b GET /p3 b.test 127.0.0.1");
    assert!(left.is_empty(), "bytes after the last response: {left:?}");
    assert!(closed_within(&mut s, Duration::from_secs(3)).await, "not closed after Connection: close");
    assert_eq!(accepted(&r), 1.0, "one client connection");
    assert_eq!(a.requests.load(Ordering::SeqCst) + b.requests.load(Ordering::SeqCst), 6);
    // Every request was counted, and each got its own access record.
    assert_eq!(r.metric("upsplice_handshakes_total{listener=\"web\",status=\"200\",reason=\"\"}"), 6.0);
    r.wait_log("/p3");
    let records = r.log().lines().filter(|l| l.contains("upsplice::access")).count();
    assert_eq!(records, 6, "{}", r.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn framing_of_every_kind_keeps_the_connection_or_says_close() {
    let (r, _a, _b) = setup("").await;
    let mut s = TcpStream::connect(r.http).await.unwrap();
    let mut left = Vec::new();
    let get = |path: &str| format!("GET {path} HTTP/1.1\r\nHost: a.test\r\n\r\n");
    // Chunked with a trailer: relayed as is, connection kept.
    s.write_all(get("/chunked").as_bytes()).await.unwrap();
    let (head, body) = read_response(&mut s, &mut left, false).await;
    assert!(head.contains("Transfer-Encoding: chunked") && !head.contains("Connection"), "{head}");
    assert_eq!(body, b"3\r\nabc\r\n2\r\nde\r\n0\r\nX-Sum: 5\r\n\r\n");
    for path in ["/204", "/304"] {
        s.write_all(get(path).as_bytes()).await.unwrap();
        let (head, body) = read_response(&mut s, &mut left, false).await;
        assert!(head.starts_with(&format!("HTTP/1.1 {} ", &path[1..])) && body.is_empty(), "{head}");
    }
    // 100-continue, then the body, then the final answer; kept.
    s.write_all(b"POST /up HTTP/1.1\r\nHost: a.test\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
        .await
        .unwrap();
    let (head, _) = read_response(&mut s, &mut left, false).await;
    assert!(head.starts_with("HTTP/1.1 100 Continue\r\n"), "{head}");
    s.write_all(b"abc").await.unwrap();
    let (_, body) = read_response(&mut s, &mut left, false).await;
    assert_eq!(body, b"a POST /up a.test 127.0.0.1");
    // A body delimited by the backend's close: relayed, then the client
    // connection closes too, and the head said so.
    s.write_all(get("/until-close").as_bytes()).await.unwrap();
    let (head, body) = read_response(&mut s, &mut left, false).await;
    assert!(head.contains("\r\nConnection: close\r\n"), "{head}");
    assert_eq!(body, b"all of it");
    assert_eq!(accepted(&r), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http10_keeps_only_when_asked_and_is_told_so() {
    let (r, _a, _b) = setup("").await;
    let mut s = TcpStream::connect(r.http).await.unwrap();
    let mut left = Vec::new();
    s.write_all(b"GET /x HTTP/1.0\r\nHost: a.test\r\nConnection: keep-alive\r\n\r\n").await.unwrap();
    let (head, _) = read_response(&mut s, &mut left, false).await;
    assert!(head.contains("\r\nConnection: keep-alive\r\n"), "{head}");
    s.write_all(b"GET /y HTTP/1.0\r\nHost: a.test\r\n\r\n").await.unwrap();
    let (head, body) = read_response(&mut s, &mut left, false).await;
    assert!(head.contains("\r\nConnection: close\r\n"), "{head}");
    assert_eq!(body, b"a GET /y a.test 127.0.0.1");
    assert!(closed_within(&mut s, Duration::from_secs(3)).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_cap_and_idle_timeout_close_the_connection() {
    let (r, _a, _b) = setup("max_requests_per_connection = 3\nkeepalive_timeout = \"1s\"").await;
    let mut s = TcpStream::connect(r.http).await.unwrap();
    let mut left = Vec::new();
    for i in 1..=3 {
        s.write_all(b"GET /n HTTP/1.1\r\nHost: a.test\r\n\r\n").await.unwrap();
        let (head, _) = read_response(&mut s, &mut left, false).await;
        assert_eq!(head.contains("\r\nConnection: close\r\n"), i == 3, "request {i}: {head}");
    }
    assert!(closed_within(&mut s, Duration::from_secs(3)).await, "open after the last allowed request");
    drop(s);
    // Idle: closed after keepalive_timeout, without an access record.
    let mut s = TcpStream::connect(r.http).await.unwrap();
    s.write_all(b"GET /n HTTP/1.1\r\nHost: a.test\r\n\r\n").await.unwrap();
    let (head, _) = read_response(&mut s, &mut Vec::new(), false).await;
    assert!(!head.contains("Connection"), "{head}");
    let idle = Instant::now();
    assert!(closed_within(&mut s, Duration::from_secs(5)).await, "idle connection kept past keepalive_timeout");
    let waited = idle.elapsed();
    assert!(waited >= Duration::from_millis(900) && waited < Duration::from_secs(3), "{waited:?}");
    std::thread::sleep(Duration::from_millis(200));
    let records = r.log().lines().filter(|l| l.contains("upsplice::access")).count();
    assert_eq!(records, 4, "one record per request, none for the idle close:\n{}", r.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_after_plain_requests_starts_its_tunnel() {
    let (r, _a, _b) = setup("").await;
    let mut s = TcpStream::connect(r.http).await.unwrap();
    let mut left = Vec::new();
    s.write_all(b"GET /first HTTP/1.1\r\nHost: a.test\r\n\r\n").await.unwrap();
    read_response(&mut s, &mut left, false).await;
    // The upgrade and the tunnel's first bytes in one write.
    s.write_all(b"GET /upgrade HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nping")
        .await
        .unwrap();
    let (head, _) = read_response(&mut s, &mut left, false).await;
    assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
    let mut got = left.clone();
    let mut chunk = [0u8; 64];
    while got.len() < 4 {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0);
        got.extend_from_slice(&chunk[..n]);
    }
    assert_eq!(got, b"ping");
    s.write_all(b"pong").await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await.unwrap().unwrap();
    assert_eq!(&chunk[..n], b"pong");
    assert_eq!(r.metric("upsplice_tunnels_active{listener=\"web\",data_plane=\"copy\"}"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_backend_gets_504_after_response_timeout() {
    let (r, _a, _b) = setup("response_timeout = \"1s\"").await;
    let started = Instant::now();
    let got = raw_exchange(r.http, b"GET /slow/3000 HTTP/1.1\r\nHost: a.test\r\n\r\n").await;
    let took = started.elapsed();
    assert!(got.starts_with("HTTP/1.1 504 Gateway Timeout\r\n"), "{got}");
    assert!(
        got.contains("\r\nX-Cf-Routererror: endpoint_failure\r\n") && got.contains("\r\nConnection: close\r\n"),
        "{got}"
    );
    assert!(took >= Duration::from_millis(900) && took < Duration::from_millis(2500), "{took:?}");
    // Within the timeout: answered.
    let got = raw_exchange(r.http, b"GET /slow/200 HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n").await;
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n") && got.ends_with("slow"), "{got}");
    assert_eq!(r.metric("upsplice_handshakes_total{listener=\"web\",status=\"504\",reason=\"endpoint_failure\"}"), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_max_request_body_get_413_and_never_reach_a_backend() {
    let (r, a, _b) = setup("max_request_body = 10").await;
    let got = raw_exchange(r.http, b"POST /x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 11\r\n\r\n01234567890").await;
    assert!(got.starts_with("HTTP/1.1 413 Content Too Large\r\n"), "{got}");
    assert_eq!(a.connections.load(Ordering::SeqCst), 0, "a backend was contacted");
    let got = raw_exchange(
        r.http,
        b"POST /x HTTP/1.1\r\nHost: a.test\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n01234\r\n5\r\n56789\r\n0\r\n\r\n",
    )
    .await;
    // A chunked body's size shows as it streams: its head reached the
    // backend, the client gets the 413 and the connection closes.
    assert!(got.starts_with("HTTP/1.1 413 Content Too Large\r\n"), "{got}");
    // At the limit: forwarded.
    let got = raw_exchange(
        r.http,
        b"POST /x HTTP/1.1\r\nHost: a.test\r\nContent-Length: 10\r\nConnection: close\r\n\r\n0123456789",
    )
    .await;
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_drain_closes_idle_connections_and_says_close_on_the_last_answer() {
    let (r, _a, _b) = setup("").await;
    let mut idle = TcpStream::connect(r.http).await.unwrap();
    let mut left = Vec::new();
    idle.write_all(b"GET /n HTTP/1.1\r\nHost: a.test\r\n\r\n").await.unwrap();
    read_response(&mut idle, &mut left, false).await;
    let mut busy = TcpStream::connect(r.http).await.unwrap();
    busy.write_all(b"GET /slow/1000 HTTP/1.1\r\nHost: a.test\r\n\r\n").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    r.signal(nix::sys::signal::Signal::SIGUSR1);
    assert!(
        closed_within(&mut idle, Duration::from_secs(2)).await,
        "an idle keep-alive connection outlived the drain's start"
    );
    let (head, body) = read_response(&mut busy, &mut Vec::new(), false).await;
    assert!(head.contains("\r\nConnection: close\r\n") && body == b"slow", "{head}");
    assert!(closed_within(&mut busy, Duration::from_secs(3)).await);
}

/// Python's `requests.Session` and `http.client` pool their connection;
/// curl reuses one for several URLs in one command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pooling_clients_reuse_one_connection_across_pools() {
    let (r, _a, _b) = setup("").await;
    let script = r#"
import sys, requests
port = int(sys.argv[1])
s = requests.Session()
out = []
for host in ["a.test", "b.test", "a.test", "b.test"]:
    resp = s.get(f"http://127.0.0.1:{port}/py", headers={"Host": host}, timeout=5)
    out.append(resp.text.split()[0])
resp = s.post(f"http://127.0.0.1:{port}/py", headers={"Host": "a.test"}, data=b"x" * 100000, timeout=5)
out.append(str(resp.status_code))
print(" ".join(out))
"#;
    let port = r.http.port().to_string();
    let out =
        tokio::task::spawn_blocking(move || Command::new("python3").args(["-c", script, &port]).output().unwrap())
            .await
            .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "a b a b 200");
    assert_eq!(accepted(&r), 1.0, "requests opened more than one connection");

    let url = |host: &str| format!("http://{host}:{}/curl", r.http.port());
    let curl = Command::new("curl")
        .args(["-sv", "--resolve", &format!("a.test:{}:127.0.0.1", r.http.port())])
        .args(["--resolve", &format!("b.test:{}:127.0.0.1", r.http.port())])
        .args([url("a.test"), url("a.test"), url("a.test")])
        .output();
    let Ok(curl) = curl else {
        eprintln!("curl is not installed (scripts/setup installs it); skipping its part");
        return;
    };
    let (stdout, stderr) = (String::from_utf8_lossy(&curl.stdout), String::from_utf8_lossy(&curl.stderr));
    assert_eq!(stdout.matches("a GET /curl a.test").count(), 3, "{stdout}\n{stderr}");
    assert!(stderr.contains("Re-using existing connection") || stderr.contains("Reusing existing"), "{stderr}");
    assert_eq!(accepted(&r), 2.0, "curl opened more than one connection");
}

/// Backend connections are kept and reused across requests and client
/// connections (`[backends] max_idle_per_backend`); one the backend closed
/// while idle is never used for a request that then fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_connections_are_reused_and_a_closed_one_is_not_a_failure() {
    let (r, a, _b) = setup("").await;
    let mut s = TcpStream::connect(r.http).await.unwrap();
    let mut left = Vec::new();
    for _ in 0..5 {
        s.write_all(b"GET /one HTTP/1.1\r\nHost: a.test\r\n\r\n").await.unwrap();
        let (head, _) = read_response(&mut s, &mut left, false).await;
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    }
    // The connection goes back to the idle pool just after its response's
    // last byte went to the client: a request on *another* client
    // connection in that instant opens a second backend connection (seen
    // 1 in 12 runs on a loaded machine, before each request below waited
    // too, and once in a clean-clone CI run even with the wait). Correct,
    // but not the case pinned down here; `s`'s own next request is served
    // after the release. So at most one more connection than the one
    // needed, and every other request reused one.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let got = raw_exchange(r.http, b"GET /two HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n").await;
        assert!(got.starts_with("HTTP/1.1 200 "), "{got}");
    }
    let opened = a.connections.load(Ordering::SeqCst);
    assert!(opened <= 2, "8 requests, one backend connection (two in the race above), got {opened}");
    assert_eq!(r.metric("upsplice_backend_reused_total{pool=\"main\"}"), (8 - opened) as f64);
    // The backend closes the connection after answering: the next requests
    // get a new one, and nobody sees an error.
    for path in ["/bye", "/one", "/bye", "/one"] {
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: a.test\r\n\r\n").as_bytes()).await.unwrap();
        let (head, _) = read_response(&mut s, &mut left, false).await;
        assert!(head.starts_with("HTTP/1.1 200 "), "{path}: {head}");
        if path == "/bye" {
            // Closed *while idle*: the backend's FIN trails its response.
            // The router learns of it from its reactor (no peek per reuse,
            // 87d870e), and a worker that a loaded machine kept off the
            // CPU may not have read its events yet when the next request
            // arrives: the request then goes out on the closing connection,
            // sees EOF and is sent again on a new one (the race of RFC 9112
            // §9.3.1, handled: the client sees its 200). Seen in 1 of 40
            // runs with two CPU hogs beside the test, and in a clean-clone
            // CI run. The wait makes it rare; the count allows it.
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let reopened = a.connections.load(Ordering::SeqCst) - opened;
    assert!((2..=4).contains(&reopened), "each /bye costs the next request a new connection, got {reopened}");
    assert_eq!(r.metric("upsplice_handshakes_total{listener=\"web\",status=\"200\",reason=\"\"}"), 12.0);
}

/// A 50 MB response on a kept connection: every byte, in order, framed by
/// its length; the next request on the same connection is answered after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_50_mb_download_then_the_next_request() {
    let (r, a, _b) = setup("").await;
    let mut s = TcpStream::connect(r.http).await.unwrap();
    let mut left = Vec::new();
    s.write_all(b"GET /big HTTP/1.1\r\nHost: a.test\r\n\r\n").await.unwrap();
    let (head, body) = read_response(&mut s, &mut left, false).await;
    assert!(head.starts_with("HTTP/1.1 200 ") && head.contains(&format!("Content-Length: {BIG}\r\n")), "{head}");
    assert!(body == pattern(7, BIG), "the 50 MB body differs ({} bytes)", body.len());
    s.write_all(b"GET /after HTTP/1.1\r\nHost: a.test\r\n\r\n").await.unwrap();
    let (_, body) = read_response(&mut s, &mut left, false).await;
    assert_eq!(body, b"a GET /after a.test 127.0.0.1");
    assert_eq!(accepted(&r), 1.0);
    assert_eq!(a.connections.load(Ordering::SeqCst), 1, "the backend connection was kept after 50 MB");
}
