//! PROXY protocol in (HAProxy's spec, v1 text and v2 binary): the header a
//! load balancer in TCP mode puts before a connection's first byte to say
//! who the client is. Read before anything else, within a deadline, and
//! never a byte past it: what follows belongs to the client (a request
//! head, a TLS ClientHello, a tcp listener's stream).
//!
//! Framing is found here (v1: up to its CRLF, at most 107 bytes; v2: 16
//! bytes and the length they carry); the bytes are parsed and validated by
//! the `ppp` crate.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::config::{ProxyProtocol, SendProxy};

/// The v2 signature (12 bytes) that starts a binary header.
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// A v1 header is at most 107 bytes, CRLF included (the spec's bound).
const V1_MAX: usize = 107;
/// The largest v2 header accepted: 16 bytes and up to this much of
/// addresses and TLVs (an AWS NLB sends well under 100; TLS TLVs from
/// HAProxy a few hundred). Larger is refused as oversized.
const V2_MAX_BODY: usize = 4096;

/// Why a connection was closed before its first byte was served. The
/// reason is the `reason` label of `upsplice_proxy_protocol_errors_total`.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("PROXY header from {0}, which is not in proxy_trusted_cidrs")]
    UntrustedPeer(SocketAddr),
    #[error("no PROXY header (the connection starts with {0:?})")]
    Missing(String),
    #[error("PROXY {found} header where the listener takes {expected}")]
    WrongVersion { found: &'static str, expected: &'static str },
    #[error("malformed PROXY header: {0}")]
    Malformed(String),
    #[error("PROXY header larger than {0} bytes")]
    Oversized(usize),
    #[error("the connection closed inside the PROXY header")]
    Truncated,
    #[error("no complete PROXY header within {0:?}")]
    Timeout(Duration),
    #[error("reading the PROXY header: {0}")]
    Io(#[from] io::Error),
}

impl ProxyError {
    /// The metric's `reason` label.
    pub fn reason(&self) -> &'static str {
        match self {
            ProxyError::UntrustedPeer(_) => "untrusted_peer",
            ProxyError::Missing(_) => "missing",
            ProxyError::WrongVersion { .. } => "wrong_version",
            ProxyError::Malformed(_) => "malformed",
            ProxyError::Oversized(_) => "oversized",
            ProxyError::Truncated => "truncated",
            ProxyError::Timeout(_) => "timeout",
            ProxyError::Io(_) => "io",
        }
    }
}

/// Reads the PROXY header `mode` requires from `stream` (whose TCP peer is
/// `peer`) and returns the client address it states: the header's source
/// for a proxied TCP connection, `peer` itself for v2 `LOCAL` (the load
/// balancer's own health check) and v1 `UNKNOWN`, as the spec says.
pub async fn accept(
    stream: &mut TcpStream,
    peer: SocketAddr,
    mode: ProxyProtocol,
    trusted: &[IpNet],
    within: Duration,
) -> Result<SocketAddr, ProxyError> {
    if !trusted.iter().any(|net| net.contains(&peer.ip())) {
        return Err(ProxyError::UntrustedPeer(peer));
    }
    let header =
        tokio::time::timeout(within, read_header(stream, mode)).await.map_err(|_| ProxyError::Timeout(within))??;
    Ok(client_address(&header)?.unwrap_or(peer))
}

/// Reads exactly one header's bytes: what is peeked is consumed only as far
/// as it is known to belong to the header.
async fn read_header(stream: &mut TcpStream, mode: ProxyProtocol) -> Result<Vec<u8>, ProxyError> {
    let mut header = Vec::with_capacity(64);
    let mut peeked = vec![0u8; 16 + V2_MAX_BODY];
    loop {
        let n = stream.peek(&mut peeked).await?;
        if n == 0 {
            return Err(if header.is_empty() { ProxyError::Missing(String::new()) } else { ProxyError::Truncated });
        }
        let mut seen = header.clone();
        seen.extend_from_slice(&peeked[..n]);
        // How many of the bytes seen belong to the header, once known.
        let take = match frame(&seen, mode)? {
            Some(total) => total - header.len(),
            // Not known yet: everything seen is header (no end in it).
            None => n,
        };
        let start = header.len();
        header.resize(start + take, 0);
        stream.read_exact(&mut header[start..]).await.map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => ProxyError::Truncated,
            _ => ProxyError::Io(e),
        })?;
        if frame(&header, mode)? == Some(header.len()) {
            return Ok(header);
        }
    }
}

