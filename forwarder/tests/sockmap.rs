//! The sockmap data plane through its library API: loopback socket pairs,
//! a `Tunnel`, `SockmapPlane::relay`. Every test is skipped, saying why,
//! when `SockmapPlane::probe()` says this build or kernel cannot run the plane.
//!
//! Regression tests for the three failure modes reproduced on this kernel
//! (`docs/kernels.md`, "sockmap"; the handoff steps in
//! `forwarder/src/dataplane/sockmap/tunnel/handoff.rs` say which step prevents
//! which): `bytes_queued_before_handoff_*` (stall and deadlock),
//! `fin_right_after_bulk_*` (FIN race) and `stalled_reader_*` (unbounded
//! psock queue).
//!
//! The plane's throughput and CPU against copy is a benchmark:
//! `cargo bench -p upsplice-benches --bench bulk`.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::plane::{recv_stream, send_stream, setup, stream_bytes};
use common::{check_offset_words, offset_words, pattern};
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;

use upsplice::dataplane::copy::CopyPlane;
use upsplice::dataplane::sockmap::SockmapPlane;
use upsplice::dataplane::{CloseReason, Mode, Outcome, Tunnel};
use upsplice::dataplane::{DataPlane, Settings};

const MIB: usize = 1024 * 1024;
/// Idle timeout of the tests' tunnels: longer than any test.
const IDLE: Duration = Duration::from_secs(30);

fn plane_with(cfg: &Settings) -> Option<SockmapPlane> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    if let Err(why) = SockmapPlane::probe() {
        let why = upsplice::dataplane::error::chain(&why);
        eprintln!("SKIPPED: sockmap unavailable: {why}");
        return None;
    }
    let cfg = Settings { mode: Mode::Sockmap, ..cfg.clone() };
    Some(SockmapPlane::start(&cfg).expect("sockmap plane starts"))
}

fn plane() -> Option<SockmapPlane> {
    plane_with(&Settings::default())
}

/// Reads to EOF; returns everything received.
async fn recv_all(mut s: impl AsyncReadExt + Unpin) -> Vec<u8> {
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("recv");
    out
}

/// Where `got` first departs from `want`, and how (for failure messages):
/// a gap (bytes lost), a repeat (bytes sent twice) or a truncation.
fn divergence(want: &[u8], got: &[u8]) -> Option<String> {
    if want == got {
        return None;
    }
    let at = want.iter().zip(got).position(|(a, b)| a != b).unwrap_or(want.len().min(got.len()));
    let (wl, gl) = (want.len(), got.len());
    if at == gl {
        return Some(format!("truncated at {at} of {wl}"));
    }
    // Does the stream resume later in `want` (a gap) or earlier (a repeat)?
    let probe = &got[at..(at + 64).min(gl)];
    let found = want.windows(probe.len()).position(|w| w == probe);
    Some(match found {
        Some(p) if p > at => format!("gap of {} bytes at {at} (received {gl} of {wl})", p - at),
        Some(p) => format!("repeat of {} bytes at {at} (received {gl} of {wl})", at - p),
        None => format!("garbage at {at} (received {gl} of {wl})"),
    })
}

/// Hash of `prefix` followed by what `send_stream(seed, len)` sends.
fn expected(prefix: &[u8], seed: u64, len: usize) -> [u8; 32] {
    Sha256::digest(stream_bytes(prefix, seed, len)).into()
}

/// Relays `t` on `plane`; a tunnel the plane hands back — it stepped aside
/// (a direction reached the queue bound), or a socket could not join the
/// maps (it got FIN meanwhile) — goes on through the copy plane, as the
/// dispatcher's chain would carry it, and the outcome counts both planes'
/// bytes.
async fn relay(plane: &SockmapPlane, t: Tunnel) -> Outcome {
    relay_parts(plane, t).await.0
}

/// [`relay`], and the bytes (to backend, to client) sockmap carried itself.
async fn relay_parts(plane: &SockmapPlane, t: Tunnel) -> (Outcome, (u64, u64)) {
    match plane.relay(t).await {
        Ok(outcome) => (outcome, (outcome.to_backend, outcome.to_client)),
        Err(rejected) => {
            eprintln!("sockmap handed the tunnel on: {}", rejected.reason);
            let copy = CopyPlane::new(&Settings::default());
            let mut outcome = copy.relay(rejected.tunnel).await.expect("copy takes every tunnel");
            outcome.to_backend += rejected.relayed.0;
            outcome.to_client += rejected.relayed.1;
            (outcome, rejected.relayed)
        }
    }
}

/// Local TCP sockets of this process's namespace in CLOSE_WAIT on `port`.
fn close_wait_on(port: u16) -> usize {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() > 3 && f[1].rsplit(':').next() == Some(&format!("{port:04X}")) && f[3] == "08"
        })
        .count()
}

/// Where the plane can run, `auto` still does not pick it (see
/// `SOCKMAP_NOT_AUTO`); uring (or splice) leads, with the per-tunnel
/// fallbacks behind it.
#[test]
fn auto_leaves_sockmap_out() {
    use upsplice::dataplane::{DataPlanes, Mode, AUTO_ORDER};
    assert!(!AUTO_ORDER.contains(&Mode::Sockmap));
    let planes = DataPlanes::start(&Settings::default()).unwrap();
    assert_ne!(planes.mode(), Mode::Sockmap);
}

#[test]
fn starts_and_self_tests() {
    let Some(plane) = plane() else { return };
    let (up, down) = plane.bytes_relayed();
    assert!(up >= 14 && down >= 24, "self-test bytes counted: {up} {down}");
}

