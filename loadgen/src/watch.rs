//! Watching the machine and other processes over a run (`--watch-pid`): per
//! watched process its CPU time (user + system, all threads, from
//! `/proc/PID/stat`), resident memory (`VmRSS` from `/proc/PID/status`) at
//! the start, at its peak and at the end, and its open descriptors (entries
//! of `/proc/PID/fd`) likewise; and the machine's busy CPU from `/proc/stat`
//! (user + nice + system + irq + softirq + steal); with `--watch-port`, the
//! established TCP connections whose local port is that port (what
//! `ss state established '( sport = :PORT )'` counts: a listener's accepted
//! connections). A sampler thread reads them every [`INTERVAL`] so that peaks
//! between start and end are seen.
//!
//! The parsers take the files' text, so they are tested on fixed samples.

use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How often the sampler reads the watched processes.
pub const INTERVAL: Duration = Duration::from_millis(100);

/// CPU time of one process in clock ticks, from `/proc/PID/stat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcTicks {
    /// utime: user mode, all threads.
    pub user: u64,
    /// stime: kernel mode, all threads.
    pub system: u64,
}

/// Parses `/proc/PID/stat`: fields 14 (utime) and 15 (stime), counted after
/// the command name, which is in parentheses and may itself hold spaces and
/// parentheses (so the text is cut at the last `)`).
pub fn parse_stat(text: &str) -> Option<ProcTicks> {
    let rest = &text[text.rfind(')')? + 1..];
    // After ")": state(3) ppid(4) ... utime(14) stime(15), i.e. the 12th and 13th fields.
    let mut f = rest.split_ascii_whitespace().skip(11);
    Some(ProcTicks { user: f.next()?.parse().ok()?, system: f.next()?.parse().ok()? })
}

/// The command name in `/proc/PID/stat` (between the first `(` and the last `)`).
pub fn parse_comm(text: &str) -> Option<&str> {
    Some(&text[text.find('(')? + 1..text.rfind(')')?])
}

/// Parses `VmRSS` (KiB) from `/proc/PID/status`; `None` for a kernel thread or a zombie.
pub fn parse_rss_kib(text: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.split_ascii_whitespace().next()?.parse().ok()
}

/// Machine-wide CPU time in clock ticks, from the `cpu` line of `/proc/stat`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MachineTicks {
    /// user + nice + system + irq + softirq + steal.
    pub busy: u64,
    /// Every field of the line (busy + idle + iowait + the rest).
    pub total: u64,
}

/// Parses the aggregate `cpu ` line of `/proc/stat`.
pub fn parse_machine(text: &str) -> Option<MachineTicks> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line.split_ascii_whitespace().skip(1).map(|x| x.parse().ok()).collect::<Option<_>>()?;
    if v.len() < 8 {
        return None;
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice]; guest time is already in user/nice.
    let busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    Some(MachineTicks { busy, total: v.iter().take(8).sum() })
}

/// Counts the ESTABLISHED sockets (state `01`) with local port `port` in a
/// `/proc/net/tcp` or `/proc/net/tcp6` table.
pub fn count_established(table: &str, port: u16) -> u64 {
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let mut f = l.split_ascii_whitespace().skip(1);
            let local_port = f.next().and_then(|a| a.rsplit(':').next()).and_then(|p| u16::from_str_radix(p, 16).ok());
            local_port == Some(port) && f.nth(1) == Some("01")
        })
        .count() as u64
}

fn read_established(root: &Path, port: u16) -> u64 {
    ["net/tcp", "net/tcp6"]
        .iter()
        .filter_map(|t| std::fs::read_to_string(root.join(t)).ok())
        .map(|text| count_established(&text, port))
        .sum()
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
pub fn clock_ticks() -> u64 {
    // SAFETY: sysconf only reads a configuration value; it has no memory side effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as u64
    } else {
        100
    }
}

/// One reading of one process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ProcSample {
    ticks: ProcTicks,
    rss_kib: u64,
    fds: u64,
}

