//! The data-plane conformance suite: every behaviour of a tunnel, checked
//! through the real binary on loopback, once per data plane. A new plane
//! joins by adding its name to the `conformance!` list at the bottom.
//!
//! `tls` is one more plane: the listeners terminate TLS, so every tunnel
//! runs on the TLS relay (`dataplane/stream.rs`) and every case's client
//! speaks TLS ([`Client`]). `ktls` is the same with `data_plane.ktls =
//! "on"`: each tunnel's session goes to the kernel after its handshake and
//! splice relays it (`dataplane/ktls.rs`); it runs where the kernel has
//! kTLS (the VM matrix, `scripts/vm-test`). Where TLS changes what a case means, the case
//! says what the TLS contract is: a client's clean close is `close_notify`
//! then FIN (it reaches the backend as a FIN), the router's clean close
//! towards a TLS client is the same, and a TLS stream that ends without
//! `close_notify` is truncated, so it is passed on as a reset.

#![allow(clippy::result_large_err)] // tungstenite's callback signature, not ours

mod common;

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::tls::{client_config, Certs, Client, Connector};
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const LIMITS: &str =
    "handshake_timeout = \"2s\"\nidle_timeout = \"1h\"\ndrain_wait = \"500ms\"\ndrain_timeout = \"2s\"\nconnect_timeout = \"5s\"";

/// `adaptive`'s keys in the suite: a tunnel that carried 8 small reads in
/// 100 ms moves to sockmap, and one that then holds 1 MiB in the kernel
/// steps aside (at the default 4 MiB, whether a stalled reader's socket
/// buffers let that much in depends on TCP's autotuning: once, under
/// load, they did not, and `saturating_after_chatting` saw no demotion).
const ADAPTIVE: &str = "promote_after = \"100ms\"\npromote_message_size = \"4KiB\"\nsockmap_queue_limit = \"1MiB\"";

/// The router under test and how its clients reach it. For every plane
/// but `tls` it runs that `data_plane.mode` and its clients speak plain
/// TCP. For `tls` both listeners get a `[listener.tls]` (the mode stays
/// `copy`, which no TLS tunnel uses) and clients speak TLS to `app.test`.
struct Node {
    router: Router,
    /// The http listener "web".
    web: Connector,
    /// The tcp listener "raw".
    raw: Connector,
    /// The certificate files, read again on SIGHUP: dropped after the router.
    _certs: Option<Certs>,
}

impl Node {
    fn start(mode: &str, limits: &str, routing: String) -> Node {
        Node::start_adaptive(mode, limits, routing, ADAPTIVE)
    }

    /// The same, with `adaptive`'s keys given (used by `adaptive` only).
    fn start_adaptive(mode: &str, limits: &str, routing: String, adaptive: &str) -> Node {
        if mode != "tls" && mode != "ktls" {
            // adaptive judges tunnels over short windows here, so that the
            // cases' tunnels move while they run.
            let extra = if mode == "adaptive" { adaptive } else { "" };
            let router = Router::start(Setup { mode, limits, routing, extra });
            let (web, raw) = (Connector { addr: router.http, tls: None }, Connector { addr: router.tcp, tls: None });
            return Node { router, web, raw, _certs: None };
        }
        let certs = Certs::make();
        let table = certs.listener_table("");
        let extra = if mode == "ktls" { "ktls = \"on\"" } else { "" };
        let config = render(&Setup { mode: "copy", limits, routing, extra });
        // The last key of each listener: its [listener.tls] follows it.
        let (web_end, raw_end) = ("trusted_cidrs = [\"127.0.0.2/32\"]\n", "protocol = \"tcp\"\npool = \"main\"\n");
        assert!(config.contains(web_end) && config.contains(raw_end), "{config}");
        let config = config.replacen(web_end, &format!("{web_end}{table}"), 1).replacen(
            raw_end,
            &format!("{raw_end}{table}"),
            1,
        );
        let router = Router::start_config(&config);
        let tls = Some(Arc::new(client_config(&certs.path("app.pem"), None)));
        let web = Connector { addr: router.http, tls: tls.clone() };
        let raw = Connector { addr: router.tcp, tls };
        Node { router, web, raw, _certs: Some(certs) }
    }

    fn is_tls(&self) -> bool {
        self.web.tls.is_some()
    }

    /// The relay a TLS node's tunnels run on: "ktls" or "tls".
    fn tls_relay(&self) -> &'static str {
        if self.router.log().contains("TLS tunnels go to the kernel") {
            "ktls"
        } else {
            "tls"
        }
    }

    /// An upgraded tunnel through "web" to `backend` (see [`raw_tunnel`]).
    async fn tunnel(
        &self,
        backend: &mut RawBackend,
        pipelined: &[u8],
        after_101: &[u8],
    ) -> (Client, TcpStream, String, Vec<u8>) {
        raw_tunnel_on(self.web.connect().await, backend, "app.test", pipelined, after_101).await
    }
}

impl Deref for Node {
    type Target = Router;
    fn deref(&self) -> &Router {
        &self.router
    }
}

impl DerefMut for Node {
    fn deref_mut(&mut self) -> &mut Router {
        &mut self.router
    }
}

fn start(mode: &str, backend: &RawBackend) -> Node {
    Node::start(mode, LIMITS, main_pool(&[backend.addr], "app.test"))
}

/// A WebSocket client (tokio-tungstenite) over a connection of `web`.
async fn ws_connect(
    web: &Connector,
    path: &str,
    headers: &[(&'static str, &str)],
) -> Result<
    (tokio_tungstenite::WebSocketStream<Client>, tokio_tungstenite::tungstenite::handshake::client::Response),
    tokio_tungstenite::tungstenite::Error,
> {
    let url = format!("ws://{}{path}", web.addr);
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
    req.headers_mut().insert("Host", "app.test".parse().unwrap());
    for (name, value) in headers {
        req.headers_mut().insert(*name, value.parse().unwrap());
    }
    tokio_tungstenite::client_async(req, web.connect().await).await
}

async fn websocket_echo_with_real_library(mode: &str) {
    let (addr, mut heads) = ws_echo_backend().await;
    let router = Node::start(mode, LIMITS, main_pool(&[addr], "app.test"));
    let (mut ws, resp) = ws_connect(&router.web, "/chat", &[("X-Forwarded-For", "6.6.6.6")]).await.unwrap();
    assert_eq!(resp.status(), 101);
    for i in 0..50 {
        let text = format!("message {i} {}", "x".repeat(i * 100));
        ws.send(Message::text(text.clone())).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(text));
    }
    let big = pattern(7, 1 << 20);
    ws.send(Message::binary(big.clone())).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap().into_data(), big);
    ws.close(None).await.unwrap();

    let headers = heads.recv().await.unwrap();
    let get = |name: &str| headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.clone());
    assert_eq!(get("x-forwarded-for").as_deref(), Some("127.0.0.1"), "an untrusted client's XFF is replaced");
    assert_eq!(get("x-forwarded-proto").as_deref(), Some("https"));
    assert!(get("x-request-start").unwrap().parse::<u64>().unwrap() > 1_600_000_000_000);
}