/// Leftovers go first, then bytes the peers had already queued in the
/// kernel, then bytes sent while the handoff runs — both ways, at full speed.
///
/// Regressions, both seen in this test on a loaded machine: (1) the
/// handoff read exactly `SIOCINQ` bytes while a new segment was coalesced
/// into the last queued one, so the verdict sent its first part again;
/// (2) a read returned 0 at FIN while passed bytes still waited in the
/// psock backlog behind the other direction's bytes, and the tunnel passed
/// FIN on without them (the stream cut off 1–3 MB early); (3) a source
/// that got FIN after the plane had passed FIN the other way is in
/// TCP_CLOSE, not TIME_WAIT, and its FIN was not counted: the exactness
/// check at the step-aside found one byte too many and reset the tunnel
/// (about one run in ten beside the conformance suite).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_first_then_everything_in_order_at_full_speed() {
    let Some(plane) = plane() else { return };
    for round in 0..3u64 {
        let head_up = pattern(100 + round, 3000);
        let head_down = pattern(200 + round, 5000);
        let (client_peer, backend_peer, t) = setup(&head_up, &head_down, IDLE).await;
        let (c_rd, c_wr) = client_peer.into_split();
        let (b_rd, b_wr) = backend_peer.into_split();
        let len = 16 * MIB;
        // Both peers start sending before the handoff and keep going.
        let up_tx = tokio::spawn(send_stream(c_wr, 1 + round, len));
        let down_tx = tokio::spawn(send_stream(b_wr, 2 + round, len));
        tokio::time::sleep(Duration::from_millis(5)).await;
        let up_rx = tokio::spawn(recv_all(b_rd));
        let down_rx = tokio::spawn(recv_all(c_rd));
        let outcome = timeout(Duration::from_secs(30), relay(&plane, t)).await.expect("tunnel ends");
        up_tx.await.unwrap();
        down_tx.await.unwrap();
        let (up, down) = (up_rx.await.unwrap(), down_rx.await.unwrap());
        let (up_len, down_len) = (up.len(), down.len());
        let up_diff = divergence(&stream_bytes(&head_up, 1 + round, len), &up);
        let down_diff = divergence(&stream_bytes(&head_down, 2 + round, len), &down);
        assert!(
            up_diff.is_none() && down_diff.is_none(),
            "round {round}: {outcome:?}; to backend: {up_diff:?}; to client: {down_diff:?}"
        );
        assert_eq!(outcome.reason, CloseReason::Done);
        assert_eq!(outcome.to_backend as usize, up_len);
        assert_eq!(outcome.to_client as usize, down_len);
    }
}

/// Regression (stall): the backend sends one message right after its 101
/// (queued in the kernel before the handoff) and then waits for the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_queued_before_handoff_are_not_stalled() {
    if shared_plane().is_none() {
        return;
    }
    for _ in 0..10 {
        let (mut client_peer, mut backend_peer, t) = setup(b"", b"HTTP-101-tail;", IDLE).await;
        backend_peer.write_all(b"hello").await.unwrap();
        // Let the segment land in the tunnel socket's receive queue.
        tokio::time::sleep(Duration::from_millis(10)).await;
        let relay = tokio::spawn(async move { plane_relay_owned(t).await });
        let mut got = [0u8; 19];
        timeout(Duration::from_secs(2), client_peer.read_exact(&mut got))
            .await
            .expect("the backend's first message arrives without more traffic")
            .unwrap();
        assert_eq!(&got, b"HTTP-101-tail;hello");
        client_peer.write_all(b"reply").await.unwrap();
        let mut got = [0u8; 5];
        timeout(Duration::from_secs(2), backend_peer.read_exact(&mut got)).await.expect("reply").unwrap();
        assert_eq!(&got, b"reply");
        drop(client_peer);
        drop(backend_peer);
        let outcome = timeout(Duration::from_secs(5), relay).await.expect("ends").unwrap();
        assert_eq!(outcome.to_client, 19);
    }
}

/// Relays on the shared plane (for spawned tasks that need 'static).
async fn plane_relay_owned(t: Tunnel) -> Outcome {
    relay(shared_plane().expect("checked by the caller"), t).await
}

/// One plane for the tests that spawn relays; None when unavailable.
fn shared_plane() -> Option<&'static SockmapPlane> {
    static PLANE: std::sync::OnceLock<Option<SockmapPlane>> = std::sync::OnceLock::new();
    PLANE.get_or_init(plane).as_ref()
}

/// Regression (found by the conformance suite): the control plane read
/// only part of a segment (its head buffer ended mid-segment); the verdict
/// reads whole segments, so without care the part already read (and
/// handed over as leftovers) reaches the backend twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partly_read_segment_is_not_sent_twice() {
    let Some(plane) = plane() else { return };
    for round in 0..5u64 {
        let (mut client_peer, backend_peer, mut t) = setup(b"", b"", IDLE).await;
        let request = pattern(300 + round, 60_000);
        // One write: on loopback one segment (64 KiB MSS).
        client_peer.write_all(&request).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        // Like the control plane: read a "head" of 1000 bytes, keep it as leftover.
        let mut head = vec![0u8; 1000];
        t.client.read_exact(&mut head).await.unwrap();
        t.to_backend = Bytes::from(head);
        tokio::spawn(async move {
            // The client closes once the tunnel is up.
            tokio::time::sleep(Duration::from_millis(100)).await;
            drop(client_peer);
        });
        let (outcome, (got, hash)) = timeout(Duration::from_secs(10), async {
            tokio::join!(relay(&plane, t), async {
                let (rd, wr) = backend_peer.into_split();
                drop(wr);
                recv_stream(rd).await
            })
        })
        .await
        .expect("ends");
        assert_eq!(got, request.len(), "bytes at the backend");
        assert!(hash == <[u8; 32]>::from(Sha256::digest(&request)), "content");
        assert_eq!(outcome.to_backend as usize, request.len());
    }
}