/// The header's total length if `seen` (its first bytes) shows it, None
/// if more bytes are needed, or why it is not a header `mode` accepts.
fn frame(seen: &[u8], mode: ProxyProtocol) -> Result<Option<usize>, ProxyError> {
    // True while `seen` could still be, or already is, `signature`'s start.
    let begins = |signature: &[u8]| match seen.len() >= signature.len() {
        true => seen.starts_with(signature),
        false => signature.starts_with(seen),
    };
    let (is_v1, is_v2) = (begins(b"PROXY "), begins(V2_SIGNATURE));
    let expected = match mode {
        ProxyProtocol::V1 => "v1",
        ProxyProtocol::V2 => "v2",
        _ => "v1 or v2",
    };
    if is_v1 && !is_v2 {
        if mode == ProxyProtocol::V2 {
            return Err(ProxyError::WrongVersion { found: "v1", expected });
        }
        return match seen.windows(2).position(|w| w == b"\r\n") {
            Some(i) if i + 2 <= V1_MAX => Ok(Some(i + 2)),
            Some(_) => Err(ProxyError::Oversized(V1_MAX)),
            None if seen.len() >= V1_MAX => Err(ProxyError::Oversized(V1_MAX)),
            None => Ok(None),
        };
    }
    if is_v2 && !is_v1 {
        if mode == ProxyProtocol::V1 {
            return Err(ProxyError::WrongVersion { found: "v2", expected });
        }
        if seen.len() < 16 {
            return Ok(None);
        }
        let body = u16::from_be_bytes([seen[14], seen[15]]) as usize;
        if body > V2_MAX_BODY {
            return Err(ProxyError::Oversized(16 + V2_MAX_BODY));
        }
        return Ok(Some(16 + body));
    }
    if is_v1 && is_v2 {
        // Not one byte seen yet (both prefixes match the empty slice).
        return Ok(None);
    }
    let shown: String = seen.iter().take(16).map(|&b| if b.is_ascii_graphic() { b as char } else { '.' }).collect();
    Err(ProxyError::Missing(shown))
}

/// The header a pool with `send_proxy` starts its backend connections
/// with: `client` connected to `local` (both in one address family; an
/// IPv4 address beside an IPv6 one is written IPv4-mapped).
pub fn header(version: SendProxy, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (client, local) = match (client, local) {
        (SocketAddr::V4(c), SocketAddr::V6(_)) => (SocketAddr::new(c.ip().to_ipv6_mapped().into(), c.port()), local),
        (SocketAddr::V6(_), SocketAddr::V4(l)) => (client, SocketAddr::new(l.ip().to_ipv6_mapped().into(), l.port())),
        _ => (client, local),
    };
    match version {
        SendProxy::V1 => ppp::v1::Addresses::from((client, local)).to_string().into_bytes(),
        SendProxy::V2 | SendProxy::Off => ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (client, local),
        )
        .build()
        .expect("a header built in memory from two socket addresses"),
    }
}

/// The header of a connection the router opens for itself (a health
/// check) to a backend that expects one: v2 `LOCAL`, v1 `UNKNOWN`.
pub fn local_header(version: SendProxy) -> Option<Vec<u8>> {
    match version {
        SendProxy::Off => None,
        SendProxy::V1 => Some(b"PROXY UNKNOWN\r\n".to_vec()),
        SendProxy::V2 => Some(
            ppp::v2::Builder::with_addresses(
                ppp::v2::Version::Two | ppp::v2::Command::Local,
                ppp::v2::Protocol::Unspecified,
                ppp::v2::Addresses::Unspecified,
            )
            .build()
            .expect("a header built in memory"),
        ),
    }
}

