//! How many bytes a TCP socket holds in its queues, for the planes that
//! size a read by what waits (uring) or check what the kernel still holds
//! (sockmap). Neither std, tokio nor socket2 offers these ioctls.

use std::io;
use std::os::fd::RawFd;

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
pub fn inq(fd: RawFd) -> io::Result<u64> {
    ioctl_int(fd, libc::FIONREAD)
}

/// `SIOCOUTQ`: bytes in the send queue, sent or not, not acknowledged yet.
pub fn outq(fd: RawFd) -> io::Result<u64> {
    ioctl_int(fd, libc::TIOCOUTQ)
}