/// Regression (deadlock): the backend filled the tunnel socket's receive
/// buffer before the handoff, so no new segment can arrive to wake the
/// verdict; everything must still go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_queued_before_handoff_fill_the_buffer_and_still_flow() {
    let Some(plane) = plane() else { return };
    let (client_peer, backend_peer, t) = setup(b"", b"", IDLE).await;
    let len = 8 * MIB;
    let (_b_rd, b_wr) = backend_peer.into_split();
    let tx = tokio::spawn(send_stream(b_wr, 7, len));
    // Until the backend is blocked: the tunnel socket's buffer is full.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!tx.is_finished(), "8 MiB should not fit in socket buffers");
    // recv drops the client peer after EOF, which closes the other way.
    let (outcome, (got, hash)) =
        timeout(Duration::from_secs(20), async { tokio::join!(relay(&plane, t), recv_stream(client_peer)) })
            .await
            .expect("all queued bytes arrive (no deadlock)");
    tx.await.unwrap();
    assert_eq!(got, len);
    assert_eq!(hash, expected(b"", 7, len));
    assert_eq!(outcome.reason, CloseReason::Done);
    assert_eq!(outcome.to_client as usize, len);
}

/// Regression (FIN race): the client sends a large burst and FIN at once;
/// FIN must reach the backend after the last byte, not before. Then the
/// backend still answers through the half-closed tunnel, and nothing is
/// left in CLOSE_WAIT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fin_right_after_bulk_loses_nothing_and_half_close_works() {
    let Some(plane) = plane() else { return };
    for round in 0..3u64 {
        let (client_peer, mut backend_peer, t) = setup(b"", b"", IDLE).await;
        let ports = (t.client.local_addr().unwrap().port(), t.backend.local_addr().unwrap().port());
        let (mut c_rd, c_wr) = client_peer.into_split();
        let len = 64 * MIB;
        let tx = tokio::spawn(send_stream(c_wr, 10 + round, len));
        let backend_side = async move {
            // Read everything up to FIN, then answer and close.
            let mut hash = Sha256::new();
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0;
            loop {
                let n = backend_peer.read(&mut buf).await.expect("backend read");
                if n == 0 {
                    break;
                }
                hash.update(&buf[..n]);
                total += n;
            }
            let answer = pattern(99, MIB);
            backend_peer.write_all(&answer).await.expect("answer");
            backend_peer.shutdown().await.unwrap();
            (total, <[u8; 32]>::from(hash.finalize()))
        };
        let client_side = async move {
            let mut got = Vec::new();
            c_rd.read_to_end(&mut got).await.expect("client read");
            got
        };
        let (outcome, (total, hash), answer) =
            timeout(Duration::from_secs(30), async { tokio::join!(relay(&plane, t), backend_side, client_side) })
                .await
                .expect("tunnel ends");
        tx.await.unwrap();
        assert_eq!(total, len, "every byte before FIN arrived");
        assert_eq!(hash, expected(b"", 10 + round, len));
        assert!(answer == pattern(99, MIB), "the other way kept flowing: got {} bytes of {}", answer.len(), MIB);
        assert_eq!(outcome.reason, CloseReason::Done);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(close_wait_on(ports.0) + close_wait_on(ports.1), 0);
    }
}

/// Every close order ends the tunnel promptly: client first, backend
/// first, backend reset (as the conformance suite's fd test does, 60 times).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_close_order_ends_the_tunnel() {
    let Some(plane) = shared_plane() else { return };
    for i in 0..60 {
        let (mut client, mut server, t) = setup(b"", b"", IDLE).await;
        let relay = tokio::spawn(async move { relay(plane, t).await });
        client.write_all(b"data").await.unwrap();
        let mut buf = [0u8; 4];
        server.read_exact(&mut buf).await.unwrap();
        match i % 3 {
            0 => {
                drop(client);
                let mut rest = Vec::new();
                let _ = server.read_to_end(&mut rest).await;
                drop(server);
            }
            1 => {
                drop(server);
                let mut rest = Vec::new();
                let _ = client.read_to_end(&mut rest).await;
                drop(client);
            }
            _ => {
                socket2::SockRef::from(&server).set_linger(Some(Duration::ZERO)).unwrap();
                drop(server);
                let mut rest = Vec::new();
                let _ = client.read_to_end(&mut rest).await;
            }
        }
        let outcome = timeout(Duration::from_secs(3), relay)
            .await
            .unwrap_or_else(|_| panic!("round {i} (case {}): the tunnel did not end", i % 3))
            .unwrap();
        assert_eq!(outcome.to_backend, 4, "round {i}");
    }
}

/// A reset from one side resets the other (a truncated stream must not
/// look complete).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_is_propagated() {
    let Some(plane) = plane() else { return };
    for client_resets in [true, false] {
        let (mut client_peer, mut backend_peer, t) = setup(b"", b"", IDLE).await;
        let relay = plane.relay(t);
        let drive = async {
            client_peer.write_all(b"abc").await.unwrap();
            let mut got = [0u8; 3];
            backend_peer.read_exact(&mut got).await.unwrap();
            let (resetter, survivor) =
                if client_resets { (client_peer, backend_peer) } else { (backend_peer, client_peer) };
            socket2::SockRef::from(&resetter).set_linger(Some(Duration::ZERO)).unwrap();
            drop(resetter);
            let mut survivor = survivor;
            let mut buf = [0u8; 16];
            let r = timeout(Duration::from_secs(5), survivor.read(&mut buf)).await.expect("survivor hears about it");
            assert!(
                matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
                "survivor got {r:?}, not a reset"
            );
        };
        let (outcome, ()) = timeout(Duration::from_secs(10), async { tokio::join!(relay, drive) }).await.expect("ends");
        let outcome = outcome.unwrap_or_else(|r| panic!("rejected: {}", r.reason));
        let want = if client_resets { CloseReason::ClientReset } else { CloseReason::BackendReset };
        assert_eq!(outcome.reason, want);
    }
}

