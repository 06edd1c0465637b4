//! `ktls`: TLS tunnels whose session the kernel carries (kTLS), relayed
//! by splice(2) like plain tunnels.
//!
//! A TLS listener's tunnel is decrypted in userspace by the `tls` relay
//! ([`super::stream`]) unless, once its handshake is done, the session's
//! keys go to the kernel (`crate::tls::ktls::offload`): then the client
//! socket reads plaintext and writes ciphertext by itself, and this plane
//! moves its bytes with the readiness driver of the splice and copy planes
//! ([`super::pair`], with [`super::pair::Sides`] marking the kTLS side).
//! The payload never enters userspace, in either direction.
//!
//! What TLS adds to the data-plane contract is handled in the driver with
//! the helpers here: records that are not application data stop a read,
//! and are read with their type ([`take_control`]): the peer's
//! `close_notify` is its EOF; a TLS 1.2 renegotiation is refused with a
//! `no_renegotiation` warning (as rustls does); a TLS 1.3 `KeyUpdate`
//! cannot be followed (rustls's buffered connection exports keys, not the
//! traffic secrets the next keys derive from; and the kernels tested,
//! 6.1 and 6.12, cannot rekey) and resets the tunnel, logged; any other alert or
//! message resets it. The router's own clean end is `close_notify` then
//! FIN.
//!
//! The plane starts only on a kernel whose behaviour it checked
//! ([`KtlsRelay::start`]): the `tls` ULP with each cipher, then real
//! tunnels through the driver between two loopback sockets given the same
//! keys — bytes both ways through splice, `close_notify` both ways, and a
//! bare FIN passed on as a reset.

pub mod sys;

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use self::sys::{Cipher, CryptoInfo, ALERT, CLOSE_NOTIFY, HANDSHAKE, NO_RENEGOTIATION, WARNING};
use super::pair::{self, Resources, Sides};
use super::pools::{BufferPool, PipePool};
use super::selftest::{self, io_err, loopback_pair};
use super::{ByteCounters, CloseReason, Outcome, PlaneError, Settings, Tunnel};

/// `[data_plane] ktls`: whether TLS tunnels are handed to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KtlsMode {
    /// Where the kernel offers kTLS and the plane's self-test passes;
    /// otherwise TLS tunnels stay on the userspace relay (logged).
    #[default]
    Auto,
    /// Required: the router does not start without it.
    On,
    /// Never: every TLS tunnel runs on the userspace relay.
    Off,
}

impl KtlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            KtlsMode::Auto => "auto",
            KtlsMode::On => "on",
            KtlsMode::Off => "off",
        }
    }
}

/// Where the kernel lists the upper-layer protocols it offers.
const AVAILABLE_ULP: &str = "/proc/sys/net/ipv4/tcp_available_ulp";

/// Whether the kernel lists the `tls` ULP (cheap; no socket is made).
pub fn probe() -> Result<(), PlaneError> {
    probe_at(std::path::Path::new(AVAILABLE_ULP))
}

fn probe_at(path: &std::path::Path) -> Result<(), PlaneError> {
    match std::fs::read_to_string(path) {
        Ok(list) if list.split_whitespace().any(|ulp| ulp == "tls") => Ok(()),
        Ok(list) => Err(PlaneError::Unsupported(format!(
            "the kernel offers no `tls` ULP ({} lists {:?}): CONFIG_TLS is off, or `modprobe tls` has not run",
            path.display(),
            list.trim()
        ))),
        Err(e) => Err(PlaneError::Unsupported(format!("{} cannot be read: {e}", path.display()))),
    }
}

/// The kTLS relay: splice pipes and copy buffers of its own, its byte
/// counts (`data_plane="ktls"`), and the ciphers this kernel took.
pub struct KtlsRelay {
    pipes: PipePool,
    buffers: BufferPool,
    counters: ByteCounters,
    /// Ciphers the kernel accepted at start.
    ciphers: Vec<Cipher>,
    report: String,
}

