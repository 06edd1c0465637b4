//! TLS targets, URL targets and PROXY protocol headers against real peers:
//! the bundled echo server serving TLS with certificates made at test time
//! (the openssl CLI), and a PROXY-reading echo server that checks the header
//! every connection starts with.

mod common;
use common::{generator, run, run_refused, tmpdir, Server};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use upsplice_loadgen::proxy::ProxyVersion;

/// A CA and a server certificate it signed (for `echo.test` and
/// 127.0.0.1), and a second CA that signed nothing.
struct Certs {
    ca: PathBuf,
    other_ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl").args(args).current_dir(dir).output().expect("run openssl");
    assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

fn certs(dir: &Path) -> Certs {
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
    for ca in ["ca", "other"] {
        let (k, o, subj) = (format!("{ca}.key"), format!("{ca}.pem"), format!("/CN=Test {ca}"));
        let mut a = vec!["req", "-x509"];
        a.extend(ec);
        a.extend(["-keyout", &k, "-out", &o, "-days", "2", "-subj", &subj]);
        openssl(dir, &a);
    }
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend(["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=echo.test"]);
    openssl(dir, &a);
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=DNS:echo.test,IP:127.0.0.1\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
        ],
    );
    Certs {
        ca: dir.join("ca.pem"),
        other_ca: dir.join("other.pem"),
        cert: dir.join("server.pem"),
        key: dir.join("server.key"),
    }
}

fn tls_echo(c: &Certs, mode: &str) -> Server {
    Server::echo(&["--mode", mode, "--tls-cert", c.cert.to_str().unwrap(), "--tls-key", c.key.to_str().unwrap()])
}

#[test]
fn wss_https_and_tls_tcp_against_the_tls_echo() {
    let dir = tmpdir();
    let c = certs(dir.path());
    let ca = c.ca.to_str().unwrap();
    let echo = tls_echo(&c, "ws");
    let url = format!("wss://{}/chat", echo.addr);
    // The CA verifies the certificate for the URL's IP address.
    let r = run(&["ws", &url, "--ca", ca, "-c", "3", "-r", "300", "-d", "1s", "-w", "300ms"], dir.path(), "wss");
    let s = &r.summary;
    assert!(r.output.status.success() && s.total_errors == 0 && s.received >= 290, "{}", r.stdout);
    assert_eq!(s.latency_us.tls.count, 3, "one full handshake per connection: {}", r.stdout);
    assert_eq!(s.latency_us.handshake.count, 3);
    assert!(r.stdout.contains("tls (full)"), "{}", r.stdout);
    assert_eq!(s.target, url);
    // https with the name the certificate has, sent as SNI and verified.
    let url = format!("https://{}/", echo.addr);
    let args = ["http", &url, "--ca", ca, "--sni", "echo.test", "-c", "2", "-r", "200", "-d", "1s", "-w", "300ms"];
    let r = run(&args, dir.path(), "https");
    assert!(r.output.status.success() && r.summary.total_errors == 0, "{}", r.stdout);
    assert_eq!(r.summary.latency_us.tls.count, 2);
    // A new TLS connection per request.
    let args = ["http", &url, "--insecure", "--close", "-c", "2", "-r", "100", "-d", "1s", "-w", "300ms"];
    let r = run(&args, dir.path(), "https-close");
    assert!(r.output.status.success() && r.summary.total_errors == 0, "{}", r.stdout);
    assert!(r.summary.latency_us.tls.count >= r.summary.received, "{}", r.stdout);
    // Lifecycle modes over wss.
    let url = format!("wss://{}/", echo.addr);
    let r = run(&["churn", &url, "--ca", ca, "-n", "20", "-c", "4"], dir.path(), "churn");
    assert!(r.output.status.success() && r.summary.total_errors == 0, "{}", r.stdout);
    assert_eq!(r.summary.latency_us.tls.count, 20);
    let r = run(&["hold", &url, "--insecure", "-c", "5", "-d", "300ms"], dir.path(), "hold");
    assert!(r.output.status.success() && r.summary.total_errors == 0, "{}", r.stdout);
    assert_eq!(r.summary.hold.as_ref().unwrap().held, 5, "{}", r.stdout);

    let echo = tls_echo(&c, "tcp");
    let t = &echo.addr;
    let args = ["tcp", "--target", t, "--tls", "--ca", ca, "-c", "2", "-r", "200", "-d", "1s", "-w", "300ms"];
    let r = run(&args, dir.path(), "tls-pingpong");
    assert!(r.output.status.success() && r.summary.total_errors == 0 && r.summary.received >= 190, "{}", r.stdout);
    let args = ["tcp", "--target", t, "--tls", "--insecure", "--mode", "bulk", "-c", "2", "-d", "1s", "-w", "200ms"];
    let r = run(&args, dir.path(), "tls-bulk");
    let tp = r.summary.throughput.as_ref().unwrap();
    assert!(r.output.status.success() && tp.bytes_out > 0 && tp.bytes_in > 0, "{}", r.stdout);
    assert_eq!(r.summary.latency_us.tls.count, 2);
}

