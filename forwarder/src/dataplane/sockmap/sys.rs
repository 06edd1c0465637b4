//! The socket calls the sockmap plane needs that neither std, tokio nor
//! socket2 offer: socket cookies, TCP_INFO byte counters, buffer sizes, the
//! "kick" that makes the kernel run the verdict over already queued bytes,
//! and an epoll set watching for hang-ups only.

use std::io;
use std::mem::size_of;
use std::os::fd::RawFd;

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
    let (buf, len) = tcp_info_raw(fd)?;
    if len < RECEIVED + 8 {
        return Err(io::Error::other("TCP_INFO too short: kernel too old"));
    }
    let u64_at = |at: usize| u64::from_ne_bytes(buf[at..at + 8].try_into().expect("8 bytes"));
    Ok(TcpCounters { state: buf[0], bytes_acked: u64_at(ACKED), bytes_received: u64_at(RECEIVED) })
}

/// `struct tcp_info` as raw bytes, and how many the kernel filled in (an
/// older kernel fills fewer).
fn tcp_info_raw(fd: RawFd) -> io::Result<([u8; 256], usize)> {
    let mut buf = [0u8; 256];
    let mut len = buf.len() as libc::socklen_t;
    // SAFETY: `buf` is valid for `len` bytes of writes.
    let rc = unsafe { libc::getsockopt(fd, libc::IPPROTO_TCP, libc::TCP_INFO, buf.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((buf, len as usize))
}

/// Sets an `int` socket option.
fn set_int(fd: RawFd, level: libc::c_int, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: `value` is a valid c_int for the duration of the call and its
    // size is passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            (&value as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

// The queue sizes are shared with the other planes. Once a socket has a
// psock (is in a sockmap), `inq` answers with the bytes in the psock's
// queue (passed by the verdict) instead of the receive queue's.
pub use crate::dataplane::queues::{inq, outq};

/// Every byte ever written into `fd`'s send queue, up to a constant offset
/// (the SYN): acknowledged + still queued. Exact when no writer runs
/// concurrently: retries until the acknowledged count did not move
/// between the two reads.
pub fn written_exact(fd: RawFd) -> io::Result<u64> {
    for _ in 0..1000 {
        let before = tcp_counters(fd)?;
        let queued = outq(fd)?;
        let after = tcp_counters(fd)?;
        if let Some(written) = written_between(&before, queued, &after) {
            return Ok(written);
        }
    }
    Err(io::Error::other("acknowledgements never settled"))
}

/// What [`written_exact`] says, from its three reads made by a caller:
/// `TCP_INFO` before, `SIOCOUTQ` (`queued`), `TCP_INFO` after, with no
/// writer meanwhile. `None` when an acknowledgement came between the two
/// `TCP_INFO` reads (the queue read may be older or newer than it).
pub fn written_between(before: &TcpCounters, queued: u64, after: &TcpCounters) -> Option<u64> {
    (before.bytes_acked == after.bytes_acked).then_some(after.bytes_acked + queued)
}

/// A lower bound of what [`written_exact`] would say, safe to call while
/// the kernel writes into `fd`: acknowledged count first, queue second.
pub fn written_at_least(fd: RawFd) -> io::Result<u64> {
    let acked = tcp_counters(fd)?.bytes_acked;
    Ok(acked + outq(fd)?)
}

/// `SO_RCVBUF`: the receive buffer the kernel uses now (autotuned or set).
pub fn rcvbuf(fd: RawFd) -> io::Result<i32> {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes, `len` is its size.
    let rc =
        unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, (&mut value as *mut i32).cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(value)
}

/// Lowers the receive buffer toward `target` (a value [`rcvbuf`] read)
/// without taking back room the peer was already offered, and fixes it
/// there; returns what it is now.
///
/// TCP never moves its window's right edge back: a peer may go on sending
/// up to what it was last offered, and a buffer set below what is queued
/// plus that window drops those segments (`RcvPruned`, `TCPRcvQDrop`).
/// The sender then backs off while the queue stays full: after stepping
/// aside straight to `target`, one of fifty saturated tunnels moved
/// nothing for a minute (CI), with about 60 drops per run of fifty. So
/// the buffer goes no lower than what is queued (`SO_MEMINFO`, as the
/// kernel charges it) plus twice the window last advertised
/// ([`advertised_window`]; twice, as the kernel sizes a window at half its
/// buffer by default: the rest is the segments' overhead). Keep the window
/// small beforehand ([`clamp_window`]) and that floor is near `target`.
///
/// `SO_RCVBUFFORCE`: the kernel doubles what it is given, and only the
/// forced form may exceed `net.core.rmem_max` (the router holds
/// CAP_NET_ADMIN for the sockmap plane). From then on TCP no longer
/// autotunes it.
pub fn shrink_rcvbuf(fd: RawFd, target: i32) -> io::Result<i32> {
    // One read for both: the buffer as it is now (what `SO_RCVBUF` says)
    // and what its queue holds.
    let info = meminfo(fd)?;
    let now = i32::try_from(info[libc::SK_MEMINFO_RCVBUF as usize]).unwrap_or(i32::MAX);
    // Without the window, the buffer stays where it is (and is fixed).
    let floor = match advertised_window(fd)? {
        Some(window) => info[libc::SK_MEMINFO_RMEM_ALLOC as usize].saturating_add(window.saturating_mul(2)),
        None => u32::MAX,
    };
    let bytes = target.max(i32::try_from(floor).unwrap_or(i32::MAX)).min(now);
    set_int(fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, bytes / 2)?;
    Ok(bytes)
}

/// `TCP_WINDOW_CLAMP`: no window advertised from now on exceeds `bytes`
/// (one already advertised stays). The kernel resets the clamp from the
/// receive buffer when the segments' overhead it measures changes, so
/// this holds the window down for a while, not for good.
pub fn clamp_window(fd: RawFd, bytes: i32) -> io::Result<()> {
    set_int(fd, libc::IPPROTO_TCP, libc::TCP_WINDOW_CLAMP, bytes)
}

/// `SO_MEMINFO` (asm-generic/socket.h; libc does not define it): the
/// socket's memory counters, `SK_MEMINFO_VARS` u32s.
const SO_MEMINFO: libc::c_int = 55;

/// `SO_MEMINFO`: the socket's memory counters, `SK_MEMINFO_*` order
/// (`RMEM_ALLOC`: what the receive queue holds as the kernel charges it,
/// the segments' true size rather than their bytes).
fn meminfo(fd: RawFd) -> io::Result<[u32; 9]> {
    let mut info = [0u32; 9];
    let mut len = size_of::<[u32; 9]>() as libc::socklen_t;
    // SAFETY: `info` is valid for `len` bytes of writes.
    let rc = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, SO_MEMINFO, info.as_mut_ptr().cast(), &mut len) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info)
}

/// The most the peer may still send beyond what was received: the window
/// last advertised (`tcpi_rcv_wnd`, kernel 6.2; the sockmap plane runs on
/// 6.12 and later). None on a kernel that does not say.
fn advertised_window(fd: RawFd) -> io::Result<Option<u32>> {
    const RCV_WND: usize = 232;
    let (buf, len) = tcp_info_raw(fd)?;
    Ok((len >= RCV_WND + 4).then(|| u32::from_ne_bytes(buf[RCV_WND..RCV_WND + 4].try_into().expect("4 bytes"))))
}

/// `SO_RCVLOWAT`: TCP calls the socket's data-ready (for a socket in a
/// sockmap: the verdict) only once this many bytes wait, or its receive
/// buffer is nearly full (`tcp_data_ready`). The kernel caps the value at
/// half the largest receive buffer (`tcp_rmem[2]`) and, as a side effect
/// that outlives the mark, grows the socket's receive buffer to hold it
/// (`tcp_set_rcvlowat`).
pub fn set_rcvlowat(fd: RawFd, bytes: i32) -> io::Result<()> {
    set_int(fd, libc::SOL_SOCKET, libc::SO_RCVLOWAT, bytes)
}

/// TCP states of a socket (not yet closed by its owner) in which the
/// peer's FIN has been received. `TCP_CLOSE` is one: a socket that sent
/// FIN first and then receives one does not show `TIME_WAIT` (that is a
/// separate timewait socket); `tcp_time_wait` closes the full socket at
/// once, with its unread bytes still queued. A reset also ends in
/// `TCP_CLOSE`, without a FIN: counted as one, it makes the consumed
/// count one short, and a check against it fails — as a reset tunnel
/// should.
const FIN_RECEIVED: [u8; 4] = [TCP_CLOSE, 8 /* CLOSE_WAIT */, 9 /* LAST_ACK */, 11 /* CLOSING */];

/// Bytes of the stream `fd` received that its owner consumed so far (read,
/// or taken by a verdict program): received minus still queued, FIN not
/// counted. Only for a socket without a psock, where `SIOCINQ` is the
/// receive queue. Retries until the received count did not move between
/// the two reads, so a segment arriving meanwhile cannot skew it.
pub fn consumed(fd: RawFd) -> io::Result<u64> {
    for _ in 0..1000 {
        let before = tcp_counters(fd)?;
        let queued = inq(fd)?;
        let after = tcp_counters(fd)?;
        if let Some(consumed) = consumed_between(&before, queued, &after) {
            return Ok(consumed);
        }
    }
    Err(io::Error::other("the received count never settled"))
}

/// What [`consumed`] says, from its three reads made by a caller:
/// `TCP_INFO` before, the bytes queued (`SIOCINQ`, or 0 when a read
/// between the two emptied the queue: [`read_queued`]'s `Ok(true)`),
/// `TCP_INFO` after. `None` when a segment (or FIN) arrived between the
/// two `TCP_INFO` reads: the queue may have been seen before or after it.
/// Unchanged, it cannot have arrived after the queue was seen empty
/// either, since every segment that reaches the receive queue first
/// raises the received count.
pub fn consumed_between(before: &TcpCounters, queued: u64, after: &TcpCounters) -> Option<u64> {
    if before.bytes_received != after.bytes_received {
        return None;
    }
    // `tcpi_bytes_received` counts the FIN; SIOCINQ does not.
    let fin = u64::from(FIN_RECEIVED.contains(&after.state));
    Some(after.bytes_received.saturating_sub(queued + fin))
}

/// Makes the kernel run the verdict program over bytes already in `fd`'s
/// receive queue. On a socket with a verdict program, `recvmsg` first calls
/// `tcp_data_ready` when the receive queue is not empty
/// (`tcp_bpf_recvmsg_parser`); the verdict only runs from data-ready, so
/// without this, bytes queued before insertion wait for the next segment.
/// `MSG_PEEK | MSG_DONTWAIT` consumes nothing and never blocks, but a
/// pending socket error (a reset) is returned — and cleared — by it, so it
/// is handed back: swallowed, the reset would later look like a clean EOF.
pub fn kick(fd: RawFd) -> io::Result<()> {
    let mut byte = 0u8;
    // SAFETY: a one-byte buffer valid for writes; PEEK consumes nothing.
    let n = unsafe { libc::recv(fd, (&mut byte as *mut u8).cast(), 1, libc::MSG_PEEK | libc::MSG_DONTWAIT) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if !matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) {
            return Err(e);
        }
    }
    Ok(())
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

/// One non-blocking `send` of `buf` (no SIGPIPE).
pub fn send_now(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for `buf.len()` bytes of reads.
    let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

/// Shuts the write side of `fd`: FIN once its send queue is out.
pub fn shutdown_write(fd: RawFd) -> io::Result<()> {
    // SAFETY: plain syscall on an open descriptor.
    if unsafe { libc::shutdown(fd, libc::SHUT_WR) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads everything queued on `fd` without blocking and appends it to
/// `out`. `Ok(true)`: the receive queue was emptied; `Ok(false)`: more than
/// `max` bytes were queued (all read so far is in `out`, some may be left).
///
/// Empty is the point: the verdict reads whole segments (`tcp_read_skb`
/// ignores how much of the first one userspace consumed), so a segment
/// left partly read would be sent again from its start. Reading exactly
/// the `SIOCINQ` count is not enough: a segment arriving between the ioctl
/// and the read is coalesced into the last queued one, and the read stops
/// inside it (reproduced: 64 KiB sent twice at full speed). Reading in
/// small chunks until `EAGAIN` never ends against a fast sender. What does
/// it is a last `recv` that comes back short: `tcp_recvmsg` returns short
/// only once it found no further byte, every segment it read from eaten
/// whole. So: one small read (most handoffs find nothing or a little),
/// then, if it came back full, one read with room for everything up to
/// `max` (a fresh 4 MiB allocation per handoff costs more than the read).
pub fn read_queued(fd: RawFd, out: &mut Vec<u8>, max: usize) -> io::Result<bool> {
    const FIRST: usize = 64 * 1024;
    let start = out.len();
    let mut room = FIRST.min(max + 1);
    loop {
        out.reserve(room);
        let spare = &mut out.spare_capacity_mut()[..room];
        // SAFETY: `spare` is valid for `room` bytes of writes; recv writes at
        // most that many and reports how many.
        let n = unsafe { libc::recv(fd, spare.as_mut_ptr().cast(), room, libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(true),
                _ => return Err(e),
            }
        }
        let n = n as usize;
        // SAFETY: the kernel initialised the first `n` bytes of the spare capacity.
        unsafe { out.set_len(out.len() + n) };
        let got = out.len() - start;
        if n < room {
            return Ok(true);
        }
        if got > max {
            return Ok(false);
        }
        room = max + 1 - got;
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

/// The name of a TCP state (`tcpi_state`, include/net/tcp_states.h), for
/// logs an operator reads.
pub fn tcp_state_name(state: u8) -> String {
    const NAMES: [&str; 12] = [
        "ESTABLISHED",
        "SYN_SENT",
        "SYN_RECV",
        "FIN_WAIT1",
        "FIN_WAIT2",
        "TIME_WAIT",
        "CLOSE",
        "CLOSE_WAIT",
        "LAST_ACK",
        "LISTEN",
        "CLOSING",
        "NEW_SYN_RECV",
    ];
    match state.checked_sub(1).and_then(|i| NAMES.get(usize::from(i))) {
        Some(name) => (*name).to_string(),
        None => format!("TCP state {state}"),
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::time::{Duration, Instant};

    /// Writes to `s` for `for_`, without blocking; returns the bytes taken.
    fn write_for(s: &mut TcpStream, for_: Duration) -> u64 {
        let chunk = [7u8; 64 * 1024];
        let (mut sent, deadline) = (0, Instant::now() + for_);
        while Instant::now() < deadline {
            match s.write(&chunk) {
                Ok(n) => sent += n as u64,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => panic!("write: {e}"),
            }
        }
        sent
    }

    /// A step-aside's buffer, as the plane leaves it: grown by the mark,
    /// the window clamped, then shrunk toward a small target while the
    /// peer was offered much more. The sender goes on flat out against a
    /// slow reader: no segment is dropped, and every byte arrives. (Set
    /// straight to the target instead, the receiver dropped segments.)
    #[test]
    fn shrinking_a_grown_buffer_drops_nothing_the_peer_was_offered() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut rx, _) = listener.accept().unwrap();
        let fd = rx.as_raw_fd();
        tx.set_nonblocking(true).unwrap();
        let before = super::rcvbuf(fd).unwrap();
        super::set_rcvlowat(fd, i32::MAX).unwrap();
        assert!(super::rcvbuf(fd).unwrap() > before, "the mark grew the buffer");
        let target = 256 * 1024;
        super::clamp_window(fd, target / 2).unwrap();
        let mut sent = write_for(&mut tx, Duration::from_millis(100));
        super::set_rcvlowat(fd, 1).unwrap();
        let set = match super::shrink_rcvbuf(fd, target) {
            Ok(set) => set,
            // SO_RCVBUFFORCE needs CAP_NET_ADMIN, as the sockmap plane does.
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => return,
            Err(e) => panic!("shrink: {e}"),
        };
        assert_eq!(super::rcvbuf(fd).unwrap(), set);
        assert!(set >= target);
        // A slow reader: 64 KiB every 2 ms while the sender writes flat out.
        rx.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut got = 0u64;
        let mut buf = vec![0u8; 64 * 1024];
        let deadline = Instant::now() + Duration::from_millis(500);
        while Instant::now() < deadline {
            sent += write_for(&mut tx, Duration::from_millis(2));
            got += rx.read(&mut buf).unwrap() as u64;
        }
        tx.shutdown(std::net::Shutdown::Write).unwrap();
        loop {
            match rx.read(&mut buf).unwrap() {
                0 => break,
                n => got += n as u64,
            }
        }
        assert_eq!(got, sent);
        let drops = super::meminfo(fd).unwrap()[libc::SK_MEMINFO_DROPS as usize];
        assert_eq!(drops, 0, "segments dropped after the buffer shrank to {set} (target {target})");
    }

    #[test]
    fn tcp_states_are_named() {
        assert_eq!(super::tcp_state_name(1), "ESTABLISHED");
        assert_eq!(super::tcp_state_name(8), "CLOSE_WAIT");
        assert_eq!(super::tcp_state_name(0), "TCP state 0");
        assert_eq!(super::tcp_state_name(13), "TCP state 13");
    }
}
