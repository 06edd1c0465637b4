//! Wire formats of the open-loop engine: how a request for sequence number
//! `seq` is written and how replies are cut out of the read buffer.
//!
//! WebSocket and raw TCP messages carry `seq` in their first 8 bytes (little
//! endian), so replies are matched without storing anything per message.
//! HTTP/1.1 answers come back in order, so the reply's sequence is implied.

use crate::recorder::ErrorKind;
use crate::wsproto::{self, opcode, Rng};

/// Bytes of the sequence number embedded at the start of every payload.
pub const SEQ_LEN: usize = 8;

/// What the decoder found at the front of the read buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Not enough bytes yet; at least `need` bytes in total are required.
    NeedMore {
        /// Total bytes the next item needs, when known.
        need: usize,
    },
    /// A reply; `seq` is `None` when it is implied by order (HTTP).
    Reply {
        /// Bytes to drop from the buffer.
        consumed: usize,
        /// The echoed sequence number.
        seq: Option<u64>,
        /// The reply itself reports a failure (HTTP status >= 400).
        failed: bool,
        /// The peer closes the connection after this reply (HTTP
        /// `Connection: close`, or HTTP/1.0 without keep-alive).
        last: bool,
    },
    /// Something that is not a reply (pong, fragment start): drop and go on.
    Skip {
        /// Bytes to drop from the buffer.
        consumed: usize,
    },
    /// A ping: answer with a pong carrying `payload` (buffer range).
    Ping {
        /// Bytes to drop from the buffer.
        consumed: usize,
        /// Range of the ping payload within the buffer.
        payload: std::ops::Range<usize>,
    },
    /// The peer sent a close frame.
    Close,
}

/// The protocol a run speaks.
#[derive(Debug, Clone)]
pub enum Codec {
    /// RFC 6455 client: masked binary frames of `size` bytes.
    Ws {
        /// Payload size.
        size: usize,
        /// Source of masking keys.
        rng: Rng,
        /// Sequence number of a fragmented reply being reassembled.
        frag_seq: Option<u64>,
    },
    /// HTTP/1.1 keep-alive: the same request over and over.
    Http {
        /// The encoded request.
        request: std::sync::Arc<[u8]>,
    },
    /// Raw TCP: `size`-byte messages echoed verbatim.
    Raw {
        /// Message size.
        size: usize,
    },
}

impl Codec {
    /// Appends the request for `seq` to `out`.
    pub fn encode(&mut self, seq: u64, out: &mut Vec<u8>) {
        match self {
            Codec::Ws { size, rng, .. } => {
                let size = *size;
                let mask = rng.next_u64().to_le_bytes();
                let mask = [mask[0], mask[1], mask[2], mask[3]];
                let start = out.len();
                let hl = wsproto::header_len(size, true);
                out.resize(start + hl + size, 0);
                wsproto::write_header(&mut out[start..], opcode::BINARY, size, Some(mask));
                let body = &mut out[start + hl..];
                body[..SEQ_LEN].copy_from_slice(&seq.to_le_bytes());
                wsproto::apply_mask(body, mask, 0);
            }
            Codec::Http { request } => out.extend_from_slice(request),
            Codec::Raw { size } => {
                let start = out.len();
                out.resize(start + *size, 0);
                out[start..start + SEQ_LEN].copy_from_slice(&seq.to_le_bytes());
            }
        }
    }

    /// Appends a masked control frame (WebSocket only; no-op otherwise).
    pub fn encode_control(&mut self, op: u8, payload: &[u8], out: &mut Vec<u8>) {
        if let Codec::Ws { rng, .. } = self {
            let m = rng.next_u64().to_le_bytes();
            wsproto::encode_frame(out, op, payload, Some([m[0], m[1], m[2], m[3]]));
        }
    }

