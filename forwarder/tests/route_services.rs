//! Route services (issue 12), gorouter's contract end to end: the router
//! sends a request on a bound route to its route service over https with
//! a token; the service — a Python https server that checks the token
//! with its own implementation of gorouter's recipe (hashlib's PBKDF2,
//! cryptography's AES-GCM) — calls back through the router, which lets
//! the request through to the app only with a valid, fresh token made
//! for that route. Forged, expired and misdirected tokens, a rotated
//! key, upgrades, and route services that are down or untrusted.
//!
//! Needs python3 with `cryptography` (scripts/setup installs it); with
//! UPSPLICE_REQUIRE_PEERS=1 (CI) its absence fails instead of skipping.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const SECRET: &str = "route-service-secret";

/// The route service: https on 127.0.0.1 (argv: cert, key, secret, a file
/// that will hold the router's address). For each request it opens the
/// token with the secret (401 if it does not open: the router must seal
/// what gorouter seals), then calls back through the router with the
/// contract's headers to the URL in X-CF-Forwarded-Url, and answers with
/// the app's answer plus `X-Route-Service: seen` and what it was sent in
/// `X-RS-*` headers. `python3 - seal SECRET URL AGE_SECONDS` prints a
/// token made `AGE_SECONDS` ago instead.
const PY_ROUTE_SERVICE: &str = r#"
import base64, datetime, hashlib, http.client, http.server, json, os, ssl, sys, urllib.parse
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

def key(secret):
    return AESGCM(hashlib.pbkdf2_hmac('sha256', secret.encode(), b'', 100001, 16))

def seal(secret, url, age):
    t = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=age)
    body = json.dumps({"forwarded_url": url, "requested_time": t.isoformat()}).encode()
    nonce = os.urandom(12)
    sig = base64.urlsafe_b64encode(key(secret).encrypt(nonce, body, b'')).decode()
    meta = base64.urlsafe_b64encode(json.dumps({"nonce": base64.b64encode(nonce).decode()}).encode()).decode()
    return sig, meta

def open_token(secret, sig, meta):
    nonce = base64.b64decode(json.loads(base64.urlsafe_b64decode(meta))["nonce"])
    return json.loads(key(secret).decrypt(nonce, base64.urlsafe_b64decode(sig), b''))

if sys.argv[1] == 'seal':
    print(*seal(sys.argv[2], sys.argv[3], float(sys.argv[4])))
    sys.exit(0)

cert, keyfile, secret, router_file = sys.argv[1:5]

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def log_message(self, *a): pass
    def handle_any(self):
        n = int(self.headers.get('Content-Length') or 0)
        body = self.rfile.read(n) if n else b''
        url = self.headers.get('X-CF-Forwarded-Url', '')
        sig = self.headers.get('X-CF-Proxy-Signature', '')
        meta = self.headers.get('X-CF-Proxy-Metadata', '')
        try:
            signed = open_token(secret, sig, meta)
        except Exception as e:
            return self.answer(401, {'X-RS-Error': type(e).__name__}, b'token did not open\n')
        if signed['forwarded_url'] != urllib.parse.unquote_plus(url):  # gorouter seals url.QueryUnescape(url)
            return self.answer(401, {'X-RS-Error': 'url'}, b'token for another url\n')
        host, port = open(router_file).read().split()
        u = urllib.parse.urlsplit(url)
        target = u.path + ('?' + u.query if u.query else '')
        c = http.client.HTTPConnection(host, int(port), timeout=10)
        headers = {'Host': u.hostname, 'X-CF-Forwarded-Url': url, 'X-CF-Proxy-Signature': sig,
                   'X-CF-Proxy-Metadata': meta, 'X-Authenticated': 'by-route-service'}
        c.request(self.command, target, body=body or None, headers=headers)
        r = c.getresponse()
        data = r.read()
        extra = {'X-Route-Service': 'seen', 'X-RS-Path': self.path, 'X-RS-Host': self.headers.get('Host', ''),
                 'X-RS-Forwarded-Url': url, 'X-RS-Requested-Time': signed['requested_time']}
        for k in ('X-App-Saw', 'X-Cf-Routererror'):
            if r.getheader(k): extra[k] = r.getheader(k)
        self.answer(r.status, extra, data)
    def answer(self, status, headers, body):
        self.send_response(status)
        for k, v in headers.items(): self.send_header(k, v)
        self.send_header('Content-Length', str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_GET = do_POST = do_PUT = do_DELETE = handle_any

ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, keyfile)
srv = http.server.ThreadingHTTPServer(('127.0.0.1', 0), H)
srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
print(srv.server_address[1], flush=True)
srv.serve_forever()
"#;

