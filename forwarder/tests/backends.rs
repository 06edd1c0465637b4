//! Backend health and the per-backend connection cap, through the real
//! binary: passive back-off and its probe, the active http check with
//! rise/fall, `[backends] max_conns` answered like gorouter, the state in
//! `/metrics`, and all of it kept across a SIGHUP that keeps the backend.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const LIMITS: &str = "connect_timeout = \"500ms\"";
const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n";

/// An HTTP backend: `GET /healthz` answers the status in `health`, any
/// other request 200; each connection serves one request.
struct HttpBackend {
    addr: SocketAddr,
    /// Requests other than health checks.
    hits: Arc<AtomicUsize>,
    checks: Arc<AtomicUsize>,
    health: Arc<AtomicU16>,
}

impl HttpBackend {
    async fn start() -> HttpBackend {
        HttpBackend::on(TcpListener::bind("127.0.0.1:0").await.unwrap())
    }

    fn on(l: TcpListener) -> HttpBackend {
        let b = HttpBackend {
            addr: l.local_addr().unwrap(),
            hits: Arc::default(),
            checks: Arc::default(),
            health: Arc::new(AtomicU16::new(200)),
        };
        let (hits, checks, health) = (b.hits.clone(), b.checks.clone(), b.health.clone());
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let (hits, checks, health) = (hits.clone(), checks.clone(), health.clone());
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let status = if head.starts_with(b"GET /healthz ") {
                        checks.fetch_add(1, Ordering::Relaxed);
                        health.load(Ordering::Relaxed)
                    } else {
                        hits.fetch_add(1, Ordering::Relaxed);
                        200
                    };
                    let answer = format!("HTTP/1.1 {status} X\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
                    let _ = s.write_all(answer.as_bytes()).await;
                });
            }
        });
        b
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::Relaxed)
    }
}

/// An address nothing listens on (connects are refused).
fn refused_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// A router whose pool "main" (route app.test) has `backends`, with
/// `check` (a `[pool.check]` table, or "") and `extra` (e.g. `[backends]`).
fn start(backends: &[SocketAddr], check: &str, extra: &str) -> Router {
    let (pool, route) =
        main_pool(backends, "app.test").split_once("\n\n").map(|(p, r)| (p.to_string(), r.to_string())).unwrap();
    let routing = format!("{pool}\n{check}\n{route}");
    Router::start(Setup { mode: "copy", limits: LIMITS, routing, extra })
}

/// One plain GET through the router: the status.
async fn get(router: &Router) -> u16 {
    let answer = raw_exchange(router.http, GET).await;
    answer.get(9..12).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("no status in {answer:?}"))
}

fn up_line(b: SocketAddr) -> String {
    format!("upsplice_backend_up{{pool=\"main\",backend=\"{b}\"}} ")
}

fn failures_line(b: SocketAddr) -> String {
    format!("upsplice_backend_failures_total{{pool=\"main\",backend=\"{b}\"}} ")
}

