//! The tunnel driver shared by the readiness-based planes (copy, splice).
//!
//! It is written against tokio's readiness API (`poll_read_ready`,
//! `try_io`, …) rather than as nested `async fn`s, so that a tunnel's
//! whole state — two [`Mover`]s, an idle timer and the drain signal — is a
//! few hundred bytes: that is what an idle WebSocket costs the router, and
//! a node holds 100,000 of them.
//!
//! Each direction is a [`Mover`]: it waits for readability holding nothing,
//! then borrows a *burst* resource — a pipe from the splice pool, or a
//! buffer from the copy pool when there is no pipe — moves bytes until the
//! source would block and the resource is empty, and gives it back. So an
//! idle tunnel holds no buffer and no pipe, and a slow reader pins at most
//! one resource per direction (nothing more is read until it drains).
//!
//! The driver turns EOF into a half-close of the other side, a failure into
//! a reset of both sides, and ends the tunnel on idle timeout or drain.

use std::future::poll_fn;
use std::io;
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd};
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use socket2::SockRef;
use tokio::io::Interest;
use tokio::net::TcpStream;

use super::lifetime::Lifetime;
use super::pools::{BufferPool, Pipe, PipePool};
use super::{abort, ByteCounters, Direction, Outcome, Tunnel};

/// Where a plane's movers get their burst resources.
pub struct Resources<'a> {
    pub buffers: &'a BufferPool,
    /// None for the copy plane.
    pub pipes: Option<&'a PipePool>,
}

/// How one direction ended.
enum End {
    /// The source sent FIN and everything before it was delivered.
    Eof,
    /// Reading the source failed (reset, or the socket broke).
    SrcFailed,
    /// Writing the destination failed.
    DstFailed,
}

/// What a direction holds while bytes move.
enum Burst {
    Idle,
    Buffer { buf: Box<[u8]>, start: usize, end: usize },
    Pipe { pipe: Pipe, filled: usize },
}

/// One direction of a tunnel.
struct Mover {
    /// Bytes userspace read past the heads: delivered before anything else.
    first: Bytes,
    burst: Burst,
    eof: bool,
    moved: u64,
}

fn is_would_block(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::WouldBlock
}

impl Mover {
    fn new(first: Bytes) -> Mover {
        Mover { first, burst: Burst::Idle, eof: false, moved: 0 }
    }

    /// Returns the burst resource to its pool (a pipe only if it is empty).
    fn release(&mut self, res: &Resources<'_>) {
        match std::mem::replace(&mut self.burst, Burst::Idle) {
            Burst::Idle => {}
            Burst::Buffer { buf, .. } => res.buffers.give(buf),
            Burst::Pipe { pipe, filled } => {
                if let Some(pool) = res.pipes {
                    if filled == 0 {
                        pool.give(pipe)
                    } else {
                        pool.discard(pipe)
                    }
                }
            }
        }
    }

