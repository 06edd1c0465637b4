//! The uring data plane through its library API: loopback socket pairs, a
//! `Tunnel`, `UringPlane::relay`. Every test is skipped (with the reason
//! printed) only when `UringPlane::probe()` says this kernel cannot run it.
//!
//! Tests run one at a time (a process-wide lock) because some of them
//! measure the process's fd count and memory.
//!
//! The uring plane's measurements against the copy plane are benchmarks:
//! `benches/benches/{bulk,small_messages,idle_tunnels}.rs`.

mod common;

use std::io;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::pattern;
use common::plane::{recv_stream, send_stream, setup};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use upsplice::dataplane::uring::UringPlane;
use upsplice::dataplane::{CloseReason, Outcome, Tunnel};
use upsplice::dataplane::{DataPlane, Settings};

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs `f` on a fresh runtime, alone, bounded to `limit`; returns None
/// (after printing why) when the kernel cannot run the plane.
fn run<F>(limit: Duration, f: impl FnOnce(UringPlane) -> F)
where
    F: std::future::Future<Output = ()>,
{
    run_with(2, limit, f)
}

fn run_with<F>(workers: usize, limit: Duration, f: impl FnOnce(UringPlane) -> F)
where
    F: std::future::Future<Output = ()>,
{
    run_cfg(Settings { uring_workers: workers, ..Settings::default() }, limit, f)
}

fn run_cfg<F>(cfg: Settings, limit: Duration, f: impl FnOnce(UringPlane) -> F)
where
    F: std::future::Future<Output = ()>,
{
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // The plane's warnings (a failed operation and its errno) go to the
    // test's output, shown when it fails.
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("upsplice=warn").try_init();
    if let Err(why) = UringPlane::probe() {
        let why = upsplice::dataplane::error::chain(&why);
        println!("SKIPPED: uring plane unavailable on this kernel: {why}");
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let plane = UringPlane::start(&cfg).expect("uring plane starts");
        tokio::time::timeout(limit, f(plane)).await.expect("test finished in time");
    });
}

/// Opens `n` tunnels on `plane`, each carrying one `size`-byte message
/// each way (checked), then left open and quiet: their ends and relays.
async fn open_after_one_message(
    plane: &std::sync::Arc<UringPlane>,
    n: usize,
    size: usize,
) -> (Vec<(TcpStream, TcpStream)>, Vec<tokio::task::JoinHandle<Outcome>>) {
    let mut ends = Vec::new();
    let mut relays = Vec::new();
    for _ in 0..n {
        let (mut client, mut backend, tunnel) = setup(b"", b"", LONG).await;
        let p = plane.clone();
        relays.push(tokio::spawn(async move { relay(&p, tunnel).await }));
        client.write_all(&vec![7u8; size]).await.unwrap();
        assert_eq!(read_exact_n(&mut backend, size).await, vec![7u8; size]);
        backend.write_all(&vec![9u8; size]).await.unwrap();
        assert_eq!(read_exact_n(&mut client, size).await, vec![9u8; size]);
        ends.push((client, backend));
    }
    (ends, relays)
}

async fn relay(plane: &UringPlane, t: Tunnel) -> Outcome {
    match plane.relay(t).await {
        Ok(o) => o,
        Err(r) => panic!("uring rejected the tunnel: {}", r.reason),
    }
}

/// Reads until EOF or error, bounded; returns what ended the stream.
async fn read_end(s: &mut TcpStream) -> io::Result<usize> {
    let mut buf = [0u8; 4096];
    let mut total = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await {
            Ok(Ok(0)) => return Ok(total),
            Ok(Ok(n)) => total += n,
            Ok(Err(e)) => return Err(e),
            Err(_) => break,
        }
    }
    Err(io::Error::new(io::ErrorKind::TimedOut, "no end of stream"))
}

async fn read_exact_n(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).await.expect("read_exact");
    buf
}

const MIB: usize = 1024 * 1024;
const LONG: Duration = Duration::from_secs(60);

#[test]
fn probe_gives_a_clear_answer() {
    match UringPlane::probe() {
        Ok(()) => println!("uring probe: ok"),
        Err(why) => {
            let why = upsplice::dataplane::error::chain(&why);
            assert!(!why.is_empty());
            println!("uring probe: {why}");
        }
    }
}