async fn integrity_64mib_both_ways(mode: &str) {
    let mut backend = RawBackend::start().await;
    let router = start(mode, &backend);
    let (client, server, _, _) = router.tunnel(&mut backend, b"", b"").await;
    const LEN: usize = 64 << 20;
    let up = pattern(1, LEN);
    let down = pattern(2, LEN);
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut sr, mut sw) = server.into_split();
    let t = Duration::from_secs(120);
    let (a, b, c, d) = tokio::join!(
        send_all(&mut cw, &up),
        send_all(&mut sw, &down),
        recv_hash(&mut sr, LEN, t),
        recv_hash(&mut cr, LEN, t)
    );
    assert_eq!(a, c, "client → backend corrupted");
    assert_eq!(b, d, "backend → client corrupted");
}

/// How long each saturated tunnel writes flat out before it half-closes.
const SATURATE_FOR: Duration = Duration::from_secs(3);
/// The longest a saturated stream may go without a byte arriving.
const MAX_GAP: Duration = Duration::from_secs(1);
/// The same with eight saturated tunnels at once: 24 peer tasks of this
/// debug build (writer, checking reader, echo per tunnel) share 2 cores
/// with the router, and their own turns take up to 1.5 s on every plane
/// (copy and uring alike). The sockmap hang this case guards against
/// stalled for 5–7 s or for good.
const MAX_GAP_EIGHT: Duration = Duration::from_secs(3);

/// A writer's half-close after `sent` bytes, bounded: a TLS close_notify
/// waits for room in a stalled tunnel, and once the reader gave up nothing
/// would ever make that room.
async fn half_close(w: &mut (impl AsyncWrite + Unpin), sent: usize) -> Result<(), String> {
    match tokio::time::timeout(Duration::from_secs(20), w.shutdown()).await {
        Ok(r) => r.map_err(|e| format!("half-close after {sent} bytes: {e}")),
        Err(_) => Err(format!("half-close after {sent} bytes: blocked for 20 s")),
    }
}

/// Writes a [`fast_stream`] as fast as the socket takes it (64 KiB
/// writes, no cap on bytes in flight) for `for_`, then half-closes; returns
/// the bytes sent, or what failed.
async fn write_flat_out(mut w: impl AsyncWrite + Unpin, for_: Duration) -> Result<u64, String> {
    let mut sent = 0usize;
    let deadline = Instant::now() + for_;
    while Instant::now() < deadline {
        // A write blocked for longer than the whole phase is a stall the
        // reader reports; stop writing then rather than hang here.
        match tokio::time::timeout_at(deadline.into(), w.write(fast_stream_at(sent, 64 * 1024))).await {
            Ok(Ok(n)) => sent += n,
            Ok(Err(e)) => return Err(format!("write failed after {sent} bytes: {e}")),
            Err(_) => break,
        }
    }
    half_close(&mut w, sent).await?;
    Ok(sent as u64)
}

/// What a reader of a checked stream saw.
#[derive(Debug)]
struct Received {
    bytes: u64,
    /// The longest wait for the next byte once bytes flowed.
    worst_gap: Duration,
    /// When it ended (since the first byte), and how many bytes had come
    /// (printed when a case fails).
    #[allow(dead_code)]
    worst_gap_at: (Duration, u64),
    ended: Instant,
}

