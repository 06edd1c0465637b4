//! TLS termination on listeners (issue 15), against the real binary with
//! certificates made at test time (rcgen): a Rust TLS client (tokio-rustls)
//! through an upgraded tunnel on the `tls` relay, `curl` over https,
//! `openssl s_client` for SNI and ALPN, bad input (plaintext instead of a
//! ClientHello, a client that never finishes its handshake) and SIGHUP
//! with a broken certificate file.
//!
//! scripts/setup installs curl and openssl; with UPSPLICE_REQUIRE_PEERS=1
//! (CI) a missing one fails its test instead of skipping it.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::peer::{have, python_websockets};
use common::tls::{client_config, connect_with, Certs};
use common::*;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A router whose http listener "web" terminates TLS with `certs`
/// (`tls_extra` goes into its `[listener.tls]`).
fn router(certs: &Certs, backend: std::net::SocketAddr, tls_extra: &str) -> Router {
    Router::start_config(&config(certs, backend, "", tls_extra))
}

/// The config of [`router`]; `listener_extra` goes into the "web" listener.
fn config(certs: &Certs, backend: std::net::SocketAddr, listener_extra: &str, tls_extra: &str) -> String {
    let setup = Setup {
        mode: "copy",
        limits: "handshake_timeout = \"1s\"",
        routing: main_pool(&[backend], "app.test"),
        extra: "[backends]\nmax_idle_per_backend = 0\n",
    };
    let tls = format!("{listener_extra}\n{}", certs.listener_table(tls_extra));
    let trusted = "trusted_cidrs = [\"127.0.0.2/32\"]\n";
    render(&setup).replace(trusted, &format!("{trusted}{tls}"))
}

/// A TLS client that trusts `ca` (a PEM file) only.
async fn tls_connect(
    addr: std::net::SocketAddr,
    ca: &Path,
    sni: &str,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    tls_connect_as(addr, ca, sni, None).await
}