impl KtlsRelay {
    /// Probes, then proves on this kernel what the relay relies on (see the
    /// module docs); fails with what did not hold.
    pub fn start(cfg: &Settings) -> Result<KtlsRelay, PlaneError> {
        probe()?;
        let ciphers = ciphers_taken();
        if !ciphers.contains(&Cipher::AesGcm128) {
            return Err(PlaneError::Unsupported(
                "the kernel refused AES-128-GCM keys on a `tls` socket (crypto modules missing?)".into(),
            ));
        }
        let relay = KtlsRelay {
            pipes: PipePool::new(cfg.pipe_size, cfg.max_pipes),
            buffers: BufferPool::new(cfg.copy_buffer as usize),
            counters: ByteCounters::default(),
            ciphers,
            report: String::new(),
        };
        let checks = run_checks(&relay);
        if let Some(why) = checks.failure() {
            return Err(PlaneError::SelfTest(format!("kTLS {why}")));
        }
        relay.counters.reset();
        let ciphers: Vec<&str> = relay.ciphers.iter().map(|c| c.name()).collect();
        let report = format!("kTLS {checks}; ciphers {}", ciphers.join(", "));
        Ok(KtlsRelay { report, ..relay })
    }

    /// What the self-test proved (startup log, `upsplice check`).
    pub fn startup_report(&self) -> &str {
        &self.report
    }

    /// Whether the kernel took this cipher at start.
    pub fn takes(&self, cipher: Cipher) -> bool {
        self.ciphers.contains(&cipher)
    }

    /// Relays a tunnel whose client socket carries kTLS until it ends.
    pub async fn relay(&self, t: Tunnel) -> Outcome {
        let res = Resources { buffers: &self.buffers, pipes: Some(&self.pipes) };
        match pair::drive_sides(t, Sides { client_ktls: true }, res, &self.counters).await {
            Ok(outcome) => outcome,
            // The driver promotes plain pairs only: a kTLS socket cannot
            // join a sockmap (docs/kernels.md), so its tunnel ends here.
            Err(handed_back) => unreachable!("a kTLS tunnel was handed back: {}", handed_back.reason),
        }
    }

    pub fn bytes_relayed(&self) -> (u64, u64) {
        self.counters.load()
    }
}

/// What a read that stopped at a control record found.
#[derive(Debug)]
pub enum Control {
    /// The peer's `close_notify`: its EOF.
    CloseNotify,
    /// A record the relay answered and went past (a refused renegotiation).
    Handled,
    /// Application data after all (the read failed for another reason).
    Data(Bytes),
    /// A record the tunnel cannot survive (logged): reset it.
    Fail,
}

/// Whether a read from a kTLS socket failed because a control record is
/// next: EIO for read/recv, EINVAL for splice.
pub fn stopped_at_control(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EIO) | Some(libc::EINVAL))
}

/// Reads the control record at the head of kTLS socket `fd` and acts on it
/// (see the module docs).
pub fn take_control(fd: RawFd) -> Control {
    // The largest record payload TLS allows (2^14) and room for padding.
    let mut buf = vec![0u8; (1 << 14) + 256];
    match sys::recv_record(fd, &mut buf) {
        // The stop said a whole record waits: nothing there is a read
        // failing for another reason, which must not be retried forever.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            tracing::debug!("kTLS: a read stopped as at a control record, but no record is ready: tunnel reset");
            Control::Fail
        }
        Err(e) => {
            tracing::debug!("kTLS: reading a control record failed: {e}");
            Control::Fail
        }
        Ok((sys::APPLICATION_DATA, n)) => {
            buf.truncate(n);
            Control::Data(Bytes::from(buf))
        }
        Ok((ALERT, n)) if n >= 2 && buf[1] == CLOSE_NOTIFY => Control::CloseNotify,
        Ok((ALERT, n)) if n >= 2 => {
            tracing::debug!(level = buf[0], description = buf[1], "kTLS: the peer sent an alert: tunnel reset");
            Control::Fail
        }
        // A ClientHello after the handshake: a TLS 1.2 renegotiation.
        Ok((HANDSHAKE, n)) if n >= 1 && buf[0] == 1 => {
            match sys::send_record(fd, ALERT, &[WARNING, NO_RENEGOTIATION]) {
                Ok(_) => Control::Handled,
                Err(_) => Control::Fail,
            }
        }
        Ok((HANDSHAKE, n)) if n >= 1 && buf[0] == 24 => {
            tracing::info!(
                "kTLS: the client sent a TLS 1.3 KeyUpdate, which a kTLS tunnel cannot follow: tunnel reset \
                 (set data_plane.ktls = \"off\" for clients that rekey)"
            );
            Control::Fail
        }
        Ok((kind, n)) => {
            tracing::debug!(record_type = kind, len = n, "kTLS: an unexpected record: tunnel reset");
            Control::Fail
        }
    }
}