/// Reads a [`fast_stream`] to EOF, checking every byte on arrival;
/// `slow` reads 16 KiB every 10 ms. Err when a byte is out of place or the
/// stream does not end within `within`.
async fn read_checked(mut r: impl AsyncReadExt + Unpin, slow: bool, within: Duration) -> Result<Received, String> {
    let mut buf = vec![0u8; if slow { 16 * 1024 } else { 256 * 1024 }];
    let mut got = 0usize;
    let mut worst_gap = Duration::ZERO;
    let mut last: Option<Instant> = None;
    let mut worst_gap_at = (Duration::ZERO, 0);
    let started = Instant::now();
    let deadline = started + within;
    loop {
        if slow {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let n = match tokio::time::timeout_at(deadline.into(), r.read(&mut buf)).await {
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(format!("read failed after {got} bytes: {e}")),
            Err(_) => {
                // The wait that timed out is a gap too: a stream that stopped
                // for good shows it here, not in worst_gap.
                let since_last = last.map_or(within, |l| l.elapsed());
                return Err(format!(
                    "no EOF within {within:?}: {got} bytes received, nothing for the last {since_last:?}, worst gap before that {worst_gap:?}"
                ));
            }
        };
        let now = Instant::now();
        if n == 0 {
            return Ok(Received { bytes: got as u64, worst_gap, worst_gap_at, ended: now });
        }
        check_fast_stream(&buf[..n], got)?;
        if let Some(prev) = last {
            // A slow reader's own sleep is not a gap of the stream.
            let waited = now - prev - if slow { Duration::from_millis(10) } else { Duration::ZERO };
            if waited > worst_gap {
                worst_gap = waited;
                worst_gap_at = (now - started, got as u64);
            }
        }
        last = Some(now);
        got += n;
    }
}

/// An echo coupled the way real request/response peers are: it stops
/// reading while its write blocks. Echoes until EOF, then half-closes.
async fn coupled_echo(s: TcpStream) {
    let (mut r, mut w) = s.into_split();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if w.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
    let _ = w.shutdown().await;
}

/// One tunnel saturated both ways through an echo: the client writes flat
/// out while reading the echo, half-closes after [`SATURATE_FOR`] and reads
/// to EOF. Every byte comes back once and in order, no gap over
/// [`MAX_GAP`], EOF soon after the half-close. Returns the bytes echoed.
async fn saturated_echo_tunnel(router: &Node, backend: &mut RawBackend) -> Result<u64, String> {
    let (client, server, _, _) = router.tunnel(backend, b"", b"").await;
    let echo = tokio::spawn(coupled_echo(server));
    let (cr, cw) = tokio::io::split(client);
    let writer = tokio::spawn(async move {
        let sent = write_flat_out(cw, SATURATE_FOR).await;
        (sent, Instant::now())
    });
    let received = read_checked(cr, false, SATURATE_FOR + Duration::from_secs(20)).await;
    let (sent, fin_at) = writer.await.unwrap();
    echo.abort();
    // When both ends failed, each says what it saw.
    let sent = sent.map_err(|e| format!("{e}; the reader: {:?}", received.as_ref().map(|r| r.bytes)))?;
    let received = received.map_err(|e| format!("{e} (client sent {sent})"))?;
    if received.bytes != sent {
        return Err(format!("{sent} bytes sent, {} echoed before EOF", received.bytes));
    }
    if received.worst_gap > MAX_GAP {
        return Err(format!("the echo stalled for {:?} ({sent} bytes)", received.worst_gap));
    }
    let eof_after = received.ended.saturating_duration_since(fin_at);
    if eof_after > Duration::from_secs(10) {
        return Err(format!("EOF came {eof_after:?} after the half-close"));
    }
    Ok(sent)
}

/// Two-way bulk through an echo, three times in a row (each run must pass:
/// the sockmap stall came in most runs, not all).
async fn two_way_saturated_echo(mode: &str) {
    let mut backend = RawBackend::start().await;
    let router = start(mode, &backend);
    for run in 0..3 {
        let echoed = saturated_echo_tunnel(&router, &mut backend)
            .await
            .unwrap_or_else(|e| panic!("run {run}: {e}\nrouter log:\n{}", router.log()));
        eprintln!("{mode}: run {run}: {} MiB echoed", echoed >> 20);
    }
    router.wait_log("close=\"done\"");
    if router.is_tls() {
        // The tunnels ran on the TLS relay (the kernel's, for ktls), and
        // the log and /metrics say so.
        let relay = router.tls_relay();
        assert_eq!(relay == "ktls", mode == "ktls", "{}", router.log());
        router.wait_log(&format!("status=101 data_plane=\"{relay}\""));
        let tunnels = router
            .wait_metric_at_least(&format!("upsplice_tunnels_total{{listener=\"web\",data_plane=\"{relay}\"}}"), 3.0);
        assert!(tunnels >= 3.0, "{tunnels} {relay} tunnels counted");
        if relay == "ktls" {
            let handed = router.metric("upsplice_ktls_handoffs_total{listener=\"web\",result=\"offloaded\"}");
            assert!(handed >= 3.0, "{handed} sessions handed to the kernel");
        }
    }
}

/// Eight saturated echo tunnels at once.
async fn two_way_saturated_eight_tunnels(mode: &str) {
    let mut backend = RawBackend::start().await;
    let router = start(mode, &backend);
    let mut tunnels = Vec::new();
    for _ in 0..8 {
        let (client, server, _, _) = router.tunnel(&mut backend, b"", b"").await;
        tunnels.push((client, server));
    }
    // Each tunnel's reader is a task of its own: polled together in one
    // task, a reader's wait for its turn would count as a stall.
    let runs = tunnels.into_iter().enumerate().map(|(i, (client, server))| async move {
        let echo = tokio::spawn(coupled_echo(server));
        let (cr, cw) = tokio::io::split(client);
        let writer = tokio::spawn(write_flat_out(cw, SATURATE_FOR));
        let received = tokio::spawn(read_checked(cr, false, SATURATE_FOR + Duration::from_secs(30))).await.unwrap();
        let sent = writer.await.unwrap().map_err(|e| format!("tunnel {i}: {e}"))?;
        echo.abort();
        let received = received.map_err(|e| format!("tunnel {i}: {e} (sent {sent})"))?;
        if received.bytes != sent {
            return Err(format!("tunnel {i}: {sent} sent, {} echoed", received.bytes));
        }
        if received.worst_gap > MAX_GAP_EIGHT {
            return Err(format!("tunnel {i}: stalled for {:?}", received.worst_gap));
        }
        Ok(sent)
    });
    let results = futures_util::future::join_all(runs).await;
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    if !failed.is_empty() {
        let log = router.log();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        panic!("{failed:?}\nrouter log (last lines, newest first):\n{}", tail.join("\n"));
    }
}

/// The far reader is slow (16 KiB every 10 ms) while the other direction
/// runs flat out: the fast direction must not wait for the slow one, and
/// both streams arrive whole.
async fn two_way_with_a_slow_far_reader(mode: &str) {
    let mut backend = RawBackend::start().await;
    let router = start(mode, &backend);
    let (client, server, _, _) = router.tunnel(&mut backend, b"", b"").await;
    let (cr, cw) = tokio::io::split(client);
    let (sr, sw) = server.into_split();
    let up_writer = tokio::spawn(write_flat_out(cw, SATURATE_FOR));
    let down_writer = tokio::spawn(write_flat_out(sw, SATURATE_FOR));
    // The slow reader drains what the buffers held at the half-close at
    // 1.6 MB/s: allow for tens of MB.
    // Separate tasks: in one, the fast reader's ready socket used up the
    // task's budget and the slow one's timer waited seconds for its turn.
    let slow = tokio::spawn(read_checked(sr, true, SATURATE_FOR + Duration::from_secs(60)));
    let fast = tokio::spawn(read_checked(cr, false, SATURATE_FOR + Duration::from_secs(20)));
    let (slow, fast) = (slow.await.unwrap(), fast.await.unwrap());
    let (up_sent, down_sent) = match (up_writer.await.unwrap(), down_writer.await.unwrap()) {
        (Ok(u), Ok(d)) => (u, d),
        (u, d) => panic!("a writer failed: {:?} {:?}\nrouter log:\n{}", u.err(), d.err(), router.log()),
    };
    let fast = fast.unwrap_or_else(|e| panic!("backend → client (fast reader): {e}\nrouter log:\n{}", router.log()));
    let slow = slow.unwrap_or_else(|e| panic!("client → backend (slow reader): {e}\nrouter log:\n{}", router.log()));
    if fast.worst_gap > MAX_GAP {
        panic!("the fast direction stalled: {fast:?}\nrouter log:\n{}", router.log());
    }
    assert_eq!(fast.bytes, down_sent, "backend → client");
    assert_eq!(slow.bytes, up_sent, "client → backend");
    assert!(fast.worst_gap <= MAX_GAP, "the fast direction stalled for {:?}", fast.worst_gap);
    assert!(slow.worst_gap <= MAX_GAP, "the slow reader waited for bytes: {slow:?} (of {up_sent})");
}

async fn half_close_client_first(mode: &str) {
    let mut backend = RawBackend::start().await;
    let router = start(mode, &backend);
    let (mut client, mut server, _, _) = router.tunnel(&mut backend, b"", b"").await;
    client.write_all(b"last words").await.unwrap();
    // A FIN; over TLS close_notify then FIN, which reaches the backend as
    // its FIN (the client can still read: TLS 1.3 closes each way alone).
    client.shutdown().await.unwrap();
    let mut got = vec![];
    let end = tokio::time::timeout(Duration::from_secs(10), server.read_to_end(&mut got)).await;
    assert!(
        matches!(end, Ok(Ok(_))) && got == b"last words",
        "the backend must see the bytes, then EOF: read {got:?}, then {end:?}\nrouter log:\n{}",
        router.log()
    );
    // The other direction keeps flowing after the client's FIN.
    let tail = pattern(3, 4 << 20);
    let sent = send_all(&mut server, &tail).await;
    assert_eq!(recv_hash(&mut client, tail.len(), Duration::from_secs(30)).await, sent);
    server.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut client).await, b"", "client sees EOF after the backend's FIN");
}

async fn half_close_backend_first(mode: &str) {
    let mut backend = RawBackend::start().await;
    let router = start(mode, &backend);
    let (mut client, mut server, _, _) = router.tunnel(&mut backend, b"", b"").await;
    server.write_all(b"bye").await.unwrap();
    // The backend's FIN reaches a TLS client as close_notify then FIN: a
    // clean EOF (read_to_end fails on a truncated TLS stream).
    server.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut client).await, b"bye");
    let tail = pattern(4, 4 << 20);
    let sent = send_all(&mut client, &tail).await;
    assert_eq!(recv_hash(&mut server, tail.len(), Duration::from_secs(30)).await, sent);
    client.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut server).await, b"");
}

fn is_reset(e: &std::io::Error) -> bool {
    matches!(e.kind(), std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe)
}

/// Reads until an error or EOF within `within`: Some(true) when the stream
/// ended with a reset, None when it did not end.
async fn ends_with_reset_within(s: &mut (impl AsyncRead + Unpin), within: Duration) -> Option<bool> {
    let mut buf = [0u8; 65536];
    let work = async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return false,
                Ok(_) => continue,
                Err(e) => return is_reset(&e),
            }
        }
    };
    tokio::time::timeout(within, work).await.ok()
}

