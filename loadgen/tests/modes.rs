//! The other load modes against the bundled echo server: HTTP keep-alive and
//! close, raw TCP ping-pong and bulk, source-address spreading, ramp-up and
//! per-connection rates below one message per second.

mod common;
use common::{run, tmpdir, Closing, Server};

#[test]
fn http_keepalive_and_close() {
    let echo = Server::echo(&[]);
    let dir = tmpdir();
    for (name, extra) in [("keep", vec![]), ("pipelined", vec!["--max-inflight", "4"]), ("close", vec!["--close"])] {
        let mut args = vec!["http", "--target", &echo.addr, "-c", "4", "-r", "400", "-d", "2s", "-w", "500ms"];
        args.extend(extra);
        let r = run(&args, dir.path(), name);
        let s = &r.summary;
        assert!(r.output.status.success(), "{name}: {}", r.stdout);
        assert_eq!(s.total_errors, 0, "{name}: {}", r.stdout);
        assert!(s.rate_reached && s.received >= 780 && s.received == s.sent, "{name}: {}", r.stdout);
        if name == "close" {
            // One connection per request: the connect histogram counts them all.
            assert!(s.latency_us.connect.count >= s.received, "{}", r.stdout);
        } else {
            assert_eq!(s.latency_us.connect.count, 4);
        }
    }
}

#[test]
fn tcp_pingpong_and_bulk() {
    let echo = Server::echo(&["--mode", "tcp"]);
    let dir = tmpdir();
    let r = run(
        &["tcp", "--target", &echo.addr, "-c", "2", "-r", "500", "-d", "2s", "-w", "500ms", "--size", "16"],
        dir.path(),
        "pingpong",
    );
    assert!(r.output.status.success(), "{}", r.stdout);
    assert!(r.summary.received >= 990 && r.summary.total_errors == 0, "{}", r.stdout);

    let r = run(
        &["tcp", "--mode", "bulk", "--target", &echo.addr, "-c", "2", "-d", "1s", "-w", "300ms", "--size", "65536"],
        dir.path(),
        "bulk",
    );
    assert!(r.output.status.success(), "{}", r.stdout);
    let t = r.summary.throughput.as_ref().expect("throughput");
    assert!(t.bytes_out > 1 << 20 && t.bytes_in > 1 << 20, "{}", r.stdout);

    let discard = Server::echo(&["--mode", "discard"]);
    let r = run(
        &["tcp", "--mode", "bulk", "--direction", "up", "--target", &discard.addr, "-c", "1", "-d", "1s", "-w", "0s"],
        dir.path(),
        "up",
    );
    let t = r.summary.throughput.as_ref().expect("throughput");
    assert!(r.output.status.success() && t.bytes_out > 1 << 20 && t.bytes_in == 0, "{}", r.stdout);

    let source = Server::echo(&["--mode", "source"]);
    let r = run(
        &["tcp", "--mode", "bulk", "--direction", "down", "--target", &source.addr, "-c", "1", "-d", "1s", "-w", "0s"],
        dir.path(),
        "down",
    );
    let t = r.summary.throughput.as_ref().expect("throughput");
    assert!(r.output.status.success() && t.bytes_in > 1 << 20 && t.bytes_out == 0, "{}", r.stdout);
}

#[test]
fn source_ips_ramp_and_fractional_rate() {
    let echo = Server::echo(&[]);
    let dir = tmpdir();
    // 5 msg/s over 10 connections = 0.5 msg/s each: must not round to zero.
    let r = run(
        &[
            "ws",
            "--target",
            &echo.addr,
            "-c",
            "10",
            "-r",
            "5",
            "-d",
            "4s",
            "-w",
            "0s",
            "--source-ip",
            "127.0.0.1-127.0.0.5",
            "--ramp-rate",
            "1000",
        ],
        dir.path(),
        "frac",
    );
    let s = &r.summary;
    assert!(r.output.status.success(), "{}", r.stdout);
    assert_eq!(s.connections_ok, 10);
    assert!((19..=21).contains(&s.sent) && s.received == s.sent, "{}", r.stdout);
}

