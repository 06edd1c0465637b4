//! Test support: the real `upsplice` binary on loopback, and backends the
//! tests control byte by byte.
#![allow(dead_code, clippy::result_large_err)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

pub mod fleet;
pub mod nats;
pub mod peer;
pub mod plane;
pub mod recorder;
pub mod tls;
pub mod tls_backend;

/// A free loopback port (bound and released; the router binds it next).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running router process; killed when dropped.
pub struct Router {
    child: Option<Child>,
    pub http: SocketAddr,
    pub tcp: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    pub log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

/// What goes into the config besides the listeners.
pub struct Setup<'a> {
    pub mode: &'a str,
    pub limits: &'a str,
    /// `[[pool]]` and `[[route]]` tables; a pool called "main" must exist
    /// (the tcp listener forwards to it).
    pub routing: String,
    pub extra: &'a str,
}

impl Router {
    /// Starts the router with every bind on port 0 and learns the ports
    /// it got from what `run` prints on stdout (no free-port guessing, no
    /// retry).
    pub fn start(setup: Setup<'_>) -> Router {
        Router::start_config(&render(&setup))
    }

    /// Starts the router on a whole config of the caller's: it must have an
    /// http listener "web", a tcp listener "raw" and an `[admin]`, each on
    /// port 0 ([`render`] is the usual one).
    pub fn start_config(config: &str) -> Router {
        Router::try_start(config).unwrap_or_else(|log| panic!("router did not become ready; log:\n{log}"))
    }

    /// As [`Router::start_config`], but returns once the ports are bound,
    /// without waiting for `/healthz` to answer 200.
    pub fn spawn_config(config: &str) -> Router {
        Router::try_spawn(config).unwrap_or_else(|log| panic!("router did not bind; log:\n{log}"))
    }

    fn try_start(config: &str) -> Result<Router, String> {
        let mut router = Router::try_spawn(config)?;
        router.wait_ready()?;
        Ok(router)
    }

