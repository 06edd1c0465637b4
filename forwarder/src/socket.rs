//! What the router does with every TCP socket it relays, client side and
//! backend side alike: the options it sets, and telling a shortage of the
//! router's own resources from a peer's failure.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use tokio::net::TcpStream;

/// The address a client connected to, read from its socket only when it
/// is needed: by the PROXY header of a pool that sends one. Every other
/// connection is spared the `getsockname` (one syscall per connection,
/// docs/performance.md §5, handshake item 6).
///
/// It names the client's socket by its descriptor: it is used only while
/// whoever holds it also holds that socket (the handshake, up to the
/// backend's connect), so the descriptor cannot have been closed and
/// reused meanwhile.
#[derive(Debug, Clone, Copy)]
pub struct LocalAddr(RawFd);

impl LocalAddr {
    pub fn of(socket: &TcpStream) -> LocalAddr {
        LocalAddr(socket.as_raw_fd())
    }

    /// The address, or `0.0.0.0:0` when the socket cannot say (it failed
    /// meanwhile; the header then names no destination, as before).
    pub fn get(self) -> SocketAddr {
        nix::sys::socket::getsockname::<nix::sys::socket::SockaddrStorage>(self.0)
            .ok()
            .and_then(|a| match (a.as_sockaddr_in(), a.as_sockaddr_in6()) {
                (Some(v4), _) => Some(SocketAddr::from(std::net::SocketAddrV4::from(*v4))),
                (_, Some(v6)) => Some(SocketAddr::from(std::net::SocketAddrV6::from(*v6))),
                _ => None,
            })
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }
}

/// Sets what a connection the router relays needs: `TCP_NODELAY` (a
/// relayed write goes out as it came; its failure is returned) and
/// `limits.tcp_user_timeout` (None: the kernel's own; a failure is logged,
/// not fatal: the connection works without it).
pub fn for_relay(stream: &TcpStream, user_timeout: Option<Duration>) -> io::Result<()> {
    stream.set_nodelay(true)?;
    if user_timeout.is_some() {
        if let Err(e) = socket2::SockRef::from(stream).set_tcp_user_timeout(user_timeout) {
            tracing::warn!("TCP_USER_TIMEOUT not set: {e}");
        }
    }
    Ok(())
}

/// The errors that say the router itself ran short (file descriptors,
/// kernel socket buffers, memory), by the name their metric carries.
const SHORTAGES: [(i32, &str); 4] =
    [(libc::EMFILE, "EMFILE"), (libc::ENFILE, "ENFILE"), (libc::ENOBUFS, "ENOBUFS"), (libc::ENOMEM, "ENOMEM")];

/// Whether `e` says the router ran short rather than a peer failing: the
/// errno's name (`upsplice_resource_errors_total`'s `error` label), or
/// None for any other error.
pub fn shortage(e: &io::Error) -> Option<&'static str> {
    let code = e.raw_os_error()?;
    SHORTAGES.iter().find(|(c, _)| *c == code).map(|(_, name)| *name)
}

/// Every name [`shortage`] can return (their series exist from startup).
pub fn shortage_names() -> impl Iterator<Item = &'static str> {
    SHORTAGES.iter().map(|(_, name)| *name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shortages_are_told_from_peer_failures() {
        let os = io::Error::from_raw_os_error;
        assert_eq!(shortage(&os(libc::EMFILE)), Some("EMFILE"));
        assert_eq!(shortage(&os(libc::ENFILE)), Some("ENFILE"));
        assert_eq!(shortage(&os(libc::ENOBUFS)), Some("ENOBUFS"));
        assert_eq!(shortage(&os(libc::ENOMEM)), Some("ENOMEM"));
        assert_eq!(shortage(&os(libc::ECONNREFUSED)), None);
        assert_eq!(shortage(&os(libc::ETIMEDOUT)), None);
        assert_eq!(shortage(&io::Error::new(io::ErrorKind::TimedOut, "no answer")), None);
        assert_eq!(shortage_names().count(), 4);
    }

    /// What `getsockname` gives, as tokio's `local_addr` reads it: the
    /// address the client connected to, also on a wildcard listener (IPv6
    /// where the machine has it).
    #[tokio::test]
    async fn the_local_address_is_the_one_the_client_connected_to() {
        for (bind, to) in [("127.0.0.1:0", "127.0.0.1"), ("0.0.0.0:0", "127.0.0.3"), ("[::]:0", "::1")] {
            let Ok(listener) = tokio::net::TcpListener::bind(bind).await else {
                assert!(bind.starts_with('['), "{bind}: IPv4 must bind");
                continue;
            };
            let to = SocketAddr::new(to.parse().unwrap(), listener.local_addr().unwrap().port());
            // Connected before the accept (the backlog takes it), so that an
            // IPv6 machine without ::1 skips rather than waits.
            let Ok(_client) = TcpStream::connect(to).await else {
                assert!(to.is_ipv6(), "{to}: IPv4 loopback must connect");
                continue;
            };
            let (accepted, _) = listener.accept().await.unwrap();
            assert_eq!(LocalAddr::of(&accepted).get(), to, "listening on {bind}");
        }
    }
}