/// The client address a complete header states; None when it says to
/// use the connection's own peer (v2 LOCAL, v1 UNKNOWN, v2 unspecified).
fn client_address(header: &[u8]) -> Result<Option<SocketAddr>, ProxyError> {
    let malformed = |e: &dyn std::fmt::Display| ProxyError::Malformed(e.to_string());
    if header.starts_with(V2_SIGNATURE) {
        use ppp::v2;
        let h = v2::Header::try_from(header).map_err(|e| malformed(&e))?;
        if h.command == v2::Command::Local {
            return Ok(None);
        }
        return match h.addresses {
            v2::Addresses::IPv4(a) => Ok(Some(SocketAddr::from((a.source_address, a.source_port)))),
            v2::Addresses::IPv6(a) => Ok(Some(SocketAddr::from((a.source_address, a.source_port)))),
            v2::Addresses::Unspecified => Ok(None),
            v2::Addresses::Unix(_) => Err(ProxyError::Malformed("a UNIX socket address".into())),
        };
    }
    use ppp::v1;
    let h = v1::Header::try_from(header).map_err(|e| malformed(&e))?;
    Ok(match h.addresses {
        v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Unknown => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    fn v2(command: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        h.extend_from_slice(&(body.len() as u16).to_be_bytes());
        h.extend_from_slice(body);
        h
    }

    fn v2_tcp4(src: [u8; 4], sport: u16, tlvs: &[u8]) -> Vec<u8> {
        let mut body = src.to_vec();
        body.extend_from_slice(&[10, 0, 0, 1]);
        body.extend_from_slice(&sport.to_be_bytes());
        body.extend_from_slice(&443u16.to_be_bytes());
        body.extend_from_slice(tlvs);
        v2(1, 0x11, &body)
    }

    /// Sends `written` in pieces (each its own write, apart in time) and
    /// accepts it; returns the result and what the stream holds after.
    async fn run(pieces: &[&[u8]], mode: ProxyProtocol) -> (Result<SocketAddr, ProxyError>, Vec<u8>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut s, peer) = l.accept().await.unwrap();
        let pieces: Vec<Vec<u8>> = pieces.iter().map(|p| p.to_vec()).collect();
        let writer = tokio::spawn(async move {
            for p in pieces {
                c.write_all(&p).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            c.shutdown().await.unwrap();
            c
        });
        let trusted: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        let r = accept(&mut s, peer, mode, &trusted, Duration::from_millis(500)).await;
        let _c = writer.await.unwrap();
        let mut rest = Vec::new();
        if r.is_ok() {
            s.read_to_end(&mut rest).await.unwrap();
        }
        (r, rest)
    }

    #[tokio::test]
    async fn v1_and_v2_state_the_client_and_leave_what_follows() {
        let (r, rest) =
            run(&[b"PROXY TCP4 192.0.2.7 10.0.0.1 5555 443\r\nGET / HTTP/1.1\r\n"], ProxyProtocol::V1).await;
        assert_eq!((r.unwrap(), rest.as_slice()), ("192.0.2.7:5555".parse().unwrap(), &b"GET / HTTP/1.1\r\n"[..]));
        let (r, _) = run(&[b"PROXY TCP6 2001:db8::7 2001:db8::1 5555 443\r\n"], ProxyProtocol::Any).await;
        assert_eq!(r.unwrap(), "[2001:db8::7]:5555".parse().unwrap());
        // TLVs (an NLB's VPC endpoint id, say) are skipped.
        let mut wire = v2_tcp4([198, 51, 100, 9], 4000, &[0xEA, 0, 3, b'v', b'p', b'c']);
        wire.extend_from_slice(b"\x16\x03\x01");
        let (r, rest) = run(&[&wire], ProxyProtocol::V2).await;
        assert_eq!((r.unwrap(), rest.as_slice()), ("198.51.100.9:4000".parse().unwrap(), &b"\x16\x03\x01"[..]));
    }

    #[test]
    fn headers_sent_on_read_back_as_written() {
        let (client, local) = ("192.0.2.7:5555".parse().unwrap(), "10.0.0.1:443".parse().unwrap());
        let v1 = header(SendProxy::V1, client, local);
        assert_eq!(v1, b"PROXY TCP4 192.0.2.7 10.0.0.1 5555 443\r\n");
        for version in [SendProxy::V1, SendProxy::V2] {
            let wire = header(version, client, local);
            assert_eq!(frame(&wire, ProxyProtocol::Any).unwrap(), Some(wire.len()));
            assert_eq!(client_address(&wire).unwrap(), Some(client));
            // Mixed families: the IPv4 side is written IPv4-mapped.
            let wire = header(version, client, "[2001:db8::1]:443".parse().unwrap());
            assert_eq!(client_address(&wire).unwrap().unwrap().port(), 5555, "{version:?}");
            // A health check's header says "no client".
            let local = local_header(version).unwrap();
            assert_eq!(frame(&local, ProxyProtocol::Any).unwrap(), Some(local.len()));
            assert_eq!(client_address(&local).unwrap(), None);
        }
    }

    #[tokio::test]
    async fn local_and_unknown_mean_the_connection_itself() {
        let (r, rest) = run(&[&v2(0, 0, &[]), b"x"], ProxyProtocol::V2).await;
        assert!(r.unwrap().ip().is_loopback());
        assert_eq!(rest, b"x");
        let (r, _) = run(&[b"PROXY UNKNOWN\r\n"], ProxyProtocol::Any).await;
        assert!(r.unwrap().ip().is_loopback());
    }

    #[tokio::test]
    async fn a_header_in_pieces_is_read_whole_and_no_further() {
        let wire = b"PROXY TCP4 192.0.2.7 10.0.0.1 5555 443\r\nrest";
        let (r, rest) = run(&[&wire[..3], &wire[3..20], &wire[20..41], &wire[41..]], ProxyProtocol::Any).await;
        assert_eq!((r.unwrap().port(), rest.as_slice()), (5555, &b"rest"[..]));
        let wire = v2_tcp4([1, 2, 3, 4], 9, &[]);
        let (r, rest) = run(&[&wire[..5], &wire[5..14], &wire[14..], b"after"], ProxyProtocol::Any).await;
        assert_eq!((r.unwrap().port(), rest.as_slice()), (9, &b"after"[..]));
    }

    #[tokio::test]
    async fn bad_headers_are_refused_with_their_reason() {
        let oversized = v2(1, 0x11, &vec![0u8; V2_MAX_BODY + 1]);
        let long_v1 = format!("PROXY TCP4 {}\r\n", "1".repeat(120));
        let cases: Vec<(Vec<u8>, ProxyProtocol, &str)> = vec![
            (b"GET / HTTP/1.1\r\n\r\n".to_vec(), ProxyProtocol::Any, "missing"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec(), ProxyProtocol::V2, "wrong_version"),
            (v2_tcp4([1, 2, 3, 4], 9, &[]), ProxyProtocol::V1, "wrong_version"),
            (b"PROXY TCP4 1.2.3.999 5.6.7.8 1 2\r\n".to_vec(), ProxyProtocol::V1, "malformed"),
            (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\nxx\r\n".to_vec(), ProxyProtocol::V1, "malformed"),
            (long_v1.into_bytes(), ProxyProtocol::V1, "oversized"),
            (oversized, ProxyProtocol::V2, "oversized"),
            // Version 3 in the version nibble.
            ([&V2_SIGNATURE[..], &[0x31, 0x11, 0, 0]].concat(), ProxyProtocol::V2, "malformed"),
            (b"PROXY TCP4 1.2.3.4".to_vec(), ProxyProtocol::V1, "truncated"),
            (v2_tcp4([1, 2, 3, 4], 9, &[])[..20].to_vec(), ProxyProtocol::V2, "truncated"),
        ];
        for (wire, mode, reason) in cases {
            let (r, _) = run(&[&wire], mode).await;
            let e = r.expect_err(&format!("{:?} accepted", String::from_utf8_lossy(&wire)));
            assert_eq!(e.reason(), reason, "{:?}: {e}", String::from_utf8_lossy(&wire));
        }
    }

    #[tokio::test]
    async fn an_untrusted_peer_and_a_slow_header_are_refused() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (mut s, peer) = l.accept().await.unwrap();
        let only_ten: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let e = accept(&mut s, peer, ProxyProtocol::Any, &only_ten, Duration::from_secs(1)).await.unwrap_err();
        assert_eq!(e.reason(), "untrusted_peer");
        let trusted: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        let e = accept(&mut s, peer, ProxyProtocol::Any, &trusted, Duration::from_millis(100)).await.unwrap_err();
        assert_eq!(e.reason(), "timeout");
    }
}
