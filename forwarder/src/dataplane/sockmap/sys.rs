//! The socket calls the sockmap plane needs that neither std, tokio nor
//! socket2 offer: socket cookies, TCP_INFO byte counters, queue sizes, the
//! "kick" that makes the kernel run the verdict over already queued bytes,
//! and an epoll set watching for hang-ups only.

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use tokio::io::unix::AsyncFd;

/// `SO_COOKIE`: the 64-bit id `bpf_get_socket_cookie` returns for a socket.
pub fn cookie(fd: RawFd) -> io::Result<u64> {
    let mut value: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes and `len` holds the size
    // of `value`; the kernel writes at most `len` bytes.
    let rc =
        unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_COOKIE, (&mut value as *mut u64).cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// The counters of `struct tcp_info` this plane uses.
#[derive(Debug, Clone, Copy, Default)]
pub struct TcpCounters {
    /// `tcpi_state` (`TCP_ESTABLISHED` = 1, `TCP_CLOSE` = 7, ...).
    pub state: u8,
    /// `tcpi_bytes_acked`: bytes of this socket acknowledged by the peer.
    pub bytes_acked: u64,
    /// `tcpi_bytes_received`: bytes received on this socket.
    pub bytes_received: u64,
}

/// `TCP_ESTABLISHED`: the only state (besides LISTEN) a sockmap accepts.
pub const TCP_ESTABLISHED: u8 = 1;

/// `TCP_CLOSE`: the socket is gone (reset, or closed both ways).
pub const TCP_CLOSE: u8 = 7;

/// Reads `TCP_INFO`. `tcpi_bytes_acked` and `tcpi_bytes_received` sit at
/// offsets 120 and 128 of `struct tcp_info` (linux/tcp.h, since 4.1/4.2);
/// libc's struct does not always include them, hence the raw buffer.
pub fn tcp_counters(fd: RawFd) -> io::Result<TcpCounters> {
    const ACKED: usize = 120;
    const RECEIVED: usize = 128;
    let mut buf = [0u8; 256];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: `buf` is valid for `len` bytes of writes.
    let rc = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, buf.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if (len as usize) < RECEIVED + 8 {
        return Err(io::Error::other("TCP_INFO too short: kernel too old"));
    }
    let u64_at = |at: usize| u64::from_ne_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
    Ok(TcpCounters { state: buf[0], bytes_acked: u64_at(ACKED), bytes_received: u64_at(RECEIVED) })
}

fn ioctl_int(fd: RawFd, request: libc::Ioctl) -> io::Result<u64> {
    let mut value: libc::c_int = 0;
    // SAFETY: both requests used here write one c_int to the pointer given.
    let rc = unsafe { libc::ioctl(fd, request, &mut value as *mut libc::c_int) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value.max(0) as u64)
}

/// `SIOCINQ`: bytes in the receive queue not read yet (not counting FIN).
/// Once the socket has a psock (is in a sockmap), the kernel answers with
/// the bytes in the psock's queue (passed by the verdict) instead.
pub fn inq(fd: RawFd) -> io::Result<u64> {
    ioctl_int(fd, libc::FIONREAD)
}

/// `SIOCOUTQ`: bytes in the send queue, sent or not, not acknowledged yet.
pub fn outq(fd: RawFd) -> io::Result<u64> {
    ioctl_int(fd, libc::TIOCOUTQ)
}

/// Every byte ever written into `fd`'s send queue, up to a constant offset
/// (the SYN): acknowledged + still queued. Exact when no writer runs
/// concurrently: retries until the acknowledged count did not move
/// between the two reads.
pub fn written_exact(fd: RawFd) -> io::Result<u64> {
    for _ in 0..1000 {
        let before = tcp_counters(fd)?.bytes_acked;
        let queued = outq(fd)?;
        let after = tcp_counters(fd)?.bytes_acked;
        if before == after {
            return Ok(before + queued);
        }
    }
    Err(io::Error::other("acknowledgements never settled"))
}

/// A lower bound of what [`written_exact`] would say, safe to call while
/// the kernel writes into `fd`: acknowledged count first, queue second.
pub fn written_at_least(fd: RawFd) -> io::Result<u64> {
    let acked = tcp_counters(fd)?.bytes_acked;
    Ok(acked + outq(fd)?)
}

/// Makes the kernel run the verdict program over bytes already in `fd`'s
/// receive queue. On a socket with a verdict program, `recvmsg` first calls
/// `tcp_data_ready` when the receive queue is not empty
/// (`tcp_bpf_recvmsg_parser`); the verdict only runs from data-ready, so
/// without this, bytes queued before insertion wait for the next segment.
/// `MSG_PEEK | MSG_DONTWAIT` consumes nothing and never blocks.
pub fn kick(fd: RawFd) {
    let mut byte = 0u8;
    // SAFETY: a one-byte buffer valid for writes; PEEK consumes nothing.
    let _ = unsafe { libc::recv(fd, (&mut byte as *mut u8).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
}

/// `SO_ERROR`: the pending socket error, cleared by reading it.
pub fn take_error(fd: RawFd) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes, `len` is its size.
    let rc = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ERROR, (&mut value as *mut libc::c_int).cast(), &mut len)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// An epoll set of the two sockets of one tunnel, waiting for hang-ups and
/// errors only (never `EPOLLIN`: redirected bytes would wake it for nothing),
/// itself registered with tokio.
pub struct HangupWatch {
    epoll: AsyncFd<OwnedFd>,
}

/// What one socket reported.
#[derive(Debug, Clone, Copy)]
pub struct Hangup {
    pub token: u64,
    /// The peer sent FIN (`EPOLLRDHUP`).
    pub read_closed: bool,
    /// Both directions are shut (`EPOLLHUP`).
    pub hup: bool,
    /// An error is pending (`EPOLLERR`), e.g. a reset.
    pub error: bool,
}

impl HangupWatch {
    pub fn new() -> io::Result<HangupWatch> {
        // SAFETY: plain syscall; the result is checked before use.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor this function owns.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: `owned` is an open epoll descriptor that the AsyncFd owns
        // from here on and never replaces; `OwnedFd::as_raw_fd` always returns
        // that same descriptor.
        let epoll = unsafe { AsyncFd::register_with_interest(owned, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(HangupWatch { epoll })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: `ev` is a valid epoll_event; `fd` is open for the call.
        let rc = unsafe { libc::epoll_ctl(self.epoll.get_ref().as_raw_fd(), op, fd, &mut ev) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Watches `fd` for FIN, hang-up and errors.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, libc::EPOLLRDHUP as u32)
    }

    /// Stops reporting FIN for `fd` (errors and hang-ups still come).
    pub fn ignore_fin(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, token, 0)
    }

    /// Stops watching `fd` altogether.
    pub fn remove(&self, fd: RawFd) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_DEL, fd, 0, 0)
    }

    /// Waits until at least one socket reports something.
    pub async fn wait(&self) -> io::Result<Vec<Hangup>> {
        loop {
            let mut guard = self.epoll.readable().await?;
            let mut events = [libc::epoll_event { events: 0, u64: 0 }; 4];
            // SAFETY: `events` is valid for 4 entries; timeout 0 never blocks.
            let n = unsafe {
                libc::epoll_wait(self.epoll.get_ref().as_raw_fd(), events.as_mut_ptr(), events.len() as libc::c_int, 0)
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                guard.clear_ready();
                continue;
            }
            return Ok(events[..n as usize]
                .iter()
                .map(|ev| {
                    let bits = ev.events;
                    Hangup {
                        token: ev.u64,
                        read_closed: bits & libc::EPOLLRDHUP as u32 != 0,
                        hup: bits & libc::EPOLLHUP as u32 != 0,
                        error: bits & libc::EPOLLERR as u32 != 0,
                    }
                })
                .collect());
        }
    }
}

/// Aborts a socket: its close sends RST instead of FIN.
pub fn abort(s: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(std::time::Duration::ZERO));
}

