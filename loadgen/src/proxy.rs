//! The PROXY protocol header the generator can send first on every
//! connection (`--proxy-protocol v1|v2`), as a TCP-mode load balancer does:
//! the connection's own source and destination addresses, written with the
//! `ppp` crate the router reads them with.

use std::net::SocketAddr;

/// Which PROXY protocol version to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ProxyVersion {
    /// The text header (`PROXY TCP4 src dst sport dport\r\n`).
    V1,
    /// The binary header (12-byte signature, `PROXY` command, TCP over IPv4/IPv6).
    V2,
}

/// The header announcing a stream connection from `src` to `dst`.
pub fn header(version: ProxyVersion, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    match version {
        ProxyVersion::V1 => ppp::v1::Addresses::from((src, dst)).to_string().into_bytes(),
        ProxyVersion::V2 => ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (src, dst),
        )
        .build()
        .expect("building a header in memory cannot fail"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_is_the_text_line() {
        let h = header(ProxyVersion::V1, "127.0.0.5:4000".parse().unwrap(), "127.0.0.1:443".parse().unwrap());
        assert_eq!(h, b"PROXY TCP4 127.0.0.5 127.0.0.1 4000 443\r\n");
        let h = header(ProxyVersion::V1, "[::1]:4000".parse().unwrap(), "[::2]:443".parse().unwrap());
        assert_eq!(h, b"PROXY TCP6 ::1 ::2 4000 443\r\n");
    }

    #[test]
    fn v2_parses_back_to_the_same_addresses() {
        let (src, dst): (SocketAddr, SocketAddr) =
            ("127.0.0.5:4000".parse().unwrap(), "127.0.0.1:443".parse().unwrap());
        let h = header(ProxyVersion::V2, src, dst);
        assert_eq!(&h[..12], b"\r\n\r\n\0\r\nQUIT\n");
        let parsed = ppp::v2::Header::try_from(h.as_slice()).unwrap();
        assert_eq!(parsed.command, ppp::v2::Command::Proxy);
        assert_eq!(parsed.addresses, ppp::v2::Addresses::from((src, dst)));
    }
}
