//! Coordinated omission: a backend that freezes for 1 s in the middle of a
//! run must show in the corrected percentiles, and when the generator's
//! in-flight window fills during the freeze, the corrected histogram charges
//! the delay from the intended send time while the uncorrected one (what a
//! closed-loop tool reports) does not.

mod common;
use common::{run, tmpdir, Server};

/// 1 s stall starting 2.5 s after the first connection: inside the measured
/// window (1 s warm-up + 4 s).
const STALL: [&str; 4] = ["--stall-at", "2.5s", "--stall-for", "1s"];

#[test]
fn corrected_p99_shows_a_one_second_stall() {
    let echo = Server::echo(&STALL);
    let dir = tmpdir();
    let r = run(
        &[
            "ws",
            "--target",
            &echo.addr,
            "-c",
            "10",
            "-r",
            "1000",
            "-d",
            "4s",
            "-w",
            "1s",
            "--threads",
            "1",
            "--max-inflight",
            "2000",
            "--size",
            "32",
        ],
        dir.path(),
        "stall",
    );
    let s = &r.summary;
    assert!(r.output.status.success(), "{}\n{}", r.stdout, r.stderr);
    assert!(s.valid && s.total_errors == 0, "{}", r.stdout);
    let c = &s.latency_us.corrected;
    // ~25 % of the measured messages were due during the stall.
    assert!(c.p99 >= 500_000, "corrected p99 {} µs should reflect the 1 s stall", c.p99);
    // The stall plus whatever a busy machine adds, but not wildly more.
    assert!(c.max >= 800_000 && c.max <= 3_000_000, "corrected max {} µs", c.max);
    assert!(c.p50 < 100_000, "corrected p50 {} µs should be unaffected", c.p50);
    // The schedule was kept during the stall (open loop): nothing was held back.
    assert!(s.rate_reached, "{}", r.stdout);
    assert!(s.sent >= 3900 && s.received == s.sent, "{}", r.stdout);
}

#[test]
fn full_window_corrected_charges_from_intended_time_uncorrected_does_not() {
    let echo = Server::echo(&STALL);
    let dir = tmpdir();
    let r = run(
        &[
            "ws",
            "--target",
            &echo.addr,
            "-c",
            "4",
            "-r",
            "1000",
            "-d",
            "4s",
            "-w",
            "1s",
            "--threads",
            "1",
            "--max-inflight",
            "2",
            "--size",
            "32",
        ],
        dir.path(),
        "window",
    );
    let s = &r.summary;
    assert!(r.output.status.success(), "{}\n{}", r.stdout, r.stderr);
    let c = &s.latency_us.corrected;
    let u = &s.latency_us.uncorrected;
    // Corrected: every message due during the stall waited for it.
    assert!(c.p99 >= 500_000, "corrected p99 {} µs", c.p99);
    assert!(c.p90 >= 300_000, "corrected p90 {} µs", c.p90);
    // Uncorrected: only the 2 messages per connection in flight when the stall
    // began saw it (8 of ~4000); the backlog was written after it and answered
    // at once. (p90 rather than p99 keeps this robust on a busy CI machine.)
    assert!(u.p90 < 50_000, "uncorrected p90 {} µs should hide the stall", u.p90);
    assert!(u.p99 < c.p99 && u.p90 * 10 < c.p90, "corrected {c:?} vs uncorrected {u:?}");
    assert!(u.max >= 500_000, "the in-flight messages did see the stall: {} µs", u.max);
    assert_eq!(c.count, u.count);
    // Catch-up sent the backlog, so the count still matches the schedule.
    assert!(s.sent >= 3900, "{}", r.stdout);
}

#[test]
fn a_stall_is_flagged_with_its_length() {
    // The echo server answers nothing for 1.5 s, 1 s after the first connection.
    let echo = Server::echo(&["--stall-at", "1s", "--stall-for", "1.5s"]);
    let dir = tmpdir();
    let r = run(
        &["ws", "--target", &echo.addr, "-c", "2", "-r", "200", "-d", "3s", "-w", "0s", "--threads", "1"],
        dir.path(),
        "stalled",
    );
    let s = &r.summary;
    assert_eq!(s.stalls.count, 1, "{}", r.stdout);
    assert!(s.stalls.longest_s >= 1.3 && s.stalls.longest_s <= 2.5, "{}", r.stdout);
    assert!(r.stdout.contains("stalls         1 of 1s or more") && r.stdout.contains("!!! STALLED"), "{}", r.stdout);
    // The stall is in the corrected figures, which stand: still a valid run.
    assert!(s.valid && r.output.status.success(), "{}", r.stdout);
    assert!(s.latency_us.corrected.max >= 1_300_000, "{}", r.stdout);

    // The same run without the stall has none.
    let calm = Server::echo(&[]);
    let r = run(&["ws", "--target", &calm.addr, "-c", "2", "-r", "200", "-d", "2s", "-w", "0s"], dir.path(), "calm");
    assert_eq!(r.summary.stalls.count, 0, "{}", r.stdout);
    assert!(!r.stdout.contains("STALLED"), "{}", r.stdout);
}