/// Reads until an error or EOF; true when the stream ended with a reset.
async fn ends_with_reset(s: &mut (impl AsyncRead + Unpin)) -> bool {
    ends_with_reset_within(s, Duration::from_secs(10)).await.expect("no EOF or reset within 10s")
}

async fn reset_from_backend_resets_client(mode: &str) {
    let mut backend = RawBackend::start().await;
    let router = start(mode, &backend);
    let (mut client, server, _, _) = router.tunnel(&mut backend, b"", b"").await;
    server.set_zero_linger().unwrap();
    drop(server);
    assert!(ends_with_reset(&mut client).await, "the client must see a reset, not a clean EOF");
}

async fn reset_from_client_resets_backend(mode: &str) {
    let mut backend = RawBackend::start().await;
    let router = start(mode, &backend);
    let (client, mut server, _, _) = router.tunnel(&mut backend, b"", b"").await;
    client.set_zero_linger();
    drop(client);
    assert!(ends_with_reset(&mut server).await, "the backend must see a reset, not a clean EOF");
    if router.is_tls() {
        // Over TLS a FIN without close_notify is a truncated stream (an
        // attacker can forge a FIN, not a close_notify): passed on as a
        // reset too.
        let (client, mut server, _, _) = router.tunnel(&mut backend, b"", b"").await;
        let Client::Tls(tls) = client else { unreachable!("a TLS node's client") };
        let (mut tcp, _) = tls.into_inner();
        tcp.shutdown().await.unwrap();
        assert!(ends_with_reset(&mut server).await, "a TLS stream cut without close_notify must reset the backend");
        drop(tcp);
        // A TLS 1.3 KeyUpdate from the client: the userspace relay follows
        // it and the bytes after it arrive; a kTLS tunnel cannot (rustls
        // exports keys, not the secrets the next ones derive from): it is
        // reset, never left carrying bytes it cannot decrypt.
        let (client, mut server, _, _) = router.tunnel(&mut backend, b"", b"").await;
        let Client::Tls(mut tls) = client else { unreachable!("a TLS node's client") };
        tls.write_all(b"before").await.unwrap();
        let mut before = [0u8; 6];
        server.read_exact(&mut before).await.unwrap();
        tls.get_mut().1.refresh_traffic_keys().unwrap();
        tls.write_all(b"after the key update").await.unwrap();
        if router.tls_relay() == "ktls" {
            assert!(ends_with_reset(&mut server).await, "a kTLS tunnel must reset on a KeyUpdate");
            router.wait_log("KeyUpdate, which a kTLS tunnel cannot follow");
        } else {
            let mut after = [0u8; 20];
            server.read_exact(&mut after).await.unwrap();
            assert_eq!(&after, b"after the key update");
        }
    }
}

async fn backend_speaks_first(mode: &str) {
    let mut backend = RawBackend::start().await;
    let router = start(mode, &backend);
    // The backend's first message rides in the same write as its 101 and
    // then it waits for the client: the client must get it without sending.
    let mut client = router.web.connect().await;
    client.write_all(WS_REQUEST.replace("{host}", "app.test").as_bytes()).await.unwrap();
    let mut server = backend.accept().await;
    read_head(&mut server).await;
    let mut resp = WS_101.to_vec();
    resp.extend_from_slice(b"hello from the backend");
    server.write_all(&resp).await.unwrap();
    let (head, mut got) = read_head(&mut client).await;
    assert!(head.starts_with("HTTP/1.1 101"));
    while got.len() < 22 {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut buf))
            .await
            .expect("speak-first bytes stalled")
            .unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, b"hello from the backend");
    // A second message, sent after the tunnel is in place, also arrives.
    server.write_all(b"second").await.unwrap();
    let mut buf = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"second");
    // And the client can answer.
    client.write_all(b"ack").await.unwrap();
    let mut buf = [0u8; 3];
    tokio::time::timeout(Duration::from_secs(5), server.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"ack");
}

async fn pipelined_bytes_after_head(mode: &str) {
    let mut backend = RawBackend::start().await;
    let router = start(mode, &backend);
    let (mut client, mut server, head, mut early) = router.tunnel(&mut backend, b"early-bytes", b"").await;
    assert!(head.contains("Upgrade: websocket"), "{head}");
    // The pipelined bytes arrive after the head, in order, none dropped.
    while early.len() < 11 {
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), server.read(&mut buf))
            .await
            .expect("pipelined bytes stalled")
            .unwrap();
        assert!(n > 0);
        early.extend_from_slice(&buf[..n]);
    }
    assert_eq!(early, b"early-bytes");
    client.write_all(b"+more").await.unwrap();
    let mut buf = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(5), server.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"+more");
}

async fn refused_upgrade_is_relayed_framed(mode: &str) {
    let mut backend = RawBackend::start().await;
    let router = start(mode, &backend);
    for (answer, body) in [
        (&b"HTTP/1.1 403 Forbidden\r\nContent-Length: 9\r\nConnection: keep-alive\r\n\r\nforbidden"[..], "forbidden"),
        (
            &b"HTTP/1.1 426 Upgrade Required\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nnope\r\n0\r\n\r\n"[..],
            "4\r\nnope\r\n0\r\n\r\n",
        ),
    ] {
        let mut client = router.web.connect().await;
        client.write_all(WS_REQUEST.replace("{host}", "app.test").as_bytes()).await.unwrap();
        let mut server = backend.accept().await;
        read_head(&mut server).await;
        server.write_all(answer).await.unwrap();
        // The backend keeps its connection open (keep-alive); the client
        // still gets the whole response and then the router's close.
        let started = Instant::now();
        let got = String::from_utf8(read_to_end(&mut client).await).unwrap();
        assert!(started.elapsed() < Duration::from_secs(3), "the client waited for the backend's close");
        assert!(got.ends_with(body), "{got:?}");
        assert_eq!(&got.as_bytes()[..12], &answer[..12]);
        drop(server);
    }
}