/// Waits (bounded) until a metric line has `value`.
fn wait_metric(router: &Router, line: &str, value: f64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let got = router.metric(line);
        if got == value {
            return;
        }
        assert!(Instant::now() < deadline, "{line}never became {value} (last {got}); log:\n{}", router.log());
        std::thread::sleep(Duration::from_millis(25));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusing_backend_is_skipped_after_one_failure_and_comes_back_after_its_backoff() {
    let live = HttpBackend::start().await;
    let dead = refused_addr();
    let router = start(&[dead, live.addr], "", "[backends]\nbackoff = \"600ms\"\nmax_backoff = \"600ms\"\n");
    assert_eq!(router.metric(&up_line(dead)), 1.0, "in service before any failure");

    // The first request that picks it fails over; from then on it is skipped.
    for _ in 0..6 {
        assert_eq!(get(&router).await, 200);
    }
    assert_eq!(live.hits(), 6);
    assert_eq!(router.metric(&failures_line(dead)), 1.0, "tried once, then skipped");
    assert_eq!(router.metric(&up_line(dead)), 0.0);
    assert_eq!(router.metric(&up_line(live.addr)), 1.0);
    assert!(router.log().contains("backend out of service"), "{}", router.log());

    // It comes back (listening again); after the back-off one request
    // probes it, succeeds, and it takes its share again.
    let revived = HttpBackend::on(TcpListener::bind(dead).await.unwrap());
    tokio::time::sleep(Duration::from_millis(700)).await;
    for _ in 0..6 {
        assert_eq!(get(&router).await, 200);
    }
    assert!(revived.hits() >= 2, "back in rotation: {} of 6", revived.hits());
    assert_eq!(router.metric(&up_line(dead)), 1.0);
    assert_eq!(router.metric(&failures_line(dead)), 1.0);
    router.wait_log("backend back in service");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_backend_out_is_still_tried_rather_than_refused() {
    let backend = HttpBackend::start().await;
    let dead = refused_addr();
    let router = start(&[dead], "", "[backends]\nbackoff = \"10s\"\nmax_backoff = \"10s\"\n");
    assert_eq!(get(&router).await, 502);
    assert_eq!(router.metric(&up_line(dead)), 0.0);
    // Listening again within its back-off: the only backend is out, but it
    // is tried anyway, and its success brings it back at once.
    let revived = HttpBackend::on(TcpListener::bind(dead).await.unwrap());
    assert_eq!(get(&router).await, 200);
    assert_eq!(revived.hits(), 1);
    assert_eq!(router.metric(&up_line(dead)), 1.0);
    drop(backend);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_check_takes_a_failing_backend_out_and_brings_it_back() {
    let sick = HttpBackend::start().await;
    let well = HttpBackend::start().await;
    let check = "[pool.check]\nkind = \"http\"\npath = \"/healthz\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\nrise = 3\nfall = 2\n";
    let router = start(&[sick.addr, well.addr], check, "");
    wait_metric(&router, &up_line(sick.addr), 1.0, Duration::from_secs(5));

    sick.health.store(500, Ordering::Relaxed);
    let checks_before = sick.checks.load(Ordering::Relaxed);
    wait_metric(&router, &up_line(sick.addr), 0.0, Duration::from_secs(5));
    assert!(sick.checks.load(Ordering::Relaxed) >= checks_before + 2, "fall = 2: out after two failed checks, not one");
    router.wait_log("health check failed 2 times");
    let hits = sick.hits();
    for _ in 0..6 {
        assert_eq!(get(&router).await, 200);
    }
    assert_eq!(sick.hits(), hits, "no request reaches a backend its check holds out");
    assert_eq!(router.metric(&up_line(well.addr)), 1.0);

    sick.health.store(204, Ordering::Relaxed);
    let checks_before = sick.checks.load(Ordering::Relaxed);
    wait_metric(&router, &up_line(sick.addr), 1.0, Duration::from_secs(5));
    assert!(sick.checks.load(Ordering::Relaxed) >= checks_before + 3, "rise = 3");
    for _ in 0..6 {
        assert_eq!(get(&router).await, 200);
    }
    assert!(sick.hits() >= hits + 2, "back in rotation");

    // A reload without the check stops its task.
    let config = std::fs::read_to_string(&router.config_path).unwrap();
    std::fs::write(&router.config_path, config.replace(check, "")).unwrap();
    router.signal(nix::sys::signal::Signal::SIGHUP);
    router.wait_log("SIGHUP: reloaded");
    tokio::time::sleep(Duration::from_millis(250)).await;
    let checks = sick.checks.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(sick.checks.load(Ordering::Relaxed), checks, "no check after the reload removed it");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_conns_answers_connection_limit_reached_while_tunnels_hold_the_cap() {
    let mut backend = RawBackend::start().await;
    let router = start(&[backend.addr], "", "[backends]\nmax_conns = 2\n");
    let t1 = raw_tunnel(&router, &mut backend, "app.test", b"", b"").await;
    let t2 = raw_tunnel(&router, &mut backend, "app.test", b"", b"").await;

    let answer = raw_exchange(router.http, GET).await;
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.contains("\r\nX-Cf-Routererror: Connection Limit Reached\r\n"), "{answer}");
    assert!(answer.contains("has reached the connection limit"), "{answer}");
    // An upgrade too, and the tcp listener closes at once.
    let ws = raw_exchange(router.http, WS_REQUEST.replace("{host}", "app.test").as_bytes()).await;
    assert!(ws.starts_with("HTTP/1.1 503 "), "{ws}");
    let mut raw = TcpStream::connect(router.tcp).await.unwrap();
    assert!(read_to_end(&mut raw).await.is_empty());
    assert_eq!(
        router
            .metric("upsplice_handshakes_total{listener=\"web\",status=\"503\",reason=\"Connection Limit Reached\"} "),
        2.0
    );

    // A tunnel ends: its slot frees, and the next request gets through.
    drop(t1);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut client = TcpStream::connect(router.http).await.unwrap();
        client.write_all(GET).await.unwrap();
        let accepted = tokio::time::timeout(Duration::from_millis(200), backend.accept()).await;
        if let Ok(mut server) = accepted {
            let _ = read_head(&mut server).await;
            server.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await.unwrap();
            let answer = String::from_utf8_lossy(&read_to_end(&mut client).await).into_owned();
            assert!(answer.starts_with("HTTP/1.1 200 "), "{answer}");
            break;
        }
        let answer = String::from_utf8_lossy(&read_to_end(&mut client).await).into_owned();
        assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
        assert!(Instant::now() < deadline, "the slot of the closed tunnel never freed");
    }
    drop(t2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sighup_that_keeps_a_backend_keeps_its_state_and_one_that_drops_it_drops_its_series() {
    let live = HttpBackend::start().await;
    let dead = refused_addr();
    let router = start(&[dead, live.addr], "", "[backends]\nbackoff = \"30s\"\nmax_backoff = \"30s\"\n");
    for _ in 0..2 {
        assert_eq!(get(&router).await, 200);
    }
    assert_eq!(router.metric(&up_line(dead)), 0.0);

    // A reload that changes something else keeps the backend's back-off.
    let config = std::fs::read_to_string(&router.config_path).unwrap();
    std::fs::write(&router.config_path, format!("{config}\n[[route]]\nhost = \"other.test\"\npool = \"main\"\n"))
        .unwrap();
    router.signal(nix::sys::signal::Signal::SIGHUP);
    router.wait_log("SIGHUP: reloaded");
    assert_eq!(router.metric(&up_line(dead)), 0.0, "still out after the reload");
    assert_eq!(router.metric(&failures_line(dead)), 1.0);
    let hits = live.hits();
    for _ in 0..4 {
        assert_eq!(get(&router).await, 200);
    }
    assert_eq!(live.hits(), hits + 4, "still skipped: no new failure, no new try");
    assert_eq!(router.metric(&failures_line(dead)), 1.0);

    // A reload without it: its series leave /metrics.
    let config = std::fs::read_to_string(&router.config_path).unwrap();
    std::fs::write(&router.config_path, config.replace(&format!("\"{dead}\", "), "")).unwrap();
    router.signal(nix::sys::signal::Signal::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while router.admin_get("/metrics").unwrap().1.contains(&dead.to_string()) {
        assert!(Instant::now() < deadline, "the removed backend's series stayed:\n{}", router.log());
        std::thread::sleep(Duration::from_millis(25));
    }
    assert_eq!(router.metric(&up_line(live.addr)), 1.0);
}

/// A backend that accepts and reads each request, then resets the
/// connection: the request (an idempotent GET) goes to the next backend
/// and the client never sees the failure; the resetting backend counts
/// one failure and is skipped for its back-off; a POST is not retried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_resets_requests_is_skipped_and_gets_are_retried() {
    let resets = Arc::new(AtomicUsize::new(0));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let bad = l.local_addr().unwrap();
    let count = resets.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let mut chunk = [0u8; 1024];
            let _ = s.read(&mut chunk).await;
            count.fetch_add(1, Ordering::Relaxed);
            // SO_LINGER 0: the close is a reset.
            let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
        }
    });
    let live = HttpBackend::start().await;
    let router = start(&[bad, live.addr], "", "[backends]\nbackoff = \"10s\"\nmax_backoff = \"10s\"\n");
    for _ in 0..6 {
        assert_eq!(get(&router).await, 200, "a GET saw the reset");
    }
    assert_eq!(resets.load(Ordering::Relaxed), 1, "reached again within its back-off");
    assert_eq!(live.hits(), 6);
    assert_eq!(router.metric(&failures_line(bad)), 1.0);
    assert_eq!(router.metric(&up_line(bad)), 0.0);

    // A POST that meets the reset is answered 502, not sent twice.
    let bad_only = start(&[bad], "", "");
    let post = b"POST / HTTP/1.1\r\nHost: app.test\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi";
    let answer = raw_exchange(bad_only.http, post).await;
    assert!(answer.starts_with("HTTP/1.1 502 "), "{answer}");
    assert_eq!(resets.load(Ordering::Relaxed), 2, "the POST was sent once");
}
