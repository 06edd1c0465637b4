//! `tls`: the userspace relay for streams the kernel planes cannot move —
//! a TLS connection's decrypted bytes exist only in userspace. It is
//! generic over both sides (`AsyncRead + AsyncWrite`), so a TLS client and
//! a plain backend, or (later) a TLS backend, go through the same code.
//!
//! The contract is the other planes' (module docs of [`super`]): leftovers
//! first, every byte once and in order; EOF on one side becomes a
//! half-close of the other (for TLS, `close_notify` then FIN, and a
//! `close_notify` read is the EOF); a reset or error resets both sockets;
//! idle timeout (a clean close of both sides: towards TLS `close_notify`
//! then FIN, as a kernel plane's FIN); drain. Each direction holds one buffer of
//! `data_plane.copy_buffer` bytes only while bytes are in flight, so an
//! idle tunnel holds none (rustls keeps its own records' buffers) and a
//! slow reader stops the reading (bounded).

use std::future::poll_fn;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::{pin, Pin};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio_util::sync::CancellationToken;

use super::lifetime::Lifetime;
use super::pools::BufferPool;
use super::{abort, ByteCounters, CloseReason, Direction, Outcome};

/// How long the clean close of an idle tunnel may wait for a peer that
/// takes no bytes (its `close_notify` does not fit): then it is dropped.
const CLOSE_WITHIN: Duration = Duration::from_secs(1);

/// A connection pair for the stream relay: [`super::Tunnel`] over any streams.
pub struct StreamTunnel<C, B> {
    pub client: C,
    pub backend: B,
    /// Bytes read from the client past its request head: deliver first.
    pub to_backend: Bytes,
    /// Bytes read from the backend past its response head: deliver first.
    pub to_client: Bytes,
    pub idle_timeout: Duration,
    pub drain: CancellationToken,
}

/// A stream whose socket can be reset (the fd under a TLS stream).
pub trait Stream: AsyncRead + AsyncWrite + AsRawFd + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + AsRawFd + Unpin + Send> Stream for T {}

/// The relay and its byte counts (`data_plane="tls"` in /metrics).
pub struct StreamRelay {
    /// `copy_buffer`-sized buffers, held by a direction only while bytes
    /// move: taken from here rather than allocated and zeroed per burst.
    buffers: BufferPool,
    counters: ByteCounters,
}

/// How one direction ended.
enum End {
    Eof,
    SrcFailed,
    DstFailed,
}

/// One direction: what waits to be written, and whether the source ended.
struct Mover {
    first: Bytes,
    buf: Option<Box<[u8]>>,
    start: usize,
    end: usize,
    unflushed: bool,
    eof: bool,
    moved: u64,
}

impl Mover {
    fn new(first: Bytes) -> Mover {
        Mover { first, buf: None, start: 0, end: 0, unflushed: false, eof: false, moved: 0 }
    }

    /// Gives the buffer back to the pool (nothing in it waits: called when
    /// the source has nothing to read, or the tunnel ended).
    fn release(&mut self, buffers: &BufferPool) {
        if let Some(buf) = self.buf.take() {
            buffers.give(buf);
        }
    }

    /// Writes what is pending to `dst`; Ready(Ok) once nothing is.
    fn poll_write_pending<D: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        mut dst: Pin<&mut D>,
        total: &std::sync::atomic::AtomicU64,
    ) -> Poll<io::Result<()>> {
        loop {
            let pending: &[u8] = if !self.first.is_empty() {
                &self.first
            } else if let (Some(buf), true) = (&self.buf, self.start < self.end) {
                &buf[self.start..self.end]
            } else {
                break;
            };
            let n = std::task::ready!(dst.as_mut().poll_write(cx, pending))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            if !self.first.is_empty() {
                self.first.advance(n);
            } else {
                self.start += n;
            }
            self.moved += n as u64;
            total.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            self.unflushed = true;
        }
        if self.unflushed {
            std::task::ready!(dst.as_mut().poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }

    fn poll_move<S: AsyncRead + Unpin, D: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        mut src: Pin<&mut S>,
        mut dst: Pin<&mut D>,
        buffers: &BufferPool,
        total: &std::sync::atomic::AtomicU64,
    ) -> Poll<End> {
        loop {
            match self.poll_write_pending(cx, dst.as_mut(), total) {
                Poll::Ready(Ok(())) => {}
                Poll::Ready(Err(_)) => return Poll::Ready(End::DstFailed),
                Poll::Pending => return Poll::Pending,
            }
            if self.eof {
                return match dst.as_mut().poll_shutdown(cx) {
                    Poll::Ready(_) => Poll::Ready(End::Eof),
                    Poll::Pending => Poll::Pending,
                };
            }
            let buf = self.buf.get_or_insert_with(|| buffers.take());
            let mut read = ReadBuf::new(buf);
            match src.as_mut().poll_read(cx, &mut read) {
                Poll::Ready(Ok(())) if read.filled().is_empty() => self.eof = true,
                Poll::Ready(Ok(())) => (self.start, self.end) = (0, read.filled().len()),
                Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                // A TLS stream that ends without close_notify reads as an
                // error: possibly truncated, so it is a reset, not an EOF.
                Poll::Ready(Err(_)) => return Poll::Ready(End::SrcFailed),
                Poll::Pending => {
                    // Idle: hold no buffer until bytes arrive.
                    self.release(buffers);
                    return Poll::Pending;
                }
            }
        }
    }
}

impl StreamRelay {
    pub fn new(buffer: usize) -> StreamRelay {
        StreamRelay { buffers: BufferPool::new(buffer.max(4096)), counters: ByteCounters::default() }
    }

