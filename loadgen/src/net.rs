//! Outgoing connections: source-address lists (`--source-ip`, with ranges)
//! and connecting from a chosen local address.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use tokio::net::{TcpSocket, TcpStream};

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
