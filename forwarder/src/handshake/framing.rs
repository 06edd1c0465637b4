//! Relaying one complete backend response (a refused upgrade, or a plain
//! response the router reads itself) framed by its own Content-Length or
//! chunked encoding, so a keep-alive backend does not leave the client
//! waiting for a close that never comes.

use std::io;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::head::{tokens, values, Response};

/// How a response body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (1xx, 204, 304, or a response to HEAD).
    Empty,
    Length(u64),
    Chunked,
    /// Until the backend closes.
    UntilClose,
}

/// The framing of `resp` given the request method, or why it has none a
/// proxy may relay: Content-Length values that are invalid or differ
/// (RFC 9112 §6.3 item 5: the proxy answers 502 instead).
pub fn framing(resp: &Response, method: &str) -> Result<Framing, &'static str> {
    if method.eq_ignore_ascii_case("HEAD") || resp.status < 200 || resp.status == 204 || resp.status == 304 {
        return Ok(Framing::Empty);
    }
    if tokens(&resp.headers, "transfer-encoding").last().is_some_and(|t| t.eq_ignore_ascii_case(b"chunked")) {
        return Ok(Framing::Chunked);
    }
    let mut length = None;
    for value in values(&resp.headers, "content-length").flat_map(|v| v.split(|&b| b == b',')) {
        let value = value.trim_ascii();
        let n: u64 = match std::str::from_utf8(value) {
            Ok(v) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => {
                v.parse().map_err(|_| "Content-Length out of range")?
            }
            _ => return Err("invalid Content-Length in the response"),
        };
        if length.is_some_and(|l| l != n) {
            return Err("conflicting Content-Length values in the response");
        }
        length = Some(n);
    }
    Ok(length.map_or(Framing::UntilClose, Framing::Length))
}

/// Finds where a chunked body ends, fed the bytes as they arrive.
///
/// Strict (RFC 9112 §7.1): a chunk size is 1–16 hex digits, optionally
/// followed by whitespace and `;extensions`; every line ends in CRLF; a bare
/// LF or another control byte in a size line, an extension or a trailer is
/// an error. A lenient parser here and a different lenient parser in the
/// backend is how a body hides a second request.
#[derive(Debug, Default)]
pub struct ChunkedEnd {
    state: Chunk,
    size: u64,
    /// Hex digits of the current chunk size seen so far.
    digits: u8,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    #[default]
    Size,
    /// Whitespace after the size: only more of it, `;` or CR may follow.
    SizeWs,
    Ext,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    TrailerStart,
    Trailer,
    TrailerLf,
    FinalLf,
    Done,
}

