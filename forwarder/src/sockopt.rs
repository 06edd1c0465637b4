//! The socket options every relayed TCP connection gets, client side and
//! backend side alike.

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
