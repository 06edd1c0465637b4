//! Where and how the generator connects: a URL (`ws://host:port/path`,
//! `wss://…`, `http://…`, `https://…`, as k6, oha and websocat take it) or
//! `--target HOST:PORT` with `--host`, `--path` and `--tls`; and the TLS and
//! PROXY protocol settings every connection of a run shares ([`Wire`]).

use crate::cli::WireArgs;
use crate::proxy::ProxyVersion;
use crate::tls::{self, TlsError, Verify};
use std::net::Ipv6Addr;
use std::sync::Arc;

/// A URL that cannot be used; each names the part that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    /// No `scheme://`.
    #[error("URL {0:?} has no scheme: write ws://, wss://, http:// or https:// before the host")]
    NoScheme(String),
    /// A scheme other than ws, wss, http, https.
    #[error("URL {url:?}: unsupported scheme {scheme:?} (ws, wss, http or https)")]
    Scheme {
        /// The URL.
        url: String,
        /// Its scheme.
        scheme: String,
    },
    /// `user:password@` before the host.
    #[error("URL {0:?}: user information (user@host) is not supported")]
    UserInfo(String),
    /// Empty host, or characters a host name cannot have.
    #[error("URL {url:?}: bad host {host:?}")]
    Host {
        /// The URL.
        url: String,
        /// The host part.
        host: String,
    },
    /// Not a number from 1 to 65535.
    #[error("URL {url:?}: bad port {port:?} (1-65535)")]
    Port {
        /// The URL.
        url: String,
        /// The port part.
        port: String,
    },
    /// Spaces or control characters in the path.
    #[error("URL {url:?}: bad path {path:?} (no spaces or control characters; percent-encode them)")]
    Path {
        /// The URL.
        url: String,
        /// The path part.
        path: String,
    },
}

/// A parsed target URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// `wss` and `https`.
    pub tls: bool,
    /// The host name or address (IPv6 without brackets).
    pub host: String,
    /// The port, or the scheme's default (80, 443).
    pub port: u16,
    /// `host[:port]` as written: the Host header.
    pub authority: String,
    /// Path and query (`/` when the URL has none); a fragment is dropped.
    pub path: String,
    /// Whether the URL had a path or query of its own.
    pub has_path: bool,
}

impl Url {
    /// `HOST:PORT` to resolve (IPv6 in brackets).
    pub fn addr(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

/// Parses `scheme://host[:port][/path][?query][#fragment]`.
pub fn parse_url(url: &str) -> Result<Url, UrlError> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(UrlError::NoScheme(url.to_string()));
    };
    let (tls, default_port) = match scheme.to_ascii_lowercase().as_str() {
        "ws" | "http" => (false, 80),
        "wss" | "https" => (true, 443),
        _ => return Err(UrlError::Scheme { url: url.to_string(), scheme: scheme.to_string() }),
    };
    let rest = rest.split_once('#').map_or(rest, |(r, _)| r);
    let split = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(split);
    if authority.contains('@') {
        return Err(UrlError::UserInfo(url.to_string()));
    }
    let bad_host = || UrlError::Host { url: url.to_string(), host: authority.to_string() };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (ip, after) = v6.split_once(']').ok_or_else(bad_host)?;
        ip.parse::<Ipv6Addr>().map_err(|_| bad_host())?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(bad_host)?),
        };
        (ip, port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let host_ok = |h: &str| {
        !h.is_empty() && h.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b':'))
    };
    if !host_ok(host) {
        return Err(bad_host());
    }
    let port = match port {
        None => default_port,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(UrlError::Port { url: url.to_string(), port: p.to_string() }),
        },
    };
    if path.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        return Err(UrlError::Path { url: url.to_string(), path: path.to_string() });
    }
    let has_path = !path.is_empty();
    let path = match path {
        "" => "/".to_string(),
        p if p.starts_with('?') => format!("/{p}"),
        p => p.to_string(),
    };
    Ok(Url { tls, host: host.to_string(), port, authority: authority.to_string(), path, has_path })
}

/// A target that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    /// The URL is malformed.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// Both a URL and `--target`.
    #[error("give the target as a URL or with --target HOST:PORT, not both")]
    Both,
    /// Neither.
    #[error("no target: give a URL (e.g. ws://127.0.0.1:8080/) or --target HOST:PORT")]
    Neither,
    /// A path in the URL and `--path`.
    #[error("the URL has a path ({0}) and --path gives another: use one")]
    PathTwice(String),
    /// `--tls` with a plain `ws://` / `http://` URL.
    #[error("--tls with the plain URL {0:?}: write wss:// or https:// instead")]
    PlainUrlWithTls(String),
    /// TLS without a way to check the server.
    #[error(
        "a TLS target needs --ca FILE (verify the server against these CA certificates) or --insecure (do not verify)"
    )]
    NoVerify,
    /// A TLS-only option without TLS.
    #[error("{0} applies to TLS targets only (wss://, https:// or --tls)")]
    TlsOnly(&'static str),
    /// The TLS settings cannot be used.
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// What the command line says about where to connect.
#[derive(Debug, Clone, Copy, Default)]
pub struct TargetSpec<'a> {
    /// The positional URL.
    pub url: Option<&'a str>,
    /// `--target HOST:PORT`.
    pub target: Option<&'a str>,
    /// `--host`.
    pub host: Option<&'a str>,
    /// `--path`.
    pub path: Option<&'a str>,
    /// `--tls`.
    pub tls: bool,
}