/// A control byte that may not appear in a chunk line or a trailer (HTAB may).
fn is_ctl(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

impl ChunkedEnd {
    /// Consumes `buf`; returns `Ok(Some(n))` when the body ends after the
    /// first `n` bytes of `buf`, `Ok(None)` when more is needed.
    pub fn feed(&mut self, buf: &[u8]) -> Result<Option<usize>, &'static str> {
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            self.state = match self.state {
                Chunk::Size => match b {
                    b'0'..=b'9' | b'a'..=b'f' | b'A'..=b'F' => {
                        let digit = (b as char).to_digit(16).expect("hex digit") as u64;
                        if self.digits == 16 {
                            return Err("chunk size overflows");
                        }
                        self.digits += 1;
                        self.size = self
                            .size
                            .checked_mul(16)
                            .and_then(|s| s.checked_add(digit))
                            .ok_or("chunk size overflows")?;
                        Chunk::Size
                    }
                    _ if self.digits == 0 => return Err("chunk size missing"),
                    b' ' | b'\t' => Chunk::SizeWs,
                    b';' => Chunk::Ext,
                    b'\r' => Chunk::SizeLf,
                    _ => return Err("invalid chunk size"),
                },
                Chunk::SizeWs => match b {
                    b' ' | b'\t' => Chunk::SizeWs,
                    b';' => Chunk::Ext,
                    b'\r' => Chunk::SizeLf,
                    _ => return Err("invalid chunk size line"),
                },
                Chunk::Ext => match b {
                    b'\r' => Chunk::SizeLf,
                    _ if is_ctl(b) => return Err("control byte in a chunk extension"),
                    _ => Chunk::Ext,
                },
                Chunk::SizeLf if b == b'\n' => {
                    self.digits = 0;
                    if self.size == 0 {
                        Chunk::TrailerStart
                    } else {
                        Chunk::Data
                    }
                }
                Chunk::Data => {
                    let take = (self.size).min((buf.len() - i) as u64);
                    self.size -= take;
                    i += take as usize;
                    if self.size == 0 {
                        self.state = Chunk::DataCr;
                    }
                    continue;
                }
                Chunk::DataCr if b == b'\r' => Chunk::DataLf,
                Chunk::DataLf if b == b'\n' => Chunk::Size,
                Chunk::TrailerStart => match b {
                    b'\r' => Chunk::FinalLf,
                    _ if is_ctl(b) => return Err("control byte in a trailer"),
                    _ => Chunk::Trailer,
                },
                Chunk::Trailer => match b {
                    b'\r' => Chunk::TrailerLf,
                    _ if is_ctl(b) => return Err("control byte in a trailer"),
                    _ => Chunk::Trailer,
                },
                Chunk::TrailerLf if b == b'\n' => Chunk::TrailerStart,
                Chunk::FinalLf if b == b'\n' => Chunk::Done,
                Chunk::Done => return Ok(Some(i)),
                _ => return Err("malformed chunked framing"),
            };
            i += 1;
            if self.state == Chunk::Done {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }
}

/// Writes `head` (a response head, as the client is to get it) and then
/// the response body to `client`: first what of it is in `rest` (read from
/// the backend with the head), then what the backend sends, until
/// `framing` says the response is complete. Bytes past the end are never
/// relayed. Each read waits at most `idle`. Returns the bytes written and
/// whether the backend sent nothing past the response's end as far as it
/// was read (else its connection must not carry another request: those
/// bytes would be taken for the next response).
pub async fn relay_response<R, W>(
    backend: &mut R,
    client: &mut W,
    head: &[u8],
    rest: &[u8],
    framing: Framing,
    idle: Duration,
) -> io::Result<(u64, bool)>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut chunked = ChunkedEnd::default();
    let mut remaining = match framing {
        Framing::Length(n) => n,
        _ => u64::MAX,
    };
    // How much of `data` belongs to the response; true when it is complete.
    let mut take = |data: &[u8]| -> io::Result<(usize, bool)> {
        match framing {
            Framing::Empty => Ok((0, true)),
            Framing::Length(_) => {
                let n = remaining.min(data.len() as u64);
                remaining -= n;
                Ok((n as usize, remaining == 0))
            }
            Framing::Chunked => match chunked.feed(data).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))? {
                Some(end) => Ok((end, true)),
                None => Ok((data.len(), false)),
            },
            Framing::UntilClose => Ok((data.len(), false)),
        }
    };
    let (n, mut done) = take(rest)?;
    let mut clean = n == rest.len();
    // One write for the head and what of the body came with it (a small
    // response is one segment, one syscall).
    let mut first = Vec::with_capacity(head.len() + n);
    first.extend_from_slice(head);
    first.extend_from_slice(&rest[..n]);
    client.write_all(&first).await?;
    drop(first);
    let mut written = (head.len() + n) as u64;
    // Only a response longer than what came with its head needs a buffer
    // (most small responses do not: no 16 KiB allocated and zeroed for them).
    let mut buf = Vec::new();
    while !done {
        if buf.is_empty() {
            buf = vec![0u8; 16 * 1024];
        }
        let read = tokio::time::timeout(idle, backend.read(&mut buf))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "backend response stalled"))??;
        if read == 0 {
            if framing == Framing::UntilClose {
                break;
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "backend closed before the response was complete",
            ));
        }
        let (n, complete) = take(&buf[..read])?;
        clean = n == read;
        client.write_all(&buf[..n]).await?;
        written += n as u64;
        done = complete;
    }
    client.flush().await?;
    Ok((written, clean))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_framing_refuses_what_a_client_could_read_otherwise() {
        let parse = |raw: &str| super::super::head::parse_response(raw.as_bytes(), 4096).unwrap().unwrap();
        let framing_of = |raw: &str| framing(&parse(raw), "GET");
        assert_eq!(framing_of("HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"), Ok(Framing::Length(5)));
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\nContent-Length: 5, 5\r\nContent-Length: 5\r\n\r\n"),
            Ok(Framing::Length(5))
        );
        assert_eq!(framing_of("HTTP/1.1 200 OK\r\n\r\n"), Ok(Framing::UntilClose));
        assert_eq!(
            framing_of("HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Ok(Framing::Chunked)
        );
        for bad in ["2, 12", "2\r\nContent-Length: 12", "+5", "-1", "0x5", "5 6", "", "18446744073709551616"] {
            let raw = format!("HTTP/1.1 200 OK\r\nContent-Length: {bad}\r\n\r\n");
            assert!(framing_of(&raw).is_err(), "{bad:?} accepted");
        }
        // No body to frame, whatever the headers say.
        assert_eq!(framing(&parse("HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n"), "HEAD"), Ok(Framing::Empty));
    }

    #[test]
    fn chunked_end_found_across_pieces() {
        let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        for split in 0..body.len() {
            let mut c = ChunkedEnd::default();
            let end = match c.feed(&body[..split]).unwrap() {
                Some(n) => n,
                None => split + c.feed(&body[split..]).unwrap().unwrap(),
            };
            assert_eq!(&body[end..], b"NEXT", "split at {split}");
        }
    }

    #[test]
    fn chunked_rejects_garbage() {
        let bad: &[&[u8]] = &[
            b"zz\r\n",
            b"ffffffffffffffffff\r\n",
            b"11111111111111111\r\n",
            // No size at all: not a last chunk.
            b"\r\n\r\n",
            b";ext\r\n",
            b" 5\r\n",
            b"0x5\r\n",
            // Bare LF where CRLF is required.
            b"5\nhello\r\n",
            b"5;a\nb\r\nhello\r\n",
            b"0\r\nX: 1\n\r\n",
            b"0\r\n\n",
            // Whatever follows whitespace must be an extension.
            b"5 6\r\nhello\r\n",
            // Chunk data must end with CRLF.
            b"2\r\nhello\r\n",
            b"0\r\nX: a\x00b\r\n\r\n",
        ];
        for input in bad {
            assert!(ChunkedEnd::default().feed(input).is_err(), "accepted {:?}", String::from_utf8_lossy(input));
        }
    }

    #[test]
    fn chunked_accepts_whitespace_extensions_and_trailers() {
        let body = b"5 ;name=\"v\"\r\nhello\r\nA\r\n0123456789\r\n0\r\nA: 1\r\nB:\t2\r\n\r\n";
        assert_eq!(ChunkedEnd::default().feed(body), Ok(Some(body.len())));
    }
}
