//! The TLS side of tests: certificates made at test time (rcgen), a
//! rustls client config that trusts one of them, and [`Client`]: a
//! client's stream that is plain TCP or TLS, so one test body drives
//! either kind of listener.

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Self-signed certificates (each its own trust anchor) in a temporary
/// directory: `app.pem`/`app.key` for `app.test` and
/// `other.pem`/`other.key` for `*.other.test`.
pub struct Certs {
    dir: tempfile::TempDir,
}

impl Certs {
    pub fn make() -> Certs {
        let dir = tempfile::tempdir().unwrap();
        for (name, san) in [("app", "app.test"), ("other", "*.other.test")] {
            let made = rcgen::generate_simple_self_signed(vec![san.to_string()]).unwrap();
            std::fs::write(dir.path().join(format!("{name}.pem")), made.cert.pem()).unwrap();
            std::fs::write(dir.path().join(format!("{name}.key")), made.signing_key.serialize_pem()).unwrap();
        }
        Certs { dir }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// A `[listener.tls]` table serving both certificates (`app.test`
    /// the default), with `extra` keys.
    pub fn listener_table(&self, extra: &str) -> String {
        format!(
            "[listener.tls]\ncerts = [ {{ cert = {:?}, key = {:?} }}, {{ cert = {:?}, key = {:?} }} ]\n{extra}\n",
            self.path("app.pem"),
            self.path("app.key"),
            self.path("other.pem"),
            self.path("other.key"),
        )
    }
}

/// A client config that trusts `ca` (a PEM file) only and offers
/// `http/1.1`, presenting `identity` (certificate DER, key DER) if given.
pub fn client_config(
    ca: &Path,
    identity: Option<(CertificateDer<'static>, PrivateKeyDer<'static>)>,
) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(upsplice::tls::provider().as_ref().clone());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => config.with_client_auth_cert(vec![cert], key).unwrap(),
        None => config.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

/// A TLS connection to `addr` with `config`, asking for `sni`.
pub async fn connect_with(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    sni: &str,
) -> io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(config).connect(ServerName::try_from(sni.to_string()).unwrap(), tcp).await
}

/// How a test's clients reach one listener: plain TCP, or TLS with a
/// client config (SNI `app.test`).
#[derive(Clone)]
pub struct Connector {
    pub addr: SocketAddr,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Connector {
    pub async fn connect(&self) -> Client {
        match &self.tls {
            None => Client::Plain(TcpStream::connect(self.addr).await.unwrap()),
            Some(config) => Client::Tls(Box::new(connect_with(self.addr, config.clone(), "app.test").await.unwrap())),
        }
    }
}

/// A client's connection: plain TCP or TLS over it. Its `shutdown` is a
/// FIN, or `close_notify` then FIN; bytes a TLS write accepted may wait in
/// rustls until a later write or a `flush` (as with any buffered writer).
pub enum Client {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl Client {
    /// The TCP connection (under the TLS one).
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Client::Plain(s) => s,
            Client::Tls(s) => s.get_ref().0,
        }
    }

    /// Arms an RST for when the connection is dropped (SO_LINGER 0).
    pub fn set_zero_linger(&self) {
        self.tcp().set_zero_linger().unwrap();
    }
}

impl AsyncRead for Client {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Client::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Client::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Client {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Client::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Client::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Client::Plain(s) => Pin::new(s).poll_flush(cx),
            Client::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Client::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Client::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