#[test]
fn bulk_64mib_both_directions_checksummed() {
    run(Duration::from_secs(120), |plane| async move {
        let (client, backend, tunnel) = setup(b"", b"", LONG).await;
        let (mut cr, mut cw) = client.into_split();
        let (mut br, mut bw) = backend.into_split();
        let total = 64 * MIB;
        let up_send = tokio::spawn(async move { send_stream(&mut cw, 1, total).await });
        let down_send = tokio::spawn(async move { send_stream(&mut bw, 2, total).await });
        let up_recv = tokio::spawn(async move { recv_stream(&mut br).await });
        let down_recv = tokio::spawn(async move { recv_stream(&mut cr).await });
        let outcome = relay(&plane, tunnel).await;
        let (up_sent, down_sent) = (up_send.await.unwrap(), down_send.await.unwrap());
        let (up_n, up_got) = up_recv.await.unwrap();
        let (down_n, down_got) = down_recv.await.unwrap();
        assert_eq!(up_n, total);
        assert_eq!(down_n, total);
        assert_eq!(up_sent, up_got, "client → backend bytes differ");
        assert_eq!(down_sent, down_got, "backend → client bytes differ");
        assert_eq!(outcome.reason, CloseReason::Done);
        assert_eq!(outcome.to_backend, total as u64);
        assert_eq!(outcome.to_client, total as u64);
        let (b, c) = plane.bytes_relayed();
        assert_eq!((b, c), (total as u64, total as u64));
    });
}

#[test]
fn half_close_client_first() {
    run(LONG, |plane| async move {
        let (mut client, mut backend, tunnel) = setup(b"", b"", LONG).await;
        let relayed = tokio::spawn(async move { relay(&plane, tunnel).await });
        client.write_all(b"request").await.unwrap();
        client.shutdown().await.unwrap();
        // The backend sees the bytes and then EOF...
        assert_eq!(read_exact_n(&mut backend, 7).await, b"request");
        assert_eq!(read_end(&mut backend).await.unwrap(), 0);
        // ...while the other direction keeps flowing.
        for _ in 0..3 {
            backend.write_all(b"reply").await.unwrap();
            assert_eq!(read_exact_n(&mut client, 5).await, b"reply");
        }
        backend.shutdown().await.unwrap();
        assert_eq!(read_end(&mut client).await.unwrap(), 0);
        let o = relayed.await.unwrap();
        assert_eq!(o.reason, CloseReason::Done);
        assert_eq!((o.to_backend, o.to_client), (7, 15));
    });
}

#[test]
fn half_close_backend_first() {
    run(LONG, |plane| async move {
        let (mut client, mut backend, tunnel) = setup(b"", b"", LONG).await;
        let relayed = tokio::spawn(async move { relay(&plane, tunnel).await });
        backend.write_all(b"bye").await.unwrap();
        backend.shutdown().await.unwrap();
        assert_eq!(read_exact_n(&mut client, 3).await, b"bye");
        assert_eq!(read_end(&mut client).await.unwrap(), 0);
        for _ in 0..3 {
            client.write_all(b"more").await.unwrap();
            assert_eq!(read_exact_n(&mut backend, 4).await, b"more");
        }
        client.shutdown().await.unwrap();
        assert_eq!(read_end(&mut backend).await.unwrap(), 0);
        let o = relayed.await.unwrap();
        assert_eq!(o.reason, CloseReason::Done);
        assert_eq!((o.to_backend, o.to_client), (12, 3));
    });
}

/// Closes `s` with an RST.
fn reset(s: TcpStream) {
    socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO)).unwrap();
    drop(s);
}

#[test]
fn client_reset_resets_backend() {
    run(LONG, |plane| async move {
        let (mut client, mut backend, tunnel) = setup(b"", b"", LONG).await;
        let relayed = tokio::spawn(async move { relay(&plane, tunnel).await });
        client.write_all(b"x").await.unwrap();
        assert_eq!(read_exact_n(&mut backend, 1).await, b"x");
        reset(client);
        let end = read_end(&mut backend).await;
        assert_eq!(
            end.map_err(|e| e.kind()),
            Err(io::ErrorKind::ConnectionReset),
            "the backend must see an RST, not a clean EOF"
        );
        assert_eq!(relayed.await.unwrap().reason, CloseReason::ClientReset);
    });
}

