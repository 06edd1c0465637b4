//! A backend connection as the router holds it: plain TCP, or TLS over
//! TCP (a pool with `tls`, a NATS endpoint with a `tls_port`), and the
//! connect that makes one — TCP, the PROXY header, then the TLS handshake,
//! all within the connect timeout.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::tls::client::{Failure, Target};

/// A TLS backend connection, boxed: rustls's state is large, and an idle
/// keep-alive connection holds it.
pub type TlsBackend = Box<tokio_rustls::client::TlsStream<TcpStream>>;

/// A connection to a backend.
#[derive(Debug)]
pub enum BackendStream {
    Plain(TcpStream),
    Tls(TlsBackend),
}

/// Why a connect failed: the error, and what TLS made of it when the
/// failure was the TLS handshake's.
#[derive(Debug)]
pub struct ConnectFailure {
    pub error: io::Error,
    pub tls: Option<Failure>,
}

impl std::fmt::Display for ConnectFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.tls {
            Some(_) => write!(f, "TLS handshake: {}", self.error),
            None => write!(f, "connect: {}", self.error),
        }
    }
}

impl ConnectFailure {
    /// When the router itself ran short (file descriptors, socket
    /// buffers, memory) rather than the backend failing, the errno's name
    /// (see [`crate::socket::shortage`]): such a failure says nothing
    /// about the backend's health.
    pub fn shortage(&self) -> Option<&'static str> {
        crate::socket::shortage(&self.error)
    }
}

impl From<io::Error> for ConnectFailure {
    fn from(error: io::Error) -> ConnectFailure {
        ConnectFailure { error, tls: None }
    }
}

/// Connects to `addr` within `timeout`: TCP (with `user_timeout`, see
/// [`crate::socket::for_relay`]), the PROXY `header` if any, then the TLS handshake
/// for `tls` if any.
pub async fn connect(
    addr: SocketAddr,
    timeout: Duration,
    user_timeout: Option<Duration>,
    header: Option<&[u8]>,
    tls: Option<&Target>,
) -> Result<BackendStream, ConnectFailure> {
    let connect = async {
        let mut stream = TcpStream::connect(addr).await?;
        crate::socket::for_relay(&stream, user_timeout)?;
        if let Some(header) = header {
            tokio::io::AsyncWriteExt::write_all(&mut stream, header).await?;
        }
        let Some(tls) = tls else { return Ok(BackendStream::Plain(stream)) };
        match tokio_rustls::TlsConnector::from(tls.config.clone()).connect(tls.server_name.clone(), stream).await {
            Ok(stream) => Ok(BackendStream::Tls(Box::new(stream))),
            Err(error) => Err(ConnectFailure { tls: Some(Failure::of_handshake(&error)), error }),
        }
    };
    tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {timeout:?}")))?
}

impl BackendStream {
    /// The TCP connection under it.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            BackendStream::Plain(s) => s,
            BackendStream::Tls(s) => s.get_ref().0,
        }
    }
}

impl From<TcpStream> for BackendStream {
    fn from(s: TcpStream) -> BackendStream {
        BackendStream::Plain(s)
    }
}

impl AsRawFd for BackendStream {
    fn as_raw_fd(&self) -> RawFd {
        self.tcp().as_raw_fd()
    }
}

impl AsyncRead for BackendStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            BackendStream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for BackendStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            BackendStream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_flush(cx),
            BackendStream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            BackendStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            BackendStream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
