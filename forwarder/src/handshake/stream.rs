//! The two sides of a handshake: byte streams that can be read and
//! written at the same time — a TCP socket, or a TLS stream over one. The
//! client side is any [`ClientStream`]; the backend side is a
//! [`BackendStream`] (the router connects it, plain or TLS), split the
//! same way.

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::either::Either;

use crate::tls::records::Records;
use crate::upstream::BackendStream;

/// A connection the handshake can serve (and the backend's, split alike).
pub trait ClientStream: AsyncRead + AsyncWrite + Unpin + Send {
    /// The read and the write half, borrowed together: a request body is
    /// relayed while the backend's response is read and written back.
    fn halves(&mut self) -> (impl AsyncRead + Unpin + Send + '_, impl AsyncWrite + Unpin + Send + '_);
}

impl ClientStream for TcpStream {
    fn halves(&mut self) -> (impl AsyncRead + Unpin + Send + '_, impl AsyncWrite + Unpin + Send + '_) {
        // Borrowed halves: no lock and no allocation, unlike tokio::io::split.
        self.split()
    }
}

/// A TLS listener's client, boxed: rustls's connection state is large and
/// a keep-alive connection holds it between requests. Its socket is read
/// through [`Records`], so that a tunnel's session can go to the kernel.
pub type TlsClient = Box<tokio_rustls::server::TlsStream<Records<TcpStream>>>;

impl ClientStream for TlsClient {
    fn halves(&mut self) -> (impl AsyncRead + Unpin + Send + '_, impl AsyncWrite + Unpin + Send + '_) {
        // One TLS session reads and writes: split shares it behind a lock.
        tokio::io::split(&mut **self)
    }
}

impl ClientStream for BackendStream {
    fn halves(&mut self) -> (impl AsyncRead + Unpin + Send + '_, impl AsyncWrite + Unpin + Send + '_) {
        match self {
            BackendStream::Plain(s) => {
                let (rd, wr) = s.split();
                (Either::Left(rd), Either::Left(wr))
            }
            BackendStream::Tls(s) => {
                let (rd, wr) = tokio::io::split(&mut **s);
                (Either::Right(rd), Either::Right(wr))
            }
        }
    }
}