    fn try_spawn(config: &str) -> Result<Router, String> {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("upsplice.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_upsplice"))
            .args(["run", "--config"])
            .arg(&config_path)
            // UPSPLICE_TEST_LOG (e.g. "debug") looks deeper into a failing test.
            .env("RUST_LOG", std::env::var("UPSPLICE_TEST_LOG").unwrap_or_else(|_| "info".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        // `listening on ADDR listener=NAME ...` per listener, then `admin on ADDR`.
        let mut bound = std::collections::HashMap::new();
        let mut stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        while bound.len() < 3 {
            let Some(Ok(line)) = stdout.next() else {
                // It exited before binding: let the log reader catch up.
                let _ = child.wait();
                std::thread::sleep(Duration::from_millis(100));
                return Err(log.lock().unwrap().clone());
            };
            let (name, addr) = match line.strip_prefix("admin on ") {
                Some(addr) => ("admin".to_string(), addr),
                None => {
                    let rest = line.strip_prefix("listening on ").unwrap_or_else(|| panic!("unexpected: {line}"));
                    let (addr, tail) = rest.split_once(" listener=").unwrap();
                    (tail.split(' ').next().unwrap().to_string(), addr)
                }
            };
            bound.insert(name, addr.parse::<SocketAddr>().unwrap());
        }
        // Drained (and dropped) on a thread of its own: nothing else is printed.
        std::thread::spawn(move || stdout.for_each(drop));
        Ok(Router {
            child: Some(child),
            http: bound["web"],
            tcp: bound["raw"],
            admin: bound["admin"],
            config_path,
            log,
            _dir: dir,
        })
    }

    /// Waits until /healthz answers; Err(log) if the process exits first.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.admin_get("/healthz").map(|(s, _)| s == 200).unwrap_or(false) {
                return Ok(());
            }
            if let Ok(Some(_)) = self.child.as_mut().unwrap().try_wait() {
                // Let the log reader catch the last lines.
                std::thread::sleep(Duration::from_millis(100));
                return Err(self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(self.log())
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits (bounded) until the router's log contains `needle`.
    pub fn wait_log(&self, needle: &str) {
        self.wait_log_count(needle, 1);
    }

    /// Waits (bounded) until the router's log contains `needle` `n` times.
    pub fn wait_log_count(&self, needle: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.log().matches(needle).count() < n {
            assert!(
                Instant::now() < deadline,
                "log never contained {needle:?} {n} times (router process {}):\n{}",
                self.liveness(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether the router process still runs, from /proc (an exited child
    /// that was not yet waited for is a zombie), for failure messages.
    fn liveness(&self) -> &'static str {
        match std::fs::read_to_string(format!("/proc/{}/stat", self.pid())) {
            Ok(stat) if stat.rsplit(')').next().is_some_and(|rest| rest.trim_start().starts_with('Z')) => "has exited",
            Ok(_) => "still runs",
            Err(_) => "is gone",
        }
    }

    /// True while the router process runs (not exited, not reaped).
    pub fn is_running(&self) -> bool {
        self.liveness() == "still runs"
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().unwrap().id() as i32
    }

    /// A blocking GET on the admin endpoint: (status, body).
    pub fn admin_get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let mut s = std::net::TcpStream::connect(self.admin)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.1\r\nHost: admin\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        let status = out.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Ok((status, body))
    }

    /// The value of one metric line (exact labels), 0 when absent.
    pub fn metric(&self, line_prefix: &str) -> f64 {
        let (_, body) = self.admin_get("/metrics").unwrap();
        body.lines()
            .find(|l| l.starts_with(line_prefix))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    }

    /// The metric once it reached `min`, waiting (bounded, as
    /// [`Router::wait_log`]) for what a tunnel's task adds as it ends:
    /// the client may see EOF before the router counted the tunnel.
    pub fn wait_metric_at_least(&self, line_prefix: &str, min: f64) -> f64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let value = self.metric(line_prefix);
            if value >= min || Instant::now() >= deadline {
                return value;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), sig).unwrap();
    }

    /// Waits for the process to exit (bounded).
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "router did not exit within {within:?}; log:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Open fds of the router process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid())).unwrap().count()
    }

    /// The smallest fd number the router process has free once its fds
    /// settled (the same for 200 ms: the readiness probe's admin
    /// connection closes just after startup): the next socket it opens
    /// gets it.
    pub fn lowest_free_fd(&self) -> usize {
        let lowest = || {
            let used: std::collections::HashSet<usize> = std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
                .unwrap()
                .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect();
            (0..).find(|fd| !used.contains(fd)).unwrap()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut last = lowest();
        loop {
            std::thread::sleep(Duration::from_millis(200));
            let now = lowest();
            if now == last || Instant::now() > deadline {
                return now;
            }
            last = now;
        }
    }

    /// Sets the router process's soft open-files limit (the hard one
    /// stays): fds numbered `limit` and above cannot be opened.
    pub fn set_fd_limit(&self, limit: usize) {
        let status = std::process::Command::new("prlimit")
            .arg("--pid")
            .arg(self.pid().to_string())
            .arg(format!("--nofile={limit}:"))
            .status()
            .unwrap();
        assert!(status.success(), "prlimit --nofile={limit}: failed");
    }

    /// The router process's soft open-files limit.
    pub fn fd_limit(&self) -> usize {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.pid())).unwrap();
        let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
        line.split_whitespace().nth(3).unwrap().parse().unwrap()
    }

    /// Open fds of the router process that are pipe ends (the splice
    /// plane keeps emptied pipes in its pool for the next burst).
    pub fn pipe_fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with("pipe:"))
            .count()
    }

    /// Resident memory of the router process in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find(|l| l.starts_with("VmRSS:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap()
    }

    /// Sockets of the router process in CLOSE_WAIT (the router failed to
    /// close after its peer did).
    pub fn close_wait_count(&self) -> usize {
        let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter_map(|p| p.to_str()?.strip_prefix("socket:[")?.strip_suffix(']').map(str::to_string))
            .collect();
        let tcp = std::fs::read_to_string("/proc/net/tcp").unwrap();
        tcp.lines()
            .skip(1)
            .filter(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.len() > 9 && f[3] == "08" && inodes.contains(f[9])
            })
            .count()
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failing case: say what the router was doing, before it is
            // killed (a stall shows in its threads' CPU and its queues).
            if let Some(c) = &self.child {
                let log = self.log();
                let tail: Vec<&str> = log.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
                eprintln!(
                    "--- router process {} at the failure ---\nlog (last {} lines):\n{}\n{}",
                    c.id(),
                    tail.len(),
                    tail.join("\n"),
                    post_mortem(c.id())
                );
            }
        }
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A live process's threads (CPU ticks each, state) and its TCP sockets'
/// queues and windows (`ss -tnmpi`, where installed): printed when a case
/// fails with the router still running.
fn post_mortem(pid: u32) -> String {
    let mut out = String::from("threads (name state utime+stime ticks):\n");
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for task in tasks.flatten() {
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else { continue };
            // pid (comm) state ... utime(14) stime(15): fields after the ")".
            let Some((head, rest)) = stat.rsplit_once(") ") else { continue };
            let comm = head.split_once(" (").map_or("?", |(_, c)| c);
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks: u64 = f.get(11).and_then(|u| u.parse().ok()).unwrap_or(0)
                + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
            out += &format!("  {comm} {} {ticks}\n", f.first().unwrap_or(&"?"));
        }
    }
    match Command::new("ss").args(["-tnmpi"]).output() {
        Ok(o) => {
            // Each entry: a line, then indented lines; keep the router's.
            let text = String::from_utf8_lossy(&o.stdout);
            let mut entry = String::new();
            let mut keep = Vec::new();
            for line in text.lines().chain(std::iter::once("END")) {
                if !line.starts_with(char::is_whitespace) {
                    if entry.contains(&format!("pid={pid},")) {
                        keep.push(std::mem::take(&mut entry));
                    }
                    entry.clear();
                }
                entry += line;
                entry.push('\n');
            }
            out += &format!("sockets ({}):\n{}", keep.len(), keep.concat());
        }
        Err(e) => out += &format!("sockets: ss: {e}\n"),
    }
    out
}