    /// Decodes the next item at the front of `buf`.
    pub fn decode(&mut self, buf: &[u8]) -> Result<Decoded, ErrorKind> {
        match self {
            Codec::Ws { frag_seq, .. } => decode_ws(buf, frag_seq),
            Codec::Http { .. } => decode_http(buf),
            Codec::Raw { size } => {
                if buf.len() < *size {
                    return Ok(Decoded::NeedMore { need: *size });
                }
                Ok(Decoded::Reply { consumed: *size, seq: Some(read_seq(buf)), failed: false, last: false })
            }
        }
    }
}

fn read_seq(buf: &[u8]) -> u64 {
    let mut a = [0u8; SEQ_LEN];
    a.copy_from_slice(&buf[..SEQ_LEN]);
    u64::from_le_bytes(a)
}

fn decode_ws(buf: &[u8], frag_seq: &mut Option<u64>) -> Result<Decoded, ErrorKind> {
    let head = match wsproto::parse_head(buf) {
        Ok(Some(h)) => h,
        Ok(None) => return Ok(Decoded::NeedMore { need: 14 }),
        Err(_) => return Err(ErrorKind::Protocol),
    };
    if head.mask.is_some() {
        // Servers must not mask (RFC 6455 §5.1).
        return Err(ErrorKind::Protocol);
    }
    let total = head.total_len();
    if buf.len() < total {
        return Ok(Decoded::NeedMore { need: total });
    }
    let payload = &buf[head.header_len..total];
    match head.opcode {
        opcode::TEXT | opcode::BINARY => {
            if frag_seq.is_some() || payload.len() < SEQ_LEN {
                return Err(ErrorKind::Protocol);
            }
            let seq = read_seq(payload);
            if head.fin {
                Ok(Decoded::Reply { consumed: total, seq: Some(seq), failed: false, last: false })
            } else {
                *frag_seq = Some(seq);
                Ok(Decoded::Skip { consumed: total })
            }
        }
        opcode::CONTINUATION => match (*frag_seq, head.fin) {
            (None, _) => Err(ErrorKind::Protocol),
            (Some(_), false) => Ok(Decoded::Skip { consumed: total }),
            (Some(seq), true) => {
                *frag_seq = None;
                Ok(Decoded::Reply { consumed: total, seq: Some(seq), failed: false, last: false })
            }
        },
        opcode::PING => Ok(Decoded::Ping { consumed: total, payload: head.header_len..total }),
        opcode::PONG => Ok(Decoded::Skip { consumed: total }),
        _ => Ok(Decoded::Close),
    }
}

fn decode_http(buf: &[u8]) -> Result<Decoded, ErrorKind> {
    let mut hdrs = [httparse::EMPTY_HEADER; 32];
    let mut resp = httparse::Response::new(&mut hdrs);
    let head_len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() > crate::httphead::MAX_HEAD {
                return Err(ErrorKind::Protocol);
            }
            return Ok(Decoded::NeedMore { need: buf.len() + 1 });
        }
        Err(_) => return Err(ErrorKind::Protocol),
    };
    let code = resp.code.unwrap_or(0);
    if code == 101 || (100..200).contains(&code) {
        // Interim answers carry no body and are not the reply.
        return Ok(Decoded::Skip { consumed: head_len });
    }
    let len = match crate::httphead::header(resp.headers, "content-length") {
        Some(v) => {
            std::str::from_utf8(v).ok().and_then(|s| s.trim().parse::<usize>().ok()).ok_or(ErrorKind::Protocol)?
        }
        // Keep-alive needs a length; chunked bodies are not supported.
        None if code == 204 || code == 304 => 0,
        None => return Err(ErrorKind::Protocol),
    };
    let total = head_len + len;
    if buf.len() < total {
        return Ok(Decoded::NeedMore { need: total });
    }
    let connection = crate::httphead::header(resp.headers, "connection");
    let last = crate::httphead::has_token(connection, "close")
        || resp.version == Some(0) && !crate::httphead::has_token(connection, "keep-alive");
    Ok(Decoded::Reply { consumed: total, seq: None, failed: code >= 400, last })
}