#[test]
fn backend_reset_resets_client() {
    run(LONG, |plane| async move {
        let (mut client, backend, tunnel) = setup(b"", b"", LONG).await;
        let relayed = tokio::spawn(async move { relay(&plane, tunnel).await });
        // Give the worker a moment to arm its recvs, then reset.
        tokio::time::sleep(Duration::from_millis(50)).await;
        reset(backend);
        let end = read_end(&mut client).await;
        assert_eq!(end.map_err(|e| e.kind()), Err(io::ErrorKind::ConnectionReset));
        assert_eq!(relayed.await.unwrap().reason, CloseReason::BackendReset);
    });
}

#[test]
fn backend_speaks_first_from_leftover() {
    run(LONG, |plane| async move {
        // The backend's first message arrived with its 101 (in `to_client`)
        // and it now waits for the client before saying anything else.
        let (mut client, mut backend, tunnel) = setup(b"", b"hello from backend", LONG).await;
        let relayed = tokio::spawn(async move { relay(&plane, tunnel).await });
        let got = tokio::time::timeout(Duration::from_secs(5), read_exact_n(&mut client, 18))
            .await
            .expect("leftover delivered without further backend traffic");
        assert_eq!(got, b"hello from backend");
        client.write_all(b"hi").await.unwrap();
        assert_eq!(read_exact_n(&mut backend, 2).await, b"hi");
        backend.write_all(b"!").await.unwrap();
        assert_eq!(read_exact_n(&mut client, 1).await, b"!");
        client.shutdown().await.unwrap();
        backend.shutdown().await.unwrap();
        let o = relayed.await.unwrap();
        assert_eq!(o.reason, CloseReason::Done);
        assert_eq!((o.to_backend, o.to_client), (2, 19));
    });
}

#[test]
fn pipelined_leftover_goes_first_in_order() {
    run(LONG, |plane| async move {
        let (mut client, mut backend, tunnel) = setup(b"pipelined-1|", b"", LONG).await;
        // The client keeps sending right away; its bytes must come after.
        client.write_all(b"live-2|").await.unwrap();
        let relayed = tokio::spawn(async move { relay(&plane, tunnel).await });
        client.write_all(b"live-3").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        backend.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"pipelined-1|live-2|live-3");
        backend.shutdown().await.unwrap();
        assert_eq!(read_end(&mut client).await.unwrap(), 0);
        assert_eq!(relayed.await.unwrap().reason, CloseReason::Done);
    });
}

#[test]
fn idle_timeout_closes_and_activity_extends_it() {
    run(LONG, |plane| async move {
        let idle = Duration::from_millis(300);
        let (mut client, mut backend, tunnel) = setup(b"", b"", idle).await;
        let started = Instant::now();
        let relayed = tokio::spawn(async move { relay(&plane, tunnel).await });
        // Traffic every 100 ms for 900 ms keeps it open.
        for _ in 0..9 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            client.write_all(b".").await.unwrap();
            assert_eq!(read_exact_n(&mut backend, 1).await, b".");
        }
        assert!(!relayed.is_finished(), "closed while active");
        let o = relayed.await.unwrap();
        let took = started.elapsed();
        assert_eq!(o.reason, CloseReason::Idle);
        assert!(took >= Duration::from_millis(1150), "closed early: {took:?}");
        assert!(took < Duration::from_secs(5), "closed late: {took:?}");
        assert!(read_end(&mut client).await.is_ok_and(|n| n == 0));
        assert!(read_end(&mut backend).await.is_ok_and(|n| n == 0));
    });
}

#[test]
fn unrepresentable_idle_timeout_means_none() {
    run(LONG, |plane| async move {
        let (mut client, mut backend, tunnel) = setup(b"", b"", Duration::MAX).await;
        let relayed = tokio::spawn(async move { relay(&plane, tunnel).await });
        client.write_all(b"q").await.unwrap();
        assert_eq!(read_exact_n(&mut backend, 1).await, b"q");
        client.shutdown().await.unwrap();
        backend.shutdown().await.unwrap();
        assert_eq!(read_end(&mut client).await.unwrap(), 0);
        assert_eq!(relayed.await.unwrap().reason, CloseReason::Done);
    });
}

