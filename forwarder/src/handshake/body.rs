//! Relaying a request body to the backend, framed by its Content-Length or
//! its chunked encoding, and not one byte more: whatever the client sends
//! after the body is never forwarded as part of this request (it would
//! reach the backend unparsed, unrouted and with the client's own
//! forwarded headers).

use std::io;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use super::framing::ChunkedEnd;
use super::rewrite::Body;
use super::stream::write_flushed;

/// Why a request body could not be relayed whole.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("invalid chunked request body: {0}")]
    Framing(&'static str),
    #[error("client closed after {0} bytes of the request body")]
    ClientClosed(u64),
    #[error("reading the request body: {0}")]
    Client(#[source] io::Error),
    #[error("writing the request body to the backend: {0}")]
    Backend(#[source] io::Error),
    #[error("no request body bytes for {0:?}")]
    Timeout(Duration),
    #[error("the request body is larger than [limits] max_request_body ({0} bytes)")]
    TooLarge(u64),
}

/// A body relayed whole.
#[derive(Debug)]
pub struct Sent {
    /// Body bytes written to the backend (chunked framing included).
    pub bytes: u64,
    /// Bytes that followed the body in what was read: the start of the
    /// client's next request, or (after an upgrade) of the tunnel.
    pub after: Bytes,
}

/// Writes the body framed by `body` to `backend`: first what of it is in
/// `early` (read with the head), then what `client` sends. Reads from the
/// client never go past a Content-Length body; a chunked body's end is
/// found by parsing it, and what came after it in the same read is
/// returned in [`Sent::after`]. Each read waits at most `idle`. A chunked
/// body that grows past `max` bytes (framing included) is an error before
/// those bytes are written.
pub async fn relay_body<R, W>(
    early: &[u8],
    client: &mut R,
    backend: &mut W,
    body: Body,
    idle: Duration,
    max: Option<u64>,
) -> Result<Sent, BodyError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut remaining = match body {
        Body::None => return Ok(Sent { bytes: 0, after: Bytes::copy_from_slice(early) }),
        Body::Length(n) => n,
        Body::Chunked => u64::MAX,
    };
    let mut chunked = ChunkedEnd::default();
    // How much of `data` belongs to the body; true when the body is complete.
    let mut take = |data: &[u8]| -> Result<(usize, bool), BodyError> {
        match body {
            Body::Chunked => match chunked.feed(data).map_err(BodyError::Framing)? {
                Some(end) => Ok((end, true)),
                None => Ok((data.len(), false)),
            },
            _ => {
                let n = remaining.min(data.len() as u64);
                remaining -= n;
                Ok((n as usize, remaining == 0))
            }
        }
    };
    let within = |sent: u64, n: usize| match max {
        Some(max) if sent + n as u64 > max => Err(BodyError::TooLarge(max)),
        _ => Ok(()),
    };
    let (n, done) = take(early)?;
    within(0, n)?;
    write_flushed(backend, &early[..n]).await.map_err(BodyError::Backend)?;
    let mut sent = n as u64;
    if done {
        return Ok(Sent { bytes: sent, after: Bytes::copy_from_slice(&early[n..]) });
    }
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let want = match body {
            Body::Length(total) => ((total - sent) as usize).min(buf.len()),
            _ => buf.len(),
        };
        let read = tokio::time::timeout(idle, client.read(&mut buf[..want]))
            .await
            .map_err(|_| BodyError::Timeout(idle))?
            .map_err(BodyError::Client)?;
        if read == 0 {
            return Err(BodyError::ClientClosed(sent));
        }
        let (n, done) = take(&buf[..read])?;
        within(sent, n)?;
        write_flushed(backend, &buf[..n]).await.map_err(BodyError::Backend)?;
        sent += n as u64;
        if done {
            return Ok(Sent { bytes: sent, after: Bytes::copy_from_slice(&buf[n..read]) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn relay(early: &[u8], from_client: &[u8], body: Body) -> (Result<Sent, BodyError>, Vec<u8>, Vec<u8>) {
        let mut client = from_client;
        let mut backend = Vec::new();
        let r = relay_body(early, &mut client, &mut backend, body, Duration::from_secs(1), None).await;
        (r, backend, client.to_vec())
    }

    #[tokio::test]
    async fn content_length_body_stops_at_its_end() {
        // All of it with the head, the next request after it.
        let (r, got, unread) = relay(b"helloGET /next", b"more", Body::Length(5)).await;
        let sent = r.unwrap();
        assert_eq!((got.as_slice(), sent.bytes, &sent.after[..]), (&b"hello"[..], 5, &b"GET /next"[..]));
        assert_eq!(unread, b"more");
        // Part with the head, the rest read: never past the end.
        let (r, got, unread) = relay(b"he", b"lloGET /next", Body::Length(5)).await;
        assert_eq!((got.as_slice(), r.unwrap().after.len()), (&b"hello"[..], 0));
        assert_eq!(unread, b"GET /next", "read past the body");
    }

    #[tokio::test]
    async fn chunked_body_ends_at_its_last_chunk_and_trailers() {
        let body = b"3\r\nabc\r\n0\r\nX-T: 1\r\n\r\n";
        for split in 0..body.len() {
            let mut rest = body[split..].to_vec();
            rest.extend_from_slice(b"GET /next");
            let (r, got, unread) = relay(&body[..split], &rest, Body::Chunked).await;
            let sent = r.unwrap();
            assert_eq!(got, body, "split at {split}");
            let mut after = sent.after.to_vec();
            after.extend_from_slice(&unread);
            assert_eq!(after, b"GET /next", "split at {split}");
        }
    }

    #[tokio::test]
    async fn bad_chunks_and_short_bodies_are_errors() {
        let (r, _, _) = relay(b"", b"5\nhello\r\n0\r\n\r\n", Body::Chunked).await;
        assert!(matches!(r, Err(BodyError::Framing(_))), "{r:?}");
        let (r, got, _) = relay(b"abc", b"", Body::Length(5)).await;
        assert!(matches!(r, Err(BodyError::ClientClosed(3))), "{r:?}");
        assert_eq!(got, b"abc");
        let (r, got, _) = relay(b"GET /next", b"", Body::None).await;
        assert_eq!((r.unwrap().after.as_ref(), got.len()), (&b"GET /next"[..], 0));
    }

    #[tokio::test]
    async fn a_chunked_body_past_the_limit_stops_before_the_excess_is_written() {
        let (mut client, mut backend) = (&b"5\r\nhello\r\n0\r\n\r\n"[..], Vec::new());
        let r = relay_body(b"", &mut client, &mut backend, Body::Chunked, Duration::from_secs(1), Some(8)).await;
        assert!(matches!(r, Err(BodyError::TooLarge(8))), "{r:?}");
        assert!(backend.len() <= 8, "{} bytes written", backend.len());
        let (mut client, mut backend) = (&b"5\r\nhello\r\n0\r\n\r\n"[..], Vec::new());
        let r = relay_body(b"", &mut client, &mut backend, Body::Chunked, Duration::from_secs(1), Some(15));
        assert_eq!(r.await.unwrap().bytes, 15);
    }
}