/// An HTTP/1.1 GET request for `host` and `path`.
pub fn http_request(host: &str, path: &str, close: bool) -> Vec<u8> {
    let conn = if close { "Connection: close\r\n" } else { "" };
    format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: upsplice-loadgen\r\n{conn}\r\n").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ws_message_is_masked_and_carries_seq() {
        let mut c = Codec::Ws { size: 32, rng: Rng::new(1), frag_seq: None };
        let mut out = Vec::new();
        c.encode(42, &mut out);
        let h = wsproto::parse_head(&out).unwrap().unwrap();
        assert_eq!(h.payload_len, 32);
        let mut body = out[h.header_len..].to_vec();
        wsproto::apply_mask(&mut body, h.mask.expect("client frames are masked"), 0);
        assert_eq!(read_seq(&body), 42);
        // The server's unmasked echo decodes to the same sequence.
        let mut echo = Vec::new();
        wsproto::encode_frame(&mut echo, opcode::BINARY, &body, None);
        assert_eq!(
            c.decode(&echo).unwrap(),
            Decoded::Reply { consumed: echo.len(), seq: Some(42), failed: false, last: false }
        );
        // A masked server frame is a protocol error.
        let mut bad = Vec::new();
        wsproto::encode_frame(&mut bad, opcode::BINARY, &body, Some([1, 2, 3, 4]));
        assert_eq!(c.decode(&bad), Err(ErrorKind::Protocol));
    }

    #[test]
    fn ws_fragments_reassemble() {
        let mut c = Codec::Ws { size: 16, rng: Rng::new(1), frag_seq: None };
        let mut first = Vec::new();
        wsproto::encode_frame(&mut first, opcode::BINARY, &7u64.to_le_bytes(), None);
        first[0] &= 0x7F; // not FIN
        let mut last = Vec::new();
        wsproto::encode_frame(&mut last, opcode::CONTINUATION, &[0u8; 8], None);
        assert_eq!(c.decode(&first).unwrap(), Decoded::Skip { consumed: first.len() });
        assert_eq!(
            c.decode(&last).unwrap(),
            Decoded::Reply { consumed: last.len(), seq: Some(7), failed: false, last: false }
        );
    }

    #[test]
    fn http_responses_are_cut_by_length() {
        let mut c = Codec::Http { request: http_request("h", "/", false).into() };
        let r = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabcHTTP/1.1 503 X\r\nContent-Length: 0\r\n\r\n";
        let second: &[u8] = b"HTTP/1.1 503 X\r\nContent-Length: 0\r\n\r\n";
        let split = r.len() - second.len();
        assert_eq!(c.decode(r).unwrap(), Decoded::Reply { consumed: split, seq: None, failed: false, last: false });
        assert_eq!(
            c.decode(second).unwrap(),
            Decoded::Reply { consumed: second.len(), seq: None, failed: true, last: false }
        );
        assert!(matches!(c.decode(&r[..20]).unwrap(), Decoded::NeedMore { .. }));
        assert_eq!(c.decode(b"garbage\r\n\r\n"), Err(ErrorKind::Protocol));
        // The peer announces that it closes after this answer.
        for closing in [
            &b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"[..],
            b"HTTP/1.1 200 OK\r\nconnection: Keep-Alive, Close\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n",
        ] {
            assert!(matches!(c.decode(closing).unwrap(), Decoded::Reply { last: true, .. }), "{closing:?}");
        }
        let kept = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n";
        assert!(matches!(c.decode(kept).unwrap(), Decoded::Reply { last: false, .. }));
    }

    #[test]
    fn raw_messages_round_trip() {
        let mut c = Codec::Raw { size: 16 };
        let mut out = Vec::new();
        c.encode(9, &mut out);
        assert_eq!(out.len(), 16);
        assert_eq!(c.decode(&out[..15]).unwrap(), Decoded::NeedMore { need: 16 });
        assert_eq!(c.decode(&out).unwrap(), Decoded::Reply { consumed: 16, seq: Some(9), failed: false, last: false });
    }
}