pub fn render(s: &Setup<'_>) -> String {
    format!(
        r#"[data_plane]
mode = "{mode}"
{extra}
[limits]
{limits}

[admin]
bind = "127.0.0.1:0"

[[listener]]
name = "web"
bind = "127.0.0.1:0"
protocol = "http"
forwarded_proto = "https"
trusted_cidrs = ["127.0.0.2/32"]

[[listener]]
name = "raw"
bind = "127.0.0.1:0"
protocol = "tcp"
pool = "main"

{routing}
"#,
        mode = s.mode,
        extra = s.extra,
        limits = s.limits,
        routing = s.routing,
    )
}

/// A `[[pool]]` "main" with `backends` and a catch-all-ish route for `host`.
pub fn main_pool(backends: &[SocketAddr], host: &str) -> String {
    let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
    format!(
        "[[pool]]\nname = \"main\"\nbackends = [{}]\n\n[[route]]\nhost = \"{host}\"\npool = \"main\"\n",
        list.join(", ")
    )
}

/// A backend the test drives by hand: accepted sockets arrive on a channel.
pub struct RawBackend {
    pub addr: SocketAddr,
    rx: tokio::sync::mpsc::UnboundedReceiver<TcpStream>,
}

impl RawBackend {
    pub async fn start() -> RawBackend {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                if tx.send(s).is_err() {
                    break;
                }
            }
        });
        RawBackend { addr, rx }
    }

    pub async fn accept(&mut self) -> TcpStream {
        tokio::time::timeout(Duration::from_secs(10), self.rx.recv()).await.expect("backend accept timed out").unwrap()
    }
}

/// Reads until the end of an HTTP head; returns (head, bytes after it).
pub async fn read_head(s: &mut (impl AsyncRead + Unpin)) -> (String, Vec<u8>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = buf.split_off(i + 4);
            return (String::from_utf8_lossy(&buf).into_owned(), rest);
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("head read timed out")
            .unwrap();
        assert!(n > 0, "peer closed before the end of the head; got {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Reads to EOF (bounded by time); returns the bytes.
pub async fn read_to_end(s: &mut (impl AsyncRead + Unpin)) -> Vec<u8> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out))
        .await
        .expect("read to EOF timed out")
        .unwrap();
    out
}

pub const WS_REQUEST: &str = "GET /chat HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
pub const WS_101: &[u8] = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n";

/// A raw upgraded tunnel through the router: the client's socket, the
/// backend's socket, and the head the backend received. `pipelined` goes
/// out in the same write as the request head; `after_101` in the same
/// write as the backend's 101.
pub async fn raw_tunnel(
    router: &Router,
    backend: &mut RawBackend,
    host: &str,
    pipelined: &[u8],
    after_101: &[u8],
) -> (TcpStream, TcpStream, String, Vec<u8>) {
    let client = TcpStream::connect(router.http).await.unwrap();
    raw_tunnel_on(client, backend, host, pipelined, after_101).await
}

