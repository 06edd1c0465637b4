//! Reading and parsing message heads with httparse, bounded in size.
//!
//! [`parse_request`] and [`parse_response`] are pure functions over the bytes
//! read so far: they say "need more", "here is the head and its length", or
//! what is wrong with it. Bytes past the head stay in the caller's buffer and
//! are forwarded in order — never dropped.

use std::io;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Most headers a head may carry (httparse needs a fixed array).
pub const MAX_HEADERS: usize = 128;

/// The HTTP/2 prior-knowledge connection preface starts with this.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// Why a request head is refused. Each maps to one error answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("head larger than {0} bytes")]
    TooLarge(usize),
    #[error("malformed head: {0}")]
    Malformed(String),
    #[error("HTTP/2 prior-knowledge preface")]
    Http2Preface,
    #[error("TLS handshake on a plaintext listener")]
    TlsHandshake,
    #[error("more than {0} header fields")]
    TooManyHeaders(usize),
}

/// Where a part of a head lies in its bytes (start, end).
type Span = (usize, usize);

/// The header fields of a head: one copy of the head's bytes and where
/// each name and value lies in it — two allocations per head, however
/// many fields it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Headers {
    raw: Box<[u8]>,
    fields: Vec<(Span, Span)>,
}

/// One header as received (name case preserved), borrowed from its head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    pub name: &'a str,
    pub value: &'a [u8],
}

impl Headers {
    /// Copies `buf` (a head as httparse parsed it) and records where each
    /// of `headers` — slices of `buf` — lies in it.
    fn new(buf: &[u8], headers: &[httparse::Header<'_>]) -> Headers {
        let fields = headers.iter().map(|h| (span(buf, h.name.as_bytes()), span(buf, h.value))).collect();
        Headers { raw: buf.into(), fields }
    }

    /// The bytes a span of the head covers.
    fn bytes(&self, (start, end): Span) -> &[u8] {
        &self.raw[start..end]
    }

    /// Text a span covers that httparse gave as `&str` (a method, a target,
    /// a header name, a reason phrase): valid UTF-8 by that.
    fn text(&self, span: Span) -> &str {
        std::str::from_utf8(self.bytes(span)).expect("httparse parsed this part of the head as text")
    }

    /// Every header, in order.
    pub fn iter(&self) -> impl Iterator<Item = Header<'_>> + '_ {
        self.fields.iter().map(|&(name, value)| Header { name: self.text(name), value: self.bytes(value) })
    }
}

/// Where `part`, a slice of `buf` (or empty), lies in it.
fn span(buf: &[u8], part: &[u8]) -> Span {
    if part.is_empty() {
        return (0, 0);
    }
    let start = (part.as_ptr() as usize).wrapping_sub(buf.as_ptr() as usize);
    assert!(start.checked_add(part.len()).is_some_and(|end| end <= buf.len()), "httparse returns slices of its input");
    (start, start + part.len())
}

/// A parsed request head, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    method: Span,
    target: Span,
    /// Minor version: 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    pub headers: Headers,
    /// Length of the head in the buffer, including the blank line.
    pub head_len: usize,
}

impl Request {
    pub fn method(&self) -> &str {
        self.headers.text(self.method)
    }

    /// The request target as received.
    pub fn target(&self) -> &str {
        self.headers.text(self.target)
    }
}

/// A parsed response head, owned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub version: u8,
    pub status: u16,
    reason: Span,
    pub headers: Headers,
    pub head_len: usize,
}

impl Response {
    /// The reason phrase as received (may be empty).
    pub fn reason(&self) -> &str {
        self.headers.text(self.reason)
    }
}

/// Iterates the values of every header called `name` (case-insensitive).
pub fn values<'a>(headers: &'a Headers, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    headers
        .fields
        .iter()
        .filter(move |&&(n, _)| headers.bytes(n).eq_ignore_ascii_case(name.as_bytes()))
        .map(|&(_, v)| headers.bytes(v))
}

/// Iterates the comma-separated tokens of every header called `name`, trimmed.
pub fn tokens<'a>(headers: &'a Headers, name: &'a str) -> impl Iterator<Item = &'a [u8]> + 'a {
    values(headers, name).flat_map(|v| v.split(|&b| b == b',')).map(|t| t.trim_ascii()).filter(|t| !t.is_empty())
}

/// Parses a request head from the start of `buf`, with at most
/// [`MAX_HEADERS`] header fields. `Ok(None)` means the head is incomplete
/// and may still fit in `max` bytes.
pub fn parse_request(buf: &[u8], max: usize) -> Result<Option<Request>, HeadError> {
    parse_request_with(buf, max, MAX_HEADERS)
}

/// [`parse_request`] with at most `max_headers` header fields
/// (`[limits] max_headers`).
pub fn parse_request_with(buf: &[u8], max: usize, max_headers: usize) -> Result<Option<Request>, HeadError> {
    // A TLS record (handshake, 0x16; version 3.x): no HTTP method starts so.
    if buf.first() == Some(&0x16) && buf.get(1).is_none_or(|&b| b == 0x03) {
        return if buf.len() >= 2 { Err(HeadError::TlsHandshake) } else { Ok(None) };
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] && n > 0 {
        return if n == H2_PREFACE.len() { Err(HeadError::Http2Preface) } else { Ok(None) };
    }
    with_header_slots(max_headers, |slots| {
        let mut req = httparse::Request::new(slots);
        let parsed = req.parse(buf);
        outcome(parsed, buf.len(), max, max_headers, |head_len| {
            let head = &buf[..head_len];
            Request {
                method: span(head, req.method.unwrap_or_default().as_bytes()),
                target: span(head, req.path.unwrap_or_default().as_bytes()),
                version: req.version.unwrap_or(1),
                headers: Headers::new(head, req.headers),
                head_len,
            }
        })
    })
}