/// Reads everything queued on `fd` in one non-blocking `recv` and appends
/// it to `out`. `Ok(true)`: the receive queue was emptied; `Ok(false)`: more
/// than `max` bytes were queued (all read so far is in `out`, some may be
/// left).
///
/// Empty is the point: the verdict reads whole segments (`tcp_read_skb`
/// ignores how much of the first one userspace consumed), so a segment
/// left partly read would be sent again from its start. Reading exactly
/// the `SIOCINQ` count is not enough: a segment arriving between the ioctl
/// and the read is coalesced into the last queued one, and the read stops
/// inside it (reproduced: 64 KiB sent twice at full speed). Reading in
/// chunks until `EAGAIN` never ends against a fast sender. One `recv` with
/// room to spare does it: `tcp_recvmsg` returns short only once it found
/// no further byte, every segment it read from eaten whole.
pub fn read_queued(fd: RawFd, out: &mut Vec<u8>, max: usize) -> io::Result<bool> {
    let room = max + 1;
    out.reserve(room);
    let start = out.len();
    loop {
        let spare = &mut out.spare_capacity_mut()[..room];
        // SAFETY: `spare` is valid for `room` bytes of writes; recv writes at
        // most that many and reports how many.
        let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), room, libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => Ok(true),
                _ => Err(e),
            };
        }
        // SAFETY: the kernel initialised the first `n` bytes of the spare capacity.
        unsafe { out.set_len(start + n as usize) };
        return Ok((n as usize) < room);
    }
}

/// One non-blocking `recv` into `buf`, bypassing tokio's readiness cache.
pub fn recv_now(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes of writes.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}
