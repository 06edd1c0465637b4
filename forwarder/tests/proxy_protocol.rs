//! PROXY protocol in (issue 15), the seed's TCP-mode topology: a load
//! balancer forwards the port in TCP mode and says who the client is with
//! a PROXY header — HAProxy `send-proxy-v2` (as an AWS NLB sends) and
//! `send-proxy` (v1, gorouter's only one), and nginx `stream` with
//! `proxy_protocol on` (v1), in front of the real binary. The client
//! connects from 127.0.0.5; the balancer reaches upsplice from 127.0.0.2,
//! the only address in `proxy_trusted_cidrs`. Raw sockets bring the bad
//! headers.
//!
//! scripts/setup installs haproxy, nginx and its stream module; with
//! UPSPLICE_REQUIRE_PEERS=1 (CI) a missing one fails the test instead of
//! skipping it.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::peer::{have, Peer};
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

/// A router whose two listeners take `proxy_protocol = mode` from
/// 127.0.0.2 only, routing `app.test` and forwarding the tcp listener to
/// `backend`.
fn router(mode: &str, backend: SocketAddr) -> Router {
    let setup = Setup {
        mode: "copy",
        limits: "handshake_timeout = \"1s\"",
        routing: main_pool(&[backend], "app.test"),
        // A backend connection per request: the tests read each request on
        // a connection of its own.
        extra: "[backends]\nmax_idle_per_backend = 0\n",
    };
    let proxy = format!("proxy_protocol = \"{mode}\"\nproxy_trusted_cidrs = [\"127.0.0.2/32\"]\n");
    let config = render(&setup)
        .replace("protocol = \"http\"\n", &format!("protocol = \"http\"\n{proxy}"))
        .replace("protocol = \"tcp\"\n", &format!("protocol = \"tcp\"\n{proxy}"));
    Router::start_config(&config)
}

/// HAProxy in TCP mode in front of `upsplice`, sending a PROXY header
/// (`send-proxy` or `send-proxy-v2`) from 127.0.0.2.
fn haproxy_tcp(send_proxy: &str, upsplice: SocketAddr) -> (Peer, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let cfg = format!(
        "global\n  maxconn 200\ndefaults\n  mode tcp\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n\
         frontend fe\n  bind 127.0.0.1:{port}\n  unique-id-format %{{+X}}o\\ %ci:%cp_%fi:%fp_%Ts_%rt\n  default_backend be\n\
         backend be\n  server upsplice {upsplice} source 127.0.0.2 {send_proxy}\n"
    );
    let addr = ([127, 0, 0, 1], port).into();
    (Peer::haproxy(dir, &cfg, addr), addr)
}

/// Debian's nginx stream module (`libnginx-mod-stream`), loaded by path.
const NGINX_STREAM: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// nginx `stream` in front of `upsplice`: TCP passed through with a PROXY
/// v1 header (`proxy_protocol on`), connecting from 127.0.0.2.
fn nginx_stream(upsplice: SocketAddr) -> (Peer, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let d = dir.path().display();
    let cfg = format!(
        "load_module {NGINX_STREAM};\ndaemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
         events {{}}\nstream {{\n server {{\n  listen 127.0.0.1:{port};\n  proxy_pass {upsplice};\n\
         proxy_protocol on;\n  proxy_bind 127.0.0.2;\n }}\n}}\n"
    );
    let addr = ([127, 0, 0, 1], port).into();
    (Peer::nginx(dir, &cfg, addr), addr)
}

/// Connects to `to` from the local address `from`.
async fn connect_from(from: &str, to: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{from}:0").parse().unwrap()).unwrap();
    socket.connect(to).await.unwrap()
}

