//! The startup self-test: a plane carries tunnels only after it relayed a
//! few loopback tunnels correctly on the running kernel.
//!
//! Kernel planes depend on kernel behaviour that differs between versions
//! (io_uring opcode fields, psock queueing), and a version list cannot say
//! what a distribution backported. So each check here drives real tunnels
//! through the plane's own `relay` and compares every byte:
//!
//! * `leftovers`: bytes read past both heads go first, and a backend that
//!   spoke before the handoff and then waits is not stalled;
//! * `bulk_both_ways`: [`BULK`] bytes each way at once while the backend
//!   reads only after a pause (the plane must hold back and resume), every
//!   byte compared;
//! * `half_close_client_first`, `half_close_backend_first`: a FIN goes on
//!   after the bytes before it, and the other direction keeps flowing;
//! * `reset`: a client's RST reaches the backend as an RST.
//!
//! Written once for every plane: it needs only a `relay` function.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::{CloseReason, Outcome, Rejected, Tunnel};

/// Bytes each way in the bulk check: many pool buffers and pipe loads,
/// small enough for a software-emulated VM.
pub const BULK: usize = 2 << 20;

/// How long one check may take (generous for a VM without acceleration;
/// on bare metal each takes milliseconds).
const CHECK_LIMIT: Duration = Duration::from_secs(10);

/// How long the backend leaves the bulk stream unread.
const READ_PAUSE: Duration = Duration::from_millis(200);

/// The result of one check.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub result: Result<(), String>,
}

/// The results of a plane's self-test, check by check.
#[derive(Debug, Clone)]
pub struct Report {
    pub checks: Vec<Check>,
}

impl Report {
    pub fn passed(&self) -> bool {
        !self.checks.is_empty() && self.checks.iter().all(|c| c.result.is_ok())
    }

    /// The checks that failed, with why, or `None` when all passed.
    pub fn failure(&self) -> Option<String> {
        let failed: Vec<String> = self
            .checks
            .iter()
            .filter_map(|c| c.result.as_ref().err().map(|why| format!("{}: {why}", c.name)))
            .collect();
        (!failed.is_empty()).then(|| format!("self-test failed: {}", failed.join("; ")))
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let passed: Vec<&str> = self.checks.iter().filter(|c| c.result.is_ok()).map(|c| c.name).collect();
        write!(f, "self-test passed {}/{}", passed.len(), self.checks.len())?;
        if !passed.is_empty() {
            write!(f, " ({})", passed.join(", "))?;
        }
        if let Some(why) = self.failure() {
            write!(f, "; {why}")?;
        }
        Ok(())
    }
}

/// Runs every check through `relay` on a runtime of its own, on a thread of
/// its own (the caller may be inside a runtime already), and waits for it.
pub fn run_blocking<F, Fut>(relay: F) -> Report
where
    F: Fn(Tunnel) -> Fut + Sync,
    Fut: Future<Output = Result<Outcome, Rejected>>,
{
    on_own_runtime(|| run(&relay))
}

/// Runs the checks `checks` makes on a runtime of their own, on a thread
/// of their own (the caller may be inside a runtime already), and waits.
pub fn on_own_runtime<F, Fut>(checks: F) -> Report
where
    F: FnOnce() -> Fut + Send,
    Fut: Future<Output = Report>,
{
    let failed = |why: String| Report { checks: vec![Check { name: "self-test", result: Err(why) }] };
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => return failed(format!("cannot start its runtime: {e}")),
                };
                rt.block_on(checks())
            })
            .join()
            .unwrap_or_else(|_| failed("panicked".into()))
    })
}

/// Runs every check through `relay`, one after the other.
pub async fn run<F, Fut>(relay: &F) -> Report
where
    F: Fn(Tunnel) -> Fut,
    Fut: Future<Output = Result<Outcome, Rejected>>,
{
    let mut checks = Vec::new();
    checks.push(check("leftovers", leftovers(relay)).await);
    checks.push(check("bulk_both_ways", bulk_both_ways(relay)).await);
    checks.push(check("half_close_client_first", half_close(relay, Side::Client)).await);
    checks.push(check("half_close_backend_first", half_close(relay, Side::Backend)).await);
    checks.push(check("reset", reset(relay)).await);
    Report { checks }
}

/// One check, bounded by [`CHECK_LIMIT`].
pub async fn check(name: &'static str, f: impl Future<Output = Result<(), String>>) -> Check {
    let result = match tokio::time::timeout(CHECK_LIMIT, f).await {
        Ok(r) => r,
        Err(_) => Err(format!("did not finish within {CHECK_LIMIT:?}")),
    };
    Check { name, result }
}

pub fn io_err(what: &'static str) -> impl Fn(std::io::Error) -> String {
    move |e| format!("{what}: {e}")
}

/// A connected loopback pair: (the far end, the end a tunnel holds).
pub async fn loopback_pair() -> Result<(TcpStream, TcpStream), String> {
    let listener = TcpListener::bind("127.0.0.1:0").await.map_err(io_err("bind"))?;
    let addr = listener.local_addr().map_err(io_err("local_addr"))?;
    let (far, near) = tokio::join!(TcpStream::connect(addr), listener.accept());
    Ok((far.map_err(io_err("connect"))?, near.map_err(io_err("accept"))?.0))
}

