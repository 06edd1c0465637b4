//! The generator's one client connection (after mini-redis's `Connection`):
//! [`open`] dials ([`net::dial`]: connect from a chosen source address,
//! PROXY header, TLS) and, for WebSocket, performs the RFC 6455 upgrade,
//! all within a time limit; a [`Conn`] then
//! [`send`](Conn::send)s messages, reads them back with
//! [`next_reply`](Conn::next_reply) (answering pings, skipping pongs, joining
//! fragments, stopping at a close frame) and ends with a client-first
//! [`close`](Conn::close).
//!
//! The frames come and go through a [`Codec`], so the same connection also
//! carries the engine's HTTP/1.1 and raw TCP messages (no upgrade, no
//! control frames). The engine reads and writes from two tasks: it splits a
//! connection with [`Conn::into_split`] and reads with
//! [`buffered_reply`](Conn::buffered_reply) / [`fill`](Conn::fill), handing
//! the pongs owed to the peer to its writer ([`take_control`](Conn::take_control)).

use crate::codec::{Codec, Decoded};
use crate::handshake;
use crate::net::{self, ReadHalf, Stream, WriteHalf};
use crate::readbuf::ReadBuf;
use crate::recorder::{record_ns, ErrorKind, Recorder};
use crate::target::Wire;
use crate::wsproto::opcode;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// Where and how to connect and upgrade.
#[derive(Debug, Clone)]
pub struct WsTarget {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Host header.
    pub host: String,
    /// Request path.
    pub path: String,
    /// Limit for connect + TLS + upgrade.
    pub timeout: Duration,
    /// PROXY header and TLS.
    pub wire: Wire,
}

/// One reply read back: the sequence number it carried (WebSocket and raw
/// TCP) and whether it reports a failure (HTTP status 400 or more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// Sequence number in the reply, if the protocol carries one.
    pub seq: Option<u64>,
    /// An HTTP error status.
    pub failed: bool,
    /// The peer closes the connection after this reply (HTTP `Connection: close`).
    pub last: bool,
}

/// A client connection: the socket (or one half of it), its read buffer, the
/// codec, and the control frames owed to the peer.
#[derive(Debug)]
pub struct Conn<S = Stream> {
    io: S,
    rb: ReadBuf,
    codec: Codec,
    /// Frames waiting to be written: pongs found while reading, then messages.
    out: Vec<u8>,
}

/// An opened connection and how long getting there took.
#[derive(Debug)]
pub struct Opened {
    /// The connection, positioned after the 101 head.
    pub conn: Conn,
    /// TCP connect (and PROXY header) and TLS handshake.
    pub dial: net::DialTimes,
    /// Request written to 101 parsed, ns (`None`: no upgrade, the codec is not WebSocket).
    pub upgrade_ns: Option<u64>,
}

impl Opened {
    /// Records connect and TLS times, and upgrade and whole-handshake times when upgraded.
    pub fn record(&self, rec: &mut Recorder) {
        self.dial.record(rec);
        if let Some(up) = self.upgrade_ns {
            record_ns(&mut rec.upgrade, up);
            record_ns(&mut rec.handshake, self.dial.connect_ns + self.dial.tls_ns.unwrap_or(0) + up);
        }
    }
}

/// A failed [`open`]: the error counter it goes to, the connect time if the
/// TCP connection was made before the TLS handshake or the upgrade failed,
/// and why TLS failed.
pub type OpenError = net::DialError;