fn read_proc(root: &Path, pid: u32) -> Option<ProcSample> {
    let dir = root.join(pid.to_string());
    let ticks = parse_stat(&std::fs::read_to_string(dir.join("stat")).ok()?)?;
    let rss_kib = std::fs::read_to_string(dir.join("status")).ok().and_then(|s| parse_rss_kib(&s)).unwrap_or(0);
    let fds = std::fs::read_dir(dir.join("fd")).map(|d| d.count() as u64).unwrap_or(0);
    Some(ProcSample { ticks, rss_kib, fds })
}

fn read_machine(root: &Path) -> Option<MachineTicks> {
    parse_machine(&std::fs::read_to_string(root.join("stat")).ok()?)
}

/// What one watched process did over the window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Watched {
    /// Process id.
    pub pid: u32,
    /// Command name (`/proc/PID/stat`), empty if it could not be read.
    pub name: String,
    /// User + system CPU seconds over the window, all threads.
    pub cpu_s: f64,
    /// Of `cpu_s`, user mode.
    pub user_s: f64,
    /// Of `cpu_s`, kernel mode.
    pub system_s: f64,
    /// `cpu_s` / window: cores kept busy on average.
    pub cores_busy: f64,
    /// Resident memory at the start of the window, KiB.
    pub rss_kib_start: u64,
    /// Highest resident memory seen, KiB.
    pub rss_kib_peak: u64,
    /// Resident memory at the end, KiB.
    pub rss_kib_end: u64,
    /// Open descriptors at the start.
    pub fds_start: u64,
    /// Most open descriptors seen.
    pub fds_peak: u64,
    /// Open descriptors at the end.
    pub fds_end: u64,
    /// The process could not be read at some point (it exited): the end
    /// figures are from the last reading that worked.
    pub gone: bool,
}

/// Machine-wide CPU over the window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MachineCpu {
    /// Busy CPU seconds (user + nice + system + irq + softirq + steal), all cores.
    pub busy_s: f64,
    /// All CPU seconds (busy, idle, iowait, ...), all cores.
    pub total_s: f64,
    /// `busy_s` / window: cores kept busy on average.
    pub cores_busy: f64,
}

/// Established connections on one local port over the window.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PortWatch {
    /// The local port.
    pub port: u16,
    /// At the start.
    pub established_start: u64,
    /// The most seen.
    pub established_peak: u64,
    /// At the end.
    pub established_end: u64,
}

/// Everything watched over a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct WatchReport {
    /// Length of the window, seconds (the generator's whole run).
    pub window_s: f64,
    /// Readings taken (start, end and every [`INTERVAL`] between).
    pub samples: u64,
    /// The machine.
    pub machine: MachineCpu,
    /// One entry per `--watch-pid`, in the order given.
    pub processes: Vec<Watched>,
    /// `--watch-port`, if given.
    #[serde(default)]
    pub port: Option<PortWatch>,
}

/// Per-process state of the sampler.
#[derive(Debug, Clone)]
struct Track {
    pid: u32,
    name: String,
    first: Option<ProcSample>,
    last: Option<ProcSample>,
    rss_peak: u64,
    fds_peak: u64,
    gone: bool,
}

impl Track {
    fn observe(&mut self, s: Option<ProcSample>) {
        match s {
            Some(s) => {
                self.first.get_or_insert(s);
                self.last = Some(s);
                self.rss_peak = self.rss_peak.max(s.rss_kib);
                self.fds_peak = self.fds_peak.max(s.fds);
            }
            None => self.gone = true,
        }
    }

    fn report(&self, hz: f64, window_s: f64) -> Watched {
        let (a, b) = (self.first.unwrap_or_default(), self.last.unwrap_or_default());
        let user_s = b.ticks.user.saturating_sub(a.ticks.user) as f64 / hz;
        let system_s = b.ticks.system.saturating_sub(a.ticks.system) as f64 / hz;
        Watched {
            pid: self.pid,
            name: self.name.clone(),
            cpu_s: user_s + system_s,
            user_s,
            system_s,
            cores_busy: (user_s + system_s) / window_s.max(1e-9),
            rss_kib_start: a.rss_kib,
            rss_kib_peak: self.rss_peak,
            rss_kib_end: b.rss_kib,
            fds_start: a.fds,
            fds_peak: self.fds_peak,
            fds_end: b.fds,
            gone: self.gone,
        }
    }
}

