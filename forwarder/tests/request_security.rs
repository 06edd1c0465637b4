//! What a client may not get past the router with a plain request (issue
//! 12's security defects), through the real binary on loopback: raw
//! sockets for hostile input, Python's `http.client` as a real client that
//! reuses its connection, and backends that keep their connection open
//! despite `Connection: close` and record every byte they receive.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::recorder::Recorder;
use common::*;
use tokio::io::AsyncWriteExt;

/// A router in front of two recording backends: `ka.example.com` → ka,
/// `internal.other-app.example.com` and `api.example.com` → other,
/// `rs.example.com` → ka behind a route service, `paths.example.com`:
/// `/api/v2` → other and `/` → ka.
async fn setup() -> (Router, Recorder, Recorder) {
    let ka = Recorder::start("ka").await;
    let other = Recorder::start("other").await;
    let routing = format!(
        "{}[[pool]]\nname = \"other\"\nbackends = [\"{}\"]\n\
         [[route]]\nhost = \"internal.other-app.example.com\"\npool = \"other\"\n\
         [[route]]\nhost = \"api.example.com\"\npool = \"other\"\n\
         [[route]]\nhost = \"rs.example.com\"\npool = \"main\"\nroute_service = \"https://auth.example.com\"\n\
         [[route]]\nhost = \"paths.example.com\"\npool = \"main\"\n\
         [[route]]\nhost = \"paths.example.com\"\npath = \"/api/v2\"\npool = \"other\"\n",
        main_pool(&[ka.addr], "ka.example.com"),
        other.addr
    );
    let limits = "handshake_timeout = \"2s\"\nconnect_timeout = \"1s\"\nidle_timeout = \"5s\"";
    // A backend connection per request, so that each recorded connection
    // holds what one request brought (reuse: smuggling.rs, keepalive.rs).
    let extra = "[backends]\nmax_idle_per_backend = 0\n";
    let router = Router::start(Setup { mode: "copy", limits, routing, extra });
    (router, ka, other)
}

/// Sends `request` from `source` in one write and reads what comes back
/// (see below for when it stops; what came is returned).
async fn exchange_from(source: &str, router: SocketAddr, request: &[u8]) -> String {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    let mut s = socket.connect(router).await.unwrap();
    s.write_all(request).await.unwrap();
    // A kept-alive connection is done once answers went quiet for 500 ms.
    let out = read_quiet(&mut s, Duration::from_secs(4), Duration::from_millis(500)).await;
    String::from_utf8_lossy(&out).into_owned()
}

async fn exchange(router: SocketAddr, request: &[u8]) -> String {
    exchange_from("127.0.0.1", router, request).await
}

/// The second request of the pipelined pairs: another host, spoofed
/// forwarded headers.
const SMUGGLED: &str = "GET /admin HTTP/1.1\r\nHost: internal.other-app.example.com\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\n\r\n";