/// Where to connect, with what Host header and path, and whether over TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// `HOST:PORT` to resolve.
    pub addr: String,
    /// Host header (and the default TLS server name).
    pub host: String,
    /// Request path.
    pub path: String,
    /// Speak TLS.
    pub tls: bool,
}

impl TargetSpec<'_> {
    /// Combines the URL or `--target` with `--host`, `--path` and `--tls`:
    /// `--host` overrides the URL's Host header, `--path` may give the path
    /// only when the URL has none.
    pub fn endpoint(&self) -> Result<Endpoint, TargetError> {
        match (self.url, self.target) {
            (Some(_), Some(_)) => Err(TargetError::Both),
            (None, None) => Err(TargetError::Neither),
            (None, Some(t)) => Ok(Endpoint {
                addr: t.to_string(),
                host: self.host.unwrap_or(t).to_string(),
                path: self.path.unwrap_or("/").to_string(),
                tls: self.tls,
            }),
            (Some(u), None) => {
                let url = parse_url(u)?;
                if self.tls && !url.tls {
                    return Err(TargetError::PlainUrlWithTls(u.to_string()));
                }
                let path = match self.path {
                    Some(_) if url.has_path => return Err(TargetError::PathTwice(url.path)),
                    Some(p) => p.to_string(),
                    None => url.path.clone(),
                };
                Ok(Endpoint {
                    addr: url.addr(),
                    host: self.host.map_or_else(|| url.authority.clone(), str::to_string),
                    path,
                    tls: url.tls,
                })
            }
        }
    }
}