/// A running watch: started before the load, finished after it.
#[derive(Debug)]
pub struct Watch {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<WatchReport>,
}

/// A `--watch-pid` that does not name a readable process.
#[derive(Debug, thiserror::Error)]
#[error("--watch-pid {0}: no such process (or /proc/{0}/stat is not readable)")]
pub struct NoSuchProcess(pub u32);

impl Watch {
    /// Takes the first readings (failing if a pid cannot be read) and starts
    /// the sampler thread.
    pub fn start(pids: &[u32], port: Option<u16>) -> Result<Watch, NoSuchProcess> {
        Self::start_at(Path::new("/proc"), pids, port, INTERVAL)
    }

    fn start_at(root: &Path, pids: &[u32], port: Option<u16>, every: Duration) -> Result<Watch, NoSuchProcess> {
        let root = root.to_path_buf();
        let mut tracks = Vec::with_capacity(pids.len());
        for &pid in pids {
            let text =
                std::fs::read_to_string(root.join(pid.to_string()).join("stat")).map_err(|_| NoSuchProcess(pid))?;
            let name = parse_comm(&text).unwrap_or_default().to_string();
            let mut t = Track { pid, name, first: None, last: None, rss_peak: 0, fds_peak: 0, gone: false };
            t.observe(read_proc(&root, pid));
            if t.first.is_none() {
                return Err(NoSuchProcess(pid));
            }
            tracks.push(t);
        }
        let mut port = port.map(|port| {
            let n = read_established(&root, port);
            PortWatch { port, established_start: n, established_peak: n, established_end: n }
        });
        let m0 = read_machine(&root).unwrap_or_default();
        let t0 = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("watch".into())
            .spawn(move || {
                let mut samples = 1;
                loop {
                    let done = flag.load(Ordering::Acquire);
                    for t in tracks.iter_mut().filter(|t| !t.gone) {
                        t.observe(read_proc(&root, t.pid));
                    }
                    if let Some(p) = &mut port {
                        p.established_end = read_established(&root, p.port);
                        p.established_peak = p.established_peak.max(p.established_end);
                    }
                    samples += 1;
                    if done {
                        break;
                    }
                    std::thread::park_timeout(every);
                }
                let m1 = read_machine(&root).unwrap_or_default();
                let window_s = t0.elapsed().as_secs_f64();
                let hz = clock_ticks() as f64;
                let busy_s = m1.busy.saturating_sub(m0.busy) as f64 / hz;
                WatchReport {
                    window_s,
                    samples,
                    machine: MachineCpu {
                        busy_s,
                        total_s: m1.total.saturating_sub(m0.total) as f64 / hz,
                        cores_busy: busy_s / window_s.max(1e-9),
                    },
                    processes: tracks.iter().map(|t| t.report(hz, window_s)).collect(),
                    port,
                }
            })
            .expect("spawning the watch thread");
        Ok(Watch { stop, thread })
    }

