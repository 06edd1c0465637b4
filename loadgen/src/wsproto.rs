//! RFC 6455 framing: the accept-key computation, frame headers, masking and an
//! incremental frame parser that works on a caller-owned buffer (no allocation
//! per frame).

use base64::Engine;
use sha1::{Digest, Sha1};

/// The GUID that RFC 6455 §1.3 appends to the client key.
const WS_GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";

/// Frame opcodes (RFC 6455 §5.2).
pub mod opcode {
    /// Continuation of a fragmented message.
    pub const CONTINUATION: u8 = 0x0;
    /// UTF-8 text message.
    pub const TEXT: u8 = 0x1;
    /// Binary message.
    pub const BINARY: u8 = 0x2;
    /// Close control frame.
    pub const CLOSE: u8 = 0x8;
    /// Ping control frame.
    pub const PING: u8 = 0x9;
    /// Pong control frame.
    pub const PONG: u8 = 0xA;
}

/// Largest frame payload either side accepts (16 MiB); bigger frames are a protocol error.
pub const MAX_PAYLOAD: u64 = 16 << 20;

/// `Sec-WebSocket-Accept` for a given `Sec-WebSocket-Key` (RFC 6455 §4.2.2).
pub fn accept_key(client_key: &str) -> String {
    let mut h = Sha1::new();
    h.update(client_key.trim().as_bytes());
    h.update(WS_GUID.as_bytes());
    base64::engine::general_purpose::STANDARD.encode(h.finalize())
}

/// A fresh `Sec-WebSocket-Key`: 16 random bytes, base64.
pub fn new_client_key(rng: &mut Rng) -> String {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
    b[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// A small xorshift64* generator for masking keys and handshake nonces.
///
/// Seeded from the OS-randomised `RandomState`; RFC 6455 asks for unpredictable
/// masks so that intermediaries cannot be poisoned, which this meets for a
/// load generator talking to its own targets.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator seeded from the process's random hasher state and `salt`.
    pub fn new(salt: u64) -> Self {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(salt);
        Rng(h.finish() | 1)
    }

    /// Next pseudo-random 64-bit value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

/// Length of a frame header for `len` payload bytes, with or without a mask key.
pub fn header_len(len: usize, masked: bool) -> usize {
    let base = if len < 126 {
        2
    } else if len <= 0xFFFF {
        4
    } else {
        10
    };
    base + if masked { 4 } else { 0 }
}

/// Writes a FIN frame header into `out` (which must hold [`header_len`] bytes)
/// and returns the number of bytes written.
pub fn write_header(out: &mut [u8], op: u8, len: usize, mask: Option<[u8; 4]>) -> usize {
    out[0] = 0x80 | (op & 0x0F);
    let mbit = if mask.is_some() { 0x80 } else { 0 };
    let mut n = if len < 126 {
        out[1] = mbit | len as u8;
        2
    } else if len <= 0xFFFF {
        out[1] = mbit | 126;
        out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        4
    } else {
        out[1] = mbit | 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    };
    if let Some(m) = mask {
        out[n..n + 4].copy_from_slice(&m);
        n += 4;
    }
    n
}

/// XORs `data` with the 4-byte mask, starting at mask offset `offset`.
pub fn apply_mask(data: &mut [u8], mask: [u8; 4], offset: usize) {
    for (i, b) in data.iter_mut().enumerate() {
        *b ^= mask[(i + offset) & 3];
    }
}

/// Appends a complete (FIN) frame to `out`, masking the payload when `mask` is given.
pub fn encode_frame(out: &mut Vec<u8>, op: u8, payload: &[u8], mask: Option<[u8; 4]>) {
    let start = out.len();
    let hl = header_len(payload.len(), mask.is_some());
    out.resize(start + hl, 0);
    write_header(&mut out[start..], op, payload.len(), mask);
    let body = out.len();
    out.extend_from_slice(payload);
    if let Some(m) = mask {
        apply_mask(&mut out[body..], m, 0);
    }
}

/// A parsed frame header; the payload follows at `header_len` in the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHead {
    /// FIN bit.
    pub fin: bool,
    /// Opcode (low 4 bits).
    pub opcode: u8,
    /// Mask key, when the frame is masked.
    pub mask: Option<[u8; 4]>,
    /// Size of the header in bytes.
    pub header_len: usize,
    /// Size of the payload in bytes.
    pub payload_len: usize,
}

impl FrameHead {
    /// Header plus payload.
    pub fn total_len(&self) -> usize {
        self.header_len + self.payload_len
    }
}

/// A framing violation.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    /// RSV bits set without a negotiated extension.
    #[error("reserved bits set in frame header")]
    ReservedBits,
    /// Payload larger than [`MAX_PAYLOAD`].
    #[error("frame payload of {0} bytes exceeds the limit")]
    TooLarge(u64),
    /// Control frame that is fragmented or longer than 125 bytes.
    #[error("invalid control frame")]
    BadControl,
    /// Unknown opcode.
    #[error("unknown opcode {0:#x}")]
    BadOpcode(u8),
}

/// Parses a frame header at the start of `buf`. `Ok(None)` means more bytes are needed.
pub fn parse_head(buf: &[u8]) -> Result<Option<FrameHead>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    if b0 & 0x70 != 0 {
        return Err(FrameError::ReservedBits);
    }
    let op = b0 & 0x0F;
    let fin = b0 & 0x80 != 0;
    match op {
        opcode::CONTINUATION | opcode::TEXT | opcode::BINARY => {}
        opcode::CLOSE | opcode::PING | opcode::PONG => {
            if !fin || (b1 & 0x7F) > 125 {
                return Err(FrameError::BadControl);
            }
        }
        other => return Err(FrameError::BadOpcode(other)),
    }
    let masked = b1 & 0x80 != 0;
    let (len, mut n) = match b1 & 0x7F {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut a = [0u8; 8];
            a.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(a), 10)
        }
        l => (l as u64, 2),
    };
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLarge(len));
    }
    let mask = if masked {
        if buf.len() < n + 4 {
            return Ok(None);
        }
        let m = [buf[n], buf[n + 1], buf[n + 2], buf[n + 3]];
        n += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some(FrameHead { fin, opcode: op, mask, header_len: n, payload_len: len as usize }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_key_matches_rfc_example() {
        // RFC 6455 §1.3.
        assert_eq!(accept_key("dGhlIHNhbXBsZSBub25jZQ=="), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn frames_round_trip_at_every_length_class() {
        for len in [0usize, 5, 125, 126, 300, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut out = Vec::new();
            encode_frame(&mut out, opcode::BINARY, &payload, Some([1, 2, 3, 4]));
            let head = parse_head(&out).unwrap().unwrap();
            assert_eq!(head.payload_len, len);
            assert_eq!(head.total_len(), out.len());
            assert_eq!(head.mask, Some([1, 2, 3, 4]));
            let mut body = out[head.header_len..].to_vec();
            apply_mask(&mut body, head.mask.unwrap(), 0);
            assert_eq!(body, payload);
            // Truncated input asks for more rather than misparsing.
            assert_eq!(parse_head(&out[..1]).unwrap(), None);
        }
    }

    #[test]
    fn rejects_bad_headers() {
        assert_eq!(parse_head(&[0xC1, 0]), Err(FrameError::ReservedBits));
        assert_eq!(parse_head(&[0x09, 0]), Err(FrameError::BadControl));
        assert_eq!(parse_head(&[0x83, 0]), Err(FrameError::BadOpcode(3)));
    }
}
