//! A reusable read buffer for framed protocols: bytes `[start, end)` are
//! read but not yet consumed; it compacts and grows only when it must, so
//! steady-state reading does not allocate.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Read buffer with a consumed prefix.
#[derive(Debug)]
pub struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl ReadBuf {
    /// A buffer that starts with `leftover` (bytes read past a handshake) and
    /// has room for at least `capacity` bytes.
    pub fn with_leftover(leftover: Vec<u8>, capacity: usize) -> Self {
        let end = leftover.len();
        let mut buf = leftover;
        buf.resize(end.max(capacity), 0);
        ReadBuf { buf, start: 0, end }
    }

    /// The unconsumed bytes.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// The unconsumed bytes, mutable (for unmasking in place).
    pub fn data_mut(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.end]
    }

    /// Drops `n` bytes from the front of [`data`](Self::data).
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
    }

    /// Makes sure an item of `need` bytes starting at the front will fit.
    pub fn reserve(&mut self, need: usize) {
        if self.start + need > self.buf.len() {
            self.compact();
            if need > self.buf.len() {
                self.buf.resize(need.next_power_of_two(), 0);
            }
        }
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// Reads more bytes from `r`; returns how many (0 at end of stream).
    pub async fn read_from<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> std::io::Result<usize> {
        self.compact();
        if self.end == self.buf.len() {
            let len = self.buf.len().max(1024);
            self.buf.resize(len * 2, 0);
        }
        let n = r.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keeps_unconsumed_bytes_across_reads_and_growth() {
        let mut rb = ReadBuf::with_leftover(b"ab".to_vec(), 4);
        let mut src: &[u8] = b"cdefgh";
        assert_eq!(rb.read_from(&mut src).await.unwrap(), 2);
        assert_eq!(rb.data(), b"abcd");
        rb.consume(3);
        assert_eq!(rb.data(), b"d");
        rb.reserve(64);
        assert_eq!(rb.data(), b"d");
        assert_eq!(rb.read_from(&mut src).await.unwrap(), 4);
        assert_eq!(rb.data(), b"defgh");
        assert_eq!(rb.read_from(&mut src).await.unwrap(), 0);
    }
}
