//! Peer processes the tests put in front of (or behind) upsplice: HAProxy
//! and nginx, as operators run them.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// True if `tool` is installed; without it the caller skips its test,
/// unless UPSPLICE_REQUIRE_PEERS is set (CI), which makes that a failure.
pub fn have(tool: &str) -> bool {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {tool} || test -x /usr/sbin/{tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    present(ok, &format!("{tool} is not installed"), "scripts/setup installs it")
}

/// `ok`, or — when a peer is missing — a skip notice, unless
/// UPSPLICE_REQUIRE_PEERS is set (CI), which makes it a failure.
fn present(ok: bool, missing: &str, how: &str) -> bool {
    if !ok {
        assert!(std::env::var_os("UPSPLICE_REQUIRE_PEERS").is_none(), "{missing} and UPSPLICE_REQUIRE_PEERS is set");
        eprintln!("SKIPPED: {missing} ({how})");
    }
    ok
}

/// True if Python's `websockets` is importable; otherwise as [`have`].
pub fn python_websockets() -> bool {
    python_module("websockets", "pip install websockets; scripts/test does it")
}

/// True if `python3 -c "import MODULE"` works; otherwise as [`have`]
/// (skip, or fail under UPSPLICE_REQUIRE_PEERS), saying how to get it.
pub fn python_module(module: &str, how: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    present(ok, &format!("Python `{module}` is not installed (python3 -c 'import {module}' failed)"), how)
}

/// A peer process, killed when dropped; its config directory lives as long.
pub struct Peer(Child, tempfile::TempDir);

impl Drop for Peer {
    /// SIGTERM, not SIGKILL: nginx's master must stop its workers, which a
    /// killed master would leave behind.
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn wait_port(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{addr} never accepted");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Peer {
    /// Starts `haproxy -db` on `cfg` (written into `dir`) and waits until
    /// `addr` accepts.
    pub fn haproxy(dir: tempfile::TempDir, cfg: &str, addr: SocketAddr) -> Peer {
        let path = dir.path().join("haproxy.cfg");
        std::fs::write(&path, cfg).unwrap();
        let bin = if std::path::Path::new("/usr/sbin/haproxy").exists() { "/usr/sbin/haproxy" } else { "haproxy" };
        let child = Command::new(bin).arg("-db").arg("-f").arg(&path).stdout(Stdio::null()).spawn().unwrap();
        wait_port(addr);
        Peer(child, dir)
    }

    /// Starts nginx in the foreground on `cfg` (written into `dir`, its
    /// prefix) and waits until `addr` accepts.
    pub fn nginx(dir: tempfile::TempDir, cfg: &str, addr: SocketAddr) -> Peer {
        let path = dir.path().join("nginx.conf");
        std::fs::write(&path, cfg).unwrap();
        let bin = if std::path::Path::new("/usr/sbin/nginx").exists() { "/usr/sbin/nginx" } else { "nginx" };
        let child = Command::new(bin)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        wait_port(addr);
        Peer(child, dir)
    }
}
