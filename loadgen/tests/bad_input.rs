//! Bad targets: every failure is counted by kind, reported, and makes the run
//! exit non-zero; nothing panics and no figure is silently wrong.

mod common;
use common::{dead_port, generator, run, run_refused, tmpdir, Server};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};
use upsplice_loadgen::wsproto::{self, opcode};

/// A one-thread test server answering every connection with `handler`.
fn serve(handler: fn(TcpStream)) -> String {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for s in l.incoming().flatten() {
            std::thread::spawn(move || handler(s));
        }
    });
    addr
}

/// Reads the request head and returns the Sec-WebSocket-Key.
fn read_key(s: &mut TcpStream) -> Option<String> {
    let mut buf = Vec::new();
    let mut b = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut b).ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(&b[..n]);
    }
    String::from_utf8_lossy(&buf).lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("sec-websocket-key").then(|| v.trim().to_string())
    })
}

fn ws_args<'a>(addr: &'a str, conns: &'a str) -> Vec<&'a str> {
    vec![
        "ws",
        "--target",
        addr,
        "-c",
        conns,
        "-r",
        "200",
        "-d",
        "2s",
        "-w",
        "0s",
        "--connect-timeout",
        "2s",
        "--drain",
        "1s",
    ]
}

fn assert_invalid(r: &common::Run) {
    assert!(!r.output.status.success(), "must exit non-zero:\n{}", r.stdout);
    assert!(!r.summary.valid, "{}", r.stdout);
    assert!(r.stdout.contains("INVALID"), "{}", r.stdout);
}

#[test]
fn unreachable_target() {
    let dir = tmpdir();
    let addr = dead_port();
    let r = run(&ws_args(&addr, "3"), dir.path(), "dead");
    assert_invalid(&r);
    assert_eq!(r.summary.errors["connect"], 3, "{}", r.stdout);
    assert_eq!(r.summary.connections_ok, 0);
    assert_eq!(r.summary.received, 0);
    assert!(r.stdout.contains("connect 3"), "{}", r.stdout);
}

#[test]
fn refused_upgrade() {
    let addr = serve(|mut s| {
        let _ = read_key(&mut s);
        let _ = s.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n");
    });
    let dir = tmpdir();
    let r = run(&ws_args(&addr, "2"), dir.path(), "refused");
    assert_invalid(&r);
    assert_eq!(r.summary.errors["upgrade_refused"], 2, "{}", r.stdout);
}

#[test]
fn non_http_target_is_a_handshake_error() {
    // The echo server in tcp mode is not an HTTP server at all: it echoes the
    // request back, which is a malformed handshake answer.
    let echo = Server::echo(&["--mode", "tcp"]);
    let dir = tmpdir();
    let r = run(&ws_args(&echo.addr, "2"), dir.path(), "tcp");
    assert_invalid(&r);
    assert_eq!(r.summary.errors["handshake"], 2, "{}", r.stdout);
}

#[test]
fn wrong_accept_key() {
    let addr = serve(|mut s| {
        let _ = read_key(&mut s);
        let _ = s.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
              Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n",
        );
        std::thread::sleep(Duration::from_secs(3));
    });
    let dir = tmpdir();
    let r = run(&ws_args(&addr, "2"), dir.path(), "accept");
    assert_invalid(&r);
    assert_eq!(r.summary.errors["bad_accept"], 2, "{}", r.stdout);
    assert_eq!(r.summary.sent, 0);
}

/// Upgrades properly, echoes for 1 s, then closes the TCP connection.
fn echo_then_close(mut s: TcpStream) {
    let Some(key) = read_key(&mut s) else { return };
    let resp = format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {}\r\n\r\n",
        wsproto::accept_key(&key)
    );
    s.write_all(resp.as_bytes()).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let t = Instant::now();
    let mut buf = Vec::new();
    let mut b = [0u8; 4096];
    while t.elapsed() < Duration::from_secs(1) {
        match s.read(&mut b) {
            Ok(0) => return,
            Ok(n) => buf.extend_from_slice(&b[..n]),
            Err(_) => continue,
        }
        while let Ok(Some(h)) = wsproto::parse_head(&buf) {
            if buf.len() < h.total_len() {
                break;
            }
            let mut payload = buf[h.header_len..h.total_len()].to_vec();
            wsproto::apply_mask(&mut payload, h.mask.unwrap(), 0);
            let mut out = Vec::new();
            wsproto::encode_frame(&mut out, opcode::BINARY, &payload, None);
            s.write_all(&out).unwrap();
            buf.drain(..h.total_len());
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
}

#[test]
fn target_closing_mid_run() {
    let addr = serve(echo_then_close);
    let dir = tmpdir();
    let r = run(&ws_args(&addr, "2"), dir.path(), "midrun");
    assert_invalid(&r);
    let s = &r.summary;
    assert_eq!(s.errors["closed_by_peer"], 2, "{}", r.stdout);
    // Replies before the close were recorded; what followed is not pretended.
    assert!(s.received > 100 && s.received < 300, "{}", r.stdout);
    assert!(s.connections_ok == 2);
    assert!(r.stderr.contains("WARNING"), "{}", r.stderr);
}

#[test]
fn bad_arguments_fail_cleanly() {
    let err = run_refused(generator(&["ws", "--target", "127.0.0.1:1", "--size", "4"]));
    assert!(err.contains("--size must be at least 8"), "{err}");
}

#[test]
fn messages_the_generator_never_sent_are_reported_not_hidden() {
    // The target freezes for 3 s near the end; with one message in flight per
    // connection the writer cannot send what falls due, and the drain ends first.
    let echo = Server::echo(&["--stall-at", "1500ms", "--stall-for", "3s"]);
    let dir = tmpdir();
    let r = run(
        &[
            "ws",
            "--target",
            &echo.addr,
            "-c",
            "2",
            "-r",
            "200",
            "-d",
            "2s",
            "-w",
            "0s",
            "--max-inflight",
            "1",
            "--drain",
            "500ms",
        ],
        dir.path(),
        "unsent",
    );
    assert_invalid(&r);
    let s = &r.summary;
    assert!(s.unsent >= 80, "{}", r.stdout);
    assert_eq!(s.errors["unanswered"], 2, "{}", r.stdout);
    assert!(!s.rate_reached, "{}", r.stdout);
    assert!(r.stdout.contains("never sent"), "{}", r.stdout);
    // Every message due in the window is accounted for.
    assert_eq!(s.sent + s.unsent + s.skipped, 400, "{}", r.stdout);
}
