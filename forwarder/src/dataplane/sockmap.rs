//! `sockmap`: an eBPF `sk_skb` stream_verdict program (`ebpf/`) redirects
//! each tunnel's bytes from the socket they arrive on to its peer's egress,
//! inside the kernel: userspace never reads or writes the payload, and an
//! idle tunnel holds no userspace buffer.
//!
//! What this relies on (kernel ≥ 6.12.34, 6.15.3 or 6.16; measured on 6.18):
//! FIN handling of sockmap sockets (6.4), and the fixes for data loss on
//! EAGAIN and the linearize panic (CVE-2025-38165). [`SockmapPlane::probe`]
//! checks it.
//!
//! * [`kernel`]: the loaded program and its maps, loaded once per plane,
//!   and the events thread (one epoll set for every tunnel's sockets);
//! * [`deadlines`]: every tunnel's idle deadline, which the events thread
//!   waits on (no timer per idle tunnel);
//! * [`tunnel`]: one tunnel along its life (handoff, watch, stepping
//!   aside, teardown), a module each;
//! * [`sys`]: socket calls (cookies, TCP_INFO, queues, kick).
//!
//! [`SockmapPlane::start`] runs a self-test through the real program before
//! the plane is used: a loopback tunnel with leftovers both ways and a
//! backend that speaks first; `auto` falls back when it fails.
//!
//! Bounds: a tunnel whose queues grow past `sockmap_queue_limit` (or past
//! one budget while the plane's node-wide bound is exceeded) steps aside:
//! it leaves the maps and goes on through the next plane
//! (`tunnel/step_aside.rs`). Repeated heads: TCP may queue a segment whose
//! head it already received, and the verdict gets whole segments, so the
//! program cuts repeated heads off by TCP sequence number (`trim_repeat` in
//! `ebpf/src/main.rs`; counted as `upsplice_sockmap_trimmed_bytes_total`),
//! or, if it cannot, the tunnel is reset.
//!
//! `auto` does not pick this plane for now (`dataplane::SOCKMAP_NOT_AUTO`).
//!
//! Measured (release, loopback, 2 cores shared with other builds): one echo
//! tunnel saturated both ways carries 2–3.4 GB in 3 s through this plane
//! (stepping aside within milliseconds), about as much as splice and copy
//! in the same test.

pub mod deadlines;
pub mod kernel;
pub mod sys;
pub mod tunnel;

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use upsplice_common::{DIR_TO_BACKEND, DIR_TO_CLIENT, MAX_SOCKETS, STATS_FAILED, STATS_TRIMMED};

use self::kernel::Kernel;
use self::tunnel::{Limits, NodeHeld, Shared, StepAsides, UserBytes};
use super::{CloseReason, DataPlane, Mode, Outcome, PlaneError, Rejected, Settings, Tunnel};

/// The compiled eBPF object, or why there is none.
fn object() -> Result<&'static [u8], PlaneError> {
    #[cfg(upsplice_ebpf)]
    {
        Ok(aya::include_bytes_aligned!(env!("UPSPLICE_EBPF_OBJECT")))
    }
    #[cfg(not(upsplice_ebpf))]
    {
        Err(PlaneError::Unsupported(format!("eBPF program not built: {}", env!("UPSPLICE_EBPF_MISSING"))))
    }
}

fn kernel_supported() -> Result<(), PlaneError> {
    let release =
        std::fs::read_to_string("/proc/sys/kernel/osrelease").map_err(PlaneError::io("reading the kernel release"))?;
    let release = release.trim();
    let mut parts = release.split(|c: char| !c.is_ascii_digit()).map(|p| p.parse::<u32>().unwrap_or(0));
    let (major, minor, patch) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    let ok = (major, minor) >= (6, 16)
        || ((major, minor) == (6, 15) && patch >= 3)
        || ((major, minor) == (6, 12) && patch >= 34);
    if ok {
        Ok(())
    } else {
        Err(PlaneError::Unsupported(format!("kernel {release} lacks sockmap fixes (needs 6.12.34+, 6.15.3+ or 6.16+)")))
    }
}