/// The two application ends and the tunnel between them.
async fn setup(to_backend: &'static [u8], to_client: &'static [u8]) -> Result<(TcpStream, TcpStream, Tunnel), String> {
    let (client_peer, client) = loopback_pair().await?;
    let (backend_peer, backend) = loopback_pair().await?;
    let t = Tunnel {
        client,
        backend,
        to_backend: Bytes::from_static(to_backend),
        to_client: Bytes::from_static(to_client),
        idle_timeout: CHECK_LIMIT,
        drain: CancellationToken::new(),
        promote: None,
    };
    Ok((client_peer, backend_peer, t))
}

/// Relays `t` and runs `peers` beside it; fails with both stories when
/// either side fails, or when the outcome is not `want`.
async fn drive<F, Fut>(
    relay: &F,
    t: Tunnel,
    peers: impl Future<Output = Result<(), String>>,
    want: (CloseReason, Option<(u64, u64)>),
) -> Result<(), String>
where
    F: Fn(Tunnel) -> Fut,
    Fut: Future<Output = Result<Outcome, Rejected>>,
{
    let (outcome, peers) = tokio::join!(relay(t), peers);
    let outcome = outcome.map_err(|r| format!("the plane refused the tunnel: {}", r.reason))?;
    peers.map_err(|e| format!("{e} (tunnel ended {})", outcome.reason.as_str()))?;
    let (reason, bytes) = want;
    if outcome.reason != reason || bytes.is_some_and(|b| b != (outcome.to_backend, outcome.to_client)) {
        return Err(format!(
            "tunnel ended {} with {}/{} bytes to backend/client (expected {}{})",
            outcome.reason.as_str(),
            outcome.to_backend,
            outcome.to_client,
            reason.as_str(),
            bytes.map(|(b, c)| format!(" with {b}/{c}")).unwrap_or_default()
        ));
    }
    Ok(())
}

async fn expect_bytes(s: &mut TcpStream, want: &[u8], who: &'static str) -> Result<(), String> {
    let mut got = vec![0u8; want.len()];
    s.read_exact(&mut got).await.map_err(|e| format!("{who} read: {e}"))?;
    if got != want {
        return Err(format!(
            "{who} got {:?}, expected {:?}",
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(want)
        ));
    }
    Ok(())
}

async fn expect_eof(s: &mut TcpStream, who: &'static str) -> Result<(), String> {
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.map_err(|e| format!("{who} waiting for EOF: {e}"))?;
    if !rest.is_empty() {
        return Err(format!("{who} got {} bytes more than were sent", rest.len()));
    }
    Ok(())
}

async fn leftovers<F, Fut>(relay: &F) -> Result<(), String>
where
    F: Fn(Tunnel) -> Fut,
    Fut: Future<Output = Result<Outcome, Rejected>>,
{
    let (mut client, mut backend, t) = setup(b"pipelined;", b"after-101;").await?;
    // The backend speaks first, before the handoff, then waits.
    backend.write_all(b"backend-first;").await.map_err(io_err("backend write"))?;
    let peers = async {
        expect_bytes(&mut client, b"after-101;backend-first;", "client").await?;
        client.write_all(b"ping").await.map_err(io_err("client write"))?;
        expect_bytes(&mut backend, b"pipelined;ping", "backend").await?;
        client.shutdown().await.map_err(io_err("client FIN"))?;
        backend.shutdown().await.map_err(io_err("backend FIN"))?;
        expect_eof(&mut backend, "backend").await?;
        expect_eof(&mut client, "client").await
    };
    drive(relay, t, peers, (CloseReason::Done, Some((14, 24)))).await
}

/// Deterministic bytes (xorshift64) for stream `seed`: both ends of a test
/// agree on them, and every seed gives another stream. (The integration
/// tests use it too.)
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Reads exactly `want.len()` bytes, then EOF; names the first byte that differs.
async fn read_all_checked(s: &mut tokio::net::tcp::ReadHalf<'_>, want: &[u8], who: &'static str) -> Result<(), String> {
    let mut got = vec![0u8; want.len()];
    let mut n = 0;
    // Bounded by the stream length: every turn reads at least one byte or ends.
    while n < got.len() {
        match s.read(&mut got[n..]).await {
            Ok(0) => return Err(format!("{who}: EOF after {n} of {} bytes", want.len())),
            Ok(k) => n += k,
            Err(e) => return Err(format!("{who}: read after {n} of {} bytes: {e}", want.len())),
        }
    }
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        return Err(format!("{who}: byte {at} of {} differs", want.len()));
    }
    let mut more = [0u8; 1];
    match s.read(&mut more).await {
        Ok(0) => Ok(()),
        Ok(_) => Err(format!("{who}: bytes after the {} sent", want.len())),
        Err(e) => Err(format!("{who}: waiting for EOF: {e}")),
    }
}

