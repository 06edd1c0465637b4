//! What the router does with every TCP socket it relays, client side and
//! backend side alike: the options it sets, and telling a shortage of the
//! router's own resources from a peer's failure.

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;

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
}