    /// (to backend, to client) relayed so far.
    pub fn bytes_relayed(&self) -> (u64, u64) {
        self.counters.load()
    }

    /// Runs a tunnel until it ends.
    pub async fn relay<C: Stream, B: Stream>(&self, t: StreamTunnel<C, B>) -> Outcome {
        let StreamTunnel { mut client, mut backend, to_backend, to_client, idle_timeout, drain } = t;
        let fds: [RawFd; 2] = [client.as_raw_fd(), backend.as_raw_fd()];
        let mut up = Mover::new(to_backend);
        let mut down = Mover::new(to_client);
        let (mut up_done, mut down_done) = (false, false);
        let mut life = Lifetime::new(idle_timeout);
        let mut idle = pin!(tokio::time::sleep(idle_timeout));
        let mut drained = pin!(drain.cancelled());
        let buffers = &self.buffers;
        let counters = &self.counters;

        let reason = poll_fn(|cx| {
            for dir in Direction::BOTH {
                let (done, end) = match dir {
                    Direction::ToBackend if !up_done => (
                        &mut up_done,
                        up.poll_move(cx, Pin::new(&mut client), Pin::new(&mut backend), buffers, &counters.to_backend),
                    ),
                    Direction::ToClient if !down_done => (
                        &mut down_done,
                        down.poll_move(cx, Pin::new(&mut backend), Pin::new(&mut client), buffers, &counters.to_client),
                    ),
                    _ => continue,
                };
                match end {
                    Poll::Ready(End::Eof) => *done = true,
                    Poll::Ready(End::SrcFailed) => return Poll::Ready(dir.source_failed()),
                    Poll::Ready(End::DstFailed) => return Poll::Ready(dir.destination_failed()),
                    Poll::Pending => {}
                }
            }
            life.poll_end(cx, [up_done, down_done], (up.moved, down.moved), idle.as_mut(), drained.as_mut())
        })
        .await;
        up.release(buffers);
        down.release(buffers);
        if reason.resets() {
            // A truncated stream must not look complete: reset both sockets.
            fds.into_iter().for_each(abort);
        } else if reason == CloseReason::Idle {
            // The router ends a stream nothing cut short: close each side
            // cleanly. Dropped without it, a TLS stream ends in a bare FIN,
            // which its client must read as a truncation.
            let close = async {
                let _ = tokio::join!(client.shutdown(), backend.shutdown());
            };
            let _ = tokio::time::timeout(CLOSE_WITHIN, close).await;
        }
        Outcome { to_backend: up.moved, to_client: down.moved, reason }
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;
    use crate::dataplane::CloseReason;

    /// Two connected pairs: (client peer, client side), (backend side, backend peer).
    async fn pairs() -> ((TcpStream, TcpStream), (TcpStream, TcpStream)) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let mut out = Vec::new();
        for _ in 0..2 {
            let a = TcpStream::connect(addr).await.unwrap();
            let (b, _) = l.accept().await.unwrap();
            out.push((a, b));
        }
        let second = out.pop().unwrap();
        let first = out.pop().unwrap();
        ((first.0, first.1), (second.1, second.0))
    }

    fn tunnel(client: TcpStream, backend: TcpStream, idle: Duration) -> StreamTunnel<TcpStream, TcpStream> {
        StreamTunnel {
            client,
            backend,
            to_backend: Bytes::from_static(b"early-up "),
            to_client: Bytes::from_static(b"early-down "),
            idle_timeout: idle,
            drain: CancellationToken::new(),
        }
    }

    #[tokio::test]
    async fn leftovers_first_and_half_close_each_way() {
        let ((mut c, client), (backend, mut b)) = pairs().await;
        let relay = StreamRelay::new(4096);
        let run = tokio::spawn(async move { relay.relay(tunnel(client, backend, Duration::from_secs(10))).await });
        c.write_all(&[1u8; 100_000]).await.unwrap();
        c.shutdown().await.unwrap();
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(&got[..9], b"early-up ");
        assert_eq!(got.len(), 9 + 100_000);
        // The other way still flows after the client's FIN.
        b.write_all(b"answer").await.unwrap();
        b.shutdown().await.unwrap();
        let mut down = Vec::new();
        c.read_to_end(&mut down).await.unwrap();
        assert_eq!(down, b"early-down answer");
        let outcome = run.await.unwrap();
        assert_eq!(outcome.reason, CloseReason::Done);
        assert_eq!((outcome.to_backend, outcome.to_client), (100_009, 17));
    }

    #[tokio::test]
    async fn a_reset_resets_the_other_side() {
        let ((c, client), (backend, mut b)) = pairs().await;
        let relay = StreamRelay::new(4096);
        let run = tokio::spawn(async move { relay.relay(tunnel(client, backend, Duration::from_secs(10))).await });
        let mut early = [0u8; 9];
        b.read_exact(&mut early).await.unwrap();
        abort(c.as_raw_fd());
        drop(c);
        assert_eq!(run.await.unwrap().reason, CloseReason::ClientReset);
        let read = b.read(&mut [0u8; 16]).await;
        assert!(matches!(&read, Err(e) if e.kind() == io::ErrorKind::ConnectionReset), "{read:?}");
    }

    #[tokio::test]
    async fn idle_tunnels_close() {
        let ((_c, client), (backend, _b)) = pairs().await;
        let relay = StreamRelay::new(4096);
        let outcome = relay.relay(tunnel(client, backend, Duration::from_millis(200))).await;
        assert_eq!(outcome.reason, CloseReason::Idle);
    }
}
