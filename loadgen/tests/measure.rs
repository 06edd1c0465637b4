//! What the generator measures besides latency: `--watch-pid` (another
//! process's CPU, memory and descriptors, and the machine's CPU) and the
//! `search` subcommand, against real processes on loopback.

mod common;
use common::{run, tmpdir, Server};
use std::process::{Command, Stdio};

/// A shell that spins until killed (killed on drop).
struct Busy(std::process::Child);

impl Drop for Busy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn watch_pid_measures_a_busy_child_and_the_echo_server() {
    let echo = Server::echo(&[]);
    let busy =
        Busy(Command::new("sh").args(["-c", "while :; do :; done"]).stdin(Stdio::null()).spawn().expect("spawn sh"));
    let dir = tmpdir();
    let (b, e) = (busy.0.id().to_string(), echo.child.id().to_string());
    let port = echo.addr.rsplit(':').next().unwrap();
    let cmd = format!("ws --target {} -c 2 -r 200 -d 1s -w 200ms --watch-pid {b},{e} --watch-port {port}", echo.addr);
    let r = run(&cmd.split_whitespace().collect::<Vec<_>>(), dir.path(), "watched");
    assert!(r.output.status.success(), "{}", r.stdout);
    let w = r.summary.watch.as_ref().expect("the summary has a watch section");
    assert_eq!(w.processes.iter().map(|p| p.pid.to_string()).collect::<Vec<_>>(), [b.clone(), e.clone()]);
    let sh = &w.processes[0];
    assert_eq!(sh.name, "sh");
    assert!(sh.cpu_s > 0.0 && sh.cores_busy > 0.0, "{sh:?}");
    // stdin, stdout, stderr at least.
    assert!(sh.fds_start >= 3 && sh.fds_end >= 3, "{sh:?}");
    assert!(sh.rss_kib_peak >= sh.rss_kib_start.max(sh.rss_kib_end) && sh.rss_kib_end > 0, "{sh:?}");
    let echo_w = &w.processes[1];
    assert_eq!(echo_w.name, "upsplice-loadge"); // comm is cut at 15 characters
    assert!(echo_w.cpu_s > 0.0, "the echo server answered 200 messages/s: {echo_w:?}");
    // Two generator connections were open at the peak: listener + 2 sockets + stdio.
    assert!(echo_w.fds_peak >= echo_w.fds_start + 2, "{echo_w:?}");
    // The echo server accepted the two connections (its side: local port = its port).
    let p = w.port.as_ref().expect("--watch-port");
    assert_eq!((p.established_start, p.established_peak), (0, 2), "{p:?}");
    assert!(w.machine.busy_s >= sh.cpu_s * 0.5 && w.machine.cores_busy > 0.0, "{w:?}");
    assert!(
        r.stdout.contains("machine cpu") && r.stdout.contains(&format!("watched        pid {b} (sh)")),
        "{}",
        r.stdout
    );

    // Repeated flags work as well as a comma list; a pid that does not exist is refused.
    let r = run(&["hold", "--target", &echo.addr, "-c", "2", "-d", "300ms", "--watch-pid", &b], dir.path(), "hold");
    assert_eq!(r.summary.watch.as_ref().unwrap().processes.len(), 1);
    let out = Command::new(common::bin())
        .args(["ws", "--target", &echo.addr, "-d", "1s", "--watch-pid", &e, "--watch-pid", "999999999"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--watch-pid 999999999"), "{out:?}");
}

#[test]
fn search_finds_a_higher_rate_under_a_looser_bound() {
    let echo = Server::echo(&[]);
    let dir = tmpdir();
    let search = |below: &str, name: &str| {
        run(
            &[
                "search",
                "--target",
                &echo.addr,
                "-c",
                "2",
                "-d",
                "1s",
                "-w",
                "200ms",
                "--drain",
                "500ms",
                "--floor",
                "100",
                "--ceiling",
                "800",
                "--below",
                below,
                "--max-steps",
                "4",
                "--max-time",
                "30s",
            ],
            dir.path(),
            name,
        )
    };
    // No loopback round trip takes under a microsecond: nothing passes.
    let tight = search("1us", "tight");
    // A second is far above anything an idle echo server answers in.
    let loose = search("1s", "loose");
    let (ts, ls) = (tight.summary.search.as_ref().unwrap(), loose.summary.search.as_ref().unwrap());
    assert_eq!(ts.answer_rate, 0.0, "{}", tight.stdout);
    assert_eq!(tight.output.status.code(), Some(1), "no rate passed: {}", tight.stdout);
    assert_eq!(ts.steps.len(), 1, "the floor failed, so nothing else was tried: {}", tight.stdout);
    assert!(loose.output.status.success(), "{}", loose.stdout);
    assert!(ls.answer_rate > ts.answer_rate && ls.answer_rate >= 100.0, "{}", loose.stdout);
    assert!(ls.steps.len() <= 4 && ls.steps.iter().any(|s| s.pass), "{}", loose.stdout);
    assert!(ls.steps.iter().all(|s| s.latency_us > 0 && s.achieved_rate > 0.0), "{:?}", ls.steps);
    // Every step is printed, and the summary is the answer's run.
    assert_eq!(loose.stdout.matches("\nstep ").count(), ls.steps.len(), "{}", loose.stdout);
    assert_eq!(loose.summary.target_rate, ls.answer_rate);
    assert!(loose.stdout.contains("search         p99 < 1000.000 ms"), "{}", loose.stdout);
}
