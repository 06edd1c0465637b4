//! The connection-lifecycle modes against the bundled echo server on
//! loopback: `hold` (many idle upgraded connections, liveness echoes, early
//! closes, SIGTERM) and `churn` (connect, upgrade, one echo, close, repeated),
//! plus the open-files limit check.

mod common;
use common::{dead_port, generator, generator_with_fd_limit, run, run_cmd, run_refused, tmpdir, Server};
use std::time::{Duration, Instant};

#[test]
fn hold_200_connections_with_pings_all_echoed() {
    let echo = Server::echo(&[]);
    let dir = tmpdir();
    let r = run(
        &[
            "hold",
            "--target",
            &echo.addr,
            "--host",
            "example.test",
            "--path",
            "/ws",
            "-c",
            "200",
            "--open-rate",
            "1000",
            "--open-concurrency",
            "32",
            "-d",
            "2s",
            "--ping-every",
            "500ms",
        ],
        dir.path(),
        "hold",
    );
    let s = &r.summary;
    assert!(r.output.status.success(), "{}\n{}", r.stdout, r.stderr);
    assert!(s.valid && s.total_errors == 0, "{}", r.stdout);
    assert_eq!(s.mode, "hold");
    assert_eq!(s.connections_ok, 200, "{}", r.stdout);
    let h = s.hold.as_ref().expect("hold stats");
    assert_eq!(h.held, 200, "{}", r.stdout);
    assert_eq!(h.closed_early, 0, "{}", r.stdout);
    // Opened at 1000/s: the 200th connection cannot start before 199 ms.
    assert!(h.open_s >= 0.19, "opened too fast for --open-rate: {}", r.stdout);
    assert!(!h.stopped_by_signal && h.held_for_s >= 1.99, "{}", r.stdout);
    // Every connection sends at 0.5, 1.0, 1.5 s after its upgrade (and maybe at 2.0 s):
    assert!((600..=1000).contains(&h.pings_sent), "{}", r.stdout);
    assert_eq!(h.pings_echoed, h.pings_sent, "{}", r.stdout);
    assert_eq!(h.pings_unanswered, 0);
    assert_eq!((s.sent, s.received), (h.pings_sent, h.pings_echoed));
    assert_eq!(s.latency_us.corrected.count, h.pings_echoed);
    for p in [&s.latency_us.connect, &s.latency_us.upgrade, &s.latency_us.handshake] {
        assert_eq!(p.count, 200, "{}", r.stdout);
    }
    assert!(s.latency_us.handshake.p50 >= s.latency_us.upgrade.p50);
    assert!(s.churn.is_none() && s.throughput.is_none());
    assert!(r.stdout.contains("200 held of 200") && r.stdout.contains("VALID"), "{}", r.stdout);
}

#[test]
fn hold_idle_until_sigterm() {
    let echo = Server::echo(&[]);
    let dir = tmpdir();
    let json = dir.path().join("sig.json");
    let child = generator(&["hold", "--target", &echo.addr, "-c", "20", "-d", "60s", "--json"])
        .arg(&json)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let t = Instant::now();
    // Our own child; SIGTERM is what the interface promises to honour.
    assert!(std::process::Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    assert!(t.elapsed() < Duration::from_secs(10), "SIGTERM took {:?}", t.elapsed());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    let s: upsplice_loadgen::report::Summary = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let h = s.hold.as_ref().unwrap();
    assert!(h.stopped_by_signal && h.held_for_s < 5.0, "{stdout}");
    assert_eq!((h.held, h.closed_early, h.pings_sent), (20, 0, 0), "{stdout}");
    // Idle on purpose: no reply expected, and that is not an invalid run.
    assert!(s.valid && s.received == 0, "{stdout}");
    assert!(stdout.contains("stopped by signal") && stdout.contains("none (idle)"), "{stdout}");
}

#[test]
fn hold_counts_connections_the_peer_closed() {
    let echo = Server::echo(&[]);
    let dir = tmpdir();
    let addr = echo.addr.clone();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1000));
        drop(echo);
    });
    let r = run(&["hold", "--target", &addr, "-c", "10", "-d", "3s", "--ping-every", "200ms"], dir.path(), "early");
    killer.join().unwrap();
    let s = &r.summary;
    let h = s.hold.as_ref().unwrap();
    assert!(!r.output.status.success() && !s.valid, "{}", r.stdout);
    assert_eq!(h.closed_early, 10, "{}", r.stdout);
    assert_eq!(h.held, 0, "{}", r.stdout);
    assert_eq!(s.errors["closed_by_peer"] + s.errors["io"], 10, "{}", r.stdout);
    assert!(h.pings_echoed >= 10 && h.pings_echoed <= h.pings_sent, "{}", r.stdout);
}

