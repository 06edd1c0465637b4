//! SNI passthrough on tcp listeners (`sni_routes`): the server name a
//! client's TLS ClientHello asks for, read without terminating TLS, and the
//! table that routes it to a pool. The connection stays encrypted end to
//! end: the backend completes the handshake with the client.
//!
//! The ClientHello is parsed by rustls's [`Acceptor`], fed the bytes this
//! module reads; it joins a ClientHello spread over several records or
//! segments. Every byte read is kept and handed back: the caller sends them
//! to the backend before anything else.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::{BufMut, Bytes};
use rustls::server::Acceptor;
use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::Listener;

/// The most read while looking for a whole ClientHello: one full record
/// (16 KiB and its 5-byte header). Real ClientHellos are far smaller (a
/// post-quantum key share makes one about 2 KiB); larger is refused.
pub const MAX_HELLO: usize = 16 * 1024 + 5;

/// What a client's first bytes said: every byte read (the ClientHello and
/// anything the client sent behind it), in order, and its server name.
#[derive(Debug)]
pub struct Hello {
    pub bytes: Bytes,
    /// Lower case, without a trailing dot; None when the ClientHello has
    /// no SNI (or names an IP address, which SNI may not).
    pub server_name: Option<String>,
}

/// Why a connection was closed before its ClientHello was routed. The
/// reason is the `reason` label of `upsplice_sni_errors_total`.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("not a TLS ClientHello: {0}")]
    Invalid(rustls::Error),
    #[error("the client closed before sending a byte")]
    Closed,
    #[error("the client closed after {0} bytes, inside its ClientHello")]
    Truncated(usize),
    #[error("no whole ClientHello within {MAX_HELLO} bytes")]
    Oversized,
    #[error("no whole ClientHello within handshake_timeout")]
    Timeout,
    #[error("reading the ClientHello: {0}")]
    Io(#[from] std::io::Error),
}

impl HelloError {
    /// The metric's `reason` label.
    pub fn reason(&self) -> &'static str {
        match self {
            HelloError::Invalid(_) => "bad_message",
            HelloError::Closed => "closed",
            HelloError::Truncated(_) => "truncated",
            HelloError::Oversized => "oversized",
            HelloError::Timeout => "timeout",
            HelloError::Io(_) => "io",
        }
    }
}

/// Reads from `client` until its ClientHello is whole, at most
/// [`MAX_HELLO`] bytes. The caller bounds it in time.
pub async fn read_client_hello<R: AsyncRead + Unpin>(client: &mut R) -> Result<Hello, HelloError> {
    let mut acceptor = Acceptor::default();
    let mut read = Vec::with_capacity(2048);
    loop {
        if read.len() >= MAX_HELLO {
            return Err(HelloError::Oversized);
        }
        let start = read.len();
        let n = client.read_buf(&mut (&mut read).limit(MAX_HELLO - start)).await?;
        if n == 0 {
            return Err(if start == 0 { HelloError::Closed } else { HelloError::Truncated(start) });
        }
        let mut fresh = &read[start..];
        while !fresh.is_empty() {
            acceptor.read_tls(&mut fresh)?;
        }
        match acceptor.accept() {
            Ok(None) => continue,
            Ok(Some(accepted)) => {
                let server_name = accepted.client_hello().server_name().map(crate::host::normalize);
                return Ok(Hello { bytes: read.into(), server_name });
            }
            // The alert rustls would send is not ours to send: the router is
            // not the TLS server here. The connection is just closed.
            Err((e, _alert)) => return Err(HelloError::Invalid(e)),
        }
    }
}

/// A passthrough listener's routes: exact server names, then `*.` wildcards
/// (one label, as in certificates), then the listener's own pool.
#[derive(Debug, Default)]
pub struct SniTable {
    exact: HashMap<String, Arc<str>>,
    /// Keyed by the suffix after the `*` (`.ws.example.com`).
    wildcard: HashMap<String, Arc<str>>,
    default: Option<Arc<str>>,
}

impl SniTable {
    /// The table of `listener`, or None when it does not route by SNI.
    pub fn of(listener: &Listener) -> Option<SniTable> {
        if listener.sni_routes.is_empty() {
            return None;
        }
        let mut table = SniTable { default: listener.pool.as_deref().map(Arc::from), ..SniTable::default() };
        for r in &listener.sni_routes {
            let name = crate::host::normalize(&r.server_name);
            let pool = Arc::from(r.pool.as_str());
            match name.strip_prefix('*') {
                Some(suffix) => table.wildcard.insert(suffix.to_string(), pool),
                None => table.exact.insert(name, pool),
            };
        }
        Some(table)
    }