/// Dials `t.addr` (from `source` when given, with `t.wire`'s PROXY header
/// and TLS) and, when `codec` is WebSocket, performs the client handshake
/// with `t.host` and `t.path`, all within `t.timeout`. The connection's read buffer starts with room for
/// `read_buf` bytes and grows only if a frame needs more.
pub async fn open(
    t: &WsTarget,
    source: Option<IpAddr>,
    mut codec: Codec,
    read_buf: usize,
) -> Result<Opened, OpenError> {
    let deadline = tokio::time::Instant::from(Instant::now() + t.timeout);
    let net::Dialed { stream: mut sock, times: dial } = net::dial(t.addr, source, &t.wire, deadline).await?;
    let t_conn = Instant::now();
    let Codec::Ws { rng, .. } = &mut codec else {
        let conn = Conn { io: sock, rb: ReadBuf::with_leftover(Vec::new(), read_buf), codec, out: Vec::new() };
        return Ok(Opened { conn, dial, upgrade_ns: None });
    };
    let failed = |kind| OpenError::new(kind, Some(dial.connect_ns));
    let leftover =
        match tokio::time::timeout_at(deadline, handshake::client_handshake(&mut sock, &t.host, &t.path, rng)).await {
            Ok(Ok(leftover)) => leftover,
            Ok(Err(e)) => return Err(failed(e.kind())),
            Err(_) => return Err(failed(ErrorKind::ConnectTimeout)),
        };
    let upgrade_ns = t_conn.elapsed().as_nanos() as u64;
    // The handshake's read buffer is larger than what it holds; keep only the bytes.
    let rb = ReadBuf::with_leftover(leftover.as_slice().to_vec(), read_buf);
    Ok(Opened { conn: Conn { io: sock, rb, codec, out: Vec::new() }, dial, upgrade_ns: Some(upgrade_ns) })
}

impl Conn {
    /// Splits into a reading connection and the write half. The caller writes
    /// with its own copy of the codec ([`codec`](Self::codec)) and sends the
    /// pongs the reader collects ([`take_control`](Self::take_control)).
    pub fn into_split(self) -> (Conn<ReadHalf>, WriteHalf) {
        let (rd, wr) = net::split(self.io);
        (Conn { io: rd, rb: self.rb, codec: self.codec, out: self.out }, wr)
    }
}

impl<S> Conn<S> {
    /// The codec (to encode messages on a split write half).
    pub fn codec(&self) -> &Codec {
        &self.codec
    }

    /// The next reply already in the read buffer, if a whole one is there.
    /// Pings met on the way queue their pongs ([`take_control`](Self::take_control));
    /// a close frame is [`ErrorKind::ClosedByPeer`], a malformed frame
    /// [`ErrorKind::Protocol`].
    pub fn buffered_reply(&mut self) -> Result<Option<Reply>, ErrorKind> {
        loop {
            match self.codec.decode(self.rb.data())? {
                Decoded::NeedMore { need } => {
                    self.rb.reserve(need);
                    return Ok(None);
                }
                Decoded::Skip { consumed } => self.rb.consume(consumed),
                Decoded::Ping { consumed, payload } => {
                    self.codec.encode_control(opcode::PONG, &self.rb.data()[payload], &mut self.out);
                    self.rb.consume(consumed);
                }
                Decoded::Close => return Err(ErrorKind::ClosedByPeer),
                Decoded::Reply { consumed, seq, failed, last } => {
                    self.rb.consume(consumed);
                    return Ok(Some(Reply { seq, failed, last }));
                }
            }
        }
    }

    /// Moves the control frames owed to the peer (pongs) to the end of `to`;
    /// returns whether there were any.
    pub fn take_control(&mut self, to: &mut Vec<u8>) -> bool {
        let any = !self.out.is_empty();
        to.append(&mut self.out);
        any
    }
}