    /// Delivers what is pending: `first`, then the burst's contents.
    /// Ready(Ok(n)) when something was written, Ready(Ok(0)) when nothing is pending.
    fn poll_flush(&mut self, cx: &mut Context<'_>, dst: &TcpStream) -> Poll<io::Result<usize>> {
        loop {
            let pending = !self.first.is_empty()
                || match &self.burst {
                    Burst::Buffer { start, end, .. } => start < end,
                    Burst::Pipe { filled, .. } => *filled > 0,
                    Burst::Idle => false,
                };
            if !pending {
                return Poll::Ready(Ok(0));
            }
            ready!(dst.poll_write_ready(cx))?;
            let written = if !self.first.is_empty() {
                dst.try_write(&self.first).inspect(|&n| self.first.advance(n))
            } else {
                match &mut self.burst {
                    Burst::Buffer { buf, start, end } => dst.try_write(&buf[*start..*end]).inspect(|&n| *start += n),
                    Burst::Pipe { pipe, filled } => dst
                        .try_io(Interest::WRITABLE, || pipe.splice_out(dst.as_fd(), *filled))
                        .inspect(|&n| *filled -= n),
                    Burst::Idle => unreachable!("checked above"),
                }
            };
            match written {
                Ok(n) => return Poll::Ready(Ok(n)),
                Err(e) if is_would_block(&e) || e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    /// Moves bytes from `src` to `dst` until EOF, an error, or nothing is
    /// ready (Pending, holding no resource unless bytes wait for `dst`).
    fn poll_move(
        &mut self,
        cx: &mut Context<'_>,
        src: &TcpStream,
        dst: &TcpStream,
        res: &Resources<'_>,
        total: &std::sync::atomic::AtomicU64,
    ) -> Poll<End> {
        loop {
            match self.poll_flush(cx, dst) {
                Poll::Ready(Ok(0)) => {}
                Poll::Ready(Ok(n)) => {
                    self.moved += n as u64;
                    total.fetch_add(n as u64, Ordering::Relaxed);
                    continue;
                }
                Poll::Ready(Err(_)) => {
                    self.release(res);
                    return Poll::Ready(End::DstFailed);
                }
                Poll::Pending => return Poll::Pending,
            }
            if self.eof {
                self.release(res);
                return Poll::Ready(End::Eof);
            }
            match src.poll_read_ready(cx) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => {
                    self.release(res);
                    return Poll::Ready(End::SrcFailed);
                }
                Poll::Pending => {
                    // Idle: hold nothing until the next bytes arrive.
                    self.release(res);
                    return Poll::Pending;
                }
            }
            if matches!(self.burst, Burst::Idle) {
                self.burst = match res.pipes.and_then(PipePool::take) {
                    Some(pipe) => Burst::Pipe { pipe, filled: 0 },
                    None => Burst::Buffer { buf: res.buffers.take(), start: 0, end: 0 },
                };
            }
            let read = match &mut self.burst {
                Burst::Buffer { buf, start, end } => read_until_drained(src, buf).inspect(|&n| (*start, *end) = (0, n)),
                Burst::Pipe { pipe, filled } => {
                    src.try_io(Interest::READABLE, || pipe.splice_in(src.as_fd())).inspect(|&n| *filled = n)
                }
                Burst::Idle => unreachable!("set above"),
            };
            match read {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                // Readiness was cleared: the next poll_read_ready registers
                // this task for the next bytes (and releases the resource).
                Err(e) if is_would_block(&e) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.release(res);
                    return Poll::Ready(End::SrcFailed);
                }
            }
        }
    }
}

/// Reads into `buf` as `try_read` does, but a short read (fewer bytes
/// than `buf` holds: TCP's receive queue is empty now) also clears the
/// readiness it was made under, as tokio's own `poll_read` does. So the
/// next `poll_read_ready` waits for the reactor's next edge instead of
/// making a read that can only return EAGAIN (profiled: 2 of copy's 4
/// reads per relayed message, docs/performance.md). No wakeup is lost:
/// `try_io` clears only the readiness event it took before the read, and
/// bytes that arrive after it raise a newer one.
fn read_until_drained(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut short = 0;
    let read = src.try_io(Interest::READABLE, || {
        let n = nix::sys::socket::recv(src.as_raw_fd(), buf, nix::sys::socket::MsgFlags::empty())?;
        if n > 0 && n < buf.len() {
            short = n;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    });
    match read {
        Err(e) if short > 0 && is_would_block(&e) => Ok(short),
        other => other,
    }
}

/// Runs a tunnel until it ends, moving bytes with `res`.
pub async fn drive(t: Tunnel, res: Resources<'_>, counters: &ByteCounters) -> Outcome {
    let Tunnel { client, backend, to_backend, to_client, idle_timeout, drain } = t;
    let mut up = Mover::new(to_backend);
    let mut down = Mover::new(to_client);
    let (mut up_done, mut down_done) = (false, false);
    let mut life = Lifetime::new(idle_timeout);
    let mut idle = pin!(tokio::time::sleep(idle_timeout));
    let mut drained = pin!(drain.cancelled());

    let reason = poll_fn(|cx| {
        for dir in Direction::BOTH {
            let (mover, done, src, dst, total) = match dir {
                Direction::ToBackend => (&mut up, &mut up_done, &client, &backend, &counters.to_backend),
                Direction::ToClient => (&mut down, &mut down_done, &backend, &client, &counters.to_client),
            };
            if *done {
                continue;
            }
            if let Poll::Ready(end) = mover.poll_move(cx, src, dst, &res, total) {
                match end {
                    End::Eof => {
                        // Half-close: the destination sees FIN, the other way keeps flowing.
                        let _ = SockRef::from(dst).shutdown(Shutdown::Write);
                        *done = true;
                    }
                    End::SrcFailed => return Poll::Ready(dir.source_failed()),
                    End::DstFailed => return Poll::Ready(dir.destination_failed()),
                }
            }
        }
        life.poll_end(cx, [up_done, down_done], (up.moved, down.moved), idle.as_mut(), drained.as_mut())
    })
    .await;

    up.release(&res);
    down.release(&res);
    if reason.resets() {
        // A truncated stream must not look complete: reset both sides.
        abort(client.as_raw_fd());
        abort(backend.as_raw_fd());
    }
    Outcome { to_backend: up.moved, to_client: down.moved, reason }
}
