//! A TLS connection's socket, read through a counter of record boundaries.
//!
//! rustls reads ciphertext in whatever chunks the socket gives. When a
//! tunnel's session is handed to the kernel (kTLS), every byte rustls
//! read must have been decrypted by it — the kernel starts at the next
//! record of the socket's queue — so the handoff is only possible when
//! rustls's reads ended on a record boundary. [`Records`] watches the
//! bytes go by (5-byte headers, bodies skipped by length) and says whether
//! they did; it adds no syscall and copies nothing.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A TLS record's header: type (1), version (2), length (2).
const HEADER: usize = 5;

/// Where the bytes read so far end, within TLS's record framing.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Framing {
    /// Header bytes of the next record seen so far (0..5).
    header: [u8; HEADER],
    have: usize,
    /// Body bytes of the current record not yet read.
    body_left: usize,
}

impl Framing {
    /// Accounts for `bytes`, the next bytes of the stream.
    fn advance(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.body_left > 0 {
                let k = self.body_left.min(bytes.len());
                self.body_left -= k;
                bytes = &bytes[k..];
                continue;
            }
            let k = (HEADER - self.have).min(bytes.len());
            self.header[self.have..self.have + k].copy_from_slice(&bytes[..k]);
            self.have += k;
            bytes = &bytes[k..];
            if self.have == HEADER {
                self.body_left = u16::from_be_bytes([self.header[3], self.header[4]]) as usize;
                self.have = 0;
            }
        }
    }

    fn at_boundary(&self) -> bool {
        self.have == 0 && self.body_left == 0
    }
}

/// A stream whose reads are counted in TLS records (see the module docs).
#[derive(Debug)]
pub struct Records<S> {
    inner: S,
    framing: Framing,
}

impl<S> Records<S> {
    pub fn new(inner: S) -> Records<S> {
        Records { inner, framing: Framing::default() }
    }

    /// Whether every byte read so far belongs to a whole record.
    pub fn at_boundary(&self) -> bool {
        self.framing.at_boundary()
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Records<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        ready!(Pin::new(&mut self.inner).poll_read(cx, buf))?;
        let this = &mut *self;
        this.framing.advance(&buf.filled()[before..]);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Records<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<S: AsRawFd> AsRawFd for Records<S> {
    fn as_raw_fd(&self) -> RawFd {
        self.inner.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(len: u16) -> Vec<u8> {
        let mut r = vec![23, 3, 3];
        r.extend_from_slice(&len.to_be_bytes());
        r.extend(std::iter::repeat_n(0xAB, len as usize));
        r
    }

    #[test]
    fn boundaries_are_found_however_the_bytes_are_cut() {
        let stream: Vec<u8> = [record(0), record(1), record(300), record(16384 + 256)].concat();
        let ends: Vec<usize> = [5, 11, 316, stream.len()].to_vec();
        for chunk in [1, 2, 4, 5, 6, 7, 100, 4096, stream.len()] {
            let mut f = Framing::default();
            let mut at = 0;
            for piece in stream.chunks(chunk) {
                f.advance(piece);
                at += piece.len();
                assert_eq!(f.at_boundary(), ends.contains(&at), "chunk {chunk}, after {at} bytes");
            }
        }
    }

    #[tokio::test]
    async fn reads_pass_through_and_are_counted() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut a, b) = tokio::io::duplex(1 << 16);
        let mut r = Records::new(b);
        let two = [record(10), record(20)].concat();
        a.write_all(&two[..7]).await.unwrap();
        let mut buf = [0u8; 64];
        let n = r.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &two[..7]);
        assert!(!r.at_boundary());
        a.write_all(&two[7..15]).await.unwrap();
        let n = r.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], &two[7..15]);
        assert!(r.at_boundary(), "the first record ends at 15");
        a.write_all(&two[15..]).await.unwrap();
        let mut rest = vec![0u8; two.len() - 15];
        r.read_exact(&mut rest).await.unwrap();
        assert!(r.at_boundary());
        r.write_all(b"out").await.unwrap();
        let mut out = [0u8; 3];
        a.read_exact(&mut out).await.unwrap();
        assert_eq!(&out, b"out");
    }
}