/// True if python3 can import `cryptography`; otherwise skip (or fail
/// under UPSPLICE_REQUIRE_PEERS).
fn python_cryptography() -> bool {
    common::peer::python_module("cryptography.hazmat.primitives.ciphers.aead", "scripts/setup installs it")
}

/// The Python route service, killed when dropped.
struct RouteService {
    child: Child,
    port: u16,
    router_file: PathBuf,
}

impl Drop for RouteService {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RouteService {
    fn start(dir: &Path, secret: &str) -> RouteService {
        let router_file = dir.join("router-addr");
        let mut child = Command::new("python3")
            .args(["-c", PY_ROUTE_SERVICE])
            .arg(dir.join("rs.pem"))
            .arg(dir.join("rs.key"))
            .arg(secret)
            .arg(&router_file)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        RouteService { child, port: line.trim().parse().expect("the route service prints its port"), router_file }
    }

    fn url(&self) -> String {
        format!("https://127.0.0.1:{}/auth?svc=1", self.port)
    }

    fn calls_back_to(&self, router: &Router) {
        std::fs::write(&self.router_file, format!("{} {}", router.http.ip(), router.http.port())).unwrap();
    }
}

/// A token made by the Python implementation `age` seconds ago.
fn python_token(secret: &str, url: &str, age: u32) -> (String, String) {
    let out =
        Command::new("python3").args(["-c", PY_ROUTE_SERVICE, "seal", secret, url, &age.to_string()]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let (sig, meta) = text.trim().split_once(' ').expect("seal prints signature and metadata");
    (sig.to_string(), meta.to_string())
}

/// The app: answers every request with what it was sent, headers and
/// body, and `X-App-Saw: <the X-CF-* and X-Authenticated headers>`.
async fn app() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                loop {
                    let Some((head, mut rest)) = next_head(&mut s).await else { return };
                    let len = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string())
                        })
                        .map_or(0, |v| v.parse::<usize>().unwrap());
                    while rest.len() < len {
                        let mut buf = [0u8; 4096];
                        let n = s.read(&mut buf).await.unwrap();
                        assert!(n > 0, "the body was cut short");
                        rest.extend_from_slice(&buf[..n]);
                    }
                    let saw: Vec<&str> = head
                        .lines()
                        .filter(|l| l.to_ascii_lowercase().starts_with("x-cf-") || l.starts_with("X-Authenticated"))
                        .collect();
                    let body = format!("{head}\n{}", String::from_utf8_lossy(&rest[..len]));
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nX-App-Saw: {}\r\nContent-Length: {}\r\n\r\n{body}",
                        saw.join(" | ").replace(['\r', '\n'], ""),
                        body.len()
                    );
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

/// The next request head on a kept connection; None when the peer closed.
async fn next_head(s: &mut tokio::net::TcpStream) -> Option<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return Some((String::from_utf8_lossy(&buf).into_owned(), rest));
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Certificates: rs.pem for 127.0.0.1 (the route service), trusted by
/// the router through `[route_services] ca`; other.pem, trusted by no one.
fn certs() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in ["rs", "other"] {
        let made = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_string()]).unwrap();
        std::fs::write(dir.path().join(format!("{name}.pem")), made.cert.pem()).unwrap();
        std::fs::write(dir.path().join(format!("{name}.key")), made.signing_key.serialize_pem()).unwrap();
    }
    dir
}

/// A router with the app on shop.test (bound to `rs_url`) and on
/// shop.test/admin (bound to the same service), and `[route_services]`
/// as given.
fn router(app: SocketAddr, rs_url: &str, route_services: &str) -> Router {
    let routing = format!(
        "[[pool]]\nname = \"main\"\nbackends = [\"{app}\"]\n\n[[pool]]\nname = \"admin\"\nbackends = [\"{app}\"]\n\n\
         [[route]]\nhost = \"shop.test\"\npool = \"main\"\nroute_service = \"{rs_url}\"\n\n\
         [[route]]\nhost = \"shop.test\"\npath = \"/admin\"\npool = \"admin\"\nroute_service = \"{rs_url}\"\n\n\
         [[route]]\nhost = \"plain.test\"\npool = \"main\"\n"
    );
    Router::start(Setup { mode: "copy", limits: "connect_timeout = \"2s\"", routing, extra: route_services })
}