/// One plain request from 127.0.0.5 through `front`; returns the head the
/// backend received and the client's answer.
async fn request_via(front: SocketAddr, backend: &mut RawBackend) -> (String, String) {
    let mut client = connect_from("127.0.0.5", front).await;
    client
        .write_all(b"GET /who HTTP/1.1\r\nHost: app.test\r\nX-Forwarded-For: 6.6.6.6\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut server = backend.accept().await;
    let (head, _) = read_head(&mut server).await;
    server.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await.unwrap();
    let answer = String::from_utf8_lossy(&read_to_end(&mut client).await).into_owned();
    (head, answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_send_proxy_v2_and_v1_make_the_client_the_real_one() {
    if !have("haproxy") {
        return;
    }
    // The TLVs an AWS NLB adds (here HAProxy's: a CRC32c of the header, the
    // SSL flags, a unique id) are skipped, the address still taken.
    let tlvs = "send-proxy-v2 proxy-v2-options crc32c,ssl,unique-id";
    for (mode, send_proxy) in
        [("v2", "send-proxy-v2"), ("v2", tlvs), ("any", "send-proxy-v2"), ("v1", "send-proxy"), ("any", "send-proxy")]
    {
        let mut backend = RawBackend::start().await;
        let r = router(mode, backend.addr);
        let (_lb, front) = haproxy_tcp(send_proxy, r.http);
        let (head, answer) = request_via(front, &mut backend).await;
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.ends_with("ok"), "{mode}/{send_proxy}: {answer}");
        // The header's client, not HAProxy (127.0.0.2) nor the spoofed value:
        // the client (127.0.0.5) is not in trusted_cidrs.
        assert!(head.contains("\r\nX-Forwarded-For: 127.0.0.5\r\n"), "{mode}/{send_proxy}: {head}");
        assert!(!head.contains("6.6.6.6"), "{mode}/{send_proxy}: {head}");
        r.wait_log("client=127.0.0.5:");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_stream_proxy_protocol_makes_the_client_the_real_one() {
    if !have("nginx") {
        return;
    }
    if !std::path::Path::new(NGINX_STREAM).exists() {
        assert!(
            std::env::var_os("UPSPLICE_REQUIRE_PEERS").is_none(),
            "{NGINX_STREAM} is missing (libnginx-mod-stream) and UPSPLICE_REQUIRE_PEERS is set"
        );
        eprintln!("SKIPPED: {NGINX_STREAM} is missing (scripts/setup installs libnginx-mod-stream)");
        return;
    }
    let mut backend = RawBackend::start().await;
    let r = router("v1", backend.addr);
    let (_lb, front) = nginx_stream(r.http);
    let (head, answer) = request_via(front, &mut backend).await;
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.ends_with("ok"), "{answer}");
    // The header's client, not nginx (127.0.0.2) nor the spoofed value.
    assert!(head.contains("\r\nX-Forwarded-For: 127.0.0.5\r\n"), "{head}");
    assert!(!head.contains("6.6.6.6"), "{head}");
    r.wait_log("client=127.0.0.5:");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_tunnel_and_a_tcp_listener_start_right_after_the_header() {
    if !have("haproxy") {
        return;
    }
    let (echo, mut heads) = ws_echo_backend().await;
    let r = router("v2", echo);
    let (_lb, front) = haproxy_tcp("send-proxy-v2", r.http);
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{front}/chat"))
            .unwrap();
    req.headers_mut().insert("Host", "app.test".parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::client_async(req, connect_from("127.0.0.5", front).await).await.unwrap();
    use futures_util::{SinkExt, StreamExt};
    let m = tokio_tungstenite::tungstenite::Message::binary(pattern(3, 100_000));
    ws.send(m.clone()).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), m);
    let head = heads.recv().await.unwrap();
    let xff = head.iter().find(|(k, _)| k.eq_ignore_ascii_case("x-forwarded-for")).map(|(_, v)| v.as_str());
    assert_eq!(xff, Some("127.0.0.5"), "{head:?}");

    // The tcp listener: the header is taken off, the stream goes on as sent.
    let mut backend = RawBackend::start().await;
    let r = router("v1", backend.addr);
    let mut client = connect_from("127.0.0.2", r.tcp).await;
    client.write_all(b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 443\r\n\x16\x03\x01 raw bytes").await.unwrap();
    let mut server = backend.accept().await;
    let mut got = vec![0u8; 13];
    tokio::time::timeout(Duration::from_secs(5), server.read_exact(&mut got)).await.unwrap().unwrap();
    assert_eq!(got, b"\x16\x03\x01 raw bytes");
    drop((client, server));
    r.wait_log("client=192.0.2.7:5555");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_headers_close_only_their_connection_and_are_counted() {
    let mut backend = RawBackend::start().await;
    let r = router("any", backend.addr);
    let v1 = b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 443\r\nGET / HTTP/1.1\r\nHost: app.test\r\n\r\n";
    let oversized = format!("PROXY TCP4 {}", "1".repeat(150));
    let cases: [(&str, &[u8], &str); 5] = [
        // A header from a peer outside proxy_trusted_cidrs: its claim is not taken.
        ("127.0.0.1", v1, "untrusted_peer"),
        ("127.0.0.2", b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n", "missing"),
        ("127.0.0.2", b"PROXY TCP4 1.2.3.999 1.2.3.4 1 2\r\n", "malformed"),
        ("127.0.0.2", oversized.as_bytes(), "oversized"),
        // Half a header, then nothing: closed at handshake_timeout (1 s).
        ("127.0.0.2", b"PROXY TCP4 192.0.2.7", "timeout"),
    ];
    // A good connection, kept alive throughout, is not touched.
    let mut good = connect_from("127.0.0.2", r.http).await;
    good.write_all(b"PROXY TCP4 192.0.2.8 127.0.0.1 6000 443\r\nGET /first HTTP/1.1\r\nHost: app.test\r\n\r\n")
        .await
        .unwrap();
    let mut server = backend.accept().await;
    read_head(&mut server).await;
    server.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await.unwrap();
    let mut answer = [0u8; 25];
    good.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"HTTP/1.1 204 No Content\r\n");
    for (from, wire, reason) in cases {
        let mut s = connect_from(from, r.http).await;
        let _ = s.write_all(wire).await;
        let mut out = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(4), s.read_to_end(&mut out)).await;
        assert!(read.is_ok(), "{reason}: not closed");
        assert!(out.is_empty(), "{reason}: answered {:?}", String::from_utf8_lossy(&out));
        let metric = format!("upsplice_proxy_protocol_errors_total{{listener=\"web\",reason=\"{reason}\"}}");
        assert_eq!(r.metric(&metric), 1.0, "{metric}");
    }
    good.write_all(b"GET /later HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut server = backend.accept().await;
    let (head, _) = read_head(&mut server).await;
    assert!(head.starts_with("GET /later ") && head.contains("\r\nX-Forwarded-For: 192.0.2.8\r\n"), "{head}");
}

/// `send_proxy` on a pool: each backend connection starts with a header
/// stating the client (from its own PROXY header here), never reused
/// across requests, and a tcp listener's stream follows it unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_proxy_tells_backends_the_client_on_every_connection() {
    let mut backend = RawBackend::start().await;
    let mut held = Vec::new();
    for (version, expected) in [("v1", &b"PROXY TCP4 192.0.2.7 "[..]), ("v2", &b"\r\n\r\n\0\r\nQUIT\n\x21\x11"[..])] {
        let setup = Setup {
            mode: "copy",
            limits: "handshake_timeout = \"1s\"",
            routing: main_pool(&[backend.addr], "app.test")
                .replace("[[route]]", &format!("send_proxy = \"{version}\"\n\n[[route]]")),
            extra: "",
        };
        let config = render(&setup).replace(
            "protocol = \"http\"\n",
            "protocol = \"http\"\nproxy_protocol = \"v1\"\nproxy_trusted_cidrs = [\"127.0.0.2/32\"]\n",
        );
        let r = Router::start_config(&config);
        let mut client = connect_from("127.0.0.2", r.http).await;
        client.write_all(b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 443\r\n").await.unwrap();
        for i in 0..2 {
            client.write_all(b"GET /p HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
            let mut server = backend.accept().await;
            let mut start = vec![0u8; expected.len()];
            server.read_exact(&mut start).await.unwrap();
            assert_eq!(start, expected, "{version}, request {i}");
            // The rest of the header, then the request.
            let (head, _) = read_head(&mut server).await;
            if version == "v1" {
                // The destination: the router's address the connection came
                // to (read from its socket only for such a pool).
                let dst = format!("127.0.0.1 5555 {}\r\nGET ", r.http.port());
                assert!(head.starts_with(&dst), "{version}: {head:?}");
            }
            assert!(head.contains("GET /p HTTP/1.1\r\n"), "{version}: {head:?}");
            assert!(head.contains("\r\nX-Forwarded-For: 192.0.2.7\r\n"), "{version}: {head:?}");
            server.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await.unwrap();
            let mut answer = [0u8; 17];
            client.read_exact(&mut answer).await.unwrap();
            assert_eq!(&answer, b"HTTP/1.1 200 OK\r\n");
            let mut rest = [0u8; 21];
            client.read_exact(&mut rest).await.unwrap();
            // Held open: the second request must still come on a new connection.
            held.push(server);
        }
    }
    // A tcp listener: the header, then the client's bytes as sent.
    let setup = Setup {
        mode: "copy",
        limits: "",
        routing: main_pool(&[backend.addr], "app.test").replace("[[route]]", "send_proxy = \"v1\"\n\n[[route]]"),
        extra: "",
    };
    let r = Router::start(setup);
    let mut client = TcpStream::connect(r.tcp).await.unwrap();
    client.write_all(b"raw").await.unwrap();
    let mut server = backend.accept().await;
    let mut got = Vec::new();
    while !got.ends_with(b"raw") {
        let mut chunk = [0u8; 256];
        let n = tokio::time::timeout(Duration::from_secs(5), server.read(&mut chunk)).await.unwrap().unwrap();
        assert!(n > 0);
        got.extend_from_slice(&chunk[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("PROXY TCP4 127.0.0.1 127.0.0.1 ") && text.ends_with("\r\nraw"), "{text:?}");
}