async fn many_concurrent_websocket_clients(mode: &str) {
    let (addr, _heads) = ws_echo_backend().await;
    let router = Node::start(mode, LIMITS, main_pool(&[addr], "app.test"));
    let (mut open, mut failed, mut tasks) = (Vec::new(), Vec::new(), Vec::new());
    // Each TLS connect is a handshake of this debug build's, the router's
    // and the test's, on 2 shared cores: waves of 10, each done before the
    // next starts, or handshake_timeout cuts the queue (50 at once did, on
    // a loaded machine). The handshake rate is a benchmark's question; this
    // case's is 500 tunnels open at once.
    let wave = if router.is_tls() { 10 } else { 50 };
    for i in 0..500 {
        if i % wave == 0 {
            if router.is_tls() {
                wait_all(&mut tasks, &mut open, &mut failed).await;
            }
            // Connect in waves so the test's own backend keeps up with accepts.
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let web = router.web.clone();
        tasks.push(tokio::spawn(async move {
            let (mut ws, _) = ws_connect(&web, "/", &[]).await.map_err(|e| format!("client {i}: {e}"))?;
            for j in 0..3 {
                let text = format!("client {i} message {j}");
                ws.send(Message::text(text.clone())).await.unwrap();
                assert_eq!(ws.next().await.unwrap().unwrap(), Message::text(text));
            }
            Ok::<_, String>(ws)
        }));
    }
    wait_all(&mut tasks, &mut open, &mut failed).await;
    if !failed.is_empty() {
        let (_, metrics) = router.admin_get("/metrics").unwrap();
        // TLS handshake errors, and where the open tunnels are and went.
        let errors: Vec<&str> = metrics
            .lines()
            .filter(|l| {
                ["upsplice_tls_handshake_errors", "upsplice_dataplane_moves_total", "upsplice_tunnels_active"]
                    .iter()
                    .any(|p| l.starts_with(p))
            })
            .collect();
        let log = router.log();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        panic!(
            "{} clients failed, first {:?}; {errors:?}\nrouter log (last lines, newest first):\n{}",
            failed.len(),
            &failed[..failed.len().min(3)],
            tail.join("\n")
        );
    }
    // All 500 are open at once here (on whichever planes carry them: the
    // series of every plane that may exists from startup).
    let (_, metrics) = router.admin_get("/metrics").unwrap();
    let active: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("upsplice_tunnels_active{listener=\"web\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(active, 500.0, "{metrics}");
    drop(open);
}

/// Waits for each of `tasks` (bounded), sorting what they return.
async fn wait_all<T>(
    tasks: &mut Vec<tokio::task::JoinHandle<Result<T, String>>>,
    ok: &mut Vec<T>,
    failed: &mut Vec<String>,
) {
    for t in tasks.drain(..) {
        match tokio::time::timeout(Duration::from_secs(60), t).await.expect("clients stalled").unwrap() {
            Ok(v) => ok.push(v),
            Err(e) => failed.push(e),
        }
    }
}

async fn idle_timeout_closes_tunnel(mode: &str) {
    let mut backend = RawBackend::start().await;
    let router = Node::start(mode, "idle_timeout = \"1s\"", main_pool(&[backend.addr], "app.test"));
    let (mut client, mut server, _, _) = router.tunnel(&mut backend, b"", b"").await;
    // Traffic keeps it alive past the timeout...
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        client.write_all(b"ping").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
    }
    // ...silence closes it: FIN both ways (towards a TLS client
    // close_notify then FIN, a clean EOF: the router closed it, nothing
    // was cut short).
    let started = Instant::now();
    let end = read_to_end(&mut client).await;
    assert!(end.is_empty());
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(800) && waited < Duration::from_secs(5), "closed after {waited:?}");
    assert_eq!(read_to_end(&mut server).await, b"");
    router.wait_log("close=\"idle_timeout\"");
}

async fn backpressure_is_bounded(mode: &str) {
    let mut backend = RawBackend::start().await;
    let router = start(mode, &backend);
    let (client, mut server, _, _) = router.tunnel(&mut backend, b"", b"").await;
    let rss_before = router.rss_kib();
    // The backend stops reading; the client writes as fast as it can for 2 s.
    let (_cr, mut cw) = tokio::io::split(client);
    let data = pattern(9, 256 << 20);
    let writer = tokio::spawn(async move {
        let mut sent = 0usize;
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline && sent < data.len() {
            match tokio::time::timeout(
                Duration::from_millis(100),
                cw.write(&data[sent..(sent + 65536).min(data.len())]),
            )
            .await
            {
                Ok(Ok(n)) => sent += n,
                Ok(Err(e)) => panic!("write failed: {e}"),
                Err(_) => {}
            }
        }
        (sent, data, cw)
    });
    let (sent, data, mut cw) = writer.await.unwrap();
    let rss_stalled = router.rss_kib();
    assert!(sent < 200 << 20, "the writer was never pushed back: {sent} bytes accepted with nobody reading");
    assert!(
        rss_stalled < rss_before + 32 * 1024,
        "router memory grew from {rss_before} KiB to {rss_stalled} KiB behind a stalled reader"
    );
    // The backend reads again: every byte accepted arrives, intact.
    use sha2::{Digest, Sha256};
    let expected: [u8; 32] = Sha256::digest(&data[..sent]).into();
    // (A TLS client flushes what rustls still holds of the bytes it accepted.)
    let (got, flushed) = tokio::join!(recv_hash(&mut server, sent, Duration::from_secs(60)), cw.flush());
    flushed.unwrap();
    assert_eq!(got, expected);
    drop(cw);
}