fn capable() -> Result<(), PlaneError> {
    const CAP_NET_ADMIN: u32 = 12;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/self/status").map_err(PlaneError::io("reading capabilities"))?;
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or_else(|| PlaneError::Unsupported("no CapEff in /proc/self/status".into()))?;
    let has = |cap: u32| eff & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_NET_ADMIN)) {
        Ok(())
    } else {
        Err(PlaneError::Unsupported("needs CAP_BPF and CAP_NET_ADMIN (or CAP_SYS_ADMIN)".into()))
    }
}

pub struct SockmapPlane {
    /// Boxed: the loaded object is large and `Plane` holds planes inline.
    kernel: Box<Kernel>,
    /// Bounds, totals and counters every tunnel shares.
    shared: Shared,
}

impl DataPlane for SockmapPlane {
    const MODE: Mode = Mode::Sockmap;

    /// Whether this kernel and build can run the sockmap plane: the eBPF object
    /// is compiled in, the kernel has the sockmap fixes, and the process may
    /// load sk_skb programs (CAP_BPF and CAP_NET_ADMIN, or CAP_SYS_ADMIN).
    fn probe() -> Result<(), PlaneError> {
        object()?;
        kernel_supported()?;
        capable()
    }

    /// Loads and attaches the program, then runs the self-test.
    fn start(cfg: &Settings) -> Result<Self, PlaneError> {
        SockmapPlane::probe()?;
        let kernel = Box::new(Kernel::load(object()?, MAX_SOCKETS)?);
        // A tunnel steps aside for its rate only where a plane takes it
        // back for that (`adaptive` promoted it from splice).
        let demote_rate = if cfg.mode == Mode::Adaptive { cfg.demote_rate } else { 0 };
        let limits = Limits::new(cfg.sockmap_queue_limit).with_demotion(demote_rate, cfg.promote_after);
        let shared = Shared {
            limits,
            user: UserBytes::default(),
            node: NodeHeld::new(cfg.sockmap_node_limit, kernel.registry.clone()),
            step_asides: StepAsides::default(),
            draining: AtomicBool::new(false),
        };
        tracing::debug!(
            per_tunnel = limits.per_tunnel(),
            node_limit = cfg.sockmap_node_limit,
            "sockmap: memory bounds (bytes)"
        );
        let plane = SockmapPlane { kernel, shared };
        plane.self_test().map_err(|e| PlaneError::SelfTest(format!("sockmap self-test failed: {e}")))?;
        Ok(plane)
    }

    fn startup_report(&self) -> String {
        "passed its own self-test (leftovers both ways, backend speaks first, FIN both ways)".into()
    }

    /// Relays `t` in the kernel until it ends; hands it back when its
    /// sockets cannot join the sockmap, or when it steps aside.
    ///
    /// [`tunnel::relay`]'s future itself, not an `async fn` around it,
    /// which would keep room for `t` beside it for the tunnel's life.
    fn relay(&self, t: Tunnel) -> impl Future<Output = Result<Outcome, Rejected>> + Send {
        tunnel::relay(&self.kernel, &self.shared, t)
    }

    /// Ends every tunnel: each is woken through its signal and sees the
    /// flag (a tunnel's own drain token is read whenever it wakes, but
    /// nothing waits on it).
    fn drain(&self) {
        self.shared.draining.store(true, Ordering::Release);
        kernel::wake_all(&self.kernel.registry);
    }

    /// Bytes relayed by all tunnels so far: the per-CPU counters of the
    /// program plus what userspace wrote itself (leftovers at handoff).
    fn bytes_relayed(&self) -> (u64, u64) {
        (
            self.kernel.stats(DIR_TO_BACKEND).bytes + self.shared.user.to_backend.load(Ordering::Relaxed),
            self.kernel.stats(DIR_TO_CLIENT).bytes + self.shared.user.to_client.load(Ordering::Relaxed),
        )
    }
}

impl SockmapPlane {
    /// Of [`Self::bytes_relayed`], the bytes userspace wrote itself:
    /// leftovers, and bytes carried while a tunnel stepped aside.
    pub fn bytes_by_userspace(&self) -> (u64, u64) {
        (self.shared.user.to_backend.load(Ordering::Relaxed), self.shared.user.to_client.load(Ordering::Relaxed))
    }