    /// The pool for a ClientHello naming `server_name` (already normal:
    /// lower case, no trailing dot); None: nothing takes it.
    pub fn pool(&self, server_name: Option<&str>) -> Option<&Arc<str>> {
        let routed = server_name.and_then(|name| {
            self.exact.get(name).or_else(|| name.find('.').and_then(|dot| self.wildcard.get(&name[dot..])))
        });
        routed.or(self.default.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(default: Option<&str>) -> SniTable {
        let toml = format!(
            "name = \"p\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\n{}\
             sni_routes = [ {{ server_name = \"*.WS.example.com.\", pool = \"wild\" }},\n\
             {{ server_name = \"a.ws.example.com\", pool = \"exact\" }} ]\n",
            default.map(|p| format!("pool = \"{p}\"\n")).unwrap_or_default()
        );
        SniTable::of(&toml::from_str(&toml).unwrap()).unwrap()
    }

    #[test]
    fn exact_beats_wildcard_and_a_wildcard_covers_one_label() {
        let t = table(Some("default"));
        let pool = |name| t.pool(name).map(|p| p.to_string());
        assert_eq!(pool(Some("a.ws.example.com")).as_deref(), Some("exact"));
        assert_eq!(pool(Some("b.ws.example.com")).as_deref(), Some("wild"));
        assert_eq!(pool(Some("x.b.ws.example.com")).as_deref(), Some("default"), "one label only");
        assert_eq!(pool(Some("ws.example.com")).as_deref(), Some("default"));
        assert_eq!(pool(None).as_deref(), Some("default"));
        let t = table(None);
        assert!(t.pool(Some("other.test")).is_none() && t.pool(None).is_none());
        assert_eq!(t.pool(Some("b.ws.example.com")).map(|p| &**p), Some("wild"));
    }

    /// A ClientHello made by rustls's own client, naming `sni`.
    fn client_hello(sni: &str) -> Vec<u8> {
        let config = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).unwrap();
        let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    /// A reader that hands out one byte per read: a ClientHello split into
    /// as many segments as it has bytes.
    struct Trickle(Vec<u8>, usize);

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            if let Some(&b) = self.0.get(self.1) {
                buf.put_slice(&[b]);
                self.1 += 1;
            }
            std::task::Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn finds_the_name_and_keeps_every_byte() {
        let mut wire = client_hello("App.Example.com");
        wire.extend_from_slice(b"after");
        let hello = read_client_hello(&mut &wire[..]).await.unwrap();
        assert_eq!(hello.server_name.as_deref(), Some("app.example.com"));
        assert_eq!(&hello.bytes[..], &wire[..], "the bytes behind it too, in order");

        let hello = read_client_hello(&mut Trickle(wire.clone(), 0)).await.unwrap();
        assert_eq!(hello.server_name.as_deref(), Some("app.example.com"));
        assert_eq!(hello.bytes.len(), wire.len() - 5, "byte by byte, read up to the ClientHello's end");
    }

    #[tokio::test]
    async fn a_hello_over_two_records_is_joined() {
        let wire = client_hello("split.example.com");
        // One handshake message, its body cut into two records.
        let body = &wire[5..];
        let (a, b) = body.split_at(body.len() / 2);
        let mut split = Vec::new();
        for part in [a, b] {
            split.extend_from_slice(&[0x16, 0x03, 0x01]);
            split.extend_from_slice(&(part.len() as u16).to_be_bytes());
            split.extend_from_slice(part);
        }
        let hello = read_client_hello(&mut &split[..]).await.unwrap();
        assert_eq!(hello.server_name.as_deref(), Some("split.example.com"));
        assert_eq!(&hello.bytes[..], &split[..]);
    }

    #[tokio::test]
    async fn bad_input_is_refused_with_its_reason() {
        let wire = client_hello("app.example.com");
        let reason = |r: Result<Hello, HelloError>| r.unwrap_err().reason();
        assert_eq!(reason(read_client_hello(&mut &b"GET / HTTP/1.1\r\n\r\n"[..]).await), "bad_message");
        assert_eq!(reason(read_client_hello(&mut &wire[..wire.len() - 1]).await), "truncated");
        assert_eq!(reason(read_client_hello(&mut &b""[..]).await), "closed");
        // A handshake message that claims 64 KiB, over records of 16 KiB.
        let mut big = vec![0x16, 0x03, 0x01, 0x40, 0x00, 0x01, 0x00, 0xff, 0xff];
        big.resize(5 + 0x4000, 0);
        big.extend_from_slice(&[0x16, 0x03, 0x01, 0x40, 0x00]);
        big.resize(big.len() + 0x4000, 0);
        assert_eq!(reason(read_client_hello(&mut &big[..]).await), "oversized");
    }
}