/// A socket that already received FIN cannot join a sockmap: the tunnel is
/// handed back untouched and the copy plane relays it, leftovers included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_that_got_fin_is_rejected_untouched_and_falls_back() {
    let Some(plane) = plane() else { return };
    let (mut client_peer, mut backend_peer, t) = setup(b"pipelined", b"tail", IDLE).await;
    client_peer.write_all(b"+more").await.unwrap();
    client_peer.shutdown().await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let rejected = match plane.relay(t).await {
        Ok(outcome) => panic!("relayed a socket with FIN: {outcome:?}"),
        Err(r) => r,
    };
    assert!(rejected.reason.contains("client"), "reason: {}", rejected.reason);
    let t = rejected.tunnel;
    assert_eq!(&t.to_backend[..], b"pipelined");
    assert_eq!(&t.to_client[..], b"tail");
    let copy = CopyPlane::new(&Settings::default());
    let backend_side = async {
        let mut got = Vec::new();
        backend_peer.read_to_end(&mut got).await.unwrap();
        backend_peer.write_all(b"bye").await.unwrap();
        backend_peer.shutdown().await.unwrap();
        got
    };
    let client_side = async {
        let mut got = Vec::new();
        client_peer.read_to_end(&mut got).await.unwrap();
        got
    };
    let (outcome, to_backend, to_client) =
        timeout(Duration::from_secs(5), async { tokio::join!(copy.relay(t), backend_side, client_side) })
            .await
            .expect("copy plane relays it");
    let outcome = outcome.expect("copy takes every tunnel");
    assert_eq!(to_backend, b"pipelined+more");
    assert_eq!(to_client, b"tailbye");
    assert_eq!(outcome.reason, CloseReason::Done);
}

/// The third (maximum) field of /proc/sys/net/ipv4/{name}.
fn tcp_buffer_max(name: &str) -> usize {
    std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
        .ok()
        .and_then(|v| v.split_whitespace().nth(2)?.parse().ok())
        .unwrap_or(8 * MIB)
}

/// Tests that fill TCP buffers node-wide take turns. Fifty saturated
/// tunnels measure what the node holds, and beside another test's stalled
/// readers (64 MB and more in receive queues autotuned up to `tcp_rmem[2]`)
/// the machine came near `tcp_mem`'s pressure line, where TCP drops
/// segments and backs a connection off to multi-second RTOs: a tunnel of
/// the test then looked hung for a minute (seen once in CI). A production
/// node sizes `tcp_mem` for its tunnels; a test binary shares one kernel.
async fn memory_heavy() -> tokio::sync::MutexGuard<'static, ()> {
    static TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    TURN.lock().await
}

fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Regression (no backpressure): with the backend not reading, a fast
/// client must be stopped by flow control after a bounded amount, not fill
/// the kernel; once the backend reads, every byte arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_reader_is_bounded_and_resumes() {
    let _turn = memory_heavy().await;
    let cfg = Settings { sockmap_queue_limit: 4 * MIB as u64, ..Settings::default() };
    let Some(plane) = plane_with(&cfg) else {
        return;
    };
    let plane = std::sync::Arc::new(plane);
    let (client_peer, backend_peer, t) = setup(b"", b"", IDLE).await;
    let (c_rd, mut c_wr) = client_peer.into_split();
    let mem_before = mem_available_kib();
    let stall = Duration::from_secs(3);
    let (stall_end_tx, stall_end_rx) = tokio::sync::oneshot::channel();
    let writer = tokio::spawn(async move {
        let mut stall_end_tx = Some(stall_end_tx);
        // Write as fast as possible for the whole stall, then a bit more.
        // The stream is `chunk` repeated, whatever the write sizes.
        let chunk = pattern(5, 256 * 1024);
        let mut offset = 0;
        let mut written = 0usize;
        let start = Instant::now();
        let mut at_stall_end = None;
        while start.elapsed() < stall + Duration::from_secs(2) {
            if at_stall_end.is_none() && start.elapsed() >= stall {
                at_stall_end = Some(written);
                if let Some(tx) = stall_end_tx.take() {
                    let _ = tx.send(written);
                }
            }
            match timeout(Duration::from_millis(50), c_wr.write(&chunk[offset..])).await {
                Ok(Ok(n)) => {
                    written += n;
                    offset = (offset + n) % chunk.len();
                }
                Ok(Err(e)) => panic!("client write: {e}"),
                Err(_) => {} // blocked by flow control
            }
        }
        c_wr.shutdown().await.unwrap();
        let mut hash = Sha256::new();
        let mut left = written;
        while left > 0 {
            let n = left.min(chunk.len());
            hash.update(&chunk[..n]);
            left -= n;
        }
        (written, at_stall_end.unwrap_or(written), <[u8; 32]>::from(hash.finalize()))
    });
    let relay = tokio::spawn({
        let plane = plane.clone();
        async move { relay(&plane, t).await }
    });
    tokio::time::sleep(stall - Duration::from_millis(200)).await;
    let mem_stalled = mem_available_kib();
    let during_stall = stall_end_rx.await.expect("writer reached the end of the stall");
    // What TCP itself may buffer (the client's send buffer, the tunnel
    // sockets' receive/send buffers, the backend's receive buffer, all at
    // their sysctl maximum) plus a few times the queue limit (pause lag and
    // the receive queue flushed at resume). Without the bound the client
    // wrote 1.4–1.8 GB in 4 s (release build).
    let bound = 2 * tcp_buffer_max("tcp_rmem") + 2 * tcp_buffer_max("tcp_wmem") + 3 * 4 * MIB;
    assert!(during_stall < bound, "client wrote {during_stall} bytes into a stalled tunnel (bound {bound})");
    let (received, hash) =
        timeout(Duration::from_secs(30), recv_stream(backend_peer)).await.expect("everything arrives after the stall");
    let (written, _, sent_hash) = writer.await.unwrap();
    drop(c_rd);
    let grown_mib = mem_before.saturating_sub(mem_stalled) / 1024;
    eprintln!(
        "stalled reader: client wrote {} MiB during a {:?} stall, MemAvailable fell {} MiB (machine-wide, noisy); {} MiB in total",
        during_stall / MIB,
        stall,
        grown_mib,
        written / MIB
    );
    assert_eq!(received, written, "bytes received vs written");
    assert!(hash == sent_hash, "stream content differs");
    // recv dropped the backend peer after EOF: the tunnel ends cleanly.
    let outcome = timeout(Duration::from_secs(5), relay).await.expect("tunnel ends").unwrap();
    assert_eq!(outcome.reason, CloseReason::Done);
    assert_eq!(outcome.to_backend as usize, written);
}

