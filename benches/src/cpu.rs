//! CPU time, as the data-plane benchmarks report it: this process's (user
//! and system, all threads: the plane's workers and the peers driving it)
//! and the machine's (all cores: also the kernel's softirq and workqueue
//! time, which the sockmap plane's redirects spend outside any process).

use std::time::Instant;

/// This process's CPU time so far, in seconds.
pub fn process_secs() -> f64 {
    // SAFETY: an all-zero `rusage` is a valid value (integers only), and
    // getrusage writes one into the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is valid for writes; RUSAGE_SELF covers every thread.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Machine-wide busy CPU time so far (all cores, from /proc/stat), in
/// seconds: user, nice, system, irq, softirq and steal.
pub fn machine_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let line = stat.lines().next().unwrap_or_default();
    // cpu user nice system idle iowait irq softirq steal ...
    let f: Vec<u64> = line.split_whitespace().skip(1).filter_map(|v| v.parse().ok()).collect();
    let busy: u64 = [0, 1, 2, 5, 6, 7].iter().map(|&i| f.get(i).copied().unwrap_or(0)).sum();
    busy as f64 / 100.0 // USER_HZ
}

/// Wall-clock and CPU time spent on one piece of work.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub secs: f64,
    pub process_cpu: f64,
    pub machine_cpu: f64,
}

/// The clocks at the start of a piece of work.
#[derive(Debug, Clone, Copy)]
pub struct Start {
    at: Instant,
    process: f64,
    machine: f64,
}

impl Start {
    pub fn now() -> Start {
        Start { at: Instant::now(), process: process_secs(), machine: machine_secs() }
    }

    /// What was spent since `self`.
    pub fn usage(&self) -> Usage {
        Usage {
            secs: self.at.elapsed().as_secs_f64(),
            process_cpu: process_secs() - self.process,
            machine_cpu: machine_secs() - self.machine,
        }
    }
}
