//! The control plane's answers to bad input and unroutable requests, through
//! the real binary with raw sockets: every answer is a complete HTTP/1.1
//! response with Content-Length and `Connection: close`, and a failure in
//! one connection never touches another.

mod common;

use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const LIMITS: &str = "handshake_timeout = \"1s\"\nmax_header_bytes = 2048\nconnect_timeout = \"500ms\"";

/// A router with routes: app.test → a live backend, dead.test → a pool
/// whose backend refuses, empty.test → a pool with no backends, rs.test →
/// a route bound to a route service, *.wild.test → the live backend.
async fn router(extra_limits: &str) -> (Router, RawBackend) {
    let backend = RawBackend::start().await;
    let dead = || {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let (dead, trio) = (dead(), [dead(), dead(), dead()]);
    let routing = format!(
        "{}\n[[pool]]\nname = \"dead\"\nbackends = [\"{dead}\"]\n[[pool]]\nname = \"empty\"\n\
         [[pool]]\nname = \"trio\"\nbackends = [\"{}\", \"{}\", \"{}\"]\n[[route]]\nhost = \"trio.test\"\npool = \"trio\"\n\
         [[route]]\nhost = \"dead.test\"\npool = \"dead\"\n[[route]]\nhost = \"empty.test\"\npool = \"empty\"\n\
         [[route]]\nhost = \"rs.test\"\npool = \"main\"\nroute_service = \"https://auth.example.com\"\n\
         [[route]]\nhost = \"*.wild.test\"\npool = \"main\"\n",
        main_pool(&[backend.addr], "app.test"),
        trio[0],
        trio[1],
        trio[2],
    );
    let limits = format!("{LIMITS}\n{extra_limits}");
    let r = Router::start(Setup { mode: "copy", limits: &limits, routing, extra: "" });
    (r, backend)
}

/// Checks the answer is complete and well framed; returns (status, head, body).
fn parse_answer(raw: &str) -> (u16, String, String) {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no complete head in {raw:?}"));
    let status: u16 = head[9..12].parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .unwrap_or_else(|| panic!("no Content-Length in {head:?}"))
        .parse()
        .unwrap();
    assert_eq!(body.len(), length, "body does not match Content-Length: {raw:?}");
    assert!(head.contains("\r\nConnection: close"), "{head}");
    (status, head.to_string(), body.to_string())
}

fn cf_error(head: &str) -> Option<&str> {
    head.lines().find_map(|l| l.strip_prefix("X-Cf-Routererror: "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_answers_follow_gorouter() {
    let (r, _backend) = router("").await;
    let ws = |host: &str| WS_REQUEST.replace("{host}", host);
    let cases: Vec<(String, u16, Option<&str>)> = vec![
        ("GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n".into(), 404, Some("unknown_route")),
        ("GET / HTTP/1.1\r\nHost: wild.test\r\n\r\n".into(), 404, Some("unknown_route")),
        ("GET / HTTP/1.1\r\nUser-Agent: x\r\n\r\n".into(), 400, Some("empty_host")),
        ("GET / HTTP/1.1\r\nHost: \r\n\r\n".into(), 400, Some("empty_host")),
        ("GET / HTTP/1.1\r\nHost: empty.test\r\n\r\n".into(), 503, Some("no_endpoints")),
        ("GET / HTTP/1.1\r\nHost: dead.test\r\n\r\n".into(), 502, Some("endpoint_failure")),
        (ws("rs.test"), 503, Some("route_service_unsupported")),
        ("GET / HTTP/1.1\r\nHost: rs.test\r\n\r\n".into(), 502, Some("route_service_unsupported")),
        ("GET / HTTP/3.0\r\nHost: app.test\r\n\r\n".into(), 400, None),
        ("GET / HTTP/1.1\r\nHost: app.test\r\nBad Header\r\n\r\n".into(), 400, None),
        (
            "POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n".into(),
            400,
            None,
        ),
        (format!("GET / HTTP/1.1\r\nHost: app.test\r\nX-Big: {}\r\n\r\n", "a".repeat(4000)), 431, None),
    ];
    for (request, status, cf) in cases {
        let raw = raw_exchange(r.http, request.as_bytes()).await;
        let (got, head, body) = parse_answer(&raw);
        assert_eq!(got, status, "for {request:?}: {raw}");
        assert_eq!(cf_error(&head), cf, "for {request:?}: {raw}");
        assert!(!body.is_empty());
    }
}

/// Clients that do not speak HTTP/1.1 get a refusal in their own
/// protocol, which their tools report by name: curl's HTTP/2 prior
/// knowledge gets GOAWAY(HTTP_1_1_REQUIRED), openssl's ClientHello a TLS
/// handshake_failure alert. Both are counted and logged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_and_tls_clients_are_told_in_their_protocol() {
    let (r, _backend) = router("").await;
    let url = format!("http://{}/", r.http);
    let curl = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-sS", "-v", "--http2-prior-knowledge", "-H", "Host: app.test", "--max-time", "5", &url])
            .output()
            .expect("curl runs (scripts/setup installs it)")
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&curl.stderr);
    // curl 7.88 names the code only in its verbose trace (error 13 is
    // HTTP_1_1_REQUIRED); newer curls print it in the error message.
    assert!(!curl.status.success() && stderr.contains("GOAWAY, error=13, last_stream=1"), "curl: {stderr}");

    let addr = r.http.to_string();
    let openssl = tokio::task::spawn_blocking(move || {
        std::process::Command::new("openssl")
            .args(["s_client", "-connect", &addr, "-servername", "app.test"])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("openssl runs (scripts/setup installs it)")
    })
    .await
    .unwrap();
    let out = format!("{}{}", String::from_utf8_lossy(&openssl.stdout), String::from_utf8_lossy(&openssl.stderr));
    assert!(!openssl.status.success() && out.contains("alert handshake failure"), "openssl: {out}");

    r.wait_log("close=\"http2_unsupported\"");
    r.wait_log("close=\"tls_unsupported\"");
    assert_eq!(r.metric("upsplice_handshakes_total{listener=\"web\",status=\"400\",reason=\"tls_unsupported\"}"), 1.0);
    assert_eq!(
        r.metric("upsplice_handshakes_total{listener=\"web\",status=\"505\",reason=\"http2_unsupported\"}"),
        1.0
    );
}

/// A failing backend: the client gets gorouter's sentence, never the pool,
/// the backend's address or the OS error; those go to the log (WARN).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_bodies_keep_internals_in_the_log() {
    let (r, _backend) = router("").await;
    let raw = raw_exchange(r.http, b"GET / HTTP/1.1\r\nHost: dead.test\r\n\r\n").await;
    let (status, _, body) = parse_answer(&raw);
    assert_eq!(status, 502);
    assert_eq!(body, "502 Bad Gateway: Registered endpoint failed to handle the request.\n");
    r.wait_log("refused: 502 endpoint_failure");
    let log = r.log();
    let line = log.lines().find(|l| l.contains("refused: 502 endpoint_failure")).unwrap();
    assert!(line.contains("WARN") && line.contains("host=\"dead.test\"") && line.contains("refused"), "{line}");
    assert!(line.contains("127.0.0.1:"), "the log names the backend: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcards_route_plain_requests() {
    let (r, mut backend) = router("").await;
    for host in ["a.b.wild.test", "x.wild.test"] {
        let mut client = TcpStream::connect(r.http).await.unwrap();
        client
            .write_all(format!("GET /x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut server = backend.accept().await;
        let (head, _) = read_head(&mut server).await;
        assert!(head.starts_with("GET /x HTTP/1.1\r\n"), "{head}");
        server.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nhi").await.unwrap();
        drop(server);
        let got = String::from_utf8(read_to_end(&mut client).await).unwrap();
        assert!(got.starts_with("HTTP/1.1 200 OK") && got.ends_with("hi"), "{got}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_upgrade_offer_proceeds_as_http11() {
    let (r, mut backend) = router("").await;
    let mut client = TcpStream::connect(r.http).await.unwrap();
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")
        .await
        .unwrap();
    let mut server = backend.accept().await;
    let (head, _) = read_head(&mut server).await;
    assert!(!head.to_ascii_lowercase().contains("h2c") && !head.contains("HTTP2-Settings"), "{head}");
    assert!(head.contains("\r\nConnection: close\r\n"), "{head}");
    server.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await.unwrap();
    drop(server);
    let got = String::from_utf8(read_to_end(&mut client).await).unwrap();
    assert!(got.starts_with("HTTP/1.1 200 OK"), "{got}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusted_peer_forwarded_headers_are_kept() {
    let (r, mut backend) = router("").await;
    // Held open: a backend connection closed without an answer would have
    // its (idempotent) request retried on a new one.
    let mut servers = Vec::new();
    // 127.0.0.2 is in the listener's trusted_cidrs; 127.0.0.1 is not.
    for (source, xff, xfp) in [("127.0.0.2", "10.9.8.7, 127.0.0.2", "http"), ("127.0.0.1", "127.0.0.1", "https")] {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
        let mut client = socket.connect(r.http).await.unwrap();
        client
            .write_all(
                b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Forwarded-For: 10.9.8.7\r\nX-Forwarded-Proto: http\r\n\r\n",
            )
            .await
            .unwrap();
        let mut server = backend.accept().await;
        let (head, _) = read_head(&mut server).await;
        assert!(head.contains(&format!("\r\nX-Forwarded-For: {xff}\r\n")), "{source}: {head}");
        assert!(head.contains(&format!("\r\nX-Forwarded-Proto: {xfp}\r\n")), "{source}: {head}");
        servers.push(server);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_times_out_while_others_are_served() {
    let (r, mut backend) = router("").await;
    let started = Instant::now();
    let mut loris = TcpStream::connect(r.http).await.unwrap();
    let http = r.http;
    let slow = tokio::spawn(async move {
        // One header byte every 100 ms: each read is quick, the whole head never completes.
        for b in b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaa".iter() {
            if loris.write_all(&[*b]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut out = Vec::new();
        let _ = loris.read_to_end(&mut out).await;
        String::from_utf8_lossy(&out).into_owned()
    });
    // Meanwhile other clients are served at once.
    for _ in 0..5 {
        let mut client = TcpStream::connect(http).await.unwrap();
        client.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut server = backend.accept().await;
        read_head(&mut server).await;
        server.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await.unwrap();
        drop(server);
        let got = String::from_utf8(read_to_end(&mut client).await).unwrap();
        assert!(got.starts_with("HTTP/1.1 204"), "{got}");
    }
    let answer = tokio::time::timeout(Duration::from_secs(10), slow).await.unwrap().unwrap();
    let (status, _, _) = parse_answer(&answer);
    assert_eq!(status, 408);
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(5), "408 after {took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_limit_answers_503_and_spares_open_connections() {
    let (r, mut backend) = router("max_connections = 2").await;
    let (mut c1, mut s1, _, _) = raw_tunnel(&r, &mut backend, "app.test", b"", b"").await;
    let (c2, s2, _, _) = raw_tunnel(&r, &mut backend, "app.test", b"", b"").await;
    let raw = raw_exchange(r.http, WS_REQUEST.replace("{host}", "app.test").as_bytes()).await;
    assert_eq!(parse_answer(&raw).0, 503);
    // The tcp listener closes at once beyond the limit.
    let mut t = TcpStream::connect(r.tcp).await.unwrap();
    assert!(read_to_end(&mut t).await.is_empty());
    // The open tunnels are untouched.
    c1.write_all(b"ok").await.unwrap();
    let mut buf = [0u8; 2];
    s1.read_exact(&mut buf).await.unwrap();
    drop((c2, s2));
    assert!(r.metric("upsplice_connections_over_limit_total{listener=\"web\"}") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_healthz() {
    let (r, _backend) = router("").await;
    raw_exchange(r.http, b"GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n").await;
    let (status, body) = r.admin_get("/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(
        body.contains("upsplice_handshakes_total{listener=\"web\",status=\"404\",reason=\"unknown_route\"} 1"),
        "{body}"
    );
    assert!(body.contains("upsplice_connections_accepted_total{listener=\"web\"}"), "{body}");
    assert!(body.contains("upsplice_handshake_duration_seconds_bucket"), "{body}");
    assert!(body.contains("upsplice_relayed_bytes_total{data_plane=\"copy\",direction=\"to_client\"}"), "{body}");
    assert!(body.ends_with("# EOF\n"));
    raw_exchange(r.http, b"GET / HTTP/1.1\r\nHost: dead.test\r\n\r\n").await;
    assert_eq!(r.metric("upsplice_backend_connect_failures_total{pool=\"dead\"}"), 1.0);
    assert_eq!(r.admin_get("/healthz").unwrap(), (200, "ok\n".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_answers_503_while_draining_and_head_like_get() {
    let (mut r, mut backend) = router("drain_wait = \"0s\"\ndrain_timeout = \"3s\"").await;
    assert_eq!(head_status(r.admin, "/healthz").await, (200, String::new()));
    let (_c, _s, _, _) = raw_tunnel(&r, &mut backend, "app.test", b"", b"").await;
    r.signal(nix::sys::signal::Signal::SIGTERM);
    r.wait_log("draining");
    assert_eq!(r.admin_get("/healthz").unwrap().0, 503);
    assert_eq!(head_status(r.admin, "/healthz").await, (503, String::new()));
    assert!(r.wait_exit(Duration::from_secs(10)).success());
}

/// `HEAD path` on the admin endpoint: (status, body) — the body must be
/// empty although Content-Length gives GET's length.
async fn head_status(admin: std::net::SocketAddr, path: &str) -> (u16, String) {
    let answer = raw_exchange(admin, format!("HEAD {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes()).await;
    let (head, body) = answer.split_once("\r\n\r\n").expect("a whole head");
    assert!(head.contains("Content-Length: "), "{head}");
    (head[9..12].parse().unwrap(), body.to_string())
}

/// drain_wait behind a load balancer: from SIGTERM, /healthz is 503 at once
/// but a client that keeps connecting is still served for drain_wait; only
/// then are connections refused. The open tunnel lives on until
/// drain_timeout and the router exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_wait_keeps_accepting_until_the_load_balancer_noticed() {
    let (mut r, mut backend) = router("drain_wait = \"1500ms\"\ndrain_timeout = \"2s\"").await;
    let (mut c, mut s, _, _) = raw_tunnel(&r, &mut backend, "app.test", b"", b"").await;
    let signalled = Instant::now();
    r.signal(nix::sys::signal::Signal::SIGTERM);
    r.wait_log("draining");
    assert_eq!(r.admin_get("/healthz").unwrap().0, 503);
    let mut served = 0;
    let refused_after = loop {
        match TcpStream::connect(r.http).await {
            Ok(mut conn) => {
                conn.write_all(b"GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n").await.unwrap();
                let answer = String::from_utf8_lossy(&read_to_end(&mut conn).await).into_owned();
                assert!(answer.starts_with("HTTP/1.1 404"), "a connection accepted while draining: {answer}");
                served += 1;
            }
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionRefused, "{e}");
                break signalled.elapsed();
            }
        }
        assert!(signalled.elapsed() < Duration::from_secs(10), "still accepting 10 s after SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(refused_after >= Duration::from_millis(1400), "refused {refused_after:?} after SIGTERM");
    assert!(served >= 5, "only {served} connections served during drain_wait");
    r.wait_log("accepting no more");
    c.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(2), s.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"still here");
    assert!(r.wait_exit(Duration::from_secs(15)).success());
    assert!(r.log().contains("drain_timeout passed: resetting 1 open connections"), "{}", r.log());
}

/// A second SIGTERM during the drain ends it at once (logged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_ends_the_drain_at_once() {
    let (mut r, mut backend) = router("drain_wait = \"30s\"\ndrain_timeout = \"30s\"").await;
    let (_c, _s, _, _) = raw_tunnel(&r, &mut backend, "app.test", b"", b"").await;
    r.signal(nix::sys::signal::Signal::SIGTERM);
    r.wait_log("draining");
    let second = Instant::now();
    r.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(r.wait_exit(Duration::from_secs(10)).success());
    assert!(second.elapsed() < Duration::from_secs(8), "exit took {:?}", second.elapsed());
    assert!(r.log().contains("a second SIGTERM/SIGINT ended the drain: resetting 1 open connections"), "{}", r.log());
}

/// SIGUSR1 (gorouter's drain signal) drains without exiting; SIGTERM then
/// exits at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr1_drains_without_exiting() {
    let (mut r, _backend) = router("drain_wait = \"0s\"\ndrain_timeout = \"1s\"").await;
    r.signal(nix::sys::signal::Signal::SIGUSR1);
    r.wait_log("drained after SIGUSR1; not exiting");
    assert!(TcpStream::connect(r.http).await.is_err(), "still accepting after the drain");
    assert_eq!(r.admin_get("/healthz").unwrap().0, 503);
    assert!(r.is_running(), "exited after SIGUSR1");
    r.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(r.wait_exit(Duration::from_secs(5)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fd_exhaustion_backs_off_and_recovers() {
    let (r, mut backend) = router("").await;
    // Leave the router room for only a few more sockets.
    let room = 6;
    r.set_fd_limit(r.fd_count() + room);
    let held_count = 12;
    let mut held = Vec::new();
    for _ in 0..held_count {
        held.push(TcpStream::connect(r.http).await.unwrap());
    }
    r.wait_log("accept failed");
    let cpu = |pid: i32| -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    };
    let before = cpu(r.pid());
    tokio::time::sleep(Duration::from_secs(1)).await;
    let ticks = cpu(r.pid()) - before;
    assert!(ticks < 30, "the accept loop spun: {ticks} CPU ticks in 1 s while out of fds");
    // Free the fds: the router takes in and closes the whole backlog (its
    // accept back-off is up to 1 s), then serves again.
    drop(held);
    r.wait_log_count("upsplice::access", held_count);
    one_get_served(&r, &mut backend).await;
    assert!(r.metric("upsplice_resource_errors_total{op=\"accept\",error=\"EMFILE\"}") >= 1.0);
}

const CLOSING_GET: &[u8] = b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n";

/// One `GET` through the router reaches `backend`, whose `200` reaches
/// the client.
async fn one_get_served(r: &Router, backend: &mut RawBackend) {
    let mut client = TcpStream::connect(r.http).await.unwrap();
    client.write_all(CLOSING_GET).await.unwrap();
    let mut server = backend.accept().await;
    let (head, _) = read_head(&mut server).await;
    assert!(head.starts_with("GET / HTTP/1.1"), "{head}");
    server.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await.unwrap();
    drop(server);
    let got = String::from_utf8(read_to_end(&mut client).await).unwrap();
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
}

/// A backend connect that fails for want of an fd is the router's
/// trouble, not the backend's: the request gets its 502, and the backend
/// stays in service for the requests after the router recovered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_fds_does_not_put_backends_out_of_service() {
    let (r, mut backend) = router("").await;
    let normal = r.fd_limit();
    // Room for exactly one more fd: the client's socket takes it, the
    // backend connect finds none.
    r.set_fd_limit(r.lowest_free_fd() + 1);
    let mut client = TcpStream::connect(r.http).await.unwrap();
    client.write_all(CLOSING_GET).await.unwrap();
    let got = String::from_utf8(read_to_end(&mut client).await).unwrap();
    assert!(got.starts_with("HTTP/1.1 502"), "{got}");
    assert!(got.contains("X-Cf-Routererror: endpoint_failure"), "{got}");
    r.wait_log("Too many open files");
    r.set_fd_limit(normal);
    one_get_served(&r, &mut backend).await;
    let log = r.log();
    assert!(!log.contains("out of service"), "a local fd shortage put the backend out of service:\n{log}");
    let metrics = r.admin_get("/metrics").unwrap().1;
    let failures: Vec<&str> = metrics.lines().filter(|l| l.starts_with("upsplice_backend_failures")).collect();
    assert!(!failures.is_empty() && failures.iter().all(|l| l.ends_with(" 0")), "{failures:?}");
    // The operator sees the shortage for what it is.
    assert_eq!(r.metric("upsplice_resource_errors_total{op=\"connect\",error=\"EMFILE\"}"), 1.0);
}

/// Out of fds is when an operator most needs `/metrics`: the admin
/// endpoint answers on the fd it holds in reserve, shows the shortage, and
/// takes its reserve back for the next time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_fds_the_admin_endpoint_still_answers() {
    let (r, _backend) = router("").await;
    let normal = r.fd_limit();
    // Not one fd to spare.
    r.set_fd_limit(r.lowest_free_fd());
    let first = r.admin_get("/metrics");
    let second = r.admin_get("/healthz");
    r.set_fd_limit(normal);
    let (status, body) = first.expect("/metrics answers out of fds");
    assert_eq!(status, 200, "{body}");
    let line = "upsplice_resource_errors_total{op=\"accept\",error=\"EMFILE\"} ";
    assert!(body.lines().any(|l| l.starts_with(line) && l != format!("{line}0")), "{body}");
    assert_eq!(second.expect("and again: the reserve was taken back").0, 200);
    assert!(r.log().contains("answering on the reserved fd"), "{}", r.log());
}

/// Out of fds, a request stops at its first backend: every other one
/// would fail the same way (EMFILE comes from `socket()` itself), and each
/// try would count as a shortage of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_fds_a_request_tries_one_backend_not_all() {
    let (r, _backend) = router("").await;
    let normal = r.fd_limit();
    r.set_fd_limit(r.lowest_free_fd() + 1);
    let mut client = TcpStream::connect(r.http).await.unwrap();
    client.write_all(b"GET / HTTP/1.1\r\nHost: trio.test\r\nConnection: close\r\n\r\n").await.unwrap();
    let got = String::from_utf8(read_to_end(&mut client).await).unwrap();
    r.set_fd_limit(normal);
    assert!(got.starts_with("HTTP/1.1 502"), "{got}");
    assert!(got.contains("X-Cf-Routererror: endpoint_failure"), "{got}");
    assert_eq!(r.metric("upsplice_resource_errors_total{op=\"connect\",error=\"EMFILE\"}"), 1.0);
    assert_eq!(r.metric("upsplice_backend_connect_failures_total{pool=\"trio\"}"), 1.0, "one backend tried");
    assert!(!r.log().contains("out of service"), "{}", r.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_with_a_body_reaches_the_backend_before_its_answer() {
    let (r, mut backend) = router("").await;
    let mut client = TcpStream::connect(r.http).await.unwrap();
    let request = WS_REQUEST.replace("{host}", "app.test").replace("\r\n\r\n", "\r\nContent-Length: 5\r\n\r\nhello");
    client.write_all(request.as_bytes()).await.unwrap();
    let mut server = backend.accept().await;
    let (_, mut body) = read_head(&mut server).await;
    // The backend insists on the body before it answers.
    while body.len() < 5 {
        let mut buf = [0u8; 16];
        let n =
            tokio::time::timeout(Duration::from_secs(3), server.read(&mut buf)).await.expect("body withheld").unwrap();
        assert!(n > 0);
        body.extend_from_slice(&buf[..n]);
    }
    assert_eq!(body, b"hello");
    server.write_all(WS_101).await.unwrap();
    let (head, _) = read_head(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 101"));
    client.write_all(b"frame").await.unwrap();
    let mut buf = [0u8; 5];
    server.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"frame");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_and_an_early_answer_reach_the_client() {
    let (r, mut backend) = router("").await;
    // 100-continue: the client sends its body only after the backend's 100.
    let mut client = TcpStream::connect(r.http).await.unwrap();
    client
        .write_all(b"PUT /f HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        .await
        .unwrap();
    let mut server = backend.accept().await;
    let (head, early) = read_head(&mut server).await;
    assert!(head.contains("\r\nExpect: 100-continue\r\n") && early.is_empty(), "{head}");
    server.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.unwrap();
    let (info, _) = read_head(&mut client).await;
    assert!(info.starts_with("HTTP/1.1 100 Continue"), "{info}");
    client.write_all(b"data").await.unwrap();
    let mut body = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), server.read_exact(&mut body)).await.unwrap().unwrap();
    assert_eq!(&body, b"data");
    server.write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n").await.unwrap();
    let got = String::from_utf8(read_to_end(&mut client).await).unwrap();
    assert!(got.starts_with("HTTP/1.1 201 Created\r\n") && got.contains("\r\nConnection: close\r\n"), "{got}");
    // The backend closes its kept connection: the next request takes a new one.
    drop(server);
    tokio::time::sleep(Duration::from_millis(50)).await;

    // An early answer: the backend refuses a body before reading it (smaller
    // than what the router drains after its answer, so no reset can race it).
    let mut client = TcpStream::connect(r.http).await.unwrap();
    let upload = tokio::spawn(async move {
        let mut req = b"POST /big HTTP/1.1\r\nHost: app.test\r\nContent-Length: 196608\r\n\r\n".to_vec();
        req.extend_from_slice(&vec![b'x'; 192 << 10]);
        // The router stops reading once the answer is relayed: a failed write is expected.
        let _ = tokio::time::timeout(Duration::from_secs(10), client.write_all(&req)).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    });
    let mut server = backend.accept().await;
    read_head(&mut server).await;
    server
        .write_all(b"HTTP/1.1 413 Content Too Large\r\nContent-Length: 3\r\nConnection: close\r\n\r\nbig")
        .await
        .unwrap();
    drop(server);
    let got = upload.await.unwrap();
    assert!(got.starts_with("HTTP/1.1 413 Content Too Large\r\n") && got.ends_with("\r\n\r\nbig"), "{got:?}");
}

/// A rejected reload says what changed (listener and field), and a TOML
/// error is one log line (log shippers split on newlines).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_reloads_name_the_change_on_one_line() {
    let (r, _backend) = router("").await;
    let good = std::fs::read_to_string(&r.config_path).unwrap();
    let web = "name = \"web\"\nbind = \"127.0.0.1:0\"";
    let moved = good.replacen(web, "name = \"web\"\nbind = \"127.0.0.1:1\"", 1);
    assert_ne!(moved, good);
    std::fs::write(&r.config_path, &moved).unwrap();
    r.signal(nix::sys::signal::Signal::SIGHUP);
    r.wait_log("can only change with a restart");
    let log = r.log();
    let line = log.lines().find(|l| l.contains("can only change with a restart")).unwrap();
    assert!(line.contains("listener[0] \"web\": bind (127.0.0.1:0 → 127.0.0.1:1)"), "{line}");

    std::fs::write(&r.config_path, format!("{good}\n[limits]\ncolour = \"blue\"\n")).unwrap();
    r.signal(nix::sys::signal::Signal::SIGHUP);
    r.wait_log("TOML parse error");
    let log = r.log();
    let line = log.lines().find(|l| l.contains("TOML parse error")).unwrap();
    assert!(line.contains("SIGHUP: reload rejected"), "the whole error on the log line: {line}\n{log}");
    assert!(line.contains("duplicate key"), "{line}");
    assert!(!log.lines().any(|l| l.trim_start().starts_with('|')), "a caret diagram reached the log:\n{log}");
}

/// The header-count limit has its own answer and its own key: 500 small
/// headers are "more than 128 header fields", not "larger than 16384
/// bytes"; `[limits] max_headers` raises it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_header_count_limit_is_its_own_and_configurable() {
    let many = |n: usize| {
        let mut req = String::from("GET / HTTP/1.1\r\nHost: nowhere.test\r\n");
        for i in 0..n {
            req.push_str(&format!("X-{i}: v\r\n"));
        }
        req + "\r\n"
    };
    let (r, _backend) = router("").await;
    let (status, _, body) = parse_answer(&raw_exchange(r.http, many(500).as_bytes()).await);
    assert_eq!(
        (status, body.as_str()),
        (431, "431 Request Header Fields Too Large: The request has more than 128 header fields.\n")
    );
    let (r, _backend) = router("max_headers = 200").await;
    let (status, _, _) = parse_answer(&raw_exchange(r.http, many(150).as_bytes()).await);
    assert_eq!(status, 404, "150 headers within max_headers = 200 are routed");
}

/// Every per-listener series exists at 0 before the first connection, so
/// `rate()` and `absent()` alerts work from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_listener_series_exist_from_startup() {
    let (r, _backend) = router("").await;
    let (_, body) = r.admin_get("/metrics").unwrap();
    for series in [
        "upsplice_connections_accepted_total{listener=\"web\"} 0",
        "upsplice_connections_active{listener=\"web\"} 0",
        "upsplice_connections_over_limit_total{listener=\"web\"} 0",
        "upsplice_tunnels_total{listener=\"web\",data_plane=\"copy\"} 0",
        "upsplice_tunnels_active{listener=\"web\",data_plane=\"copy\"} 0",
        "upsplice_connections_accepted_total{listener=\"raw\"} 0",
        "upsplice_backend_connect_failures_total{pool=\"dead\"} 0",
    ] {
        assert!(body.lines().any(|l| l == series), "{series} missing from:\n{body}");
    }
}