/// The host name in a Host header value: without the port, IPv6 without brackets.
pub fn host_name(host: &str) -> &str {
    if let Some(v6) = host.strip_prefix('[') {
        return v6.split_once(']').map_or(v6, |(ip, _)| ip);
    }
    match host.rsplit_once(':') {
        // A bare IPv6 address has more than one colon.
        Some((h, p)) if !h.contains(':') && p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// What every connection of a run does before its protocol starts: a
/// PROXY protocol header, then a TLS handshake.
#[derive(Debug, Clone, Default)]
pub struct Wire {
    /// The PROXY header to send first.
    pub proxy: Option<ProxyVersion>,
    /// TLS client settings.
    pub tls: Option<Arc<tls::Client>>,
}

/// HTTP/1.1 is what ws and http connections speak (an ALPN-checking router
/// refuses clients that offer only h2).
pub const ALPN_HTTP1: &[&[u8]] = &[b"http/1.1"];

impl Wire {
    /// Builds the wire settings for `endpoint` from the TLS and PROXY
    /// options; refuses TLS-only options without TLS and TLS without
    /// `--ca` or `--insecure`. The server name is `--sni`, else the Host
    /// header's host name.
    pub fn new(endpoint: &Endpoint, args: &WireArgs, alpn: &[&[u8]]) -> Result<Wire, TargetError> {
        let tls = if endpoint.tls {
            let verify = match (&args.ca, args.insecure) {
                (Some(ca), false) => Verify::Ca(ca.clone()),
                (None, true) => Verify::Insecure,
                // clap refuses both together.
                _ => return Err(TargetError::NoVerify),
            };
            let name = args.sni.as_deref().unwrap_or_else(|| host_name(&endpoint.host));
            Some(Arc::new(tls::Client::new(&verify, name, alpn, args.resume)?))
        } else {
            for (given, flag) in [
                (args.ca.is_some(), "--ca"),
                (args.insecure, "--insecure"),
                (args.sni.is_some(), "--sni"),
                (args.resume, "--resume"),
            ] {
                if given {
                    return Err(TargetError::TlsOnly(flag));
                }
            }
            None
        };
        Ok(Wire { proxy: args.proxy_protocol, tls })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> Url {
        parse_url(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn urls_set_address_host_path_and_tls() {
        let u = url("ws://127.0.0.1:8080/chat?room=1");
        assert_eq!(
            (u.tls, u.addr(), u.authority.as_str(), u.path.as_str()),
            (false, "127.0.0.1:8080".into(), "127.0.0.1:8080", "/chat?room=1")
        );
        let u = url("wss://app.example.com/ws");
        assert_eq!((u.tls, u.addr(), u.authority.as_str()), (true, "app.example.com:443".into(), "app.example.com"));
        let u = url("HTTP://localhost");
        assert_eq!((u.tls, u.port, u.path.as_str(), u.has_path), (false, 80, "/", false));
        let u = url("https://[::1]:8443?x#frag");
        assert_eq!(
            (u.tls, u.addr(), u.authority.as_str(), u.path.as_str()),
            (true, "[::1]:8443".into(), "[::1]:8443", "/?x")
        );
    }

    #[test]
    fn bad_urls_name_the_part() {
        let err = |s: &str| parse_url(s).unwrap_err();
        assert!(matches!(err("127.0.0.1:8080/x"), UrlError::NoScheme(_)));
        assert!(matches!(err("ftp://h/"), UrlError::Scheme { scheme, .. } if scheme == "ftp"));
        assert!(matches!(err("ws://user@h/"), UrlError::UserInfo(_)));
        assert!(matches!(err("ws:///path"), UrlError::Host { .. }));
        assert!(matches!(err("ws://h st/"), UrlError::Host { .. }));
        assert!(matches!(err("ws://[::1/"), UrlError::Host { .. }));
        assert!(matches!(err("ws://[nope]:80/"), UrlError::Host { .. }));
        assert!(matches!(err("ws://h:0/"), UrlError::Port { port, .. } if port == "0"));
        assert!(matches!(err("ws://h:99999/"), UrlError::Port { .. }));
        assert!(matches!(err("ws://h:/"), UrlError::Port { .. }));
        assert!(matches!(err("ws://h/a b"), UrlError::Path { path, .. } if path == "/a b"));
        let msg = err("ws://h:http/").to_string();
        assert!(msg.contains("bad port \"http\""), "{msg}");
    }

    #[test]
    fn url_or_target_with_host_path_and_tls() {
        let spec = TargetSpec { url: Some("wss://a.example:8443/x"), ..Default::default() };
        let e = spec.endpoint().unwrap();
        assert_eq!(
            e,
            Endpoint { addr: "a.example:8443".into(), host: "a.example:8443".into(), path: "/x".into(), tls: true }
        );
        let spec =
            TargetSpec { url: Some("ws://127.0.0.1:1"), host: Some("h"), path: Some("/p"), ..Default::default() };
        let e = spec.endpoint().unwrap();
        assert_eq!((e.host.as_str(), e.path.as_str(), e.tls), ("h", "/p", false));
        let spec = TargetSpec { target: Some("127.0.0.1:1"), tls: true, ..Default::default() };
        let e = spec.endpoint().unwrap();
        assert_eq!((e.host.as_str(), e.path.as_str(), e.tls), ("127.0.0.1:1", "/", true));
        let both = TargetSpec { url: Some("ws://h/"), target: Some("h:1"), ..Default::default() };
        assert!(matches!(both.endpoint(), Err(TargetError::Both)));
        assert!(matches!(TargetSpec::default().endpoint(), Err(TargetError::Neither)));
        let twice = TargetSpec { url: Some("ws://h/a"), path: Some("/b"), ..Default::default() };
        assert!(matches!(twice.endpoint(), Err(TargetError::PathTwice(_))));
        let plain = TargetSpec { url: Some("ws://h/"), tls: true, ..Default::default() };
        assert!(matches!(plain.endpoint(), Err(TargetError::PlainUrlWithTls(_))));
    }

    #[test]
    fn host_names_for_sni() {
        assert_eq!(host_name("a.example:8443"), "a.example");
        assert_eq!(host_name("a.example"), "a.example");
        assert_eq!(host_name("[::1]:443"), "::1");
        assert_eq!(host_name("::1"), "::1");
        assert_eq!(host_name("127.0.0.1:80"), "127.0.0.1");
    }

    #[test]
    fn tls_options_need_tls_and_tls_needs_a_verification_choice() {
        let plain = Endpoint { addr: "h:1".into(), host: "h".into(), path: "/".into(), tls: false };
        let tls = Endpoint { tls: true, ..plain.clone() };
        let none = WireArgs::default();
        assert!(Wire::new(&plain, &none, &[]).unwrap().tls.is_none());
        assert!(matches!(Wire::new(&tls, &none, &[]), Err(TargetError::NoVerify)));
        let insecure = WireArgs { insecure: true, ..Default::default() };
        assert!(matches!(Wire::new(&plain, &insecure, &[]), Err(TargetError::TlsOnly("--insecure"))));
        assert!(Wire::new(&tls, &insecure, &[]).unwrap().tls.is_some());
        let sni = WireArgs { sni: Some("x.example".into()), ..Default::default() };
        assert!(matches!(Wire::new(&plain, &sni, &[]), Err(TargetError::TlsOnly("--sni"))));
    }
}
