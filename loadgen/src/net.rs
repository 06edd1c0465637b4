//! Outgoing connections: source-address lists (`--source-ip`, with ranges),
//! connecting from a chosen local address, and [`dial`]: connect, send the
//! PROXY header, make the TLS handshake, each step timed.

use crate::proxy;
use crate::recorder::{record_ns, ErrorKind, Recorder};
use crate::target::Wire;
use crate::tls::ClientStream;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Instant;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio_util::either::Either;

/// A connection to the target: plain TCP, or TLS over it (boxed: a TLS
/// session is large, and idle plain connections should stay small).
pub type Stream = Either<TcpStream, Box<ClientStream>>;
/// The reading half of a split [`Stream`].
pub type ReadHalf = Either<OwnedReadHalf, tokio::io::ReadHalf<Box<ClientStream>>>;
/// The writing half of a split [`Stream`].
pub type WriteHalf = Either<OwnedWriteHalf, tokio::io::WriteHalf<Box<ClientStream>>>;

/// Splits a stream for a reader task and a writer task. Plain TCP splits
/// without a lock; a TLS session is shared by the two halves.
pub fn split(s: Stream) -> (ReadHalf, WriteHalf) {
    match s {
        Either::Left(tcp) => {
            let (r, w) = tcp.into_split();
            (Either::Left(r), Either::Left(w))
        }
        Either::Right(tls) => {
            let (r, w) = tokio::io::split(tls);
            (Either::Right(r), Either::Right(w))
        }
    }
}

/// A connection that [`dial`] made, and how long its steps took.
#[derive(Debug)]
pub struct Dialed {
    /// The connection, ready for the protocol.
    pub stream: Stream,
    /// How long its steps took.
    pub times: DialTimes,
}

/// How long a [`dial`]'s steps took, and what kind of TLS handshake it made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DialTimes {
    /// TCP connect (and the PROXY header written), ns.
    pub connect_ns: u64,
    /// The TLS handshake, ns (`None`: no TLS).
    pub tls_ns: Option<u64>,
    /// The TLS handshake resumed a session (`--resume`, and the server took it).
    pub resumed: bool,
}

impl DialTimes {
    /// Records the connect time, and the TLS handshake's as a full or a
    /// resumed one.
    pub fn record(&self, rec: &mut Recorder) {
        record_ns(&mut rec.connect, self.connect_ns);
        if let Some(ns) = self.tls_ns {
            record_ns(if self.resumed { &mut rec.tls_resumed } else { &mut rec.tls }, ns);
        }
    }
}

/// A failed [`dial`] (or a failed upgrade after it): the error counter it
/// goes to, the connect time if the TCP connection was made, and for a
/// failed TLS handshake what rustls said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialError {
    /// What failed.
    pub kind: ErrorKind,
    /// TCP connect, ns, when the failure came after it.
    pub connect_ns: Option<u64>,
    /// Why the TLS handshake failed (e.g. `invalid peer certificate: UnknownIssuer`).
    pub tls_error: Option<String>,
}

impl DialError {
    /// A failure of kind `kind` after a connect that took `connect_ns`.
    pub fn new(kind: ErrorKind, connect_ns: Option<u64>) -> Self {
        DialError { kind, connect_ns, tls_error: None }
    }

    /// Records the connect time (if any), counts the error and keeps the
    /// first TLS failure's reason for the report.
    pub fn record(&self, rec: &mut Recorder) {
        if let Some(ns) = self.connect_ns {
            record_ns(&mut rec.connect, ns);
        }
        self.note(rec);
        rec.error(self.kind);
    }

    /// Keeps the first TLS failure's reason for the report (when the caller
    /// counts the error itself).
    pub fn note(&self, rec: &mut Recorder) {
        if rec.tls_error.is_none() {
            rec.tls_error.clone_from(&self.tls_error);
        }
    }
}

/// Connects to `target` from `source`, sends the PROXY header `wire` asks
/// for (the connection's own addresses) and makes the TLS handshake, all
/// before `deadline`.
pub async fn dial(
    target: SocketAddr,
    source: Option<IpAddr>,
    wire: &Wire,
    deadline: tokio::time::Instant,
) -> Result<Dialed, DialError> {
    let t_start = Instant::now();
    let mut sock = match tokio::time::timeout_at(deadline, connect(target, source)).await {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => return Err(DialError::new(ErrorKind::Connect, None)),
        Err(_) => return Err(DialError::new(ErrorKind::ConnectTimeout, None)),
    };
    if let Some(version) = wire.proxy {
        let addrs = sock.local_addr().and_then(|l| Ok((l, sock.peer_addr()?)));
        let written = match addrs {
            Ok((local, peer)) => sock.write_all(&proxy::header(version, local, peer)).await,
            Err(e) => Err(e),
        };
        if written.is_err() {
            return Err(DialError::new(ErrorKind::Connect, None));
        }
    }
    let t_conn = Instant::now();
    let connect_ns = (t_conn - t_start).as_nanos() as u64;
    let Some(tls) = &wire.tls else {
        return Ok(Dialed { stream: Either::Left(sock), times: DialTimes { connect_ns, ..DialTimes::default() } });
    };
    match tokio::time::timeout_at(deadline, tls.handshake(sock)).await {
        Ok(Ok(s)) => {
            let times = DialTimes {
                connect_ns,
                tls_ns: Some(t_conn.elapsed().as_nanos() as u64),
                resumed: crate::tls::resumed(&s),
            };
            Ok(Dialed { stream: Either::Right(Box::new(s)), times })
        }
        Ok(Err(e)) => {
            Err(DialError { kind: ErrorKind::Tls, connect_ns: Some(connect_ns), tls_error: Some(e.to_string()) })
        }
        Err(_) => Err(DialError::new(ErrorKind::ConnectTimeout, Some(connect_ns))),
    }
}

