//! The two sides of a handshake: byte streams that can be read and
//! written at the same time — a TCP socket, or a TLS stream over one. The
//! client side is any [`ClientStream`]; the backend side is a
//! [`BackendStream`] (the router connects it, plain or TLS), split the
//! same way.

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::either::Either;

use crate::tls::records::Records;
use crate::upstream::BackendStream;

/// Writes `bytes` and flushes them. A TLS stream takes plaintext into its
/// own buffer whenever its socket pushes back (a full send buffer, or the
/// task's tokio budget spent), and then reports it written: without the
/// flush a request head or body, a `101` or a `100 Continue` may wait in
/// rustls while its peer waits for it (the tests' own TLS client once
/// left an upgrade request so, and the router answered 408). For TCP the
/// flush does nothing.
pub async fn write_flushed<W: AsyncWrite + Unpin + ?Sized>(w: &mut W, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(bytes).await?;
    w.flush().await
}

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

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::Arc;
    use std::task::{Context, Poll};
    use std::time::Duration;

    use rustls::pki_types::{PrivateKeyDer, ServerName};
    use tokio::io::{AsyncReadExt, DuplexStream, ReadBuf};

    use super::*;

    /// A socket that, once armed, pushes back on every other write: Pending
    /// (waking at once), as a full send buffer or a spent tokio budget does.
    struct PushBack {
        inner: DuplexStream,
        armed: bool,
        pushed: bool,
    }

    impl AsyncRead for PushBack {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for PushBack {
        fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            if self.armed && !self.pushed {
                self.pushed = true;
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            self.pushed = false;
            Pin::new(&mut self.inner).poll_write(cx, buf)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    /// A TLS client (over [`PushBack`], armed once the handshake is done)
    /// and the server's end of it.
    async fn tls_pair() -> (tokio_rustls::client::TlsStream<PushBack>, tokio_rustls::server::TlsStream<DuplexStream>) {
        let made = rcgen::generate_simple_self_signed(vec!["t.test".to_string()]).unwrap();
        let cert = made.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(made.signing_key.serialize_der().into());
        let provider = crate::tls::provider();
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.clone()], key)
            .unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(cert).unwrap();
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let (near, far) = tokio::io::duplex(1 << 16);
        let io = PushBack { inner: near, armed: false, pushed: false };
        let name = ServerName::try_from("t.test").unwrap();
        let (cli, srv) = tokio::join!(
            tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, io),
            tokio_rustls::TlsAcceptor::from(Arc::new(server)).accept(far)
        );
        let mut cli = cli.unwrap();
        cli.get_mut().0.armed = true;
        (cli, srv.unwrap())
    }

    #[tokio::test]
    async fn a_tls_write_the_socket_pushed_back_arrives_only_when_flushed() {
        let request = b"GET /chat HTTP/1.1\r\nHost: a\r\n\r\n";
        let mut got = vec![0u8; request.len()];
        // write_all alone: rustls took the bytes and reported them
        // written; they never leave while nothing else is written.
        let (mut cli, mut srv) = tls_pair().await;
        cli.write_all(request).await.unwrap();
        let read = tokio::time::timeout(Duration::from_millis(300), srv.read_exact(&mut got)).await;
        assert!(read.is_err(), "the bytes arrived without a flush: the test no longer shows the hazard");
        // write_flushed: they arrive.
        let (mut cli, mut srv) = tls_pair().await;
        write_flushed(&mut cli, request).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), srv.read_exact(&mut got)).await.unwrap().unwrap();
        assert_eq!(&got[..], &request[..]);
    }
}