/// Sends `close_notify` on a kTLS socket; WouldBlock when it does not fit now.
pub fn close_notify(fd: RawFd) -> io::Result<()> {
    match sys::send_close_notify(fd)? {
        true => Ok(()),
        false => Err(io::ErrorKind::WouldBlock.into()),
    }
}

/// Gives socket `fd` the `tls` ULP and both directions' keys.
pub fn install(fd: RawFd, tx: &CryptoInfo, rx: &CryptoInfo) -> io::Result<()> {
    sys::attach_ulp(fd)?;
    install_keys(fd, tx, rx)
}

/// Gives a socket that has the `tls` ULP both directions' keys.
pub fn install_keys(fd: RawFd, tx: &CryptoInfo, rx: &CryptoInfo) -> io::Result<()> {
    tx.install(fd, libc::TLS_TX)?;
    rx.install(fd, libc::TLS_RX)
}

/// Which ciphers the kernel takes on a `tls` socket (TLS 1.3 keys; one
/// loopback connection each, since a ULP cannot be taken off).
fn ciphers_taken() -> Vec<Cipher> {
    let mut taken = vec![];
    for cipher in [Cipher::AesGcm128, Cipher::AesGcm256, Cipher::Chacha20Poly1305] {
        let ok = (|| -> io::Result<()> {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            let a = std::net::TcpStream::connect(listener.local_addr()?)?;
            let _b = listener.accept()?;
            let info = CryptoInfo::test_keys(cipher, 1);
            install(a.as_raw_fd(), &info, &info)
        })();
        match ok {
            Ok(()) => taken.push(cipher),
            Err(e) => tracing::debug!("kTLS: the kernel refused {} keys: {e}", cipher.name()),
        }
    }
    taken
}

/// Bytes each way in the bulk check: many records and pipe loads.
const BULK: usize = 1 << 20;

/// The checks, each through the relay's own driver.
fn run_checks(relay: &KtlsRelay) -> selftest::Report {
    selftest::on_own_runtime(|| async {
        let mut checks = vec![];
        checks.push(selftest::check("bulk_both_ways", Check::Bulk.run(relay)).await);
        checks.push(selftest::check("close_notify_both_ways", Check::CloseNotify.run(relay)).await);
        checks.push(selftest::check("bare_fin_resets", Check::BareFin.run(relay)).await);
        selftest::Report { checks }
    })
}

#[derive(Clone, Copy)]
enum Check {
    Bulk,
    CloseNotify,
    BareFin,
}

impl Check {
    /// `peer` (the test's TLS client, kTLS with mirrored keys) ⇄ relay ⇄
    /// `far` (the test's plain backend).
    async fn run(self, relay: &KtlsRelay) -> Result<(), String> {
        let (mut peer, client) = loopback_pair().await?;
        let (mut far, backend) = loopback_pair().await?;
        let (k1, k2) = (Cipher::AesGcm128, Cipher::AesGcm128);
        install(peer.as_raw_fd(), &CryptoInfo::test_keys(k1, 1), &CryptoInfo::test_keys(k2, 2))
            .map_err(io_err("kTLS on the test client"))?;
        install(client.as_raw_fd(), &CryptoInfo::test_keys(k2, 2), &CryptoInfo::test_keys(k1, 1))
            .map_err(io_err("kTLS on the relay's socket"))?;
        let t = Tunnel {
            client,
            backend,
            to_backend: Bytes::new(),
            to_client: Bytes::new(),
            idle_timeout: Duration::from_secs(60),
            drain: CancellationToken::new(),
            promote: None,
        };
        let relayed = relay.relay(t);
        let test = async {
            match self {
                Check::Bulk => {
                    let data: Vec<u8> = (0..BULK).map(|i| (i * 7 + i / 4096) as u8).collect();
                    let up = async {
                        peer.write_all(&data).await.map_err(io_err("client write"))?;
                        let mut back = vec![0u8; BULK];
                        peer.read_exact(&mut back).await.map_err(io_err("client read"))?;
                        Ok::<_, String>(back)
                    };
                    let down = async {
                        let mut got = vec![0u8; BULK];
                        far.read_exact(&mut got).await.map_err(io_err("backend read"))?;
                        far.write_all(&got).await.map_err(io_err("backend write"))?;
                        Ok::<_, String>(got)
                    };
                    let (back, got) = tokio::try_join!(up, down)?;
                    if got != data || back != data {
                        return Err("bytes differ after a round trip through kTLS and splice".into());
                    }
                    close_both(&mut peer, &mut far).await
                }
                Check::CloseNotify => {
                    peer.write_all(b"last words").await.map_err(io_err("client write"))?;
                    close_both(&mut peer, &mut far).await
                }
                Check::BareFin => {
                    peer.write_all(b"cut").await.map_err(io_err("client write"))?;
                    peer.shutdown().await.map_err(io_err("client shutdown"))?;
                    let mut buf = [0u8; 16];
                    let mut got = 0;
                    loop {
                        match far.read(&mut buf[got..]).await {
                            Ok(0) => return Err("a FIN without close_notify reached the backend as a FIN".into()),
                            Ok(n) => got += n,
                            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                                return (&buf[..got] == b"cut" || got == 0)
                                    .then_some(())
                                    .ok_or_else(|| format!("the backend read {:?} before the reset", &buf[..got]));
                            }
                            Err(e) => return Err(format!("backend read: {e}")),
                        }
                    }
                }
            }
        };
        let (outcome, tested) = tokio::join!(relayed, test);
        tested?;
        let want = match self {
            Check::BareFin => CloseReason::ClientReset,
            _ => CloseReason::Done,
        };
        if outcome.reason != want {
            return Err(format!("the tunnel ended {:?}, not {want:?}", outcome.reason));
        }
        Ok(())
    }
}