    /// Segments redirected (to backend, to client) and bytes the kernel
    /// refused to redirect (peer socket gone), from the per-CPU counters.
    pub fn kernel_counters(&self) -> (u64, u64, u64) {
        (
            self.kernel.stats(DIR_TO_BACKEND).segments,
            self.kernel.stats(DIR_TO_CLIENT).segments,
            self.kernel.stats(STATS_FAILED).bytes,
        )
    }

    /// Repeated bytes the program cut off the head of segments so far: TCP
    /// queued a retransmission that overlapped bytes already relayed (see
    /// `trim_repeat` in `ebpf/src/main.rs`).
    pub fn bytes_trimmed(&self) -> u64 {
        self.kernel.stats(STATS_TRIMMED).bytes
    }

    /// Idle deadlines set now: one per tunnel being watched.
    pub fn idle_deadlines(&self) -> usize {
        self.kernel.deadlines.count()
    }

    /// Tunnels that stepped aside so far: (handed to the next plane with
    /// every byte accounted for, reset because that could not be done).
    pub fn step_asides(&self) -> (u64, u64) {
        let s = &self.shared.step_asides;
        (s.handed_over.load(Ordering::Relaxed), s.reset.load(Ordering::Relaxed))
    }

    /// Bytes all tunnels hold now (kernel queues and userspace buffers),
    /// against the node-wide bound.
    pub fn held(&self) -> (u64, u64) {
        (self.shared.node.total.load(Ordering::Relaxed), self.shared.node.limit)
    }

    /// What one tunnel can make the node hold at most (both directions,
    /// on top of its sockets' own TCP buffers).
    pub fn per_tunnel_bound(&self) -> u64 {
        self.shared.limits.per_tunnel()
    }

    /// A loopback tunnel through the real program: leftovers both ways,
    /// bytes the backend sent before the handoff and then waits (the stall
    /// case), a reply, and a half-close each way. Runs on its own thread and
    /// runtime so that `start` works inside and outside a tokio runtime.
    fn self_test(&self) -> Result<(), String> {
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| format!("self-test runtime: {e}"))?;
                    rt.block_on(async {
                        tokio::time::timeout(Duration::from_secs(5), self.self_test_run())
                            .await
                            .map_err(|_| "self-test timed out".to_string())?
                    })
                })
                .join()
                .map_err(|_| "self-test panicked".to_string())?
        })
    }

    async fn self_test_run(&self) -> Result<(), String> {
        let err = |what: &'static str| move |e: std::io::Error| format!("{what}: {e}");
        let (mut client_peer, client) = loopback_pair().await.map_err(err("client pair"))?;
        let (mut backend_peer, backend) = loopback_pair().await.map_err(err("backend pair"))?;
        // The backend speaks first, before the handoff, then waits.
        backend_peer.write_all(b"backend-first;").await.map_err(err("backend write"))?;
        let t = Tunnel {
            client,
            backend,
            to_backend: Bytes::from_static(b"pipelined;"),
            to_client: Bytes::from_static(b"after-101;"),
            idle_timeout: Duration::from_secs(5),
            drain: CancellationToken::new(),
            promote: None,
        };
        let relay = self.relay(t);
        let exchange = async {
            let mut got = vec![0u8; 24];
            client_peer.read_exact(&mut got).await.map_err(err("client read"))?;
            if got != b"after-101;backend-first;" {
                return Err(format!("client got {:?}", String::from_utf8_lossy(&got)));
            }
            client_peer.write_all(b"ping").await.map_err(err("client write"))?;
            let mut got = vec![0u8; 14];
            backend_peer.read_exact(&mut got).await.map_err(err("backend read"))?;
            if got != b"pipelined;ping" {
                return Err(format!("backend got {:?}", String::from_utf8_lossy(&got)));
            }
            client_peer.shutdown().await.map_err(err("client FIN"))?;
            backend_peer.shutdown().await.map_err(err("backend FIN"))?;
            let mut rest = Vec::new();
            backend_peer.read_to_end(&mut rest).await.map_err(err("backend EOF"))?;
            client_peer.read_to_end(&mut rest).await.map_err(err("client EOF"))?;
            if !rest.is_empty() {
                return Err(format!("{} unexpected bytes", rest.len()));
            }
            Ok::<(), String>(())
        };
        let (outcome, exchanged) = tokio::join!(relay, exchange);
        let outcome = outcome.map_err(|r| format!("tunnel refused: {}", r.reason))?;
        exchanged.map_err(|e| format!("{e} (tunnel ended: {outcome:?})"))?;
        if outcome.reason != CloseReason::Done || outcome.to_backend != 14 || outcome.to_client != 24 {
            return Err(format!("unexpected outcome {outcome:?}"));
        }
        Ok(())
    }
}