/// [`tls_connect`], presenting `identity` (certificate DER, key DER) if given.
async fn tls_connect_as(
    addr: std::net::SocketAddr,
    ca: &Path,
    sni: &str,
    identity: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    connect_with(addr, Arc::new(client_config(ca, identity)), sni).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_tunnel_runs_on_the_tls_relay_with_half_close() {
    let certs = Certs::make();
    let mut backend = RawBackend::start().await;
    let r = router(&certs, backend.addr, "");
    let mut client = tls_connect(r.http, &certs.path("app.pem"), "app.test").await.unwrap();
    client
        .write_all(b"GET /ws HTTP/1.1\r\nHost: app.test\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nearly")
        .await
        .unwrap();
    let mut server = backend.accept().await;
    let (head, _) = read_head(&mut server).await;
    assert!(head.contains("\r\nX-Forwarded-Proto: https\r\n"), "{head}");
    server
        .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        .await
        .unwrap();
    let mut got = [0u8; 5];
    server.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"early");

    // Bulk both ways, then half-close from the client: the backend sees
    // EOF and can still answer.
    let data = vec![7u8; 1 << 20];
    let sent = send_all(&mut client, &data).await;
    assert_eq!(recv_hash(&mut server, data.len(), Duration::from_secs(10)).await, sent);
    client.shutdown().await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), server.read_to_end(&mut rest)).await.unwrap().unwrap();
    assert!(rest.is_empty());
    server.write_all(b"bye").await.unwrap();
    drop(server);
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut answer)).await.unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert!(answer.starts_with("HTTP/1.1 101") && answer.ends_with("bye"), "{answer}");

    let deadline = Instant::now() + Duration::from_secs(5);
    while r.metric("upsplice_tunnels_total{listener=\"web\",data_plane=\"tls\"}") < 1.0 {
        assert!(Instant::now() < deadline, "no tls tunnel counted: {}", r.admin_get("/metrics").unwrap().1);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(r.metric("upsplice_relayed_bytes_total{data_plane=\"tls\",direction=\"to_backend\"}") >= data.len() as f64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_over_https_and_openssl_sni_and_alpn() {
    if !have("curl") || !have("openssl") {
        return;
    }
    let certs = Certs::make();
    let mut backend = RawBackend::start().await;
    let r = router(&certs, backend.addr, "");
    let port = r.http.port();
    let ca = certs.path("app.pem");
    let curl = tokio::task::spawn_blocking(move || {
        Command::new("curl")
            .args(["-sS", "--max-time", "10", "--cacert"])
            .arg(&ca)
            .args(["--resolve", &format!("app.test:{port}:127.0.0.1"), &format!("https://app.test:{port}/x")])
            .output()
            .unwrap()
    });
    let mut server = backend.accept().await;
    let (head, _) = read_head(&mut server).await;
    assert!(head.starts_with("GET /x HTTP/1.1\r\n"), "{head}");
    server.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello").await.unwrap();
    drop(server);
    let out = curl.await.unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello", "{}", String::from_utf8_lossy(&out.stderr));

    // SNI: a name under *.other.test gets that certificate; none gets the first.
    let san = |servername: &str| {
        let sni = if servername.is_empty() { "-noservername".to_string() } else { format!("-servername {servername}") };
        let cmd = format!(
            "openssl s_client -connect 127.0.0.1:{port} {sni} </dev/null 2>/dev/null | openssl x509 -noout -ext subjectAltName"
        );
        String::from_utf8_lossy(&Command::new("sh").args(["-c", &cmd]).output().unwrap().stdout).into_owned()
    };
    assert!(san("a.other.test").contains("DNS:*.other.test"), "{}", san("a.other.test"));
    assert!(san("app.test").contains("DNS:app.test"));
    assert!(san("").contains("DNS:app.test"), "the first certificate is the default");

    // ALPN: h2 only is refused with no_application_protocol.
    let h2 = Command::new("sh")
        .args([
            "-c",
            &format!("openssl s_client -connect 127.0.0.1:{port} -servername app.test -alpn h2 </dev/null 2>&1"),
        ])
        .output()
        .unwrap();
    let h2 = String::from_utf8_lossy(&h2.stdout);
    assert!(h2.contains("no application protocol"), "{h2}");
    assert!(
        r.metric("upsplice_tls_handshake_errors_total{listener=\"web\",reason=\"no_application_protocol\"}") >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_version_1_3_refuses_tls_1_2() {
    if !have("openssl") {
        return;
    }
    let certs = Certs::make();
    let backend = RawBackend::start().await;
    let r = router(&certs, backend.addr, "min_version = \"1.3\"");
    let port = r.http.port();
    let run = |version: &str| {
        let cmd = format!("openssl s_client -connect 127.0.0.1:{port} -servername app.test {version} </dev/null 2>&1");
        String::from_utf8_lossy(&Command::new("sh").args(["-c", &cmd]).output().unwrap().stdout).into_owned()
    };
    assert!(run("-tls1_3").contains("TLSv1.3"));
    let old = run("-tls1_2");
    assert!(old.contains("alert") || old.contains("no protocols available"), "{old}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_slow_handshakes_are_closed_and_counted() {
    let certs = Certs::make();
    let mut backend = RawBackend::start().await;
    let r = router(&certs, backend.addr, "");
    // Plaintext HTTP instead of a ClientHello.
    let mut plain = TcpStream::connect(r.http).await.unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
    let got = read_quiet(&mut plain, Duration::from_secs(3), Duration::from_millis(500)).await;
    assert!(!got.starts_with(b"HTTP/"), "answered in plaintext: {got:?}");
    // A client that never sends its ClientHello is closed at handshake_timeout.
    let started = Instant::now();
    let mut slow = TcpStream::connect(r.http).await.unwrap();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut buf)).await.unwrap();
    assert!(matches!(n, Ok(0) | Err(_)));
    assert!(started.elapsed() >= Duration::from_millis(900), "closed before handshake_timeout");
    assert!(r.metric("upsplice_tls_handshake_errors_total{listener=\"web\",reason=\"bad_message\"}") >= 1.0);
    assert!(r.metric("upsplice_tls_handshake_errors_total{listener=\"web\",reason=\"timeout\"}") >= 1.0);
    // Other connections are unaffected.
    let mut client = tls_connect(r.http, &certs.path("app.pem"), "app.test").await.unwrap();
    client.write_all(b"GET / HTTP/1.1\r\nHost: app.test\r\n\r\n").await.unwrap();
    let mut server = backend.accept().await;
    let (head, _) = read_head(&mut server).await;
    assert!(head.starts_with("GET / HTTP/1.1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_rotates_the_certificate_or_keeps_the_old_one() {
    let certs = Certs::make();
    let backend = RawBackend::start().await;
    let r = router(&certs, backend.addr, "");
    // A broken certificate file: the reload is rejected, the old one served.
    let good = std::fs::read(certs.path("app.pem")).unwrap();
    std::fs::write(certs.path("app.pem"), b"not a certificate").unwrap();
    r.signal(nix::sys::signal::Signal::SIGHUP);
    r.wait_log("reload rejected");
    assert!(r.log().contains("app.pem"), "the error names the file: {}", r.log());
    std::fs::write(certs.path("app.pem"), &good).unwrap();
    tls_connect(r.http, &certs.path("app.pem"), "app.test").await.expect("the old certificate is still served");

    // A rotated certificate: new connections see it.
    let old_ca = certs.path("old-app.pem");
    std::fs::write(&old_ca, &good).unwrap();
    let rotated = rcgen::generate_simple_self_signed(vec!["app.test".to_string()]).unwrap();
    let new_ca = certs.path("new-app.pem");
    std::fs::write(&new_ca, rotated.cert.pem()).unwrap();
    std::fs::write(certs.path("app.pem"), rotated.cert.pem()).unwrap();
    std::fs::write(certs.path("app.key"), rotated.signing_key.serialize_pem()).unwrap();
    r.signal(nix::sys::signal::Signal::SIGHUP);
    r.wait_log("SIGHUP: reloaded");
    tls_connect(r.http, &new_ca, "app.test").await.expect("the rotated certificate is served");
    assert!(tls_connect(r.http, &old_ca, "app.test").await.is_err(), "the old certificate is no longer served");
}

#[test]
fn check_lists_each_tls_listeners_certificates_and_fails_on_a_bad_one() {
    let certs = Certs::make();
    let config = certs.path("upsplice.toml");
    let listener = |cert: &str| {
        format!(
            "[[listener]]\nname = \"wss\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\n[listener.tls]\n\
             certs = [ {{ cert = \"{cert}\", key = \"app.key\" }} ]\n\n{}",
            main_pool(&["127.0.0.1:9".parse().unwrap()], "app.test")
        )
    };
    let check =
        || Command::new(env!("CARGO_BIN_EXE_upsplice")).args(["check", "--config"]).arg(&config).output().unwrap();
    std::fs::write(&config, listener("app.pem")).unwrap();
    let out = check();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("listener \"wss\": ") && stdout.contains("(app.test), expires "), "{stdout}");
    // A key that is not the certificate's: the check fails, naming both.
    std::fs::write(&config, listener("other.pem")).unwrap();
    let out = check();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("other.pem with") && stderr.contains("app.key"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_require_refuses_no_certificate_and_sanitize_set_sends_the_clients() {
    use base64::Engine;
    use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair};
    let certs = Certs::make();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    std::fs::write(certs.path("clients.pem"), ca_params.self_signed(&ca_key).unwrap().pem()).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let client_key = KeyPair::generate().unwrap();
    let mut client_params = CertificateParams::new(vec!["client.test".to_string()]).unwrap();
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = client_params.signed_by(&client_key, &issuer).unwrap();
    let identity = || {
        let key = PrivatePkcs8KeyDer::from(client_key.serialize_der());
        Some((client_cert.der().clone(), PrivateKeyDer::from(key)))
    };

    let mut backend = RawBackend::start().await;
    let tls_extra = format!("client_ca = {:?}\nclient_cert = \"require\"", certs.path("clients.pem"));
    let r = Router::start_config(&config(&certs, backend.addr, "forwarded_client_cert = \"sanitize_set\"", &tls_extra));
    let ca = certs.path("app.pem");
    let request = b"GET / HTTP/1.1\r\nHost: app.test\r\nX-Forwarded-Client-Cert: forged\r\n\r\n";

    // No client certificate: the handshake fails (in TLS 1.3 the client
    // learns it at its first read), nothing reaches the backend.
    if let Ok(mut anonymous) = tls_connect(r.http, &ca, "app.test").await {
        let _ = anonymous.write_all(request).await;
        let mut buf = [0u8; 64];
        let read = tokio::time::timeout(Duration::from_secs(5), anonymous.read(&mut buf)).await.unwrap();
        assert!(matches!(read, Ok(0) | Err(_)), "served without a client certificate: {read:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while r.metric("upsplice_tls_handshake_errors_total{listener=\"web\",reason=\"no_client_certificate\"}") < 1.0 {
        assert!(Instant::now() < deadline, "not counted: {}", r.admin_get("/metrics").unwrap().1);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // With one: served, and XFCC is the client's certificate, not the claim.
    let mut client = tls_connect_as(r.http, &ca, "app.test", identity()).await.unwrap();
    client.write_all(request).await.unwrap();
    let mut server = backend.accept().await;
    let (head, _) = read_head(&mut server).await;
    let expected = base64::engine::general_purpose::STANDARD.encode(client_cert.der());
    assert!(head.contains(&format!("\r\nX-Forwarded-Client-Cert: {expected}\r\n")), "{head}");
    assert!(!head.contains("forged"), "{head}");
}

const PY_WSS_CLIENT: &str = r#"
import asyncio, ssl, sys, websockets
async def main(port, ca):
    ctx = ssl.create_default_context(cafile=ca)
    url = "wss://app.test:%s/py" % port
    async with websockets.connect(url, ssl=ctx, host="127.0.0.1", port=int(port), server_hostname="app.test", max_size=None) as ws:
        for i in range(20):
            msg = "wss message %d " % i + "z" * (i * 500)
            await ws.send(msg)
            assert await ws.recv() == msg
        blob = bytes(range(256)) * 4096
        await ws.send(blob)
        assert await ws.recv() == blob
    print("python wss client ok")
asyncio.run(main(sys.argv[1], sys.argv[2]))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_websockets_over_wss() {
    if !python_websockets() {
        return;
    }
    let certs = Certs::make();
    let (backend, mut heads) = ws_echo_backend().await;
    let r = router(&certs, backend, "");
    let (port, ca) = (r.http.port().to_string(), certs.path("app.pem"));
    let out = tokio::task::spawn_blocking(move || {
        Command::new("python3").args(["-c", PY_WSS_CLIENT, &port]).arg(&ca).output().unwrap()
    })
    .await
    .unwrap();
    assert!(out.status.success(), "python wss client failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("python wss client ok"));
    let headers = heads.recv().await.unwrap();
    assert!(headers.iter().any(|(k, v)| k.eq_ignore_ascii_case("x-forwarded-proto") && v == "https"), "{headers:?}");
}

/// A ticket-key file of `keys` (each a byte repeated 32 times, base64).
fn write_ticket_keys(path: &Path, keys: &[u8]) {
    use base64::Engine;
    let lines: Vec<String> = keys.iter().map(|&k| base64::engine::general_purpose::STANDARD.encode([k; 32])).collect();
    std::fs::write(path, format!("# newest first\n{}\n", lines.join("\n"))).unwrap();
}

/// A handshake with `router` by `client`, then a request the router
/// answers itself (no route for the host), read to its end: reading it
/// also takes in the session tickets sent after the handshake. How the
/// handshake went: full or resumed.
async fn handshake_with(router: &Router, client: &Arc<rustls::ClientConfig>) -> rustls::HandshakeKind {
    let mut client = connect_with(router.http, client.clone(), "app.test").await.unwrap();
    let kind = client.get_ref().1.handshake_kind().expect("the handshake is done");
    client.write_all(b"GET / HTTP/1.1\r\nHost: nowhere.test\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut answer)).await.unwrap();
    assert!(answer.starts_with(b"HTTP/1.1 "), "{:?}", String::from_utf8_lossy(&answer));
    kind
}

/// A client with a session store of its own (each phase of the test takes
/// tickets from one router and offers them to another). One config for
/// all its handshakes: rustls resumes a session only with the config
/// (verifier) that made it.
fn fresh_client(ca: &Path) -> Arc<rustls::ClientConfig> {
    let mut config = client_config(ca, None);
    config.resumption = rustls::client::Resumption::store(Arc::new(rustls::client::ClientSessionMemoryCache::new(16)));
    Arc::new(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_ticket_keys_resume_across_routers_and_rotate() {
    use rustls::HandshakeKind::{Full, Resumed};
    let certs = Certs::make();
    let backend = RawBackend::start().await;
    let (fleet_keys, other_keys) = (certs.path("fleet.keys"), certs.path("other.keys"));
    write_ticket_keys(&fleet_keys, &[1]);
    write_ticket_keys(&other_keys, &[3]);
    let with_keys =
        |keys: &Path| Router::start_config(&config(&certs, backend.addr, "", &format!("ticket_keys = {keys:?}")));
    let (node_a, node_b, stranger) = (with_keys(&fleet_keys), with_keys(&fleet_keys), with_keys(&other_keys));
    let ca = certs.path("app.pem");

    // A session made on one node of the fleet resumes on the other...
    let client = fresh_client(&ca);
    assert_eq!(handshake_with(&node_a, &client).await, Full);
    assert_eq!(handshake_with(&node_b, &client).await, Resumed, "node b did not resume node a's session");
    // ...and not on a node with other keys.
    let client = fresh_client(&ca);
    assert_eq!(handshake_with(&node_a, &client).await, Full);
    assert_eq!(handshake_with(&stranger, &client).await, Full, "resumed with another fleet's ticket");

    // Rotation: a new key first, the old one kept. Tickets of the old key
    // still resume; new tickets are made with the new key.
    let old_ticket = fresh_client(&ca);
    assert_eq!(handshake_with(&node_a, &old_ticket).await, Full);
    write_ticket_keys(&fleet_keys, &[2, 1]);
    node_b.signal(nix::sys::signal::Signal::SIGHUP);
    node_b.wait_log("SIGHUP: reloaded");
    assert_eq!(handshake_with(&node_b, &old_ticket).await, Resumed, "an old key's ticket after rotation");
    let new_ticket = fresh_client(&ca);
    assert_eq!(handshake_with(&node_b, &new_ticket).await, Full);
    write_ticket_keys(&other_keys, &[2]);
    stranger.signal(nix::sys::signal::Signal::SIGHUP);
    stranger.wait_log("SIGHUP: reloaded");
    assert_eq!(handshake_with(&stranger, &new_ticket).await, Resumed, "the first key encrypts");

    // A malformed file on SIGHUP: the reload is rejected, naming the file
    // and the problem, and the keys in use stay.
    let kept = fresh_client(&ca);
    assert_eq!(handshake_with(&node_b, &kept).await, Full);
    std::fs::write(&fleet_keys, "c2hvcnQ=\n").unwrap();
    node_b.signal(nix::sys::signal::Signal::SIGHUP);
    node_b.wait_log("reload rejected");
    let log = node_b.log();
    assert!(log.contains("fleet.keys") && log.contains("line 1: a key of 5 bytes"), "{log}");
    assert_eq!(handshake_with(&node_b, &kept).await, Resumed, "the old keys were dropped");
}

#[test]
fn a_malformed_ticket_key_file_is_refused_at_start() {
    let certs = Certs::make();
    let keys = certs.path("bad.keys");
    std::fs::write(&keys, "not base64!\n").unwrap();
    let config_path = certs.path("upsplice.toml");
    let config = config(&certs, "127.0.0.1:9".parse().unwrap(), "", &format!("ticket_keys = {keys:?}"));
    std::fs::write(&config_path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_upsplice"))
        .args(["run", "--config"])
        .arg(&config_path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the router started with a malformed ticket key file");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(stderr.contains("bad.keys") && stderr.contains("line 1: not base64"), "{stderr}");
}
