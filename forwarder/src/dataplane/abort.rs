//! Ending a tunnel abruptly: the survivor of a reset must see an RST, never
//! a FIN, so that a stream cut short never looks complete.

use std::os::fd::RawFd;

/// Makes the socket's close send RST instead of FIN (`SO_LINGER` 0); the
/// close itself comes when its owner drops it. Errors are ignored: the
/// socket may be gone already, and then there is nothing to reset.
pub fn abort(fd: RawFd) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: `linger` is a valid value of the size passed; setsockopt only
    // reads it, and fails with EBADF or ENOTSOCK on anything but an open socket.
    let _ = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
}