    /// Takes the last readings and returns the report.
    pub fn finish(self) -> WatchReport {
        self.stop.store(true, Ordering::Release);
        self.thread.thread().unpark();
        self.thread.join().unwrap_or_else(|p| std::panic::resume_unwind(p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "4242 (nginx: worker (2)) S 4241 4241 4241 0 -1 4194624 1234 0 0 0 \
                        517 283 0 0 20 0 1 0 1171716 3133440 407 18446744073709551615 0 0 0 0 0\n";

    #[test]
    fn stat_fields_after_a_name_with_spaces_and_parentheses() {
        assert_eq!(parse_stat(STAT), Some(ProcTicks { user: 517, system: 283 }));
        assert_eq!(parse_comm(STAT), Some("nginx: worker (2)"));
        assert_eq!(parse_stat("4242 (cut short) S 1 2"), None);
    }

    #[test]
    fn rss_from_status() {
        let status = "Name:\tupsplice\nVmPeak:\t  99999 kB\nVmHWM:\t   8000 kB\nVmRSS:\t    2200 kB\nThreads:\t3\n";
        assert_eq!(parse_rss_kib(status), Some(2200));
        assert_eq!(parse_rss_kib("Name:\tkworker/0:1\nThreads:\t1\n"), None);
    }

    #[test]
    fn machine_busy_leaves_out_idle_and_iowait() {
        let stat = "cpu  1494139 34671 194086 491891 26298 0 55201 62242 0 0\n\
                    cpu0 744007 17196 98402 248408 13504 0 28476 31495 0 0\nintr 1 2 3\n";
        let m = parse_machine(stat).unwrap();
        assert_eq!(m.busy, 1494139 + 34671 + 194086 + 55201 + 62242);
        assert_eq!(m.total, m.busy + 491891 + 26298);
        assert_eq!(parse_machine("cpu0 1 2 3\n"), None);
    }

    #[test]
    fn established_connections_on_a_local_port() {
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
                   0: 0100007F:4E85 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 212 1\n\
                   1: 0100007F:4E85 0200007F:B591 01 00000000:00000000 00:00000000 00000000     0        0 213 1\n\
                   2: 0100007F:4E85 0300007F:B592 01 00000000:00000000 00:00000000 00000000     0        0 214 1\n\
                   3: 0100007F:4E85 0300007F:B593 06 00000000:00000000 03:0000062E 00000000     0        0 0 3\n\
                   4: 0300007F:B592 0100007F:4E85 01 00000000:00000000 00:00000000 00000000     0        0 215 1\n";
        // 0x4E85 = 20101: the listener (0A), a TIME_WAIT (06) and the client side (remote port) do not count.
        assert_eq!(count_established(tcp, 20101), 2);
        assert_eq!(count_established(tcp, 20102), 0);
        let tcp6 = "  sl  local_address                         remote_address                        st\n\
                    0: 00000000000000000000000001000000:4E85 00000000000000000000000001000000:C001 01 0\n";
        assert_eq!(count_established(tcp6, 20101), 1);
    }

    #[test]
    fn a_fake_proc_tree_is_sampled_from_start_to_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("77");
        std::fs::create_dir_all(p.join("fd")).unwrap();
        // Written aside and renamed, so that the sampler never reads half a file.
        let put = |path: std::path::PathBuf, text: String| {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(tmp, path).unwrap();
        };
        let write = |utime: u64, rss: u64, fds: usize| {
            put(p.join("stat"), format!("77 (fake) S 1 1 1 0 -1 0 0 0 0 0 {utime} 50 0 0 20 0 1 0 1 1 1\n"));
            put(p.join("status"), format!("Name:\tfake\nVmRSS:\t{rss} kB\n"));
            for i in 0..10 {
                let f = p.join("fd").join(i.to_string());
                if i < fds {
                    std::fs::write(f, "").unwrap();
                } else {
                    let _ = std::fs::remove_file(f);
                }
            }
            put(dir.path().join("stat"), format!("cpu  {utime} 0 0 1000 0 0 0 0 0 0\n"));
        };
        write(100, 1000, 3);
        let w = Watch::start_at(dir.path(), &[77], None, Duration::from_millis(5)).unwrap();
        write(150, 5000, 9);
        std::thread::sleep(Duration::from_millis(100));
        write(300, 2000, 4);
        let r = w.finish();
        let hz = clock_ticks() as f64;
        let p = &r.processes[0];
        assert_eq!((p.pid, p.name.as_str(), p.gone), (77, "fake", false));
        assert!((p.user_s - 200.0 / hz).abs() < 1e-9 && p.system_s == 0.0, "{p:?}");
        assert_eq!((p.rss_kib_start, p.rss_kib_peak, p.rss_kib_end), (1000, 5000, 2000));
        assert_eq!((p.fds_start, p.fds_peak, p.fds_end), (3, 9, 4));
        assert!((r.machine.busy_s - 200.0 / hz).abs() < 1e-9, "{r:?}");
        assert!(r.samples >= 3);
        assert!(Watch::start_at(dir.path(), &[78], None, INTERVAL).is_err());
    }
}
