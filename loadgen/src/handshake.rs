//! The client side of the RFC 6455 opening handshake.

use crate::httphead::{self, has_token, header};
use crate::recorder::ErrorKind;
use crate::wsproto::{self, Rng};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

/// A failed client handshake.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The server answered with another status than 101.
    #[error("upgrade refused with status {0}")]
    Refused(u16),
    /// Sec-WebSocket-Accept missing or not matching the key.
    #[error("wrong or missing Sec-WebSocket-Accept")]
    BadAccept,
    /// 101 without `Upgrade: websocket` / `Connection: upgrade`.
    #[error("101 answer without Upgrade: websocket and Connection: upgrade")]
    MissingUpgrade,
    /// Unparseable answer.
    #[error("malformed handshake answer")]
    Malformed,
    /// Reading the head failed.
    #[error(transparent)]
    Head(#[from] httphead::HeadError),
}

impl HandshakeError {
    /// The error counter this failure goes to.
    pub fn kind(&self) -> ErrorKind {
        match self {
            HandshakeError::Refused(_) => ErrorKind::UpgradeRefused,
            HandshakeError::BadAccept => ErrorKind::BadAccept,
            HandshakeError::MissingUpgrade | HandshakeError::Malformed => ErrorKind::Handshake,
            HandshakeError::Head(_) => ErrorKind::Handshake,
        }
    }
}

/// Performs the opening handshake on `sock`. Returns the bytes that arrived
/// after the 101 head (the start of the first frames, if any).
pub async fn client_handshake<S: AsyncRead + AsyncWrite + Unpin>(
    sock: &mut S,
    host: &str,
    path: &str,
    rng: &mut Rng,
) -> Result<Vec<u8>, HandshakeError> {
    let key = wsproto::new_client_key(rng);
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    sock.write_all(req.as_bytes()).await.map_err(|e| HandshakeError::Head(e.into()))?;
    sock.flush().await.map_err(|e| HandshakeError::Head(e.into()))?;
    let mut buf = Vec::with_capacity(1024);
    let n = httphead::read_head(sock, &mut buf).await?;
    {
        let mut hdrs = [httparse::EMPTY_HEADER; 32];
        let mut resp = httparse::Response::new(&mut hdrs);
        match resp.parse(&buf[..n]) {
            Ok(httparse::Status::Complete(_)) => {}
            _ => return Err(HandshakeError::Malformed),
        }
        let code = resp.code.unwrap_or(0);
        if code != 101 {
            return Err(HandshakeError::Refused(code));
        }
        let upgrade_ok = header(resp.headers, "upgrade").is_some_and(|v| v.eq_ignore_ascii_case(b"websocket"))
            && has_token(header(resp.headers, "connection"), "upgrade");
        if !upgrade_ok {
            return Err(HandshakeError::MissingUpgrade);
        }
        let want = wsproto::accept_key(&key);
        if header(resp.headers, "sec-websocket-accept").map(|v| v.trim_ascii()) != Some(want.as_bytes()) {
            return Err(HandshakeError::BadAccept);
        }
    }
    buf.drain(..n);
    Ok(buf)
}