/// No byte either way for `idle_timeout` closes the tunnel; bytes moving
/// (counted by the kernel) keep it open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_timeout_counts_kernel_bytes() {
    let Some(plane) = plane() else { return };
    let (mut client_peer, mut backend_peer, mut t) = setup(b"", b"", IDLE).await;
    t.idle_timeout = Duration::from_millis(300);
    let start = Instant::now();
    let relay = plane.relay(t);
    let traffic = async {
        // Keep it busy for 1.2 s, four idle timeouts' worth.
        for i in 0..12u8 {
            client_peer.write_all(&[i]).await.unwrap();
            let mut b = [0u8; 1];
            backend_peer.read_exact(&mut b).await.unwrap();
            assert_eq!(b[0], i);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let (outcome, ()) = timeout(Duration::from_secs(5), async { tokio::join!(relay, traffic) }).await.expect("ends");
    let outcome = outcome.unwrap_or_else(|r| panic!("rejected: {}", r.reason));
    let took = start.elapsed();
    assert_eq!(outcome.reason, CloseReason::Idle);
    assert_eq!(outcome.to_backend, 12);
    assert!(took >= Duration::from_millis(1300) && took < Duration::from_millis(2300), "closed after {took:?}");
}

/// The drain token closes a busy tunnel at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_closes_at_once() {
    let Some(plane) = plane() else { return };
    let (client_peer, backend_peer, t) = setup(b"", b"", IDLE).await;
    let drain = t.drain.clone();
    let (_c_rd, c_wr) = client_peer.into_split();
    let _tx = tokio::spawn(send_stream(c_wr, 3, 1 << 30));
    let rx = tokio::spawn(async move {
        let mut s = backend_peer;
        let mut buf = vec![0u8; 256 * 1024];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 {
                break;
            }
        }
    });
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        drain.cancel();
    });
    let start = Instant::now();
    let outcome = timeout(Duration::from_secs(5), relay(&plane, t)).await.expect("drain ends it");
    let took = start.elapsed();
    assert_eq!(outcome.reason, CloseReason::Drain);
    assert!(outcome.to_backend > 0, "bytes moved before the drain");
    assert!(took < Duration::from_millis(400), "took {took:?}");
    timeout(Duration::from_secs(5), rx).await.expect("backend sees the close").unwrap();
}

/// An idle tunnel waits on nothing but its signal, and keeps its idle
/// deadline in the plane's set: the plane's drain reaches it at once, and
/// its deadline goes with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_plane_s_drain_ends_idle_tunnels_at_once() {
    let Some(plane) = plane() else { return };
    assert_eq!(plane.idle_deadlines(), 0, "the self-test's tunnels left none");
    let mut peers = Vec::new();
    let mut relays = Vec::new();
    for _ in 0..4 {
        let (client_peer, backend_peer, t) = setup(b"", b"", IDLE).await;
        peers.push((client_peer, backend_peer));
        relays.push(plane.relay(t));
    }
    let relays = relays.into_iter().map(|r| async { r.await.unwrap_or_else(|r| panic!("rejected: {}", r.reason)) });
    let drain = async {
        // Past the handoff: each watch waits on its signal alone.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(plane.idle_deadlines(), 4, "one idle deadline per tunnel");
        plane.drain();
        Instant::now()
    };
    let (outcomes, drained_at) =
        timeout(Duration::from_secs(5), async { tokio::join!(futures_util::future::join_all(relays), drain) })
            .await
            .expect("the drain ends every idle tunnel");
    let took = drained_at.elapsed();
    for o in &outcomes {
        assert_eq!(o.reason, CloseReason::Drain);
    }
    assert!(took < Duration::from_millis(200), "ended {took:?} after the drain");
    assert_eq!(plane.idle_deadlines(), 0, "an ended tunnel takes its deadline out");
}