#[test]
fn drain_closes_at_once() {
    run(LONG, |plane| async move {
        let (mut client, mut backend, tunnel) = setup(b"", b"", LONG).await;
        let drain = tunnel.drain.clone();
        let relayed = tokio::spawn(async move { relay(&plane, tunnel).await });
        client.write_all(b"ab").await.unwrap();
        assert_eq!(read_exact_n(&mut backend, 2).await, b"ab");
        let fired = Instant::now();
        drain.cancel();
        let o = relayed.await.unwrap();
        assert!(fired.elapsed() < Duration::from_secs(1));
        assert_eq!(o.reason, CloseReason::Drain);
        assert_eq!(o.to_backend, 2);
        // Both sides see the stream cut short: reset, never a FIN that
        // would make it look complete.
        assert_reset(read_end(&mut client).await);
        assert_reset(read_end(&mut backend).await);
    });
}

/// The end of a stream the router cut short: a reset.
fn assert_reset(end: io::Result<usize>) {
    assert!(matches!(&end, Err(e) if e.kind() == io::ErrorKind::ConnectionReset), "expected a reset, got {end:?}");
}

fn rss_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("status");
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).expect("VmRSS");
    let kib: usize = line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("VmRSS value");
    kib * 1024
}

fn fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").expect("fds").count()
}