fn rs_section(dir: &Path, extra: &str) -> String {
    format!("[route_services]\nkey = {SECRET:?}\nca = {:?}\n{extra}\n", dir.join("rs.pem"))
}

/// One request on a fresh connection; the whole answer (the router closes
/// after it: `Connection: close`).
async fn request(router: &Router, head: &str, body: &str) -> String {
    let req = format!("{head}Content-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    raw_exchange(router.http, req.as_bytes()).await
}

fn header<'a>(answer: &'a str, name: &str) -> Option<&'a str> {
    let head = answer.split("\r\n\r\n").next()?;
    head.lines().find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_goes_through_its_route_service_and_reaches_the_app_once_checked() {
    if !python_cryptography() {
        return;
    }
    let dir = certs();
    let rs = RouteService::start(dir.path(), SECRET);
    let log = dir.path().join("access.json");
    let extra = format!("{}\n[access_log]\npath = {log:?}\nformat = \"json\"\n", rs_section(dir.path(), ""));
    let router = router(app().await, &rs.url(), &extra);
    rs.calls_back_to(&router);

    let answer = request(&router, "POST /orders?id=7&x=%20y HTTP/1.1\r\nHost: shop.test:8080\r\n", "hello app").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // The service got the request at its own URL, with gorouter's headers.
    assert_eq!(header(&answer, "X-Route-Service"), Some("seen"), "{answer}");
    assert_eq!(header(&answer, "X-RS-Path"), Some("/auth?svc=1"));
    assert_eq!(header(&answer, "X-RS-Host").map(|h| h.starts_with("127.0.0.1")), Some(true), "{answer}");
    assert_eq!(header(&answer, "X-RS-Forwarded-Url"), Some("https://shop.test/orders?id=7&x=%20y"));
    // The app got the callback: body intact, the contract's headers gone,
    // the service's own header kept.
    assert_eq!(header(&answer, "X-App-Saw"), Some("X-Authenticated: by-route-service"), "{answer}");
    assert!(answer.contains("POST /orders?id=7&x=%20y HTTP/1.1") && answer.ends_with("hello app"), "{answer}");

    // The access log and metrics see both legs as requests of their own.
    let (_, metrics) = router.admin_get("/metrics").unwrap();
    let ok: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("upsplice_handshakes_total{listener=\"web\",status=\"200\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(ok, 2.0, "two 200s, the request and the callback:\n{metrics}");
    // The service's leg is logged with the service it went to; the
    // callback, which went to the app, without one.
    let lines: Vec<serde_json::Value> = wait_lines(&log, 2).iter().map(|l| serde_json::from_str(l).unwrap()).collect();
    let legs: Vec<(&str, Option<&str>)> =
        lines.iter().map(|l| (l["route"].as_str().unwrap(), l["route_service"].as_str())).collect();
    assert!(legs.contains(&("shop.test", Some(rs.url().as_str()))), "{lines:?}");
    assert!(legs.contains(&("shop.test", None)), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_expired_and_misdirected_callbacks_never_reach_the_app() {
    if !python_cryptography() {
        return;
    }
    let dir = certs();
    let rs = RouteService::start(dir.path(), SECRET);
    let router = router(app().await, &rs.url(), &rs_section(dir.path(), "timeout = \"30s\""));
    rs.calls_back_to(&router);
    let callback = |path: &str, sig: &str, meta: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: shop.test\r\nX-CF-Proxy-Signature: {sig}\r\nX-CF-Proxy-Metadata: {meta}\r\n"
        )
    };

    // A token from gorouter's recipe (Python's) opens: a callback that a
    // gorouter's service leg produced is served.
    let (sig, meta) = python_token(SECRET, "https://shop.test/x", 0);
    let answer = request(&router, &callback("/x", &sig, &meta), "").await;
    assert!(answer.starts_with("HTTP/1.1 200") && header(&answer, "X-Route-Service").is_none(), "{answer}");

    let refused = |answer: &str, status: &str, error: &str| {
        assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{answer}");
        assert_eq!(header(answer, "X-Cf-Routererror"), Some(error), "{answer}");
        assert!(header(answer, "X-App-Saw").is_none(), "the app was reached: {answer}");
    };
    let answer = request(&router, &callback("/x", "Zm9yZ2Vk", &meta), "").await;
    refused(&answer, "400", "invalid_route_service_signature");
    let (sig, meta) = python_token("another-secret", "https://shop.test/x", 0);
    refused(&request(&router, &callback("/x", &sig, &meta), "").await, "400", "invalid_route_service_signature");
    let (sig, meta) = python_token(SECRET, "https://shop.test/x", 45);
    refused(&request(&router, &callback("/x", &sig, &meta), "").await, "504", "expired_route_service_signature");
    // A token for / does not open /admin (another route, another pool).
    let (sig, meta) = python_token(SECRET, "https://shop.test/x", 0);
    refused(
        &request(&router, &callback("/admin/users", &sig, &meta), "").await,
        "400",
        "invalid_route_service_signature",
    );
    // Without a signature the request goes to the service, never around it.
    let answer =
        request(&router, "GET /admin/users HTTP/1.1\r\nHost: shop.test\r\nX-CF-Proxy-Metadata: x\r\n", "").await;
    assert_eq!(header(&answer, "X-Route-Service"), Some("seen"), "{answer}");
    // A route without a service passes the headers on untouched.
    let answer = request(&router, "GET / HTTP/1.1\r\nHost: plain.test\r\nX-CF-Proxy-Signature: s\r\n", "").await;
    assert_eq!(header(&answer, "X-App-Saw"), Some("X-CF-Proxy-Signature: s"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_key_still_opens_tokens_of_the_previous_one() {
    if !python_cryptography() {
        return;
    }
    let dir = certs();
    let rs = RouteService::start(dir.path(), "new-secret");
    let section = format!(
        "[route_services]\nkey = \"new-secret\"\nprevious_key = {SECRET:?}\nca = {:?}\n",
        dir.path().join("rs.pem")
    );
    let router = router(app().await, &rs.url(), &section);
    rs.calls_back_to(&router);
    // Sealed by a node that still has the old key.
    let (sig, meta) = python_token(SECRET, "https://shop.test/x", 0);
    let answer = request(
        &router,
        &format!(
            "GET /x HTTP/1.1\r\nHost: shop.test\r\nX-CF-Proxy-Signature: {sig}\r\nX-CF-Proxy-Metadata: {meta}\r\n"
        ),
        "",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // New tokens are sealed with the new key: the service (which has only
    // the new one) opens them.
    let answer = request(&router, "GET /y HTTP/1.1\r\nHost: shop.test\r\n", "").await;
    assert_eq!(header(&answer, "X-Route-Service"), Some("seen"), "{answer}");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_and_unreachable_or_untrusted_services_are_refused() {
    if !python_cryptography() {
        return;
    }
    let dir = certs();
    let upgrade = "GET /ws HTTP/1.1\r\nHost: shop.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n";

    // websockets = false (the default): upgrades get gorouter's 503.
    let rs = RouteService::start(dir.path(), SECRET);
    let main = router(app().await, &rs.url(), &rs_section(dir.path(), ""));
    rs.calls_back_to(&main);
    let answer = request(&main, upgrade, "").await;
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert_eq!(header(&answer, "X-Cf-Routererror"), Some("route_service_unsupported"));

    // A service nobody listens on: 502 endpoint_failure, nothing hangs.
    let closed = free_port();
    let down = router(app().await, &format!("https://127.0.0.1:{closed}/"), &rs_section(dir.path(), ""));
    let answer = request(&down, "GET / HTTP/1.1\r\nHost: shop.test\r\n", "").await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert_eq!(header(&answer, "X-Cf-Routererror"), Some("endpoint_failure"));

    // A service whose certificate the router does not trust: 526.
    let untrusting = format!("[route_services]\nkey = {SECRET:?}\nca = {:?}\n", dir.path().join("other.pem"));
    let strict = router(app().await, &rs.url(), &untrusting);
    let answer = request(&strict, "GET / HTTP/1.1\r\nHost: shop.test\r\n", "").await;
    assert!(answer.starts_with("HTTP/1.1 526"), "{answer}");
    assert!(header(&answer, "X-Route-Service").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_key_nothing_reaches_an_app_behind_a_route_service() {
    let router = router(app().await, "https://127.0.0.1:9/", "");
    let answer = request(&router, "GET / HTTP/1.1\r\nHost: shop.test\r\nX-CF-Proxy-Signature: s\r\n", "").await;
    assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    assert_eq!(header(&answer, "X-Cf-Routererror"), Some("route_service_unsupported"));
    assert!(header(&answer, "X-App-Saw").is_none(), "{answer}");
}