/// What httparse's answer means for a head read so far (`len` bytes):
/// complete (and within `max`), not yet, or an error.
fn outcome<T>(
    parsed: httparse::Result<usize>,
    len: usize,
    max: usize,
    max_headers: usize,
    complete: impl FnOnce(usize) -> T,
) -> Result<Option<T>, HeadError> {
    match parsed {
        Ok(httparse::Status::Complete(head_len)) if head_len > max => Err(HeadError::TooLarge(max)),
        Ok(httparse::Status::Complete(head_len)) => Ok(Some(complete(head_len))),
        Ok(httparse::Status::Partial) if len >= max => Err(HeadError::TooLarge(max)),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooManyHeaders(max_headers)),
        Err(e) => Err(HeadError::Malformed(e.to_string())),
    }
}

/// Runs `parse` with `n` empty header slots: on the stack up to
/// [`MAX_HEADERS`], on the heap past it (only a config that raised
/// `max_headers` pays for that).
fn with_header_slots<'b, T>(n: usize, parse: impl FnOnce(&mut [httparse::Header<'b>]) -> T) -> T {
    if n <= MAX_HEADERS {
        let mut slots: [httparse::Header<'b>; MAX_HEADERS] = [httparse::EMPTY_HEADER; MAX_HEADERS];
        parse(&mut slots[..n])
    } else {
        parse(&mut vec![httparse::EMPTY_HEADER; n])
    }
}

/// Parses a response head from the start of `buf` (same contract).
pub fn parse_response(buf: &[u8], max: usize) -> Result<Option<Response>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut headers);
    let parsed = resp.parse(buf);
    outcome(parsed, buf.len(), max, MAX_HEADERS, |head_len| {
        let head = &buf[..head_len];
        Response {
            version: resp.version.unwrap_or(1),
            status: resp.code.unwrap_or(0),
            reason: span(head, resp.reason.unwrap_or_default().as_bytes()),
            headers: Headers::new(head, resp.headers),
            head_len,
        }
    })
}

/// How reading a head from a socket ended without a head.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Head(#[from] HeadError),
    #[error("head incomplete after {0:?}")]
    Timeout(Duration),
    #[error("peer closed before a complete head ({0} bytes received)")]
    Closed(usize),
    #[error("read failed: {0}")]
    Io(#[from] io::Error),
}

/// Reads from `stream` into `buf` until `parse` finds a complete head, the
/// head outgrows `max`, or `timeout` passes (for the whole head, not per
/// read — a slow-loris client cannot extend it). Never reads more than
/// `max + 1` bytes past what `buf` already holds, so memory stays bounded.
pub async fn read_head<S: AsyncRead + Unpin, T>(
    stream: &mut S,
    buf: &mut BytesMut,
    max: usize,
    timeout: Duration,
    parse: impl Fn(&[u8], usize) -> Result<Option<T>, HeadError>,
) -> Result<T, ReadError> {
    let work = async {
        loop {
            if !buf.is_empty() {
                if let Some(head) = parse(buf, max)? {
                    return Ok(head);
                }
            }
            // Read at most up to max (+1 to tell "too large" from "exactly max"),
            // in steps that start small: most heads are well under 2 KiB, and
            // a burst of handshakes should not each take max bytes.
            let step = buf.len().clamp(2048, 16 * 1024);
            let room = (max + 1).saturating_sub(buf.len()).clamp(1, step);
            buf.reserve(room);
            let n = (&mut *stream).take(room as u64).read_buf(buf).await?;
            if n == 0 {
                return Err(ReadError::Closed(buf.len()));
            }
        }
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(r) => r,
        Err(_) => Err(ReadError::Timeout(timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn complete_partial_and_leftover() {
        let raw = b"GET /chat HTTP/1.1\r\nHost: a\r\n\r\nEXTRA";
        let r = parse_request(raw, 1024).unwrap().unwrap();
        assert_eq!((r.method(), r.target(), r.version), ("GET", "/chat", 1));
        assert_eq!(&raw[r.head_len..], b"EXTRA");
        assert_eq!(parse_request(&raw[..10], 1024), Ok(None));
    }

    #[test]
    fn too_large_and_malformed_and_h2() {
        let raw = b"GET / HTTP/1.1\r\nX: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
        assert_eq!(parse_request(raw, 32), Err(HeadError::TooLarge(32)));
        assert!(matches!(parse_request(b"GET / HTTP/3.0\r\n\r\n", 100), Err(HeadError::Malformed(_))));
        assert_eq!(parse_request(b"\x16\x03\x01\x02\x00", 100), Err(HeadError::TlsHandshake));
        assert_eq!(parse_request(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 100), Err(HeadError::Http2Preface));
        assert_eq!(parse_request(b"PRI * HT", 100), Ok(None));
    }

    #[test]
    fn tokens_split_across_headers() {
        let raw = b"GET / HTTP/1.1\r\nConnection: keep-alive, Upgrade\r\nconnection: x \r\n\r\n";
        let h = parse_request(raw, 1024).unwrap().unwrap().headers;
        let t: Vec<&[u8]> = tokens(&h, "CONNECTION").collect();
        assert_eq!(t, vec![&b"keep-alive"[..], b"Upgrade", b"x"]);
    }
}