/// The client's clean close (close_notify, FIN) reaches the backend as a
/// FIN after every byte; the backend's FIN reaches the client as
/// close_notify then FIN.
async fn close_both(peer: &mut TcpStream, far: &mut TcpStream) -> Result<(), String> {
    sys::send_close_notify(peer.as_raw_fd()).map_err(io_err("client close_notify"))?;
    peer.shutdown().await.map_err(io_err("client shutdown"))?;
    let mut rest = vec![];
    far.read_to_end(&mut rest).await.map_err(io_err("backend read to EOF"))?;
    if !(rest.is_empty() || rest == b"last words") {
        return Err(format!("the backend read {} unexpected bytes before EOF", rest.len()));
    }
    far.shutdown().await.map_err(io_err("backend shutdown"))?;
    // The client reads the relay's close_notify as a control record.
    let fd = peer.as_raw_fd();
    let mut buf = [0u8; 64];
    let record = loop {
        peer.readable().await.map_err(io_err("client readable"))?;
        match peer.try_io(tokio::io::Interest::READABLE, || sys::recv_record(fd, &mut buf)) {
            Ok(r) => break r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(format!("client reading the relay's close: {e}")),
        }
    };
    match record {
        (ALERT, 2) if buf[..2] == [WARNING, CLOSE_NOTIFY] => Ok(()),
        (kind, n) => Err(format!("the client read a record of type {kind} ({n} bytes), not close_notify")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ulp_list_decides() {
        let dir = tempfile::tempdir().unwrap();
        let at = |text: &str| {
            let p = dir.path().join("ulp");
            std::fs::write(&p, text).unwrap();
            probe_at(&p)
        };
        assert!(at("espintcp mptcp tls\n").is_ok());
        let without = at("espintcp mptcp\n").unwrap_err().to_string();
        assert!(without.contains("CONFIG_TLS") && without.contains("espintcp mptcp"), "{without}");
        let absent = probe_at(&dir.path().join("absent")).unwrap_err().to_string();
        assert!(absent.contains("cannot be read"), "{absent}");
    }

    #[test]
    fn control_stops_are_eio_and_einval_only() {
        assert!(stopped_at_control(&io::Error::from_raw_os_error(libc::EIO)));
        assert!(stopped_at_control(&io::Error::from_raw_os_error(libc::EINVAL)));
        assert!(!stopped_at_control(&io::Error::from_raw_os_error(libc::ECONNRESET)));
        assert!(!stopped_at_control(&io::ErrorKind::WouldBlock.into()));
    }

    /// On a kernel with kTLS (the VM matrix), the plane starts and its
    /// self-test passes; elsewhere it refuses with the probe's reason.
    #[test]
    fn starts_where_the_kernel_offers_ktls() {
        match (probe(), KtlsRelay::start(&Settings::default())) {
            (Ok(()), Ok(relay)) => assert!(relay.startup_report().contains("passed 3/3"), "{}", relay.startup_report()),
            (Ok(()), Err(e)) => {
                panic!("the kernel offers kTLS but the plane failed: {}", super::super::error::chain(&e))
            }
            (Err(why), Err(e)) => assert_eq!(why.to_string(), e.to_string()),
            (Err(_), Ok(_)) => panic!("started without the tls ULP"),
        }
    }
}