/// [`raw_tunnel`] over a client connection of the caller's (plain or TLS).
pub async fn raw_tunnel_on<C: AsyncRead + AsyncWrite + Unpin>(
    mut client: C,
    backend: &mut RawBackend,
    host: &str,
    pipelined: &[u8],
    after_101: &[u8],
) -> (C, TcpStream, String, Vec<u8>) {
    let mut req = WS_REQUEST.replace("{host}", host).into_bytes();
    req.extend_from_slice(pipelined);
    client.write_all(&req).await.unwrap();
    // A TLS client's stream may keep what it took (its socket pushed back,
    // or the task's tokio budget was spent) until a flush: the router would
    // wait for the request and answer 408 (seen 2 in about 75 runs of the
    // saturated TLS cases, always on a tunnel after a bulk run).
    client.flush().await.unwrap();
    let mut server = backend.accept().await;
    let (head, early) = read_head(&mut server).await;
    let mut resp = WS_101.to_vec();
    resp.extend_from_slice(after_101);
    server.write_all(&resp).await.unwrap();
    let (rhead, rest) = read_head(&mut client).await;
    assert!(rhead.starts_with("HTTP/1.1 101"), "{rhead}");
    // What the client got past the 101 so far is part of `after_101`.
    let _ = rest;
    (client, server, head, early)
}

// Not every test binary uses it.
#[allow(unused_imports)]
pub use upsplice::dataplane::selftest::pattern;

/// Writes `data` in chunks while hashing; returns the SHA-256.
pub async fn send_all(w: &mut (impl AsyncWriteExt + Unpin), data: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    for chunk in data.chunks(256 * 1024) {
        w.write_all(chunk).await.unwrap();
    }
    // A buffered writer (TLS) may hold the last bytes until flushed.
    w.flush().await.unwrap();
    Sha256::digest(data).into()
}

/// Reads exactly `len` bytes (bounded by time); returns their SHA-256.
pub async fn recv_hash(r: &mut (impl AsyncReadExt + Unpin), len: usize, within: Duration) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    let work = async {
        while got < len {
            let n = r.read(&mut buf[..(len - got).min(256 * 1024)]).await.unwrap();
            assert!(n > 0, "EOF after {got} of {len} bytes");
            h.update(&buf[..n]);
            got += n;
        }
    };
    tokio::time::timeout(within, work).await.expect("transfer did not finish in time");
    h.finalize().into()
}

/// Reads until the peer closes, or until `quiet` passes without a byte
/// once bytes came (a kept-alive connection); `first` bounds the wait for
/// the first byte.
pub async fn read_quiet(s: &mut TcpStream, first: Duration, quiet: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let wait = if out.is_empty() { first } else { quiet };
        match tokio::time::timeout(wait, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&chunk[..n]),
            _ => return out,
        }
    }
}

/// Writes a raw request and reads the whole answer until the router closes.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    String::from_utf8_lossy(&read_to_end(&mut s).await).into_owned()
}

/// A WebSocket echo backend built on tokio-tungstenite; every request
/// head it accepts is sent on the returned channel.
pub async fn ws_echo_backend() -> (std::net::SocketAddr, tokio::sync::mpsc::UnboundedReceiver<Vec<(String, String)>>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let cb = |req: &Request, resp: Response| {
                    let headers = req
                        .headers()
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                        .collect();
                    let _ = tx.send(headers);
                    Ok(resp)
                };
                let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(s, cb).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if msg.is_text() || msg.is_binary() {
                        if ws.send(msg).await.is_err() {
                            break;
                        }
                    } else if msg.is_close() {
                        break;
                    }
                }
            });
        }
    });
    (addr, rx)
}

/// Fills `buf` with the stream that starts at offset `pos`: every 8-byte
/// word holds its own offset, so a word out of place tells where it came
/// from. Cheap enough for a sender at full speed.
pub fn offset_words(buf: &mut [u8], pos: usize) {
    debug_assert_eq!(pos % 8, 0);
    for (i, word) in buf.chunks_exact_mut(8).enumerate() {
        word.copy_from_slice(&((pos + i * 8) as u64).to_le_bytes());
    }
}