async fn bulk_both_ways<F, Fut>(relay: &F) -> Result<(), String>
where
    F: Fn(Tunnel) -> Fut,
    Fut: Future<Output = Result<Outcome, Rejected>>,
{
    let (mut client, mut backend, t) = setup(b"", b"").await?;
    let up = pattern(1, BULK);
    let down = pattern(2, BULK);
    let peers = async {
        let (mut cr, mut cw) = client.split();
        let (mut br, mut bw) = backend.split();
        let send_up = async {
            cw.write_all(&up).await.map_err(io_err("client write"))?;
            cw.shutdown().await.map_err(io_err("client FIN"))
        };
        let send_down = async {
            bw.write_all(&down).await.map_err(io_err("backend write"))?;
            bw.shutdown().await.map_err(io_err("backend FIN"))
        };
        let recv_up = async {
            // The backend does not read for a while: the plane must hold
            // back (its buffers fill) and resume without losing a byte.
            tokio::time::sleep(READ_PAUSE).await;
            read_all_checked(&mut br, &up, "backend").await
        };
        let recv_down = read_all_checked(&mut cr, &down, "client");
        let (a, b, c, d) = tokio::join!(send_up, send_down, recv_up, recv_down);
        a.and(b).and(c).and(d)
    };
    drive(relay, t, peers, (CloseReason::Done, Some((BULK as u64, BULK as u64)))).await
}

#[derive(Clone, Copy)]
enum Side {
    Client,
    Backend,
}

/// One side sends a message and FIN; the other still sends 256 KiB after
/// it saw that FIN, then FIN.
async fn half_close<F, Fut>(relay: &F, first: Side) -> Result<(), String>
where
    F: Fn(Tunnel) -> Fut,
    Fut: Future<Output = Result<Outcome, Rejected>>,
{
    let (client, backend, t) = setup(b"", b"").await?;
    let tail = pattern(3, 256 << 10);
    let (mut a, mut b, a_name, b_name) = match first {
        Side::Client => (client, backend, "client", "backend"),
        Side::Backend => (backend, client, "backend", "client"),
    };
    let peers = async {
        a.write_all(b"last words").await.map_err(|e| format!("{a_name} write: {e}"))?;
        a.shutdown().await.map_err(|e| format!("{a_name} FIN: {e}"))?;
        expect_bytes(&mut b, b"last words", b_name).await?;
        expect_eof(&mut b, b_name).await?;
        // The other way keeps flowing after the FIN.
        b.write_all(&tail).await.map_err(|e| format!("{b_name} write after the FIN: {e}"))?;
        b.shutdown().await.map_err(|e| format!("{b_name} FIN: {e}"))?;
        let (mut ar, _aw) = a.split();
        read_all_checked(&mut ar, &tail, a_name).await
    };
    let (short, long) = (10u64, tail.len() as u64);
    let bytes = match first {
        Side::Client => (short, long),
        Side::Backend => (long, short),
    };
    drive(relay, t, peers, (CloseReason::Done, Some(bytes))).await
}

async fn reset<F, Fut>(relay: &F) -> Result<(), String>
where
    F: Fn(Tunnel) -> Fut,
    Fut: Future<Output = Result<Outcome, Rejected>>,
{
    let (client, mut backend, t) = setup(b"", b"").await?;
    let peers = async {
        let mut client = client;
        client.write_all(b"before").await.map_err(io_err("client write"))?;
        expect_bytes(&mut backend, b"before", "backend").await?;
        // An RST from the client: SO_LINGER 0, then close.
        socket2::SockRef::from(&client).set_linger(Some(Duration::ZERO)).map_err(io_err("client SO_LINGER"))?;
        drop(client);
        let mut buf = [0u8; 16];
        match backend.read(&mut buf).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(format!("backend saw {e}, expected a reset")),
            Ok(0) => Err("backend saw a clean EOF after the client's reset".into()),
            Ok(n) => Err(format!("backend got {n} bytes after the client's reset")),
        }
    };
    drive(relay, t, peers, (CloseReason::ClientReset, None)).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::copy::CopyPlane;
    use crate::dataplane::{DataPlane, Settings};

    /// The copy plane (userspace, no kernel subtleties) passes every check:
    /// the checks themselves are right.
    #[test]
    fn the_copy_plane_passes_every_check() {
        let plane = CopyPlane::new(&Settings::default());
        let report = run_blocking(|t| plane.relay(t));
        assert!(report.passed(), "{report}");
        assert_eq!(report.checks.len(), 5);
    }

    /// A plane that loses bytes fails, and the report names the check.
    #[test]
    fn a_plane_that_drops_a_direction_fails_the_checks_that_need_it() {
        // "Relays" by closing both sockets at once: nothing arrives.
        let report = run_blocking(|t: Tunnel| async move {
            drop(t);
            Ok(Outcome { to_backend: 0, to_client: 0, reason: CloseReason::Done })
        });
        assert!(!report.passed());
        let why = report.failure().expect("a failure");
        assert!(why.contains("leftovers:") && why.contains("bulk_both_ways:"), "{why}");
    }
}
