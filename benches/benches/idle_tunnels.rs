//! What idle tunnels cost: the io_uring splice prototype keeps a splice
//! waiting on each socket, which the kernel parks on an io-wq worker
//! thread; the uring plane keeps a multishot recv armed (a poll entry) and
//! no buffer. Counts the threads each adds for the same idle one-way
//! tunnels, and the uring plane's pool buffers.
//!
//! `cargo bench -p upsplice-benches --bench idle_tunnels`
//!
//! * `UPSPLICE_BENCH_TUNNELS` (64): idle one-way tunnels.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use upsplice::dataplane::uring::UringPlane;
use upsplice::dataplane::DataPlane;
use upsplice::dataplane::{CloseReason, Settings};
use upsplice_benches::tunnel::{relayed, tunnel, Ends};
use upsplice_benches::{setting, splice_prototype};

fn main() {
    let n = setting("UPSPLICE_BENCH_TUNNELS", 64, 8);
    if let Err(why) = UringPlane::probe() {
        println!("SKIPPED: uring plane unavailable on this kernel: {}", upsplice::dataplane::error::chain(&why));
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(run(n));
}

fn thread_count() -> usize {
    std::fs::read_dir("/proc/self/task").expect("tasks").count()
}

async fn run(n: usize) {
    let plane =
        Arc::new(UringPlane::start(&Settings { uring_workers: 2, ..Settings::default() }).expect("uring plane"));
    let threads0 = thread_count();
    let mut splices = Vec::new();
    let mut ends = Vec::new();
    for _ in 0..n {
        let Ends { client, backend, tunnel } = tunnel().await;
        let src = tunnel.client.into_std().unwrap();
        let dst = tunnel.backend.into_std().unwrap();
        src.set_nonblocking(false).unwrap();
        dst.set_nonblocking(false).unwrap();
        splices.push(std::thread::spawn(move || splice_prototype::relay_one_way(src, dst)));
        ends.push((client, backend));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Minus the n std threads running the prototype's rings.
    let splice_threads = thread_count().saturating_sub(threads0 + n);
    for (mut c, _b) in ends.drain(..) {
        c.shutdown().await.unwrap();
    }
    for s in splices {
        s.join().unwrap();
    }
    let threads1 = thread_count();
    let mut relays = Vec::new();
    for _ in 0..n {
        let Ends { client, backend, tunnel } = tunnel().await;
        let p = plane.clone();
        relays.push(tokio::spawn(async move { relayed("uring", p.relay(tunnel).await) }));
        ends.push((client, backend));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let uring_threads = thread_count().saturating_sub(threads1);
    println!(
        "{n} idle one-way tunnels: io_uring splice prototype +{splice_threads} kernel io-wq threads; \
         uring plane +{uring_threads} threads, {} bytes of pool buffers",
        plane.buffered_bytes().0
    );
    for (mut c, mut b) in ends {
        c.shutdown().await.unwrap();
        b.shutdown().await.unwrap();
    }
    for r in relays {
        assert_eq!(r.await.unwrap().reason, CloseReason::Done);
    }
}
