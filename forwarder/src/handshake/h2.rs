//! The refusal an HTTP/2 prior-knowledge client (curl
//! `--http2-prior-knowledge`, gRPC) understands: this router speaks
//! HTTP/1.1 only, and says so in HTTP/2 — `RST_STREAM` on the client's
//! first stream and `GOAWAY`, both with `HTTP_1_1_REQUIRED` (RFC 9113
//! §7), which clients report by name. A stream can only be reset once the
//! client opened it, so its first HEADERS frame is awaited (bounded).

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// `HTTP_1_1_REQUIRED`.
const HTTP_1_1_REQUIRED: u32 = 0xd;
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 1;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const GOAWAY: u8 = 7;

/// Reads past the preface (already in `buf`, maybe partly) to the first
/// HEADERS frame and returns its stream id; None when it does not come
/// within `max` bytes and `timeout`, or the client stops.
pub async fn first_stream<S: AsyncRead + Unpin>(
    client: &mut S,
    buf: &mut BytesMut,
    max: usize,
    timeout: Duration,
) -> Option<u32> {
    let work = async {
        let mut at = PREFACE.len();
        loop {
            while buf.len() >= at + FRAME_HEADER {
                let header = &buf[at..at + FRAME_HEADER];
                let len = u32::from_be_bytes([0, header[0], header[1], header[2]]) as usize;
                let stream = u32::from_be_bytes([header[5], header[6], header[7], header[8]]) & 0x7fff_ffff;
                if header[3] == HEADERS && stream != 0 {
                    return Some(stream);
                }
                at += FRAME_HEADER + len;
            }
            if buf.len() >= max || client.read_buf(buf).await.ok()? == 0 {
                return None;
            }
        }
    };
    tokio::time::timeout(timeout, work).await.ok().flatten()
}

/// The server's preface (an empty SETTINGS frame), `RST_STREAM` on
/// `stream` when the client opened one, and `GOAWAY` with `debug` (a
/// human sentence) as its debug data.
pub fn refusal(stream: Option<u32>, debug: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    frame(&mut out, SETTINGS, 0, &[]);
    if let Some(id) = stream {
        frame(&mut out, RST_STREAM, id, &HTTP_1_1_REQUIRED.to_be_bytes());
    }
    let mut goaway = stream.unwrap_or(0).to_be_bytes().to_vec();
    goaway.extend_from_slice(&HTTP_1_1_REQUIRED.to_be_bytes());
    goaway.extend_from_slice(debug);
    frame(&mut out, GOAWAY, 0, &goaway);
    out
}

fn frame(out: &mut Vec<u8>, kind: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, 0]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_is_well_formed() {
        let out = refusal(Some(1), b"x");
        assert_eq!(&out[..9], &[0, 0, 0, SETTINGS, 0, 0, 0, 0, 0]);
        assert_eq!(&out[9..22], &[0, 0, 4, RST_STREAM, 0, 0, 0, 0, 1, 0, 0, 0, 0xd]);
        assert_eq!(&out[22..], &[0, 0, 9, GOAWAY, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0xd, b'x']);
    }

    #[tokio::test]
    async fn the_first_stream_is_found_past_the_preface_and_settings() {
        let mut wire = PREFACE.to_vec();
        frame(&mut wire, SETTINGS, 0, &[0, 3, 0, 0, 0, 100]);
        frame(&mut wire, HEADERS, 3, b"hpack");
        let mut buf = BytesMut::from(&wire[..20]);
        let mut rest = &wire[20..];
        assert_eq!(first_stream(&mut rest, &mut buf, 1024, Duration::from_secs(1)).await, Some(3));
        let mut buf = BytesMut::from(PREFACE);
        let mut nothing: &[u8] = &[];
        assert_eq!(first_stream(&mut nothing, &mut buf, 1024, Duration::from_secs(1)).await, None);
    }
}
