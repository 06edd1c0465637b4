//! Helpers shared by the integration tests: start the real binary, run it,
//! read its JSON summary.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;
use upsplice_loadgen::report::Summary;

/// Path of the binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_upsplice-loadgen")
}

/// A child process that prints `listening on ADDR` first; killed on drop.
pub struct Server {
    pub child: Child,
    pub addr: String,
}

impl Server {
    /// Starts `cmd` and waits for its `listening on ADDR` line.
    pub fn start(mut cmd: Command) -> Server {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn server");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("read listening line");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Server { child, addr }
    }

    /// The bundled echo server with extra arguments.
    pub fn echo(extra: &[&str]) -> Server {
        let mut c = Command::new(bin());
        c.args(["echo", "--listen", "127.0.0.1:0", "--threads", "1"]).args(extra);
        Server::start(c)
    }

    /// Sends SIGTERM and returns the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        // The pid is our own child; SIGTERM is what the interface promises to honour.
        let _ = Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status();
        let status = wait_timeout(&mut self.child, Duration::from_secs(5));
        std::mem::forget(self);
        status
    }
}

fn wait_timeout(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let t = std::time::Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if t.elapsed() > limit {
            let _ = child.kill();
            return child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Result of one generator run.
pub struct Run {
    pub output: Output,
    pub summary: Summary,
    pub stdout: String,
    pub stderr: String,
}

/// A fresh temporary directory.
pub fn tmpdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// Runs the generator with `args` plus `--json FILE` and parses the summary.
/// Panics (test failure) when the binary panicked or printed no summary.
pub fn run(args: &[&str], dir: &Path, name: &str) -> Run {
    run_cmd(generator(args), dir, name)
}

/// The generator with `args`, stdin closed.
pub fn generator(args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.args(args).stdin(Stdio::null());
    c
}

/// The generator with `args`, started through `sh` with the open-files limit
/// set to `soft` / `hard` first (lowering a limit needs no privilege).
pub fn generator_with_fd_limit(soft: u64, hard: u64, args: &[&str]) -> Command {
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(format!("ulimit -Sn {soft} && ulimit -Hn {hard} && exec \"$0\" \"$@\""))
        .arg(bin())
        .args(args)
        .stdin(Stdio::null());
    c
}

/// Runs `cmd` (the generator) plus `--json FILE` and parses the summary.
pub fn run_cmd(mut cmd: Command, dir: &Path, name: &str) -> Run {
    let json: PathBuf = dir.join(format!("{name}.json"));
    let output = cmd.arg("--json").arg(&json).output().expect("run generator");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    assert!(!stderr.contains("panicked"), "generator panicked:\n{stderr}");
    let text = std::fs::read_to_string(&json)
        .unwrap_or_else(|e| panic!("no JSON summary ({e}); stdout:\n{stdout}\nstderr:\n{stderr}"));
    let summary: Summary = serde_json::from_str(&text).expect("summary JSON");
    Run { output, summary, stdout, stderr }
}

/// Runs `cmd` (the generator) expecting a refusal before any load: exit
/// status 1, no panic, no summary. Returns stderr.
pub fn run_refused(mut cmd: Command) -> String {
    let out = cmd.output().expect("run generator");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "stdout:\n{}\nstderr:\n{stderr}", String::from_utf8_lossy(&out.stdout));
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(out.stdout.is_empty(), "no summary expected: {}", String::from_utf8_lossy(&out.stdout));
    stderr
}

/// A free loopback port with nothing listening on it.
pub fn dead_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a.to_string()
}

/// How [`closing_http_server`] ends each connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Closing {
    /// Answers `200` with `Connection: close`, then closes.
    Announced,
    /// Answers `200` without saying so, then closes.
    Unannounced,
    /// Reads the request and closes without answering.
    Unanswered,
}

/// A tiny HTTP server on a thread that closes every connection after its
/// first request, as a router that does not keep plain requests alive does.
/// Returns its address; it lives as long as the test process.
pub fn closing_http_server(how: Closing) -> String {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { continue };
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf) {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let close = match how {
                    Closing::Announced => "Connection: close\r\n",
                    Closing::Unannounced => "",
                    Closing::Unanswered => return,
                };
                let _ = write!(s, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n{close}\r\nok");
            });
        }
    });
    addr
}