/// 64 MiB each way at once, checksummed; counters agree.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checksummed_64_mib_both_ways() {
    let _turn = memory_heavy().await;
    let Some(plane) = plane() else { return };
    let (before_up, before_down) = plane.bytes_relayed();
    let (client_peer, backend_peer, t) = setup(b"head-up", b"head-down", IDLE).await;
    let (c_rd, c_wr) = client_peer.into_split();
    let (b_rd, b_wr) = backend_peer.into_split();
    let len = 64 * MIB;
    let ((outcome, by_sockmap), _, _, (up_len, up_hash), (down_len, down_hash)) =
        timeout(Duration::from_secs(60), async {
            tokio::join!(
                relay_parts(&plane, t),
                send_stream(c_wr, 41, len),
                send_stream(b_wr, 42, len),
                recv_stream(b_rd),
                recv_stream(c_rd)
            )
        })
        .await
        .expect("64 MiB both ways in time");
    assert_eq!(up_len, len + 7);
    assert_eq!(down_len, len + 9);
    assert_eq!(up_hash, expected(b"head-up", 41, len));
    assert_eq!(down_hash, expected(b"head-down", 42, len));
    assert_eq!(outcome.reason, CloseReason::Done);
    assert_eq!(outcome.to_backend as usize, up_len);
    assert_eq!(outcome.to_client as usize, down_len);
    // The plane's counters hold what it carried itself (all of it, or what
    // it carried before the tunnel stepped aside).
    let (after_up, after_down) = plane.bytes_relayed();
    assert_eq!((after_up - before_up, after_down - before_down), by_sockmap, "per-CPU counters");
}

/// Sends `len` bytes from `tx` to `rx` (256 KiB writes and reads), checking
/// every byte on arrival.
async fn bulk(mut tx: TcpStream, mut rx: TcpStream, len: usize) {
    let sender = tokio::spawn(async move {
        let mut chunk = vec![0u8; 256 * 1024];
        let mut sent = 0;
        while sent < len {
            let n = (len - sent).min(chunk.len());
            offset_words(&mut chunk[..n], sent);
            tx.write_all(&chunk[..n]).await.unwrap();
            sent += n;
        }
        tx.shutdown().await.unwrap();
        tx
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    loop {
        let n = rx.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        if let Err(e) = check_offset_words(&buf[..n], got) {
            panic!("{e} (of {len})");
        }
        got += n;
    }
    assert_eq!(got, len);
    drop(sender.await.unwrap());
}

/// One direction at full speed against a 4 MiB queue bound, so the plane
/// keeps switching between redirecting and passing bytes to userspace, and
/// TCP retransmits (loopback reorders when a socket's transmits move
/// between CPUs). TCP then queues segments whose head it already received
/// — a retransmission merged with new bytes — and the kernel hands the
/// verdict the whole segment: before the program cut such heads off, one
/// 65,483-byte segment arrived twice in most 1 GiB runs (3 of 3 runs of
/// this test failed; 6 of 6 passed after, with trimmed bytes counted).
/// Stops after `UPSPLICE_SUSTAINED_MIB` (default 1024) MiB per round, once
/// a round saw a trimmed segment, or after 3 rounds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sustained_backpressure_keeps_every_byte_once() {
    let _turn = memory_heavy().await;
    let Some(plane) = plane() else { return };
    let mib: usize = std::env::var("UPSPLICE_SUSTAINED_MIB").ok().and_then(|v| v.parse().ok()).unwrap_or(1024);
    for round in 0..3 {
        let trimmed_before = plane.bytes_trimmed();
        let (client_peer, backend_peer, t) = setup(b"", b"", IDLE).await;
        let (_, outcome) = timeout(Duration::from_secs(240), async {
            tokio::join!(bulk(client_peer, backend_peer, mib * MIB), relay(&plane, t))
        })
        .await
        .expect("in time");
        assert_eq!(outcome.to_backend as usize, mib * MIB);
        let trimmed = plane.bytes_trimmed() - trimmed_before;
        eprintln!("round {round}: {mib} MiB intact; {trimmed} repeated bytes trimmed in the kernel");
        if trimmed > 0 {
            break;
        }
    }
}

/// Segments this network namespace's TCP dropped for want of receive room
/// (`RcvPruned` + `TCPRcvQDrop`, /proc/net/netstat): what shrinking a
/// receive buffer below what the peer was offered costs.
fn node_tcp_receive_drops() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else { return 0 };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .filter(|(name, _)| matches!(*name, "RcvPruned" | "TCPRcvQDrop"))
        .filter_map(|(_, v)| v.parse::<u64>().ok())
        .sum()
}

/// Lowest MemAvailable (KiB) seen while `work` runs, sampled every 50 ms.
async fn lowest_mem_available_while<F: std::future::Future>(work: F) -> (u64, F::Output) {
    let mut lowest = mem_available_kib();
    tokio::pin!(work);
    loop {
        tokio::select! {
            out = &mut work => return (lowest, out),
            _ = tokio::time::sleep(Duration::from_millis(50)) => lowest = lowest.min(mem_available_kib()),
        }
    }
}