#[test]
fn churn_300_cycles() {
    let echo = Server::echo(&[]);
    let dir = tmpdir();
    let r = run(&["churn", "--target", &echo.addr, "-n", "300", "-c", "16", "-d", "30s"], dir.path(), "churn");
    let s = &r.summary;
    assert!(r.output.status.success(), "{}\n{}", r.stdout, r.stderr);
    assert!(s.valid && s.total_errors == 0, "{}", r.stdout);
    let c = s.churn.as_ref().expect("churn stats");
    assert_eq!((c.attempts, c.handshakes, c.completed), (300, 300, 300), "{}", r.stdout);
    assert_eq!((s.sent, s.received, s.connections_ok), (300, 300, 300), "{}", r.stdout);
    assert!(c.handshakes_per_s > 0.0 && c.elapsed_s < 30.0, "{}", r.stdout);
    assert_eq!(s.latency_us.handshake.count, 300);
    assert_eq!(s.latency_us.corrected.count, 300);
    assert!(s.hold.is_none());
    assert!(r.stdout.contains("300 completed") && r.stdout.contains("handshakes/s"), "{}", r.stdout);
}

#[test]
fn churn_at_a_fixed_rate_for_a_duration() {
    let echo = Server::echo(&[]);
    let dir = tmpdir();
    let r = run(&["churn", "--target", &echo.addr, "-r", "200", "-d", "1s", "-c", "8"], dir.path(), "rate");
    let s = &r.summary;
    assert!(r.output.status.success(), "{}\n{}", r.stdout, r.stderr);
    let c = s.churn.as_ref().unwrap();
    assert!((195..=200).contains(&c.attempts) && c.completed == c.attempts, "{}", r.stdout);
    assert!(s.rate_reached && s.total_errors == 0, "{}", r.stdout);
}

#[test]
fn churn_against_a_dead_port_counts_connect_errors_and_stops() {
    let dir = tmpdir();
    let addr = dead_port();
    let t = Instant::now();
    let r = run(&["churn", "--target", &addr, "-n", "20", "-c", "4", "-d", "10s"], dir.path(), "dead");
    assert!(t.elapsed() < Duration::from_secs(8));
    let s = &r.summary;
    assert!(!r.output.status.success() && !s.valid, "{}", r.stdout);
    assert_eq!(s.errors["connect"], 20, "{}", r.stdout);
    assert_eq!(s.churn.as_ref().unwrap().completed, 0);
}

#[test]
fn soft_fd_limit_is_raised_and_too_many_connections_are_refused() {
    let echo = Server::echo(&[]);
    let dir = tmpdir();
    // 300 connections need more than the soft limit of 128: raised to the hard 1024.
    let cmd = generator_with_fd_limit(128, 1024, &["hold", "--target", &echo.addr, "-c", "300", "-d", "200ms"]);
    let r = run_cmd(cmd, dir.path(), "raised");
    let h = r.summary.hold.as_ref().unwrap();
    assert!(r.output.status.success(), "{}\n{}", r.stdout, r.stderr);
    assert_eq!((h.held, h.fd_limit), (300, 1024), "{}", r.stdout);
    // Beyond the hard limit: a clear refusal before any connection is made.
    let err =
        run_refused(generator_with_fd_limit(128, 1024, &["hold", "--target", &echo.addr, "-c", "5000", "-d", "200ms"]));
    assert!(err.contains("--connections 5000") && err.contains("open files") && err.contains("1024"), "{err}");
    let err = run_refused(generator_with_fd_limit(128, 1024, &["churn", "--target", &echo.addr, "-c", "2000"]));
    assert!(err.contains("--concurrency 2000") && err.contains("1024"), "{err}");
}

#[test]
fn lifecycle_bad_arguments() {
    for (args, want) in [
        (vec!["hold", "--target", "127.0.0.1:1", "-c", "0"], "--connections must be at least 1"),
        (vec!["hold", "--target", "127.0.0.1:1", "--open-rate", "0"], "--open-rate must be a positive number"),
        (vec!["hold", "--target", "127.0.0.1:1", "--size", "4"], "--size must be at least 8"),
        (vec!["churn", "--target", "127.0.0.1:1", "-n", "0"], "--count must be at least 1"),
        (vec!["churn", "--target", "127.0.0.1:1", "--rate=-5"], "--rate must be a positive number"),
    ] {
        let err = run_refused(generator(&args));
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