/// A `--source-ip` value that could not be understood.
#[derive(Debug, thiserror::Error)]
pub enum SourceIpError {
    /// Not an address or an `A-B` IPv4 range.
    #[error("invalid source address or range {0:?}")]
    Invalid(String),
    /// Range end before its start, or too large.
    #[error("bad range {0:?} (end must follow start, at most 65536 addresses)")]
    BadRange(String),
}

/// Parses `--source-ip` values: single addresses or inclusive IPv4 ranges
/// such as `127.0.0.1-127.0.0.20`.
pub fn parse_source_ips(values: &[String]) -> Result<Vec<IpAddr>, SourceIpError> {
    let mut out = Vec::new();
    for v in values {
        for part in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            if let Some((a, b)) = part.split_once('-') {
                let a: Ipv4Addr = a.trim().parse().map_err(|_| SourceIpError::Invalid(part.into()))?;
                let b: Ipv4Addr = b.trim().parse().map_err(|_| SourceIpError::Invalid(part.into()))?;
                let (a, b) = (u32::from(a), u32::from(b));
                if b < a || b - a >= 65536 {
                    return Err(SourceIpError::BadRange(part.into()));
                }
                out.extend((a..=b).map(|x| IpAddr::V4(Ipv4Addr::from(x))));
            } else {
                out.push(part.parse().map_err(|_| SourceIpError::Invalid(part.into()))?);
            }
        }
    }
    Ok(out)
}

/// Connects to `target`, binding to `source` first when given. The local port
/// is left to `connect` (IP_BIND_ADDRESS_NO_PORT) so each source address has
/// its own ephemeral port range per destination.
pub async fn connect(target: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let sock = if target.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    if let Some(ip) = source {
        set_bind_no_port(&sock);
        sock.bind(SocketAddr::new(ip, 0))?;
    }
    let s = sock.connect(target).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Best effort: without it binding still works, only with fewer ports per address.
fn set_bind_no_port(sock: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let one: libc::c_int = 1;
    // SAFETY: the fd is a live socket owned by `sock`; the option value points to a
    // c_int that outlives the call and its size is passed exactly.
    unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Raises the soft open-files limit to the hard limit (tens of thousands of
/// connections need it) and returns the resulting soft limit.
pub fn raise_fd_limit() -> u64 {
    // SAFETY: `rlimit` is plain old data; getrlimit/setrlimit only read and
    // write the struct we pass by reference.
    unsafe {
        let mut rl: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 0;
        }
        if rl.rlim_cur < rl.rlim_max {
            let want = libc::rlimit { rlim_cur: rl.rlim_max, rlim_max: rl.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                rl.rlim_cur = rl.rlim_max;
            }
        }
        rl.rlim_cur as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_and_singles() {
        let v = parse_source_ips(&["127.0.0.1-127.0.0.3".into(), "127.0.0.9,::1".into()]).unwrap();
        assert_eq!(v.len(), 5);
        assert_eq!(v[2], "127.0.0.3".parse::<IpAddr>().unwrap());
        assert_eq!(v[4], "::1".parse::<IpAddr>().unwrap());
        assert!(parse_source_ips(&["127.0.0.5-127.0.0.1".into()]).is_err());
        assert!(parse_source_ips(&["nope".into()]).is_err());
    }

    #[test]
    fn fd_limit_is_raised_to_the_hard_limit() {
        let soft = raise_fd_limit();
        assert!(soft >= 1024, "{soft}");
        assert_eq!(raise_fd_limit(), soft);
    }

    #[tokio::test]
    async fn connects_from_a_chosen_source() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let src: IpAddr = "127.0.0.2".parse().unwrap();
        let (c, a) = tokio::join!(connect(addr, Some(src)), l.accept());
        assert_eq!(c.unwrap().local_addr().unwrap().ip(), src);
        assert_eq!(a.unwrap().1.ip(), src);
    }
}