/// 50 echo tunnels through a router of `mode`, each saturated both ways for
/// 3 s (the client writes flat out, the echo stops reading while its write
/// blocks); returns how far MemAvailable fell below its level before (KiB),
/// the router's /metrics text at the end and the segments the node's TCP
/// dropped for want of receive room meanwhile.
async fn fifty_saturated_echo_tunnels(mode: &str, extra: &str) -> (u64, String, u64) {
    use common::{main_pool, raw_tunnel, RawBackend, Router, Setup};
    const TUNNELS: usize = 50;
    let mut backend = RawBackend::start().await;
    let router = Router::start(Setup {
        mode,
        limits: "idle_timeout = \"1h\"\nconnect_timeout = \"5s\"\nhandshake_timeout = \"5s\"",
        routing: main_pool(&[backend.addr], "app.test"),
        extra,
    });
    let mut pairs = Vec::new();
    for _ in 0..TUNNELS {
        pairs.push(raw_tunnel(&router, &mut backend, "app.test", b"", b"").await);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = mem_available_kib();
    let drops_before = node_tcp_receive_drops();
    let runs: Vec<_> = pairs
        .into_iter()
        .map(|(client, server, _, _)| {
            tokio::spawn(async move {
                let (mut sr, mut sw) = server.into_split();
                let echo = tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n) = sr.read(&mut buf).await {
                        if n == 0 || sw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                    let _ = sw.shutdown().await;
                });
                let (mut cr, mut cw) = client.into_split();
                let writer = tokio::spawn(async move {
                    let chunk = vec![7u8; 64 * 1024];
                    let deadline = Instant::now() + Duration::from_secs(3);
                    let mut sent = 0u64;
                    // Deadline checked before each write too (see `send_for`).
                    while Instant::now() < deadline {
                        let Ok(Ok(n)) = tokio::time::timeout_at(deadline.into(), cw.write(&chunk)).await else {
                            break;
                        };
                        sent += n as u64;
                    }
                    let _ = cw.shutdown().await;
                    sent
                });
                let mut buf = vec![0u8; 256 * 1024];
                let mut got = 0u64;
                let reader = async {
                    while let Ok(n) = cr.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        got += n as u64;
                    }
                };
                let finished = timeout(Duration::from_secs(60), reader).await.is_ok();
                let sent = writer.await.unwrap();
                echo.abort();
                (finished, sent, got)
            })
        })
        .collect();
    let (lowest, results) = lowest_mem_available_while(futures_util::future::join_all(runs)).await;
    let drops = node_tcp_receive_drops().saturating_sub(drops_before);
    for (i, r) in results.into_iter().enumerate() {
        let (finished, sent, got) = r.unwrap();
        if !(finished && sent == got) {
            let log = router.log();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            let metrics = router.admin_get("/metrics").map(|(_, body)| body).unwrap_or_default();
            let sockmap: Vec<&str> = metrics.lines().filter(|l| l.contains("sockmap") && !l.starts_with('#')).collect();
            panic!(
                "{mode}: tunnel {i}: sent {sent}, echoed {got}, finished {finished}\n\
                 segments the node's TCP dropped for want of receive room meanwhile: {drops}\n\
                 metrics: {sockmap:?}\nrouter log, newest first:\n{}",
                tail.join("\n")
            );
        }
    }
    let metrics = router.admin_get("/metrics").map(|(_, body)| body).unwrap_or_default();
    (before.saturating_sub(lowest), metrics, drops)
}

/// The memory bound, node-wide: 50 tunnels saturated both ways make the
/// node hold no more through sockmap than through the copy plane under the
/// same load, plus the documented per-tunnel figure (what redirected bytes
/// may wait in the kernel before a tunnel steps aside) for each, plus a
/// tolerance for this shared machine. Before the step-aside, one such
/// tunnel alone pinned 52 MB in one socket's receive queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_saturated_tunnels_stay_within_the_memory_bound() {
    let _turn = memory_heavy().await;
    let cfg = Settings { sockmap_queue_limit: MIB as u64, ..Settings::default() };
    let Some(plane) = plane_with(&cfg) else { return };
    let per_tunnel_kib = plane.per_tunnel_bound() / 1024;
    drop(plane);
    let (copy_kib, _, copy_drops) = fifty_saturated_echo_tunnels("copy", "").await;
    let (sockmap_kib, metrics, sockmap_drops) =
        fifty_saturated_echo_tunnels("sockmap", "sockmap_queue_limit = \"1MiB\"").await;
    const TOLERANCE_KIB: u64 = 256 * 1024;
    // The documented figure has a second term: what arrives between the
    // crossing and the plane's reaction (README: up to ~20 MB per tunnel
    // at 1.3 GB/s on this loaded 2-core machine). Alone, 50 tunnels took
    // less than copy (714 vs 828 MiB); run beside the other tests, 1963 vs
    // 926 MiB.
    const REACTION_KIB: u64 = 20 * 1024;
    let bound = copy_kib + 50 * (per_tunnel_kib + REACTION_KIB) + TOLERANCE_KIB;
    eprintln!(
        "50 saturated tunnels: MemAvailable fell {} MiB through copy, {} MiB through sockmap (bound {} MiB: copy + 50 × ({} + {}) KiB + {} MiB)",
        copy_kib / 1024,
        sockmap_kib / 1024,
        bound / 1024,
        per_tunnel_kib,
        REACTION_KIB,
        TOLERANCE_KIB / 1024
    );
    // Node-wide counters (other tests run beside this one), so reported,
    // not asserted; a tunnel that stalls after drops fails above.
    eprintln!("segments dropped for want of receive room: {copy_drops} through copy, {sockmap_drops} through sockmap");
    let stepped: Vec<&str> = metrics.lines().filter(|l| l.starts_with("upsplice_sockmap_step_asides_total")).collect();
    eprintln!("{stepped:?}");
    assert!(sockmap_kib <= bound, "sockmap held {sockmap_kib} KiB, bound {bound} KiB");
    assert!(
        stepped.iter().any(|l| l.contains("reset") && l.ends_with(" 0")),
        "no tunnel may be reset for stepping aside: {stepped:?}"
    );
}

/// Writes `seed`'s stream for `for_` as fast as `s` takes it, or until
/// `at_most` bytes went, then FIN; returns (bytes, hash).
/// `pace`: a pause after each write (a paced sender), or none.
async fn send_for(
    mut s: impl AsyncWriteExt + Unpin,
    seed: u64,
    for_: Duration,
    at_most: usize,
    pace: Option<Duration>,
) -> (usize, [u8; 32]) {
    let mut hash = Sha256::new();
    let chunk = pattern(seed, 256 * 1024);
    let deadline = Instant::now() + for_;
    let (mut sent, mut at) = (0, 0);
    // The stream is `chunk` repeated, whatever the write sizes. The
    // deadline is checked before each write as well: `timeout_at` returns a
    // write that is ready at once even past its deadline, so against a
    // reader that keeps up the writer would never stop.
    while Instant::now() < deadline && sent < at_most {
        let end = chunk.len().min(at + (at_most - sent));
        let Ok(Ok(n)) = tokio::time::timeout_at(deadline.into(), s.write(&chunk[at..end])).await else { break };
        hash.update(&chunk[at..at + n]);
        sent += n;
        at = (at + n) % chunk.len();
        if let Some(pause) = pace {
            tokio::time::sleep(pause).await;
        }
    }
    s.shutdown().await.expect("FIN");
    (sent, hash.finalize().into())
}