async fn no_close_wait_and_fds_return(mode: &str) {
    let mut backend = RawBackend::start().await;
    let router = start(mode, &backend);
    // Warm up pools (buffers, pipes) so the baseline includes them.
    let (c, s, _, _) = router.tunnel(&mut backend, b"", b"").await;
    drop((c, s));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (baseline, baseline_pipes) = (router.fd_count(), router.pipe_fd_count());
    for i in 0..60 {
        let (mut client, mut server, _, _) = router.tunnel(&mut backend, b"", b"").await;
        client.write_all(b"data").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        match i % 3 {
            0 => {
                // Client closes first (cleanly: FIN, over TLS close_notify
                // then FIN); the backend answers the FIN with its own.
                client.shutdown().await.unwrap();
                drop(client);
                read_to_end(&mut server).await;
                drop(server);
            }
            1 => {
                // Backend closes first; the client answers, cleanly.
                drop(server);
                read_to_end(&mut client).await;
                client.shutdown().await.unwrap();
                drop(client);
            }
            _ => {
                server.set_zero_linger().unwrap();
                drop(server);
                let _ = ends_with_reset(&mut client).await;
            }
        }
    }
    // Pipes the splice plane keeps in its pool may grow by those two
    // overlapping tunnels (one closing, the next starting) borrowed at once;
    // a leak would be one or more per tunnel, 60 here.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (fds, pipes, cw) = (router.fd_count(), router.pipe_fd_count(), router.close_wait_count());
        let others = fds - pipes;
        if others <= baseline - baseline_pipes && pipes <= baseline_pipes + 4 && cw == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "router holds {fds} fds, {pipes} of them pipes (baseline {baseline}, {baseline_pipes}) and {cw} CLOSE_WAIT sockets"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn tcp_listener_forwards_raw_bytes(mode: &str) {
    let mut backend = RawBackend::start().await;
    let router = start(mode, &backend);
    let client = router.raw.connect().await;
    let server = backend.accept().await;
    // Not HTTP at all: the tcp listener must not parse a byte.
    let up = pattern(11, 8 << 20);
    let down = pattern(12, 8 << 20);
    let (mut cr, mut cw) = tokio::io::split(client);
    let (mut sr, mut sw) = server.into_split();
    let t = Duration::from_secs(60);
    let (a, b, c, d) = tokio::join!(
        send_all(&mut cw, &up),
        send_all(&mut sw, &down),
        recv_hash(&mut sr, up.len(), t),
        recv_hash(&mut cr, down.len(), t)
    );
    assert_eq!((a, b), (c, d));
}

async fn plain_request_with_body(mode: &str) {
    let mut backend = RawBackend::start().await;
    let router = start(mode, &backend);
    let body = pattern(13, 300_000);
    let mut client = router.web.connect().await;
    let head = format!(
        "POST /upload HTTP/1.1\r\nHost: app.test\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut req = head.into_bytes();
    req.extend_from_slice(&body);
    let writer = tokio::spawn(async move {
        client.write_all(&req).await.unwrap();
        client.flush().await.unwrap();
        client
    });
    let mut server = backend.accept().await;
    let (got_head, mut got) = read_head(&mut server).await;
    // The client's hop-by-hop header stays with the client; the backend
    // connection may be kept for the next request ([backends] reuse).
    assert!(!got_head.contains("\r\nConnection:"), "{got_head}");
    while got.len() < body.len() {
        let mut buf = vec![0u8; 65536];
        let n = server.read(&mut buf).await.unwrap();
        assert!(n > 0);
        got.extend_from_slice(&buf[..n]);
    }
    assert_eq!(got, body);
    server.write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok").await.unwrap();
    drop(server);
    let mut client = writer.await.unwrap();
    let resp = String::from_utf8(read_to_end(&mut client).await).unwrap();
    assert!(resp.starts_with("HTTP/1.1 201 Created") && resp.ends_with("ok"), "{resp}");
}

async fn sigterm_drains_then_closes(mode: &str) {
    let mut backend = RawBackend::start().await;
    let mut router = start(mode, &backend);
    let (mut client, mut server, _, _) = router.tunnel(&mut backend, b"", b"").await;
    router.signal(nix::sys::signal::Signal::SIGTERM);
    router.wait_log("draining");
    // For drain_wait (500 ms) new tunnels still open...
    let (c2, s2, _, _) = router.tunnel(&mut backend, b"", b"").await;
    drop((c2, s2));
    // ...then accepting stops...
    router.wait_log("accepting no more");
    assert!(TcpStream::connect(router.http).await.is_err(), "the listener still accepts after drain_wait");
    // ...the open tunnel still works during drain_timeout (2 s)...
    client.write_all(b"still here").await.unwrap();
    let mut buf = [0u8; 10];
    tokio::time::timeout(Duration::from_secs(2), server.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"still here");
    // ...and is reset at the deadline, both sides (a FIN would make a
    // stream cut short look complete); the router exits 0.
    async fn is_cut(side: &str, stream: &mut (impl AsyncRead + Unpin)) {
        let cut = tokio::time::timeout(Duration::from_secs(6), stream.read(&mut [0u8; 16]))
            .await
            .unwrap_or_else(|_| panic!("{side}: tunnel not cut at the drain deadline"));
        assert!(
            matches!(&cut, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "{side}: the drain deadline must reset, got {cut:?}"
        );
    }
    is_cut("client", &mut client).await;
    is_cut("backend", &mut server).await;
    let status = router.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "exit status {status:?}");
}

async fn sighup_reloads_routes_and_keeps_tunnels(mode: &str) {
    let mut old_backend = RawBackend::start().await;
    let mut new_backend = RawBackend::start().await;
    let router = start(mode, &old_backend);
    let (mut client, mut server, _, _) = router.tunnel(&mut old_backend, b"", b"").await;

    // A broken config is rejected; the old one stays.
    let good = std::fs::read_to_string(&router.config_path).unwrap();
    std::fs::write(&router.config_path, format!("{good}\n[[route]]\nhost = \"other.test\"\npool = \"missing\"\n"))
        .unwrap();
    router.signal(nix::sys::signal::Signal::SIGHUP);
    router.wait_log("reload rejected");
    let (c2, s2, _, _) = router.tunnel(&mut old_backend, b"", b"").await;
    drop((c2, s2));

    // A good one moves new connections to the new pool.
    std::fs::write(&router.config_path, good.replace(&old_backend.addr.to_string(), &new_backend.addr.to_string()))
        .unwrap();
    router.signal(nix::sys::signal::Signal::SIGHUP);
    router.wait_log("SIGHUP: reloaded");
    let (c3, s3, _, _) = router.tunnel(&mut new_backend, b"", b"").await;
    drop((c3, s3));

    // The tunnel opened before both reloads is untouched.
    client.write_all(b"after reload").await.unwrap();
    let mut buf = [0u8; 12];
    tokio::time::timeout(Duration::from_secs(5), server.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(&buf, b"after reload");
}

/// Writes a [`fast_stream`] in small messages (`size` bytes every
/// millisecond or so, as a chatty WebSocket does) for `for_`, then
/// half-closes; returns the bytes sent.
/// `size` bytes of the fast stream from `pos` (across its period's end).
fn fast_message(pos: usize, size: usize) -> Vec<u8> {
    let mut message = Vec::with_capacity(size);
    while message.len() < size {
        message.extend_from_slice(fast_stream_at(pos + message.len(), size - message.len()));
    }
    message
}

async fn write_small_messages(mut w: impl AsyncWrite + Unpin, size: usize, for_: Duration) -> Result<u64, String> {
    let mut sent = 0usize;
    let deadline = Instant::now() + for_;
    while Instant::now() < deadline {
        let message = fast_message(sent, size);
        w.write_all(&message).await.map_err(|e| format!("write failed after {sent} bytes: {e}"))?;
        sent += size;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    half_close(&mut w, sent).await?;
    Ok(sent as u64)
}

/// Small messages (100 bytes, one a millisecond) for `chat_for`, then
/// 64 KiB writes 4 ms apart (about 12 MiB/s) for `bulk_for`, then a
/// half-close. Returns the bytes sent.
async fn write_chat_then_bulk(
    mut w: impl AsyncWrite + Unpin,
    chat_for: Duration,
    bulk_for: Duration,
) -> Result<u64, String> {
    let mut sent = 0usize;
    let chat_until = Instant::now() + chat_for;
    while Instant::now() < chat_until {
        let message = fast_message(sent, 100);
        w.write_all(&message).await.map_err(|e| format!("write failed after {sent} bytes: {e}"))?;
        sent += message.len();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let bulk_until = Instant::now() + bulk_for;
    while Instant::now() < bulk_until {
        let chunk = fast_message(sent, 64 * 1024);
        w.write_all(&chunk).await.map_err(|e| format!("write failed after {sent} bytes: {e}"))?;
        sent += chunk.len();
        tokio::time::sleep(Duration::from_millis(4)).await;
    }
    half_close(&mut w, sent).await?;
    Ok(sent as u64)
}

/// A tunnel that talks in small messages (promoted, on adaptive), then
/// carries steady bulk both ways (about 12 MiB/s each) to readers that
/// keep up: it steps aside for its rate (demoted to splice, on adaptive:
/// `demote_rate`), and every byte arrives once and in order, then EOF,
/// both ways. Steady, not as fast as it goes: a tunnel at full speed may
/// pass its queue bound first (the psock's queue grows when the kernel's
/// worker lags), and this case is about the rate.
async fn bulk_after_chatting(mode: &str) {
    let mut backend = RawBackend::start().await;
    // A queue bound a steady 12 MiB/s to readers that keep up does not
    // reach (its budget, a quarter, is when the rate is first looked at),
    // and a rate a third of that: the move is the rate's.
    let adaptive = "promote_after = \"100ms\"\npromote_message_size = \"4KiB\"\nsockmap_queue_limit = \"16MiB\"\n\
                    demote_rate = \"4MiB\"";
    let router = Node::start_adaptive(mode, LIMITS, main_pool(&[backend.addr], "app.test"), adaptive);
    let (client, server, _, _) = router.tunnel(&mut backend, b"", b"").await;
    let (cr, cw) = tokio::io::split(client);
    let (sr, sw) = server.into_split();
    let (chat, bulk) = (Duration::from_millis(400), Duration::from_millis(1500));
    let up = tokio::spawn(write_chat_then_bulk(cw, chat, bulk));
    let down = tokio::spawn(write_chat_then_bulk(sw, chat, bulk));
    let within = chat + bulk + Duration::from_secs(30);
    let (at_backend, at_client) = tokio::join!(read_checked(sr, false, within), read_checked(cr, false, within));
    let log = || router.log();
    let up = up.await.unwrap().unwrap_or_else(|e| panic!("client writer: {e}\nrouter log:\n{}", log()));
    let down = down.await.unwrap().unwrap_or_else(|e| panic!("backend writer: {e}\nrouter log:\n{}", log()));
    let at_backend = at_backend.unwrap_or_else(|e| panic!("client → backend: {e}\nrouter log:\n{}", log()));
    let at_client = at_client.unwrap_or_else(|e| panic!("backend → client: {e}\nrouter log:\n{}", log()));
    assert_eq!(at_backend.bytes, up, "client → backend");
    assert_eq!(at_client.bytes, down, "backend → client");
    eprintln!("{mode}: {} MiB up, {} MiB down", up >> 20, down >> 20);
    if mode == "adaptive" {
        assert!(moves(&router, "promotion") >= 1.0, "not promoted while chatting\n{}", log());
        let demoted = router
            .metric("upsplice_dataplane_moves_total{from=\"sockmap\",to=\"splice\",kind=\"demotion\",reason=\"rate\"}");
        assert!(demoted >= 1.0, "not demoted for its rate\n{}", log());
        // The access record names the three legs: splice, sockmap, splice.
        router.wait_log("planes=splice:");
        assert!(log().contains(",sockmap:") && log().contains("stepped aside"), "{}", log());
    }
}

/// Small messages both ways, then each side half-closes after its own
/// time; every byte arrives once and in order, then EOF, both ways.
/// Returns the bytes each way (up, down).
async fn chatty_tunnel(router: &Node, backend: &mut RawBackend, up_for: Duration, down_for: Duration) -> (u64, u64) {
    let (client, server, _, _) = router.tunnel(backend, b"", b"").await;
    let (cr, cw) = tokio::io::split(client);
    let (sr, sw) = server.into_split();
    let up = tokio::spawn(write_small_messages(cw, 100, up_for));
    let down = tokio::spawn(write_small_messages(sw, 60, down_for));
    let within = up_for.max(down_for) + Duration::from_secs(20);
    let (at_backend, at_client) = tokio::join!(read_checked(sr, false, within), read_checked(cr, false, within));
    let (up, down) = (up.await.unwrap(), down.await.unwrap());
    let log = || router.log();
    let up = up.unwrap_or_else(|e| panic!("client writer: {e}\nrouter log:\n{}", log()));
    let down = down.unwrap_or_else(|e| panic!("backend writer: {e}\nrouter log:\n{}", log()));
    let at_backend = at_backend.unwrap_or_else(|e| panic!("client → backend: {e}\nrouter log:\n{}", log()));
    let at_client = at_client.unwrap_or_else(|e| panic!("backend → client: {e}\nrouter log:\n{}", log()));
    assert_eq!(at_backend.bytes, up, "client → backend");
    assert_eq!(at_client.bytes, down, "backend → client");
    (up, down)
}

/// The `upsplice_dataplane_moves_total` series of `kind`, added up.
fn moves(router: &Node, kind: &str) -> f64 {
    let (_, body) = router.admin_get("/metrics").unwrap();
    body.lines()
        .filter(|l| l.starts_with("upsplice_dataplane_moves_total{") && l.contains(&format!("kind=\"{kind}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A chatty tunnel keeps talking both ways while it is judged and moved
/// (adaptive: to sockmap, with bytes in flight each way at that moment);
/// nothing is lost, duplicated or reordered.
async fn moves_with_bytes_in_flight_both_ways(mode: &str) {
    let mut backend = RawBackend::start().await;
    let router = start(mode, &backend);
    let talk = Duration::from_millis(1500);
    let (up, down) = chatty_tunnel(&router, &mut backend, talk, talk).await;
    assert!(up > 0 && down > 0);
    router.wait_log("close=\"done\"");
    if mode == "adaptive" {
        let promoted = router.metric(
            "upsplice_dataplane_moves_total{from=\"splice\",to=\"sockmap\",kind=\"promotion\",reason=\"small_messages\"}",
        );
        assert!(promoted >= 1.0, "the chatty tunnel was not promoted\n{}", router.log());
        // The access record names the planes and what each carried.
        router.wait_log("planes=splice:");
        assert!(router.log().contains(",sockmap:"), "{}", router.log());
    }
}

/// Tunnels whose client half-closes around the moment they are judged
/// (100 ms on adaptive) and moved: some FINs come before, during and after
/// the move. The other direction keeps flowing; both streams arrive whole.
async fn half_close_during_a_move(mode: &str) {
    let mut backend = RawBackend::start().await;
    let router = start(mode, &backend);
    // One tunnel after another: each needs the backend's next accept.
    for i in 0..8u64 {
        let up_for = Duration::from_millis(60 + 20 * i);
        chatty_tunnel(&router, &mut backend, up_for, Duration::from_millis(600)).await;
    }
    if mode == "adaptive" {
        assert!(moves(&router, "promotion") >= 1.0, "no tunnel was promoted\n{}", router.log());
    }
}

/// Tunnels whose client resets around the moment they are judged and
/// moved: each backend sees a reset, never a clean EOF, wherever the reset
/// met the tunnel (before, during or after the move).
///
/// The resets fall at 60..260 ms. A tunnel's first window lasts 100-200 ms
/// at random (adaptive), so the earlier ones meet the judgement or the
/// handoff, and the last two outlive every first window: at least one
/// tunnel is promoted in every run (with six tunnels up to 185 ms, none
/// was in about 1 run of 20).
async fn reset_during_a_move(mode: &str) {
    let mut backend = RawBackend::start().await;
    let router = start(mode, &backend);
    for i in 0..9u64 {
        let (mut client, mut server, _, _) = router.tunnel(&mut backend, b"", b"").await;
        let talk_until = Instant::now() + Duration::from_millis(60 + 25 * i);
        let reader = tokio::spawn(async move {
            let reset = ends_with_reset(&mut server).await;
            (reset, server)
        });
        let mut sent = 0;
        while Instant::now() < talk_until {
            client.write_all(fast_stream_at(sent, 90)).await.unwrap();
            sent += 90;
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        client.set_zero_linger();
        drop(client);
        let (reset, _server) = reader.await.unwrap();
        assert!(reset, "tunnel {i}: the backend saw a clean EOF after the client's reset\n{}", router.log());
    }
    if mode == "adaptive" {
        assert!(moves(&router, "promotion") >= 1.0, "no tunnel was promoted\n{}", router.log());
    }
}

/// A tunnel that talks in small messages (promoted, on adaptive), then
/// saturates one way towards a reader that stops: it steps aside (demoted,
/// on adaptive) and every byte still arrives once the reader reads again.
async fn saturating_after_chatting(mode: &str) {
    let mut backend = RawBackend::start().await;
    let router = start(mode, &backend);
    let (client, server, _, _) = router.tunnel(&mut backend, b"", b"").await;
    let (cr, mut cw) = tokio::io::split(client);
    let (sr, mut sw) = server.into_split();
    // Chat: 300 ms of small messages each way, read and checked by each side.
    let mut sent = [0usize; 2];
    let (mut cr, mut sr) = (cr, sr);
    let deadline = Instant::now() + Duration::from_millis(300);
    while Instant::now() < deadline {
        for (i, w) in [&mut cw as &mut (dyn AsyncWrite + Unpin + Send), &mut sw].into_iter().enumerate() {
            let m = fast_stream_at(sent[i], 80);
            w.write_all(m).await.unwrap();
            sent[i] += m.len();
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for (i, r) in [&mut sr as &mut (dyn AsyncRead + Unpin + Send), &mut cr].into_iter().enumerate() {
        let mut got = vec![0u8; sent[i]];
        tokio::time::timeout(Duration::from_secs(10), r.read_exact(&mut got)).await.unwrap().unwrap();
        check_fast_stream(&got, 0).unwrap();
    }
    // Then bulk towards a backend that does not read for 2 s.
    let offset = sent[0];
    let writer = tokio::spawn(async move {
        let mut at = offset;
        let deadline = Instant::now() + Duration::from_secs(2);
        while Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_millis(100), cw.write(fast_stream_at(at, 64 * 1024))).await {
                Ok(Ok(n)) => at += n,
                Ok(Err(e)) => return Err(format!("write failed: {e}")),
                Err(_) => {}
            }
        }
        // (A TLS client's close_notify waits behind the bulk: it goes out
        // once the backend reads again.)
        cw.shutdown().await.map_err(|e| format!("half-close: {e}"))?;
        Ok(at - offset)
    });
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // The backend reads again: the rest of the stream, checked, then EOF.
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0usize;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = tokio::time::timeout_at(deadline.into(), sr.read(&mut buf))
            .await
            .unwrap_or_else(|_| panic!("no EOF after {got} bulk bytes\n{}", router.log()))
            .unwrap();
        if n == 0 {
            break;
        }
        check_fast_stream(&buf[..n], offset + got).unwrap();
        got += n;
    }
    let bulk = writer.await.unwrap().unwrap_or_else(|e| panic!("client: {e}\n{}", router.log()));
    assert_eq!(got, bulk, "bulk bytes after the chat");
    sw.shutdown().await.unwrap();
    if mode == "adaptive" {
        assert!(moves(&router, "promotion") >= 1.0, "not promoted while chatting\n{}", router.log());
        assert!(moves(&router, "demotion") >= 1.0, "not demoted when it saturated\n{}", router.log());
        router.wait_log("planes=splice:");
    }
}

/// `limits.tcp_user_timeout`: a backend that stops reading for longer
/// gets its tunnel reset (the client sees a reset, the access record says
/// `backend_reset`) within a few seconds, instead of holding it until
/// `idle_timeout`; a shorter pause first is no harm to it.
async fn stalled_reader_past_tcp_user_timeout(mode: &str) {
    let mut backend = RawBackend::start().await;
    let router = Node::start(mode, "tcp_user_timeout = \"1s\"", main_pool(&[backend.addr], "app.test"));
    let (client, mut server, _, _) = router.tunnel(&mut backend, b"", b"").await;
    let (mut cr, mut cw) = tokio::io::split(client);
    // A pause well under the timeout: every byte still arrives.
    let burst = fast_stream_at(0, 4 << 20);
    let (wrote, got) = tokio::join!(
        async {
            cw.write_all(burst).await.unwrap();
            cw.flush().await.unwrap();
        },
        async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut got = vec![0u8; burst.len()];
            tokio::time::timeout(Duration::from_secs(20), server.read_exact(&mut got)).await.unwrap().unwrap();
            got
        }
    );
    let () = wrote;
    check_fast_stream(&got, 0).unwrap();
    // Then the backend stops reading for good; the client writes on.
    let stalled = Instant::now();
    let writer = tokio::spawn(async move {
        let mut at = burst.len();
        while stalled.elapsed() < Duration::from_secs(20) {
            match tokio::time::timeout(Duration::from_millis(100), cw.write(fast_stream_at(at, 64 * 1024))).await {
                Ok(Ok(n)) => at += n,
                Ok(Err(e)) => return Some(is_reset(&e)),
                Err(_) => {}
            }
        }
        None
    });
    // The reset reaches whichever of the client's reader and writer meets
    // it first (the other then sees the end of a closed socket).
    let read = ends_with_reset_within(&mut cr, Duration::from_secs(20)).await;
    let after = stalled.elapsed();
    let wrote = writer.await.unwrap();
    assert!(
        read == Some(true) || (read.is_some() && wrote == Some(true)),
        "the client saw no reset within 20 s of the stall (reader: {read:?}, writer: {wrote:?})\n{}",
        router.log()
    );
    assert!(after < Duration::from_secs(12), "the tunnel was reset only {after:?} after the backend stopped reading");
    router.wait_log("close=\"backend_reset\"");
    drop(server);
}

macro_rules! conformance {
    ($($mode:ident),* $(,)?) => {$(
        mod $mode {
            macro_rules! case {
                ($name:ident) => {
                    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                    async fn $name() {
                        if let Some(why) = super::unavailable(stringify!($mode)) {
                            eprintln!("SKIPPED: {} unavailable here: {why}", stringify!($mode));
                            return;
                        }
                        super::$name(stringify!($mode)).await
                    }
                };
            }
            case!(websocket_echo_with_real_library);
            case!(integrity_64mib_both_ways);
            case!(two_way_saturated_echo);
            case!(two_way_saturated_eight_tunnels);
            case!(two_way_with_a_slow_far_reader);
            case!(half_close_client_first);
            case!(half_close_backend_first);
            case!(reset_from_backend_resets_client);
            case!(reset_from_client_resets_backend);
            case!(backend_speaks_first);
            case!(pipelined_bytes_after_head);
            case!(refused_upgrade_is_relayed_framed);
            case!(many_concurrent_websocket_clients);
            case!(idle_timeout_closes_tunnel);
            case!(backpressure_is_bounded);
            case!(no_close_wait_and_fds_return);
            case!(tcp_listener_forwards_raw_bytes);
            case!(plain_request_with_body);
            case!(sigterm_drains_then_closes);
            case!(sighup_reloads_routes_and_keeps_tunnels);
            case!(moves_with_bytes_in_flight_both_ways);
            case!(half_close_during_a_move);
            case!(reset_during_a_move);
            case!(saturating_after_chatting);
            case!(bulk_after_chatting);
            case!(stalled_reader_past_tcp_user_timeout);
        }
    )*};
}

/// Why a plane cannot run on this machine or build (e.g. sockmap without
/// the eBPF toolchain), if it cannot. `tls` (the TLS relay) runs anywhere;
/// `ktls` where the kernel offers the `tls` ULP.
fn unavailable(mode: &str) -> Option<String> {
    if mode == "ktls" {
        return upsplice::dataplane::ktls::probe().err().map(|e| e.to_string());
    }
    if mode == "adaptive" {
        // Tunnels start on splice and move to sockmap: both must run.
        return ["splice", "sockmap"].into_iter().find_map(unavailable);
    }
    upsplice::dataplane::probe_all()
        .into_iter()
        .find(|(m, _)| m.as_str() == mode)
        .and_then(|(_, available)| available.err())
}

conformance!(copy, splice, uring, sockmap, adaptive, tls, ktls);
