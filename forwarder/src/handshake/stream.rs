//! The client side of a handshake: any byte stream that can be read and
//! written at the same time — a TCP socket, or a TLS stream over one. The backend side is always a `TcpStream` (the router
//! connects it).

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

/// A client connection the handshake can serve.
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
/// a keep-alive connection holds it between requests.
pub type TlsClient = Box<tokio_rustls::server::TlsStream<TcpStream>>;

impl ClientStream for TlsClient {
    fn halves(&mut self) -> (impl AsyncRead + Unpin + Send + '_, impl AsyncWrite + Unpin + Send + '_) {
        // One TLS session reads and writes: split shares it behind a lock.
        tokio::io::split(&mut **self)
    }
}