#[test]
fn backpressure_with_stalled_reader_stays_bounded() {
    run(Duration::from_secs(90), |plane| async move {
        let (client, mut backend, tunnel) = setup(b"", b"", LONG).await;
        let rss_before = rss_bytes();
        let plane = std::sync::Arc::new(plane);
        let p = plane.clone();
        let relayed = tokio::spawn(async move { relay(&p, tunnel).await });
        // The backend does not read. Write until no progress for 1 s (at
        // most 1 GiB), counting and hashing exactly what was accepted.
        let mut seed = 7;
        let mut h = Sha256::new();
        let mut chunk = Vec::new();
        let mut off = chunk.len();
        let mut written = 0usize;
        let mut peak_rss = rss_before;
        let mut progress = Instant::now();
        while written < 1024 * MIB && progress.elapsed() < Duration::from_secs(1) {
            if off == chunk.len() {
                chunk = pattern(seed, MIB);
                seed += 1;
                off = 0;
                peak_rss = peak_rss.max(rss_bytes());
            }
            if tokio::time::timeout(Duration::from_millis(200), client.writable()).await.is_err() {
                continue;
            }
            match client.try_write(&chunk[off..]) {
                Ok(n) => {
                    h.update(&chunk[off..off + n]);
                    off += n;
                    written += n;
                    progress = Instant::now();
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("write: {e}"),
            }
        }
        peak_rss = peak_rss.max(rss_bytes());
        let grew = peak_rss.saturating_sub(rss_before);
        println!(
            "stalled reader: {} KiB accepted before the writer blocked; RSS grew {} KiB",
            written / 1024,
            grew / 1024
        );
        assert!(written < 256 * MIB, "writer never blocked: {written} bytes");
        let (_, pool_peak) = plane.buffered_bytes();
        let queued = plane.queued_peak();
        println!("stalled reader: at most {} KiB queued, in pool buffers of {} KiB", queued / 1024, pool_peak / 1024);
        assert!(queued <= plane.direction_limit(), "queued {queued} bytes for one stalled direction");
        // Each completion takes a whole buffer, however few bytes it carries;
        // here the writer's 1 MiB writes arrive as 64 KiB loopback segments,
        // half a buffer each.
        assert!(pool_peak <= 2 * plane.direction_limit(), "held {pool_peak} bytes of pool buffers");
        assert!(grew < 16 * MIB, "router memory grew by {grew} bytes");
        // Resume reading: everything accepted arrives intact.
        let mut client = client;
        client.shutdown().await.unwrap();
        let (got, hash) = recv_stream(&mut backend).await;
        assert_eq!(got, written);
        assert_eq!(hash, <[u8; 32]>::from(h.finalize()));
        backend.shutdown().await.unwrap();
        let o = relayed.await.unwrap();
        assert_eq!(o.reason, CloseReason::Done);
        assert_eq!(o.to_backend, written as u64);
    });
}

#[test]
fn exhausted_buffer_pool_recovers_without_loss() {
    use futures_util::future::join_all;
    // One worker: 256 pool buffers of 64 KiB. 64 tunnels whose backends do
    // not read want more than that, so recvs run out of buffers (ENOBUFS)
    // and must resume once buffers come back.
    run_with(1, Duration::from_secs(120), |plane| async move {
        let n = 64;
        let per = 2 * MIB;
        let mut relays = Vec::new();
        let mut writers = Vec::new();
        let mut backends = Vec::new();
        let plane = std::sync::Arc::new(plane);
        for i in 0..n {
            let (client, backend, tunnel) = setup(b"", b"", LONG).await;
            // Small kernel buffers on the backend leg, so the bytes pile
            // up in the worker rather than in socket buffers.
            socket2::SockRef::from(&tunnel.backend).set_send_buffer_size(16 * 1024).unwrap();
            socket2::SockRef::from(&backend).set_recv_buffer_size(16 * 1024).unwrap();
            let p = plane.clone();
            relays.push(tokio::spawn(async move { relay(&p, tunnel).await }));
            writers.push(tokio::spawn(async move {
                let (_r, mut w) = client.into_split();
                send_stream(&mut w, i as u64 + 100, per).await
            }));
            backends.push(backend);
        }
        // Let the writers fill every buffer on the way.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (held, _) = plane.buffered_bytes();
        println!("pool exhaustion: {} KiB of pool buffers held", held / 1024);
        assert!(held >= 12 * MIB, "the pool was not exhausted: {held} bytes held");
        assert!(held <= 16 * MIB);
        // Meanwhile a fresh tunnel on the same worker still moves bytes
        // both ways (through heap buffers while the pool is empty).
        let (mut client, mut backend, tunnel) = setup(b"", b"", LONG).await;
        let p = plane.clone();
        let fresh = tokio::spawn(async move { relay(&p, tunnel).await });
        let started = Instant::now();
        let payload = pattern(99, 200 * 1024);
        let (c_w, c_r) = tokio::join!(client.write_all(&payload), async {
            let mut got = vec![0u8; payload.len()];
            backend.read_exact(&mut got).await.map(|_| got)
        });
        c_w.unwrap();
        assert!(c_r.unwrap() == payload, "fresh tunnel corrupted bytes");
        backend.write_all(b"still alive").await.unwrap();
        assert_eq!(read_exact_n(&mut client, 11).await, b"still alive");
        println!(
            "pool exhaustion: a fresh tunnel moved 200 KiB + a reply in {:?} ({} heap recvs so far)",
            started.elapsed(),
            plane.heap_recvs()
        );
        assert!(plane.heap_recvs() > 0, "the heap path was not taken");
        assert!(started.elapsed() < Duration::from_secs(10));
        client.shutdown().await.unwrap();
        backend.shutdown().await.unwrap();
        assert_eq!(fresh.await.unwrap().reason, CloseReason::Done);
        let readers = backends.into_iter().map(|mut b| {
            tokio::spawn(async move {
                let r = recv_stream(&mut b).await;
                b.shutdown().await.unwrap();
                r
            })
        });
        let got = join_all(readers).await;
        let sent = join_all(writers).await;
        for (i, (g, s)) in got.into_iter().zip(sent).enumerate() {
            let (len, hash) = g.unwrap();
            assert_eq!(len, per, "tunnel {i}");
            assert_eq!(hash, s.unwrap(), "tunnel {i}");
        }
        for r in join_all(relays).await {
            assert_eq!(r.unwrap().reason, CloseReason::Done);
        }
        assert_eq!(plane.buffered_bytes().0, 0, "buffers not returned");
    });
}

/// While a worker's pool is empty, a quiet tunnel holds no heap buffer and
/// a burst of small messages over many tunnels costs heap memory in
/// proportion to the bytes waiting, not a 16 KiB buffer per direction (the
/// router's RSS once grew by ~16 KiB per tunnel when 9,000 tunnels closed
/// at once).
#[test]
fn empty_pool_costs_what_waits() {
    use futures_util::future::join_all;
    // One worker with 16 buffers of 1 MiB; a stalled direction queues up
    // to 2 MiB, in at least 2 buffers: 8 of them take the whole pool.
    let cfg = Settings { uring_workers: 1, uring_buffer: MIB as u64, ..Settings::default() };
    run_cfg(cfg, Duration::from_secs(60), |plane| async move {
        let plane = std::sync::Arc::new(plane);
        let per = 3 * MIB;
        let mut stalled = Vec::new();
        for i in 0..8 {
            let (client, backend, tunnel) = setup(b"", b"", LONG).await;
            socket2::SockRef::from(&tunnel.backend).set_send_buffer_size(16 * 1024).unwrap();
            socket2::SockRef::from(&backend).set_recv_buffer_size(16 * 1024).unwrap();
            let p = plane.clone();
            let relayed = tokio::spawn(async move { relay(&p, tunnel).await });
            let writer = tokio::spawn(async move {
                let (_r, mut w) = client.into_split();
                send_stream(&mut w, 7 + i, per).await
            });
            stalled.push((backend, writer, relayed));
        }
        // Wait until the stalled directions hold still: every pool buffer,
        // plus what they read into heap buffers since (up to their bound).
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut held = (0, usize::MAX);
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let now = (plane.buffered_bytes().0, plane.heap_buffered_bytes().0);
            if now == held && now.0 == 16 * MIB {
                break;
            }
            assert!(Instant::now() < deadline, "the pool was not exhausted: {now:?} bytes held");
            held = now;
        }
        let stalled_heap = held.1;

        // Fresh tunnels on the empty pool: a message each way, then quiet.
        let n = 200;
        let (mut ends, relays) = open_after_one_message(&plane, n, 64).await;
        let heap_recvs = plane.heap_recvs();
        let deadline = Instant::now() + Duration::from_secs(2);
        while plane.heap_buffered_bytes().0 > stalled_heap && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let quiet = plane.heap_buffered_bytes().0 - stalled_heap;
        println!(
            "{n} quiet tunnels on an empty pool: {quiet} bytes of heap buffers ({stalled_heap} more for the \
             stalled directions), {heap_recvs} heap recvs"
        );
        assert!(heap_recvs >= 2 * n, "the tunnels did not read without the pool ({heap_recvs} heap recvs)");
        assert_eq!(quiet, 0, "quiet tunnels hold heap buffers");

        // A burst: every tunnel gets 64 bytes each way at once.
        for (c, b) in &mut ends {
            c.write_all(&[1u8; 64]).await.unwrap();
            b.write_all(&[2u8; 64]).await.unwrap();
        }
        for (c, b) in &mut ends {
            assert_eq!(read_exact_n(b, 64).await, [1u8; 64]);
            assert_eq!(read_exact_n(c, 64).await, [2u8; 64]);
        }
        let (_, peak) = plane.heap_buffered_bytes();
        println!("a burst of 64-byte messages over {n} tunnels: heap buffers peaked at {peak} bytes");
        assert!(peak <= stalled_heap + 2 * n * 64, "heap buffers peaked at {peak} bytes");

        for (mut c, mut b) in ends {
            c.shutdown().await.unwrap();
            b.shutdown().await.unwrap();
        }
        for r in join_all(relays).await {
            assert_eq!(r.unwrap().reason, CloseReason::Done);
        }
        // The stalled streams arrive whole once their readers read.
        let readers = stalled.into_iter().map(|(mut backend, writer, relayed)| async move {
            socket2::SockRef::from(&backend).set_recv_buffer_size(MIB).unwrap();
            let (len, hash) = recv_stream(&mut backend).await;
            backend.shutdown().await.unwrap();
            assert_eq!(len, per);
            assert_eq!(hash, writer.await.unwrap());
            assert_eq!(relayed.await.unwrap().reason, CloseReason::Done);
        });
        join_all(readers).await;
        assert_eq!(plane.heap_buffered_bytes().0, 0, "heap buffers not freed");
        assert_eq!(plane.buffered_bytes().0, 0, "buffers not returned");
    });
}