impl<S: AsyncRead + Unpin> Conn<S> {
    /// Reads more bytes into the buffer. End of stream is
    /// [`ErrorKind::ClosedByPeer`], a read error [`ErrorKind::Io`].
    /// Cancel-safe: nothing is lost if the future is dropped.
    pub async fn fill(&mut self) -> Result<(), ErrorKind> {
        match self.rb.read_from(&mut self.io).await {
            Ok(0) => Err(ErrorKind::ClosedByPeer),
            Ok(_) => Ok(()),
            Err(_) => Err(ErrorKind::Io),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Writes message (or request) `seq`, after any pongs still owed.
    pub async fn send(&mut self, seq: u64) -> Result<(), ErrorKind> {
        self.codec.encode(seq, &mut self.out);
        self.flush().await
    }

    /// Writes the pongs owed to the peer, if any.
    pub async fn flush(&mut self) -> Result<(), ErrorKind> {
        if self.out.is_empty() {
            return Ok(());
        }
        // TLS buffers what it encrypts: flush it to the socket.
        let r = async {
            self.io.write_all(&self.out).await?;
            self.io.flush().await
        }
        .await
        .map_err(|_| ErrorKind::Io);
        self.out.clear();
        r
    }

    /// Reads until the next reply, answering pings on the way.
    pub async fn next_reply(&mut self) -> Result<Reply, ErrorKind> {
        loop {
            let reply = self.buffered_reply()?;
            self.flush().await?;
            if let Some(r) = reply {
                return Ok(r);
            }
            self.fill().await?;
        }
    }

    /// Client-first close: close frame (WebSocket only), FIN, then read until
    /// the peer's EOF; whatever arrives meanwhile (its close frame, late
    /// echoes) is dropped.
    pub async fn close(&mut self) -> Result<(), ErrorKind> {
        self.out.clear();
        self.codec.encode_control(opcode::CLOSE, &1000u16.to_be_bytes(), &mut self.out);
        self.flush().await?;
        self.io.shutdown().await.map_err(|_| ErrorKind::Io)?;
        loop {
            let len = self.rb.data().len();
            self.rb.consume(len);
            match self.fill().await {
                Ok(()) => {}
                Err(ErrorKind::ClosedByPeer) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wsproto::{self, Rng};
    use tokio::io::AsyncReadExt;

    /// A connection over one end of an in-memory pipe, as after the upgrade.
    fn pipe_conn() -> (Conn<tokio::io::DuplexStream>, tokio::io::DuplexStream) {
        let (a, b) = tokio::io::duplex(4096);
        let codec = Codec::Ws { size: 16, rng: Rng::new(1), frag_seq: None };
        (Conn { io: a, rb: ReadBuf::with_leftover(Vec::new(), 64), codec, out: Vec::new() }, b)
    }

    fn server_frame(op: u8, payload: &[u8], fin: bool) -> Vec<u8> {
        let mut f = Vec::new();
        wsproto::encode_frame(&mut f, op, payload, None);
        if !fin {
            f[0] &= 0x7F;
        }
        f
    }

    #[tokio::test]
    async fn pings_are_answered_and_fragments_joined() {
        let (mut conn, mut peer) = pipe_conn();
        let mut msg = 7u64.to_le_bytes().to_vec();
        msg.extend_from_slice(&[0; 8]);
        let mut wire = server_frame(opcode::PING, b"hi", true);
        wire.extend(server_frame(opcode::BINARY, &msg[..8], false));
        wire.extend(server_frame(opcode::PONG, b"", true));
        wire.extend(server_frame(opcode::CONTINUATION, &msg[8..], true));
        peer.write_all(&wire).await.unwrap();
        assert_eq!(conn.next_reply().await, Ok(Reply { seq: Some(7), failed: false, last: false }));
        // The pong went out, masked, with the ping's payload.
        let mut buf = [0u8; 64];
        let n = peer.read(&mut buf).await.unwrap();
        let h = wsproto::parse_head(&buf[..n]).unwrap().unwrap();
        assert_eq!((h.opcode, h.payload_len), (opcode::PONG, 2));
        let mut body = buf[h.header_len..n].to_vec();
        wsproto::apply_mask(&mut body, h.mask.unwrap(), 0);
        assert_eq!(body, b"hi");
    }

    #[tokio::test]
    async fn close_frame_ends_reading_and_close_waits_for_eof() {
        let (mut conn, mut peer) = pipe_conn();
        peer.write_all(&server_frame(opcode::CLOSE, &1000u16.to_be_bytes(), true)).await.unwrap();
        assert_eq!(conn.next_reply().await, Err(ErrorKind::ClosedByPeer));
        let closing = tokio::spawn(async move { conn.close().await });
        // Our close frame, then EOF (FIN) from us; then the peer ends too.
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        let h = wsproto::parse_head(&got).unwrap().unwrap();
        assert_eq!(h.opcode, opcode::CLOSE);
        drop(peer);
        assert_eq!(closing.await.unwrap(), Ok(()));
    }
}
