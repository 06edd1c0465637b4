//! Not a data plane, a yardstick: one direction relayed with
//! IORING_OP_SPLICE through a 1 MiB pipe, keeping one splice into the pipe
//! and one out of it in flight. The kernel runs both on io-wq workers (one
//! parked worker thread per waiting splice), which is what the uring plane
//! was designed to avoid.

use std::io;
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use io_uring::{opcode, types, IoUring};

/// Relays `src` to `dst` (blocking sockets) until `src`'s FIN, then shuts
/// `dst`'s write side; returns the bytes relayed.
pub fn relay_one_way(src: TcpStream, dst: TcpStream) -> u64 {
    const CHUNK: u32 = 1 << 20;
    let mut ring = IoUring::new(8).expect("ring");
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array we pass.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both fds are fresh and owned by nobody else.
    let (pr, pw) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on an fd we own, no pointers.
    unsafe { libc::fcntl(pw.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int) };
    let mut pw = Some(pw);
    let splice_in = |pw: &OwnedFd| {
        opcode::Splice::new(types::Fd(src.as_raw_fd()), -1, types::Fd(pw.as_raw_fd()), -1, CHUNK).build().user_data(1)
    };
    let splice_out =
        opcode::Splice::new(types::Fd(pr.as_raw_fd()), -1, types::Fd(dst.as_raw_fd()), -1, CHUNK).build().user_data(2);
    // SAFETY: splices reference fds only, which outlive the ring's use.
    unsafe {
        ring.submission().push(&splice_in(pw.as_ref().unwrap())).unwrap();
        ring.submission().push(&splice_out).unwrap();
    }
    let mut total = 0u64;
    // Bounded: every turn moves bytes or ends at EOF.
    'run: loop {
        ring.submit_and_wait(1).expect("submit");
        let done: Vec<(u64, i32)> = ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (ud, res) in done {
            assert!(res >= 0, "splice failed: {}", io::Error::from_raw_os_error(-res));
            match (ud, res) {
                // EOF from the source: closing the pipe's write end lets the
                // out splice return 0 once the pipe is empty.
                (1, 0) => pw = None,
                // SAFETY: as above.
                (1, _) => unsafe {
                    ring.submission().push(&splice_in(pw.as_ref().unwrap())).unwrap();
                },
                (_, 0) => break 'run,
                (_, n) => {
                    total += n as u64;
                    // SAFETY: as above.
                    unsafe { ring.submission().push(&splice_out).unwrap() };
                }
            }
        }
    }
    drop(pw);
    dst.shutdown(std::net::Shutdown::Write).unwrap();
    total
}