#[test]
fn idle_tunnels_hold_no_pool_buffer() {
    use futures_util::future::join_all;
    run(Duration::from_secs(60), |plane| async move {
        let n = 400;
        let plane = std::sync::Arc::new(plane);
        let rss0 = rss_bytes();
        let (ends, relays) = open_after_one_message(&plane, n, 3000).await;
        // The worker may still be reaping the last sends' completions.
        let deadline = Instant::now() + Duration::from_secs(2);
        while plane.buffered_bytes().0 > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (held, _) = plane.buffered_bytes();
        let grew = rss_bytes().saturating_sub(rss0);
        println!(
            "{n} idle tunnels: {held} bytes of pool buffers held; process RSS grew {} KiB \
             ({} bytes per tunnel, including the test's own 2 sockets and task each)",
            grew / 1024,
            grew / n
        );
        assert_eq!(held, 0, "idle tunnels hold pool buffers");
        // Close them all: every relay reports a clean end.
        for (mut c, mut b) in ends {
            c.shutdown().await.unwrap();
            b.shutdown().await.unwrap();
        }
        for r in join_all(relays).await {
            assert_eq!(r.unwrap().reason, CloseReason::Done);
        }
    });
}

/// One short tunnel: a leftover, a ping-pong, then (by `i % 3`) a clean
/// close, a client reset or a drain.
async fn short_tunnel(plane: &UringPlane, i: usize) {
    let (mut client, mut backend, tunnel) = setup(b"hi", b"", LONG).await;
    let drain = tunnel.drain.clone();
    let app = async {
        client.write_all(b"ping").await.unwrap();
        assert_eq!(read_exact_n(&mut backend, 6).await, b"hiping");
        backend.write_all(b"pong").await.unwrap();
        assert_eq!(read_exact_n(&mut client, 4).await, b"pong");
        match i % 3 {
            0 => {
                client.shutdown().await.unwrap();
                backend.shutdown().await.unwrap();
                assert_eq!(read_end(&mut client).await.unwrap(), 0);
                assert_eq!(read_end(&mut backend).await.unwrap(), 0);
                drop((client, backend));
                CloseReason::Done
            }
            1 => {
                reset(client);
                assert!(read_end(&mut backend).await.is_err());
                CloseReason::ClientReset
            }
            _ => {
                drain.cancel();
                assert_reset(read_end(&mut client).await);
                CloseReason::Drain
            }
        }
    };
    let (outcome, expected) = tokio::join!(relay(plane, tunnel), app);
    assert_eq!(outcome.reason, expected, "tunnel {i}");
}