/// A connected loopback pair: (the far end, the end a tunnel holds).
async fn loopback_pair() -> std::io::Result<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let (far, near) = tokio::join!(TcpStream::connect(addr), listener.accept());
    Ok((far?, near?.0))
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use upsplice_common::{PeerEntry, PEER_BROKEN};

    use super::*;

    const RELAY_FUTURE_MAX: usize = 768;

    /// The relay future, boxed by `Plane::relay`, stays for an idle
    /// tunnel's whole life: the watch's state, never the tunnel beside it
    /// (1,432 bytes before, in a release build). Measured by type: making
    /// one needs a loaded plane (root and BPF).
    #[test]
    fn an_idle_tunnel_s_relay_future_is_small() {
        fn size<'p, F: Future>(_relay: impl FnOnce(&'p SockmapPlane, Tunnel) -> F) -> usize {
            std::mem::size_of::<F>()
        }
        let size = size(<SockmapPlane as DataPlane>::relay);
        eprintln!("sockmap relay future: {size} bytes");
        assert!(size <= RELAY_FUTURE_MAX, "the sockmap relay future is {size} bytes (at most {RELAY_FUTURE_MAX})");
    }

    /// A socket the program marked broken (a repeated head it could not cut
    /// off) loses its bytes in the kernel; the plane must then reset both
    /// sides, never pass the gap on as if the stream were whole. The flag is
    /// set here by hand: the real cause is an allocation failing inside
    /// `bpf_skb_adjust_room`.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_broken_stream_resets_both_sides() {
        if let Err(why) = SockmapPlane::probe() {
            eprintln!("SKIPPED: sockmap unavailable: {}", crate::dataplane::error::chain(&why));
            return;
        }
        let plane = SockmapPlane::start(&Settings::default()).expect("sockmap plane starts");
        let (mut client_peer, client) = loopback_pair().await.unwrap();
        let (mut backend_peer, backend) = loopback_pair().await.unwrap();
        let client_cookie = sys::cookie(client.as_raw_fd()).unwrap();
        let t = Tunnel {
            client,
            backend,
            to_backend: Bytes::new(),
            to_client: Bytes::new(),
            idle_timeout: Duration::from_secs(30),
            drain: CancellationToken::new(),
            promote: None,
        };
        let relay = plane.relay(t);
        let scenario = async {
            // Relayed while whole.
            client_peer.write_all(b"whole;").await.unwrap();
            let mut got = [0u8; 6];
            backend_peer.read_exact(&mut got).await.unwrap();
            assert_eq!(&got, b"whole;");
            let entry = plane.kernel.peer(client_cookie);
            plane.kernel.pair(client_cookie, PeerEntry { flags: entry.flags | PEER_BROKEN, ..entry }).unwrap();
            let _ = client_peer.write_all(b"lost").await;
            // Both peers see the tunnel reset, and nothing of "lost" arrives.
            let mut rest = Vec::new();
            let backend_end = backend_peer.read_to_end(&mut rest).await;
            assert!(rest.is_empty(), "bytes after the break reached the backend: {rest:?}");
            let mut buf = [0u8; 16];
            let client_end = client_peer.read(&mut buf).await;
            (backend_end, client_end)
        };
        let (outcome, (backend_end, client_end)) =
            tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(relay, scenario) })
                .await
                .expect("in time");
        let Ok(outcome) = outcome else { panic!("the plane refused the tunnel") };
        assert_eq!(outcome.reason, CloseReason::Error, "{outcome:?}");
        assert_eq!(backend_end.map_err(|e| e.kind()).err(), Some(std::io::ErrorKind::ConnectionReset));
        assert_eq!(client_end.map_err(|e| e.kind()).err(), Some(std::io::ErrorKind::ConnectionReset));
    }
}