#[test]
fn slow_ramp_counts_missed_schedule_as_rate_not_reached() {
    let echo = Server::echo(&[]);
    let dir = tmpdir();
    // 4 connections at 2/s: the last one starts 1.5 s into a 2 s window.
    let r = run(
        &["ws", "--target", &echo.addr, "-c", "4", "-r", "400", "-d", "2s", "-w", "0s", "--ramp-rate", "2"],
        dir.path(),
        "ramp",
    );
    let s = &r.summary;
    assert!(!s.rate_reached, "{}", r.stdout);
    assert!(r.stdout.contains("TARGET RATE NOT REACHED"), "{}", r.stdout);
    assert!(s.achieved_rate < 0.8 * s.target_rate, "{}", r.stdout);
    // The messages due before the late connections were up are accounted for.
    assert!(s.skipped >= 200, "{}", r.stdout);
    assert_eq!(s.sent + s.skipped + s.unsent, 800, "{}", r.stdout);
    // The figures themselves are fine: a warning, not an invalid run.
    assert!(s.valid && r.output.status.success(), "{}", r.stdout);
}

#[test]
fn bulk_that_moves_no_bytes_is_invalid_and_says_so() {
    // `discard` never writes: a download from it moves nothing.
    let discard = Server::echo(&["--mode", "discard"]);
    let dir = tmpdir();
    let r = run(
        &[
            "tcp",
            "--mode",
            "bulk",
            "--direction",
            "down",
            "--target",
            &discard.addr,
            "-c",
            "1",
            "-d",
            "500ms",
            "-w",
            "0s",
        ],
        dir.path(),
        "nothing",
    );
    let s = &r.summary;
    assert_eq!(r.output.status.code(), Some(1), "{}", r.stdout);
    assert!(!s.valid && s.throughput.as_ref().unwrap().bytes_in == 0, "{}", r.stdout);
    // The connection itself was fine, and the report says both.
    assert_eq!(s.connections_ok, 1, "{}", r.stdout);
    assert!(r.stdout.contains("connections 1 established of 1"), "{}", r.stdout);
    assert!(r.stdout.contains("!!! no byte was received in the measured window"), "{}", r.stdout);
    assert!(r.stdout.contains("result         INVALID"), "{}", r.stdout);
}

#[test]
fn http_keepalive_reconnects_when_the_server_closes_after_each_response() {
    let dir = tmpdir();
    for how in [Closing::Announced, Closing::Unannounced] {
        let addr = common::closing_http_server(how);
        let name = format!("{how:?}");
        let name = name.as_str();
        let r = run(&["http", "--target", &addr, "-c", "2", "-r", "100", "-d", "2s", "-w", "300ms"], dir.path(), name);
        let s = &r.summary;
        assert!(r.output.status.success(), "{name}: {}\n{}", r.stdout, r.stderr);
        assert!(s.valid && s.total_errors == 0, "{name}: {}", r.stdout);
        assert!(s.received >= 190 && s.received == s.sent, "{name}: {}", r.stdout);
        // One connection per answer: at least every measured request came over a new one.
        assert!(s.reconnects >= s.received, "{name}: {}", r.stdout);
        assert!(r.stdout.contains(&format!("(+{} reconnects)", s.reconnects)), "{name}: {}", r.stdout);
        assert!(r.stdout.contains("use --close"), "{name}: {}", r.stdout);
        assert!(r.stdout.contains("result         VALID"), "{name}: {}", r.stdout);
    }
}

#[test]
fn http_keepalive_against_a_server_that_never_answers_says_to_use_close() {
    let dir = tmpdir();
    let addr = common::closing_http_server(Closing::Unanswered);
    let t = std::time::Instant::now();
    let r = run(&["http", "--target", &addr, "-c", "2", "-r", "100", "-d", "3s", "-w", "0s"], dir.path(), "silent");
    let s = &r.summary;
    assert_eq!(r.output.status.code(), Some(1), "{}", r.stdout);
    assert!(!s.valid && s.received == 0 && s.reconnects == 0, "{}", r.stdout);
    assert_eq!(s.errors["closed_by_peer"], 2, "one per connection, no reconnect loop: {}", r.stdout);
    assert!(r.stdout.contains("without answering a request") && r.stdout.contains("use --close"), "{}", r.stdout);
    // Said at once: the run does not wait out its 3 s.
    assert!(t.elapsed() < std::time::Duration::from_secs(2), "{:?}\n{}", t.elapsed(), r.stdout);
}