#[test]
fn connect_only_churn_counts_full_and_resumed_handshakes() {
    let dir = tmpdir();
    let c = certs(dir.path());
    let echo = tls_echo(&c, "ws");
    let url = format!("wss://{}/", echo.addr);
    // One at a time: without --resume every cycle is a full handshake and
    // nothing but the handshake (no upgrade, no message).
    let args = ["churn", &url, "--insecure", "--connect-only", "-n", "10", "-c", "1"];
    let r = run(&args, dir.path(), "full");
    let s = &r.summary;
    assert!(r.output.status.success() && s.total_errors == 0, "{}", r.stdout);
    assert_eq!((s.latency_us.tls.count, s.latency_us.tls_resumed.count), (10, 0), "{}", r.stdout);
    assert_eq!((s.latency_us.upgrade.count, s.received), (0, 10), "{}", r.stdout);
    assert_eq!(s.churn.as_ref().unwrap().completed, 10, "{}", r.stdout);
    // With --resume the first is full and every later one resumes the
    // tickets the earlier ones read while closing.
    let args = ["churn", &url, "--insecure", "--connect-only", "--resume", "-n", "10", "-c", "1"];
    let r = run(&args, dir.path(), "resumed");
    let s = &r.summary;
    assert!(r.output.status.success() && s.total_errors == 0, "{}", r.stdout);
    assert_eq!((s.latency_us.tls.count, s.latency_us.tls_resumed.count), (1, 9), "{}", r.stdout);
    assert!(r.stdout.contains("tls (resumed)"), "{}", r.stdout);
    // --resume needs TLS.
    let plain = format!("ws://{}/", echo.addr);
    let stderr = run_refused(generator(&["churn", &plain, "--resume", "-n", "1"]));
    assert!(stderr.contains("--resume applies to TLS targets only"), "{stderr}");
}

#[test]
fn an_untrusted_certificate_fails_with_the_reason() {
    let dir = tmpdir();
    let c = certs(dir.path());
    let echo = tls_echo(&c, "ws");
    let url = format!("wss://{}/", echo.addr);
    let r = run(
        &["ws", &url, "--ca", c.other_ca.to_str().unwrap(), "-c", "2", "-r", "100", "-d", "500ms", "-w", "0s"],
        dir.path(),
        "wrong-ca",
    );
    assert_eq!(r.output.status.code(), Some(1), "{}", r.stdout);
    assert_eq!(r.summary.errors.get("tls"), Some(&2), "{}", r.stdout);
    assert!(r.stderr.contains("TLS handshake failed: invalid peer certificate: UnknownIssuer"), "{}", r.stderr);
    // The right CA, but a name the certificate does not have.
    let r = run(
        &["ws", &url, "--ca", c.ca.to_str().unwrap(), "--sni", "other.test", "-c", "1", "-d", "300ms", "-w", "0s"],
        dir.path(),
        "wrong-name",
    );
    assert_eq!(r.output.status.code(), Some(1), "{}", r.stdout);
    assert!(r.stderr.contains("certificate not valid for name \"other.test\""), "{}", r.stderr);
    // A plain client against a TLS server is not a TLS error.
    let plain = format!("ws://{}/", echo.addr);
    let r = run(&["ws", &plain, "-c", "1", "-d", "300ms", "-w", "0s"], dir.path(), "plain");
    assert_eq!(r.output.status.code(), Some(1));
    assert!(!r.stderr.contains("TLS"), "{}", r.stderr);
}

#[test]
fn refusals_name_the_problem() {
    let dir = tmpdir();
    let c = certs(dir.path());
    let ca = c.ca.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["ws", "wss://127.0.0.1:1/"], "needs --ca FILE"),
        (&["tcp", "--target", "127.0.0.1:1", "--ca", ca], "--ca applies to TLS targets only"),
        (&["http", "http://127.0.0.1:1/", "--sni", "a"], "--sni applies to TLS targets only"),
        (&["ws", "ws://127.0.0.1:1/", "--tls", "--insecure"], "write wss://"),
        (&["ws", "wss://127.0.0.1:1/", "--ca", "/nonexistent.pem"], "/nonexistent.pem"),
        (&["ws", "ftp://127.0.0.1:1/"], "unsupported scheme \"ftp\""),
        (&["ws", "ws://127.0.0.1:99999/"], "bad port \"99999\""),
        (&["ws", "127.0.0.1:8080"], "has no scheme"),
        (&["ws", "ws://127.0.0.1:1/a", "--path", "/b"], "--path gives another"),
        (&["tcp", "ws://127.0.0.1:1/a"], "tcp sends no request"),
        (&["ws", "ws://127.0.0.1:1/", "--target", "127.0.0.1:1"], "cannot be used with"),
        (&["hold", "wss://127.0.0.1:1/", "--insecure", "--ca", ca], "cannot be used with"),
    ];
    for (args, want) in cases {
        let mut cmd = generator(args);
        let stderr = if want.contains("cannot be used with") {
            // clap refuses with its usage error (status 2).
            let out = cmd.output().unwrap();
            assert_eq!(out.status.code(), Some(2), "{args:?}");
            String::from_utf8_lossy(&out.stderr).to_string()
        } else {
            run_refused(cmd)
        };
        assert!(stderr.contains(want), "{args:?}: want {want:?} in:\n{stderr}");
    }
}