/// The writer sends everything and its FIN while the reader stalls, so
/// the tunnel steps aside with the FIN already queued behind the bytes;
/// once the reader reads, every byte and then EOF arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stepping_aside_with_the_fin_queued_loses_nothing() {
    let Some(plane) = shared_plane() else { return };
    for round in 0..3u64 {
        let (client_peer, backend_peer, t) = setup(b"", b"", IDLE).await;
        let relay = tokio::spawn(async move { relay(plane, t).await });
        let (c_rd, c_wr) = client_peer.into_split();
        let writer = tokio::spawn(send_for(c_wr, 400 + round, Duration::from_millis(700), usize::MAX, None));
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let mut backend_peer = backend_peer;
        let mut hash = Sha256::new();
        let mut buf = vec![0u8; 256 * 1024];
        let mut len = 0;
        loop {
            match timeout(Duration::from_secs(10), backend_peer.read(&mut buf)).await {
                Ok(Ok(0)) => break,
                Ok(Ok(n)) => {
                    hash.update(&buf[..n]);
                    len += n;
                }
                Ok(Err(e)) => panic!("round {round}: read failed after {len} bytes: {e}"),
                Err(_) => {
                    let (sent, _) = writer.await.unwrap();
                    panic!("round {round}: {len} of {sent} bytes arrived, then nothing for 10 s");
                }
            }
        }
        assert_eq!((len, <[u8; 32]>::from(hash.finalize())), writer.await.unwrap(), "round {round}");
        drop(backend_peer);
        drop(c_rd);
        timeout(Duration::from_secs(10), relay).await.expect("tunnel ends").unwrap();
    }
}

/// Four paced tunnels written for 1.5 s while their readers stall: without
/// node-wide pressure each holds up to its own bound (16 MiB per direction
/// here) before it steps aside; with a 16 MiB node-wide bound, once the sum
/// passes it every tunnel steps aside at one budget (4 MiB), so the plane
/// holds about the bound plus a budget per tunnel. Every byte arrives
/// either way, and no tunnel is reset. (Against full-speed writers the
/// plane's reaction time adds tens of MB per tunnel: README.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_wide_bound_caps_what_tunnels_hold() {
    let _turn = memory_heavy().await;
    let mut held_at = Vec::new();
    for node_limit in [1u64 << 30, 16 * MIB as u64] {
        let cfg =
            Settings { sockmap_queue_limit: 16 * MIB as u64, sockmap_node_limit: node_limit, ..Settings::default() };
        let Some(plane) = plane_with(&cfg) else { return };
        let plane = std::sync::Arc::new(plane);
        let mut relays = Vec::new();
        let mut ends = Vec::new();
        for i in 0..4u64 {
            let (client_peer, backend_peer, t) = setup(b"", b"", IDLE).await;
            let plane = plane.clone();
            relays.push(tokio::spawn(async move { relay(&plane, t).await }));
            let (c_rd, c_wr) = client_peer.into_split();
            // Paced (at most 256 KiB per 12 ms, ~20 MB/s each), so what arrives
            // while the plane reacts stays small next to the bounds tested;
            // 20 MiB each (past the 16 MiB per-direction bound, within what
            // the buffers take without blocking) whatever the pace comes to:
            // a loaded machine stretched the pauses, and by time alone the
            // 1 GiB case was offered too little to reach its per-tunnel
            // bound (8 MiB held instead of 64).
            let pace = Some(Duration::from_millis(12));
            let send = send_for(c_wr, 300 + i, Duration::from_secs(20), 20 * MIB, pace);
            ends.push((tokio::spawn(send), backend_peer, c_rd));
        }
        // The most the plane held, sampled until the writers stopped and the
        // plane had time to react to their last bytes (a fixed moment
        // instead saw less offered than the bounds under a loaded machine).
        let (mut held, mut limit) = (0, 0);
        let mut settled_at = None;
        while settled_at.is_none_or(|at| Instant::now() < at) {
            let (now, l) = plane.held();
            (held, limit) = (held.max(now), l);
            if settled_at.is_none() && ends.iter().all(|(writer, _, _)| writer.is_finished()) {
                settled_at = Some(Instant::now() + Duration::from_millis(300));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let (_, reset) = plane.step_asides();
        eprintln!("node limit {} MiB: at most {} MiB held with every reader stalled", limit >> 20, held >> 20);
        held_at.push(held);
        assert_eq!(reset, 0);
        for (writer, backend_peer, c_rd) in ends {
            let sent = writer.await.unwrap();
            let (len, hash) =
                timeout(Duration::from_secs(60), recv_stream(backend_peer)).await.expect("all bytes arrive");
            assert_eq!((len, hash), sent);
            drop(c_rd);
        }
        for r in relays {
            timeout(Duration::from_secs(10), r).await.expect("tunnel ends").unwrap();
        }
        assert_eq!(plane.step_asides().1, 0, "no tunnel may be reset");
    }
    // One budget (4 MiB) per tunnel past the bound, and a budget per
    // tunnel more for what arrives before the plane reacts.
    let bound = 16 * MIB as u64 + 2 * 4 * 4 * MIB as u64;
    assert!(
        held_at[1] <= bound,
        "with a 16 MiB node-wide bound the plane held {} MiB (bound {} MiB)",
        held_at[1] >> 20,
        bound >> 20
    );
    assert!(held_at[1] < held_at[0], "the node-wide bound changed nothing: {held_at:?}");
}
