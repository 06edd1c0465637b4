//! `[runtime]`: the threads connections are served on, against the real
//! binary on loopback. Per core, each worker thread has its own listening
//! socket (SO_REUSEPORT) and serves what it accepted; with
//! `work_stealing`, one tokio scheduler serves everything.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use common::{main_pool, Router, Setup};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A tcp backend that echoes every connection until its EOF.
async fn echo_backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

fn router(backend: SocketAddr, runtime: &str) -> Router {
    Router::start(Setup {
        mode: "copy",
        limits: "",
        routing: main_pool(&[backend], "app.test"),
        extra: &format!("\n[runtime]\n{runtime}\n"),
    })
}

/// The router's threads: (name, nanoseconds on a CPU so far) each.
fn threads(pid: i32) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_owned();
        // schedstat: time on a CPU (ns), time waiting for one, slices.
        let schedstat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        let ran = schedstat.split_whitespace().next().and_then(|v| v.parse().ok()).unwrap_or(0);
        out.push((name, ran));
    }
    out.sort();
    out
}

/// `n` connections through the tcp listener at once, each echoing its
/// own line; every one must come back whole.
async fn echo_through(addr: SocketAddr, n: usize) {
    let mut conns = Vec::new();
    for i in 0..n {
        conns.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let line = format!("connection {i}\n");
            s.write_all(line.as_bytes()).await.unwrap();
            s.shutdown().await.unwrap();
            let mut got = String::new();
            tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut got)).await.unwrap().unwrap();
            assert_eq!(got, line);
        }));
    }
    for c in conns {
        c.await.unwrap();
    }
}

/// Per core: one thread per worker, and the kernel spreads connections
/// over their sockets, so each worker serves some of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_core_workers_each_serve_connections() {
    let backend = echo_backend().await;
    let r = router(backend, "workers = 2");
    let before = threads(r.pid());
    let workers: Vec<&String> = before.iter().map(|(n, _)| n).filter(|n| n.starts_with("upsplice-w")).collect();
    assert_eq!(workers, ["upsplice-w0", "upsplice-w1"], "{before:?}");
    // The main runtime keeps one thread, for the router's own tasks.
    assert_eq!(before.iter().filter(|(n, _)| n.starts_with("tokio-rt-worker")).count(), 1, "{before:?}");
    echo_through(r.tcp, 64).await;
    let after = threads(r.pid());
    for w in ["upsplice-w0", "upsplice-w1"] {
        let ran = |t: &[(String, u64)]| t.iter().find(|(n, _)| n == w).map(|(_, ns)| *ns).unwrap();
        // 64 connections hashed over two sockets: each worker accepted
        // and relayed many (tens of µs each); an idle one runs nothing.
        assert!(
            ran(&after) >= ran(&before) + 200_000,
            "{w} did not serve its share: {before:?} → {after:?}\n{}",
            r.log()
        );
    }
    assert!(r.log().contains("serving on 2 workers, each with its own socket per listener"), "{}", r.log());
}

/// `work_stealing = true`: no worker threads of upsplice's own; tokio's
/// scheduler serves the connections.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn work_stealing_serves_on_one_scheduler() {
    let backend = echo_backend().await;
    let r = router(backend, "workers = 2\nwork_stealing = true");
    echo_through(r.tcp, 32).await;
    let names = threads(r.pid());
    assert!(!names.iter().any(|(n, _)| n.starts_with("upsplice-w")), "{names:?}");
    assert_eq!(names.iter().filter(|(n, _)| n.starts_with("tokio-rt-worker")).count(), 2, "{names:?}");
    assert!(r.log().contains("serving on 2 workers sharing one work-stealing scheduler"), "{}", r.log());
}

/// SO_REUSEPORT must not let a second router started by mistake share a
/// port the first one serves: it fails to bind, as it would without.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_router_on_a_bound_port_fails_to_start() {
    let backend = echo_backend().await;
    let r = router(backend, "workers = 2");
    let config = std::fs::read_to_string(&r.config_path).unwrap();
    let web = "name = \"web\"\nbind = \"127.0.0.1:0\"";
    let taken = config.replacen(web, &format!("name = \"web\"\nbind = \"{}\"", r.http), 1);
    assert_ne!(taken, config);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("second.toml");
    std::fs::write(&path, taken).unwrap();
    let out = tokio::time::timeout(
        Duration::from_secs(20),
        tokio::task::spawn_blocking(move || {
            Command::new(env!("CARGO_BIN_EXE_upsplice")).args(["run", "--config"]).arg(&path).output().unwrap()
        }),
    )
    .await
    .expect("the second router exits")
    .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains(&format!("listener \"web\": cannot bind {}", r.http)), "{stderr}");
    // The first one still serves.
    echo_through(r.tcp, 4).await;
}

/// `[runtime]` is read at start: a reload that changes it is rejected
/// and says so; the router goes on serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_cannot_change_the_runtime() {
    let backend = echo_backend().await;
    let r = router(backend, "workers = 2");
    let config = std::fs::read_to_string(&r.config_path).unwrap();
    let changed = config.replacen("workers = 2", "workers = 3", 1);
    assert_ne!(changed, config);
    std::fs::write(&r.config_path, changed).unwrap();
    r.signal(nix::sys::signal::Signal::SIGHUP);
    r.wait_log("can only change with a restart");
    assert!(r.log().contains("[runtime] (workers, work_stealing) can only change with a restart"), "{}", r.log());
    echo_through(r.tcp, 4).await;
}