#[test]
fn churn_returns_fds_and_memory_to_baseline() {
    use futures_util::stream::{self, StreamExt};
    run(Duration::from_secs(180), |plane| async move {
        // Warm up: runtime, allocator and the workers' pools.
        stream::iter(0..96).for_each_concurrent(32, |i| short_tunnel(&plane, i)).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (fd0, rss0) = (fd_count(), rss_bytes());
        let n = 3000;
        let started = Instant::now();
        stream::iter(0..n).for_each_concurrent(64, |i| short_tunnel(&plane, i)).await;
        let took = started.elapsed();
        // The workers give their pool pages back after 1 s without tunnels.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (fd1, rss1) = (fd_count(), rss_bytes());
        println!("churn: {n} tunnels in {took:?}; fds {fd0} -> {fd1}; RSS {} KiB -> {} KiB", rss0 / 1024, rss1 / 1024);
        assert!(fd1 <= fd0, "leaked fds: {fd0} -> {fd1}");
        assert!(rss1 <= rss0 + 8 * MIB, "memory did not return: {rss0} -> {rss1}");
    });
}

#[test]
fn dropped_relay_future_closes_the_tunnel() {
    run(LONG, |plane| async move {
        let fd0 = fd_count();
        let (mut client, mut backend, tunnel) = setup(b"", b"", LONG).await;
        let relayed = tokio::time::timeout(Duration::from_millis(200), relay(&plane, tunnel)).await;
        assert!(relayed.is_err(), "an open tunnel does not end by itself");
        // Dropping the future cancelled the tunnel on its worker: a
        // stream cut short, reset on both sides.
        assert_reset(read_end(&mut client).await);
        assert_reset(read_end(&mut backend).await);
        drop((client, backend));
        let deadline = Instant::now() + Duration::from_secs(5);
        while fd_count() > fd0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(fd_count() <= fd0, "the worker still holds the sockets");
    });
}