/// A raw TCP echo server that first reads a PROXY header of `version` from
/// every connection (then, with `tls`, makes a TLS handshake) and keeps the
/// addresses it announced next to the connection's real ones.
type Seen = Arc<Mutex<Vec<(SocketAddr, SocketAddr, SocketAddr, SocketAddr)>>>;

fn proxy_echo(version: ProxyVersion, tls: Option<&Certs>) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let tls =
        tls.map(|c| tokio_rustls::TlsAcceptor::from(upsplice_loadgen::tls::server_config(&c.cert, &c.key).unwrap()));
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.set_nonblocking(true).unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let log = seen.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            loop {
                let (mut s, peer) = l.accept().await.unwrap();
                let (log, tls) = (log.clone(), tls.clone());
                tokio::spawn(async move {
                    let (src, dst) = read_proxy_header(&mut s, version).await;
                    log.lock().unwrap().push((src, dst, peer, s.local_addr().unwrap()));
                    match tls {
                        Some(acc) => echo(acc.accept(s).await.unwrap()).await,
                        None => echo(s).await,
                    }
                });
            }
        });
    });
    (addr, seen)
}

async fn read_proxy_header(s: &mut tokio::net::TcpStream, version: ProxyVersion) -> (SocketAddr, SocketAddr) {
    let mut head = Vec::new();
    match version {
        ProxyVersion::V1 => {
            while !head.ends_with(b"\r\n") {
                head.push(s.read_u8().await.unwrap());
            }
            let h = ppp::v1::Header::try_from(std::str::from_utf8(&head).unwrap()).unwrap();
            let ppp::v1::Addresses::Tcp4(a) = h.addresses else { panic!("{h:?}") };
            ((a.source_address, a.source_port).into(), (a.destination_address, a.destination_port).into())
        }
        ProxyVersion::V2 => {
            head.resize(16, 0);
            s.read_exact(&mut head).await.unwrap();
            let len = u16::from_be_bytes([head[14], head[15]]) as usize;
            head.resize(16 + len, 0);
            s.read_exact(&mut head[16..]).await.unwrap();
            let h = ppp::v2::Header::try_from(head.as_slice()).unwrap();
            assert_eq!(h.command, ppp::v2::Command::Proxy);
            let ppp::v2::Addresses::IPv4(a) = h.addresses else { panic!("{h:?}") };
            ((a.source_address, a.source_port).into(), (a.destination_address, a.destination_port).into())
        }
    }
}

async fn echo<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(mut s: S) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = s.read(&mut buf).await {
        if n == 0 || s.write_all(&buf[..n]).await.is_err() || s.flush().await.is_err() {
            return;
        }
    }
}

#[test]
fn proxy_headers_carry_the_connections_addresses() {
    let dir = tmpdir();
    let c = certs(dir.path());
    for (version, name, tls) in [(ProxyVersion::V1, "v1", false), (ProxyVersion::V2, "v2", true)] {
        let (addr, seen) = proxy_echo(version, tls.then_some(&c));
        let mut args = vec!["tcp", "--target", &addr, "--proxy-protocol", name, "--source-ip", "127.0.0.5-127.0.0.6"];
        args.extend(["-c", "2", "-r", "200", "-d", "1s", "-w", "200ms"]);
        if tls {
            args.extend(["--tls", "--ca", c.ca.to_str().unwrap()]);
        }
        let r = run(&args, dir.path(), name);
        assert!(r.output.status.success() && r.summary.total_errors == 0, "{name}: {}", r.stdout);
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2, "{name}");
        for &(src, dst, peer, local) in seen.iter() {
            // The header announces the connection itself: its source and destination.
            assert_eq!((src, dst), (peer, local), "{name}");
            assert!(["127.0.0.5", "127.0.0.6"].contains(&src.ip().to_string().as_str()), "{name}: {src}");
        }
    }
    // ws over a PROXY header to the same kind of server is refused by nothing:
    // every mode sends the header (here: churn's upgrade is not echoed, so
    // only the header is checked).
    let (addr, seen) = proxy_echo(ProxyVersion::V2, None);
    let url = format!("ws://{addr}/");
    let _ = generator(&["churn", &url, "--proxy-protocol", "v2", "-n", "2", "-c", "1", "--connect-timeout", "300ms"])
        .output()
        .unwrap();
    assert_eq!(seen.lock().unwrap().len(), 2);
}