/// Checks `got`, which arrived at offset `pos` of an [`offset_words`]
/// stream; on the first byte out of place, says what it is. The common
/// case is one comparison against the expected words (fast in a debug
/// build too: the test's sender and checker must outrun the relay, or the
/// kernel paths under test never see pressure).
pub fn check_offset_words(got: &[u8], pos: usize) -> Result<(), String> {
    let start = pos & !7;
    let mut expected = vec![0u8; (pos - start + got.len()).div_ceil(8) * 8];
    offset_words(&mut expected, start);
    if expected[pos - start..pos - start + got.len()] == *got {
        return Ok(());
    }
    for (i, &b) in got.iter().enumerate() {
        let at = pos + i;
        if b != ((at & !7) as u64).to_le_bytes()[at % 8] {
            // The first whole word from here on says where these bytes came from.
            let from = (0..8).find_map(|k| {
                let v = u64::from_le_bytes(got.get(i + k..i + k + 8)?.try_into().ok()?);
                (v % 8 == 0 && (v as i64 - (at + k) as i64).abs() < 1 << 26).then(|| v as i64 - k as i64)
            });
            let how = match from {
                Some(f) if f < at as i64 => format!("a repeat of the {} bytes before it", at as i64 - f),
                Some(f) => format!("{} bytes skipped", f - at as i64),
                None => "bytes from nowhere in the stream".into(),
            };
            return Err(format!("byte {at} out of place: {how} (it came from offset {from:?})"));
        }
    }
    Ok(())
}

/// Length of one period of [`fast_stream`]: a multiple of 8, not a power of
/// two, longer than any segment or buffer on the path (a shift by a whole
/// period would go unseen).
pub const FAST_PERIOD: usize = 6 * 1024 * 1024 + 8;

/// One period of a periodic [`offset_words`] stream (byte `p` of the stream
/// is byte `p % FAST_PERIOD` of this), made once. Sending and checking it
/// costs a `memcpy`/`memcmp` of std's optimised code per chunk, so the
/// peers of a debug-built test still saturate a tunnel — generating or
/// checking each word in the test's own unoptimised code did not (about
/// 50 MiB/s: too slow to fill any buffer of the path).
pub fn fast_stream() -> &'static [u8] {
    static STREAM: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    STREAM.get_or_init(|| {
        let mut v = vec![0u8; FAST_PERIOD];
        offset_words(&mut v, 0);
        v
    })
}

/// The bytes of [`fast_stream`] from position `pos` up to the end of its
/// period, at most `max`.
pub fn fast_stream_at(pos: usize, max: usize) -> &'static [u8] {
    let at = pos % FAST_PERIOD;
    &fast_stream()[at..(at + max).min(FAST_PERIOD)]
}

/// Checks `got`, which arrived at position `pos` of [`fast_stream`]; on a
/// mismatch, says where and what the misplaced bytes are.
pub fn check_fast_stream(got: &[u8], pos: usize) -> Result<(), String> {
    let mut done = 0;
    while done < got.len() {
        let want = fast_stream_at(pos + done, got.len() - done);
        let have = &got[done..done + want.len()];
        if have != want {
            let i = have.iter().zip(want).position(|(a, b)| a != b).unwrap_or(0);
            let at = pos + done + i;
            let word_at = i & !7;
            let found = have.get(word_at..word_at + 8).map(|w| u64::from_le_bytes(w.try_into().unwrap()));
            return Err(format!(
                "byte {at} out of place (stream period {FAST_PERIOD}; the word there says offset {found:?} mod the period, expected {})",
                (at & !7) % FAST_PERIOD
            ));
        }
        done += want.len();
    }
    Ok(())
}

/// Waits (bounded, 10 s) until the file at `path` has `n` lines (an
/// access log the router appends to); returns them.
pub fn wait_lines(path: &std::path::Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        // Complete lines only: a read racing the writer's write(2) can end
        // inside a line (the kernel grows the file a page at a time).
        let complete = text.rfind('\n').map_or("", |end| &text[..=end]);
        let lines: Vec<String> = complete.lines().map(str::to_string).collect();
        if lines.len() >= n {
            return lines;
        }
        assert!(Instant::now() < deadline, "{} has {} lines, not {n}:\n{text}", path.display(), lines.len());
        std::thread::sleep(Duration::from_millis(50));
    }
}