fn assert_never_reached(backend: &Recorder, context: &str) {
    let got = backend.received();
    for needle in ["/admin", "6.6.6.6", "internal.other-app"] {
        assert!(!got.contains(needle), "{context}: {needle:?} reached backend {}:\n{got}", backend.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_are_each_parsed_routed_and_rewritten() {
    let (r, ka, other) = setup().await;
    let firsts = [
        ("GET", "GET /a HTTP/1.1\r\nHost: ka.example.com\r\n\r\n".to_string(), ""),
        ("Content-Length body", "POST /a HTTP/1.1\r\nHost: ka.example.com\r\nContent-Length: 5\r\n\r\nhello".into(), "hello"),
        (
            "chunked body with a trailer",
            "POST /a HTTP/1.1\r\nHost: ka.example.com\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n"
                .into(),
            "5\r\nhello\r\n0\r\nX-Sum: 1\r\n\r\n",
        ),
    ];
    // The pipelined second request asks to close, so the exchange ends.
    let smuggled = SMUGGLED.replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n");
    for (what, first, body) in firsts {
        let (ka_before, other_before) = (ka.connections(), other.connections());
        let answer = exchange(r.http, format!("{first}{smuggled}").as_bytes()).await;
        ka.wait_closed().await;
        other.wait_closed().await;
        // The first backend got the first request and its body, nothing after.
        assert_never_reached(&ka, what);
        assert_eq!(ka.connections(), ka_before + 1, "{what}");
        let got = String::from_utf8_lossy(&ka.conns.lock().unwrap()[ka_before]).into_owned();
        assert!(got.starts_with(first.split("\r\n").next().unwrap()), "{what}: {got}");
        assert!(got.ends_with(&format!("\r\n\r\n{body}")), "{what}: the body, and nothing after it: {got:?}");
        // The second was routed by its own Host, its forwarded headers
        // replaced: the client is not trusted.
        assert_eq!(other.connections(), other_before + 1, "{what}");
        let got = String::from_utf8_lossy(&other.conns.lock().unwrap()[other_before]).into_owned();
        assert!(got.starts_with("GET /admin HTTP/1.1\r\n"), "{what}: {got}");
        assert!(got.contains("\r\nX-Forwarded-For: 127.0.0.1\r\n") && !got.contains("6.6.6.6"), "{what}: {got}");
        assert_eq!(got.matches("X-Forwarded-Proto:").count(), 1, "{what}: {got}");
        // Two responses, in order, each framed; the first keeps the
        // connection, the last says it closes; the backends' keep-alive
        // headers are not relayed.
        let (first_answer, second_answer) = answer.split_at(answer.find("\r\n\r\nka").expect(what) + 6);
        assert!(first_answer.starts_with("HTTP/1.1 200 OK\r\n"), "{what}: {answer:?}");
        assert!(!first_answer.contains("Connection:"), "{what}: {first_answer:?}");
        assert!(second_answer.starts_with("HTTP/1.1 200 OK\r\n"), "{what}: {answer:?}");
        assert!(second_answer.contains("\r\nConnection: close\r\n"), "{what}: {second_answer:?}");
        assert!(second_answer.ends_with("\r\n\r\nother"), "{what}: exactly two responses: {answer:?}");
        assert!(!answer.to_ascii_lowercase().contains("keep-alive"), "{what}: backend's keep-alive relayed: {answer}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_http_client_reusing_its_connection_is_routed_per_request() {
    let (r, ka, other) = setup().await;
    // http.client reuses the connection unless the response says close.
    let script = r#"
import http.client, sys
conn = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]), timeout=5)
conn.request("GET", "/a", headers={"Host": "ka.example.com"})
first = conn.getresponse().read().decode()
conn.request("GET", "/admin", headers={"Host": "internal.other-app.example.com", "X-Forwarded-For": "6.6.6.6"})
second = conn.getresponse().read().decode()
print(first, second)
"#;
    let out = tokio::task::spawn_blocking({
        let port = r.http.port().to_string();
        move || Command::new("python3").args(["-c", script, &port]).output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ka other", "each request routed by its own Host");
    ka.wait_closed().await;
    assert_never_reached(&ka, "second request of a reused connection");
    let got = other.received();
    assert!(got.contains("GET /admin HTTP/1.1\r\n") && got.contains("\r\nX-Forwarded-For: 127.0.0.1\r\n"), "{got}");
    assert!(!got.contains("6.6.6.6"), "{got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_request_body_framing_is_refused() {
    let (r, ka, other) = setup().await;
    let cases = [
        // A bare LF ends the chunk-size line: the backend may read it differently.
        "POST /a HTTP/1.1\r\nHost: ka.example.com\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
        // No chunk size: not a last chunk.
        "POST /a HTTP/1.1\r\nHost: ka.example.com\r\nTransfer-Encoding: chunked\r\n\r\n\r\n\r\n",
        // Chunked twice, chunked and a length, chunked not last.
        "POST /a HTTP/1.1\r\nHost: ka.example.com\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST /a HTTP/1.1\r\nHost: ka.example.com\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "POST /a HTTP/1.1\r\nHost: ka.example.com\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    ];
    for case in cases {
        let answer = exchange(r.http, format!("{case}{SMUGGLED}").as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{case:?}: {answer:?}");
        assert!(answer.contains("\r\nConnection: close\r\n"), "{answer}");
    }
    ka.wait_closed().await;
    assert_never_reached(&ka, "invalid framing");
    assert_never_reached(&other, "invalid framing");
    assert!(!ka.received().contains("hello"), "a broken body was relayed: {}", ka.received());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_upgrade_with_a_body_gets_nothing_past_the_body() {
    let (r, ka, other) = setup().await;
    // The recording backend answers 200: the upgrade is refused.
    let upgrade =
        WS_REQUEST.replace("{host}", "ka.example.com").replace("\r\n\r\n", "\r\nContent-Length: 5\r\n\r\nhello");
    let answer = exchange(r.http, format!("{upgrade}{SMUGGLED}").as_bytes()).await;
    ka.wait_closed().await;
    assert_never_reached(&ka, "after a refused upgrade");
    assert_never_reached(&other, "after a refused upgrade");
    assert!(ka.received().ends_with("\r\n\r\nhello"), "{}", ka.received());
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.ends_with("\r\n\r\nka"), "{answer:?}");
    assert!(answer.contains("\r\nConnection: close\r\n"), "{answer}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_service_route_never_reaches_the_app() {
    let (r, ka, _other) = setup().await;
    let cases = [
        ("GET /private HTTP/1.1\r\nHost: rs.example.com\r\n\r\n".to_string(), "502 "),
        ("POST /private HTTP/1.1\r\nHost: rs.example.com\r\nContent-Length: 5\r\n\r\nhello".into(), "502 "),
        ("GET http://rs.example.com/private HTTP/1.1\r\nHost: ka.example.com\r\n\r\n".into(), "502 "),
        (WS_REQUEST.replace("{host}", "rs.example.com"), "503 "),
    ];
    for (request, status) in cases {
        let answer = exchange(r.http, request.as_bytes()).await;
        assert!(answer.starts_with(&format!("HTTP/1.1 {status}")), "{request:?}: {answer:?}");
        assert!(answer.contains("\r\nX-Cf-Routererror: route_service_unsupported\r\n"), "{answer}");
    }
    assert_eq!(ka.connections(), 0, "the app was reached around its route service: {}", ka.received());
    assert!(
        r.metric("upsplice_handshakes_total{listener=\"web\",status=\"502\",reason=\"route_service_unsupported\"}")
            >= 3.0
    );
}

/// Headers only a trusted proxy may state (README, "Forwarded headers").
const CLAIMS: &str = "Forwarded: for=6.6.6.6;proto=https\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-Host: admin.internal\r\nX-Forwarded-Port: 443\r\nX-Forwarded-Ssl: on\r\nX-Forwarded-Scheme: https\r\nX-Forwarded-Client-Cert: Hash=6666\r\nX-Vcap-Request-Id: 66666666-6666-6666-6666-666666666666\r\nX-Request-Start: 1600000000000\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_claims_reach_backends_only_from_trusted_peers() {
    let (r, ka, _other) = setup().await;
    let plain = format!("GET /a HTTP/1.1\r\nHost: ka.example.com\r\n{CLAIMS}\r\n");
    // The recording backend refuses the upgrade; its head is what counts.
    let upgrade = WS_REQUEST.replace("{host}", "ka.example.com").replace("\r\n\r\n", &format!("\r\n{CLAIMS}\r\n"));
    // 127.0.0.2 is in the listener's trusted_cidrs; 127.0.0.1 is not.
    for (source, trusted) in [("127.0.0.1", false), ("127.0.0.2", true)] {
        for request in [&plain, &upgrade] {
            let before = ka.connections();
            let answer = exchange_from(source, r.http, request.as_bytes()).await;
            assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer:?}");
            ka.wait_closed().await;
            let got = String::from_utf8_lossy(&ka.conns.lock().unwrap()[before]).into_owned();
            let head = got.split("\r\n\r\n").next().unwrap().to_string();
            for claim in CLAIMS.split("\r\n").filter(|l| !l.is_empty()) {
                let name = claim.split(':').next().unwrap();
                let lines = head
                    .lines()
                    .filter(|l| l.to_ascii_lowercase().starts_with(&format!("{}:", name.to_ascii_lowercase())));
                let lines: Vec<&str> = lines.collect();
                if trusted {
                    assert_eq!(lines, vec![claim], "{source}: a trusted peer's {name} is kept as sent: {head}");
                } else if name == "X-Request-Start" || name == "X-Vcap-Request-Id" {
                    assert_eq!(lines.len(), 1, "{head}");
                    assert_ne!(lines[0], claim, "{source}: the router sets {name}: {head}");
                } else {
                    assert!(lines.is_empty(), "{source}: {name} reached the backend: {head}");
                }
            }
            assert!(!trusted || head.contains("\r\nX-Forwarded-For: 127.0.0.2\r\n"), "{head}");
            assert!(trusted || !head.contains("6.6.6.6"), "{head}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn absolute_form_is_routed_and_forwarded_with_its_host() {
    let (r, ka, other) = setup().await;
    let plain = "GET http://api.example.com/api/v2?x=1 HTTP/1.1\r\nHost: unknown.example.com\r\n\r\n".to_string();
    let upgrade =
        WS_REQUEST.replace("GET /chat", "GET http://api.example.com/chat").replace("{host}", "unknown.example.com");
    for (request, line) in [(plain, "GET /api/v2?x=1 HTTP/1.1"), (upgrade, "GET /chat HTTP/1.1")] {
        let before = other.connections();
        let answer = exchange(r.http, request.as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.ends_with("other"), "{answer:?}");
        other.wait_closed().await;
        let got = String::from_utf8_lossy(&other.conns.lock().unwrap()[before]).into_owned();
        // Origin-form, with the target's authority as the only Host.
        assert!(got.starts_with(&format!("{line}\r\nHost: api.example.com\r\n")), "{got}");
        assert_eq!(got.matches("\r\nHost: ").count(), 1, "{got}");
        assert!(!got.contains("unknown.example.com"), "{got}");
    }
    // Userinfo obscures the authority (RFC 9110 §4.2.4): refused.
    let answer = exchange(r.http, b"GET http://ka.example.com@api.example.com/ HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer:?}");
    assert_eq!(ka.connections(), 0, "{}", ka.received());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paths_are_matched_normalised_and_forwarded_as_received() {
    let (r, ka, other) = setup().await;
    // paths.example.com: /api/v2 → other, / → ka.
    let cases = [
        ("/api/v2", "other"),
        ("/x/../api/v2", "other"),
        ("/%61pi/v2", "other"),
        ("/api/./v2/x", "other"),
        ("/%2e%2e/api/v2?q=1", "other"),
        ("//api//v2", "other"),
        ("/api/v2x", "ka"),
        ("/api/v3/../v2x", "ka"),
        // An encoded '/' is not a separator: one segment, passed on unchanged.
        ("/api%2Fv2", "ka"),
        // One segment "v2%2F..": not the /api/v2 prefix (a backend that
        // decodes %2F reads "/admin", which is the "/" pool's too).
        ("/api/v2%2F..%2F..%2Fadmin", "ka"),
    ];
    for (path, backend) in cases {
        let (ka_before, other_before) = (ka.connections(), other.connections());
        let request = format!("GET {path} HTTP/1.1\r\nHost: paths.example.com\r\n\r\n");
        let answer = exchange(r.http, request.as_bytes()).await;
        assert!(answer.ends_with(&format!("\r\n\r\n{backend}")), "{path}: {answer:?}");
        let (rec, before) = if backend == "ka" { (&ka, ka_before) } else { (&other, other_before) };
        rec.wait_closed().await;
        let got = String::from_utf8_lossy(&rec.conns.lock().unwrap()[before]).into_owned();
        assert!(got.starts_with(&format!("GET {path} HTTP/1.1\r\n")), "{path}: forwarded as received: {got}");
    }
    // The same for an upgrade.
    let upgrade = WS_REQUEST.replace("GET /chat", "GET /x/../%61pi/v2/chat").replace("{host}", "paths.example.com");
    let answer = exchange(r.http, upgrade.as_bytes()).await;
    assert!(answer.ends_with("\r\n\r\nother"), "{answer:?}");
    // Invalid escapes and an encoded NUL: 400, nothing forwarded.
    let (ka_before, other_before) = (ka.connections(), other.connections());
    for path in ["/api/v2%00", "/api/%zz", "/api/v2/%", "/%0"] {
        let answer =
            exchange(r.http, format!("GET {path} HTTP/1.1\r\nHost: paths.example.com\r\n\r\n").as_bytes()).await;
        assert!(answer.starts_with("HTTP/1.1 400 "), "{path}: {answer:?}");
    }
    assert_eq!((ka.connections(), other.connections()), (ka_before, other_before));
}
