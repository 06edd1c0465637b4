//! Reading a bounded HTTP/1.1 head from a stream, shared by the echo server
//! and the clients.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Largest head either side reads before giving up.
pub const MAX_HEAD: usize = 16 * 1024;

/// Why a head could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// The peer closed before a complete head arrived.
    #[error("connection closed before the HTTP head was complete")]
    Eof,
    /// The head exceeded [`MAX_HEAD`].
    #[error("HTTP head larger than {MAX_HEAD} bytes")]
    TooLarge,
    /// Socket error.
    #[error("i/o error while reading the HTTP head: {0}")]
    Io(#[from] std::io::Error),
}

/// Position just past the blank line ending a head, if `buf` holds one.
pub fn head_end(buf: &[u8]) -> Option<usize> {
    buf.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4)
}

/// Reads until `buf` (which may already hold bytes) contains a complete head
/// and returns the head's length; bytes past it stay in `buf`.
pub async fn read_head<R: AsyncRead + Unpin>(r: &mut R, buf: &mut Vec<u8>) -> Result<usize, HeadError> {
    let mut scanned: usize = 0;
    loop {
        if let Some(end) = head_end(&buf[scanned.saturating_sub(3)..]) {
            return Ok(scanned.saturating_sub(3) + end);
        }
        scanned = buf.len();
        if buf.len() >= MAX_HEAD {
            return Err(HeadError::TooLarge);
        }
        let old = buf.len();
        buf.resize(old + 4096, 0);
        let n = r.read(&mut buf[old..]).await;
        match n {
            Ok(0) => {
                buf.truncate(old);
                return Err(HeadError::Eof);
            }
            Ok(n) => buf.truncate(old + n),
            Err(e) => {
                buf.truncate(old);
                return Err(e.into());
            }
        }
    }
}

/// Case-insensitive lookup of a header value.
pub fn header<'a>(headers: &[httparse::Header<'a>], name: &str) -> Option<&'a [u8]> {
    headers.iter().find(|h| h.name.eq_ignore_ascii_case(name)).map(|h| h.value)
}

/// True when the comma-separated header value contains `token` (case-insensitive).
pub fn has_token(value: Option<&[u8]>, token: &str) -> bool {
    value.is_some_and(|v| v.split(|&b| b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reads_head_and_keeps_leftover() {
        let data: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nEXTRA";
        let mut r = data;
        let mut buf = Vec::new();
        let n = read_head(&mut r, &mut buf).await.unwrap();
        assert_eq!(&buf[..n], &data[..data.len() - 5]);
        assert_eq!(&buf[n..], b"EXTRA");
    }

    #[tokio::test]
    async fn eof_before_head_is_an_error() {
        let mut r: &[u8] = b"GET / HTTP/1.1\r\n";
        let mut buf = Vec::new();
        assert!(matches!(read_head(&mut r, &mut buf).await, Err(HeadError::Eof)));
    }

    #[test]
    fn token_lists() {
        assert!(has_token(Some(b"keep-alive, Upgrade"), "upgrade"));
        assert!(!has_token(Some(b"keep-alive"), "upgrade"));
        assert!(!has_token(None, "upgrade"));
    }
}
