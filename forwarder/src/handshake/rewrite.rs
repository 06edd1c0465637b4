//! Turning a client's request head into the head sent to the backend.
//!
//! * hop-by-hop headers go (`Connection`, `Keep-Alive`, `Proxy-Connection`,
//!   `TE`, `HTTP2-Settings` and whatever `Connection` names), except that an
//!   upgrade keeps `Connection: Upgrade` and its `Upgrade` header;
//! * an `Upgrade: h2c` offer is dropped and the request proceeds as HTTP/1.1;
//! * plain requests get `Connection: close` towards the backend unless its
//!   connection may carry another request (`keep_backend`: backend reuse
//!   is on and the request is HTTP/1.1);
//! * `X-Forwarded-For`: a trusted peer's list is extended with the peer's
//!   address, anyone else's is replaced by it; `X-Forwarded-Proto`: a trusted
//!   peer's value is kept, otherwise the listener's is set;
//!   `X-Request-Start`: a trusted peer's is kept, otherwise milliseconds
//!   since the epoch, as gorouter sets it; `X-Vcap-Request-Id`: a trusted
//!   peer's is kept, otherwise a fresh UUID, as gorouter sets it;
//! * the other headers that name the client, its scheme or its request
//!   ([`UNTRUSTED_DROPPED`]: `Forwarded`, `X-Real-IP`, `X-Forwarded-Host`,
//!   …) are kept from a trusted peer and removed from anyone else's
//!   request, so a backend never takes a client's claim for the router's;
//! * `X-Forwarded-Client-Cert` per the listener's `forwarded_client_cert`
//!   (gorouter's modes): `always_forward` keeps a trusted peer's,
//!   `forward` keeps it only on an mTLS connection, `sanitize_set` always
//!   removes it and, on mTLS, sets the client's certificate (base64 DER);
//! * `X-CF-ApplicationID`, `X-CF-InstanceID` and `X-CF-InstanceIndex` are
//!   always removed; each attempt's head to an app instance learned from
//!   NATS carries its own ([`Forward::head_to`]), as gorouter sets them;
//! * ambiguous body framing (Transfer-Encoding with Content-Length, differing
//!   Content-Lengths, a Transfer-Encoding that does not end in chunked) is
//!   refused: it is how requests get smuggled past a proxy.

use std::borrow::Cow;
use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};

use base64::Engine;

use super::answer::Refusal;
use super::head::{tokens, values, Headers, Request, Response};
use crate::config::ForwardedClientCert;
use crate::upstream::AppInstance;

/// How the request body is framed (what follows the head from the client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    None,
    Length(u64),
    Chunked,
}

/// What the listener knows about the client.
#[derive(Debug, Clone)]
pub struct ClientInfo<'a> {
    pub peer: IpAddr,
    pub trusted: bool,
    pub forwarded_proto: &'a str,
    pub now_ms: u128,
    /// The `X-Vcap-Request-Id` to send when a trusted peer sent none (a
    /// fresh UUID per request, as gorouter sets it).
    pub request_id: &'a str,
    /// The listener's `forwarded_client_cert`.
    pub forwarded_client_cert: ForwardedClientCert,
    /// The leaf certificate (DER) the client presented, on an mTLS connection.
    pub client_cert: Option<&'a [u8]>,
}

/// A request ready to be routed and forwarded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// Host to route by, as sent (maybe with a port).
    pub host: String,
    /// The normalised path to route by ([`crate::path::normalize`]; no
    /// query). The request is forwarded with its path as received.
    pub path: String,
    /// The protocols the client asked to upgrade to, if this is an upgrade.
    pub upgrade: Option<String>,
    pub body: Body,
    /// The head to send to the backend.
    pub head: Vec<u8>,
    /// `X-Forwarded-For`, `X-Forwarded-Proto` and `X-Vcap-Request-Id` as
    /// sent (for the access log).
    pub x_forwarded_for: String,
    pub x_forwarded_proto: String,
    pub request_id: String,
}

/// Headers never forwarded as they came.
const DROPPED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "upgrade",
    "http2-settings",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-request-start",
    // The app instance headers: the router's alone to say (see
    // `Forward::head_to`), whoever the client is.
    "x-cf-applicationid",
    "x-cf-instanceid",
    "x-cf-instanceindex",
];

/// Headers removed from the requests of peers outside the listener's
/// `trusted_cidrs` (README, "Forwarded headers"): each states something
/// about the client, its scheme or its original request that only a proxy
/// in front may say, and frameworks act on them (Rack and Spring take the
/// scheme from `X-Forwarded-Ssl`/`-Scheme`, many apps the client address
/// from `X-Real-IP` or `Forwarded`). The router does not set them itself.
pub const UNTRUSTED_DROPPED: &[&str] = &[
    "forwarded",
    "x-real-ip",
    "x-forwarded-host",
    "x-forwarded-port",
    "x-forwarded-ssl",
    "x-forwarded-scheme",
    "x-forwarded-client-cert",
    "x-vcap-request-id",
];

/// `X-Forwarded-Client-Cert`: kept or set by the listener's `forwarded_client_cert`.
const XFCC: &str = "x-forwarded-client-cert";

/// Headers a `Connection` token may not remove: they frame or route the request.
const PROTECTED: &[&str] = &["host", "content-length", "transfer-encoding"];

/// Checks `req` and builds the head to forward, or the answer to give
/// instead. `keep_backend`: the backend connection may carry another
/// request after this one (no `Connection: close` on a plain request).
pub fn rewrite(req: &Request, client: &ClientInfo<'_>, keep_backend: bool) -> Result<Forward, Refusal> {
    if req.method().eq_ignore_ascii_case("CONNECT") {
        return Err(Refusal::bad_request("CONNECT is not supported by this router"));
    }
    let Target { host, path, absolute } = target(req)?;
    let route_path = crate::path::normalize(&path).map_err(|e| Refusal::bad_request(e.to_string()))?;
    let body = body_framing(req)?;

    // Upgrade: Connection must name "upgrade" and Upgrade must offer
    // something other than h2c (dropped: we do not speak HTTP/2).
    let connection_upgrade = tokens(&req.headers, "connection").any(|t| t.eq_ignore_ascii_case(b"upgrade"));
    let upgrade = (req.version == 1 && connection_upgrade).then(|| offered_protocols(&req.headers)).flatten();

    let keep_xfcc = match client.forwarded_client_cert {
        ForwardedClientCert::AlwaysForward => client.trusted,
        ForwardedClientCert::Forward => client.client_cert.is_some(),
        ForwardedClientCert::SanitizeSet => false,
    };
    let dropped = |name: &str| {
        let xfcc = name.eq_ignore_ascii_case(XFCC);
        DROPPED.iter().any(|d| name.eq_ignore_ascii_case(d))
            || (xfcc && !keep_xfcc)
            || (!xfcc && !client.trusted && UNTRUSTED_DROPPED.iter().any(|d| name.eq_ignore_ascii_case(d)))
            || named_by_connection(&req.headers).any(|t| t.eq_ignore_ascii_case(name.as_bytes()))
    };

    let mut head = Vec::with_capacity(req.head_len + 192);
    head.extend_from_slice(req.method().as_bytes());
    head.push(b' ');
    // An absolute-form target goes on in origin-form with the Host it
    // names (RFC 9112 §3.2.2), as gorouter and HAProxy send it: the backend
    // and the router agree on the host, and origin servers that do not
    // parse absolute-form are not surprised.
    head.extend_from_slice(if absolute { path.as_bytes() } else { req.target().as_bytes() });
    head.extend_from_slice(if req.version == 0 { b" HTTP/1.0\r\n" } else { b" HTTP/1.1\r\n" });
    if absolute {
        push_header(&mut head, "Host", host.as_bytes());
    }
    for h in req.headers.iter() {
        if dropped(h.name) || (absolute && h.name.eq_ignore_ascii_case("host")) {
            continue;
        }
        push_header(&mut head, h.name, h.value);
    }
    match &upgrade {
        Some(protocols) => {
            push_header(&mut head, "Connection", b"Upgrade");
            push_header(&mut head, "Upgrade", protocols.as_bytes());
        }
        None if keep_backend => {}
        None => push_header(&mut head, "Connection", b"close"),
    }

    // A trusted peer's list, then the peer, in one buffer that becomes
    // the access log's copy (as text; a trusted peer's non-UTF-8 bytes go
    // on to the backend as sent).
    let mut xff = Vec::with_capacity(48);
    if client.trusted {
        for sent in values(&req.headers, "x-forwarded-for").map(|v| v.trim_ascii()).filter(|v| !v.is_empty()) {
            xff.extend_from_slice(sent);
            xff.extend_from_slice(b", ");
        }
    }
    write!(xff, "{}", client.peer).expect("a Vec takes every write");
    push_header(&mut head, "X-Forwarded-For", &xff);
    let sent_proto = values(&req.headers, "x-forwarded-proto").next().map(|v| v.trim_ascii()).filter(|v| !v.is_empty());
    let proto = match sent_proto {
        Some(p) if client.trusted => p,
        _ => client.forwarded_proto.as_bytes(),
    };
    push_header(&mut head, "X-Forwarded-Proto", proto);
    // A trusted proxy in front saw the request first: its start time stands.
    let sent_start = values(&req.headers, "x-request-start").map(|v| v.trim_ascii()).find(|v| !v.is_empty());
    match sent_start {
        Some(start) if client.trusted => push_header(&mut head, "X-Request-Start", start),
        _ => write!(head, "X-Request-Start: {}\r\n", client.now_ms).expect("a Vec takes every write"),
    }
    // A trusted proxy's request id stands (it is in the dropped list for
    // anyone else); otherwise the router's, as gorouter sets one.
    let sent_id = values(&req.headers, "x-vcap-request-id").map(|v| v.trim_ascii()).find(|v| !v.is_empty());
    let request_id = match sent_id {
        Some(id) if client.trusted => id,
        _ => {
            push_header(&mut head, "X-Vcap-Request-Id", client.request_id.as_bytes());
            client.request_id.as_bytes()
        }
    };
    if let (ForwardedClientCert::SanitizeSet, Some(cert)) = (client.forwarded_client_cert, client.client_cert) {
        // gorouter's format: the leaf certificate's DER, base64.
        let encoded = base64::engine::general_purpose::STANDARD.encode(cert);
        push_header(&mut head, "X-Forwarded-Client-Cert", encoded.as_bytes());
    }
    head.extend_from_slice(b"\r\n");

    Ok(Forward {
        host,
        path: route_path,
        upgrade,
        body,
        x_forwarded_for: String::from_utf8(xff).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()),
        x_forwarded_proto: String::from_utf8_lossy(proto).into_owned(),
        request_id: String::from_utf8_lossy(request_id).into_owned(),
        head,
    })
}

/// The route-service headers of gorouter's contract: the router sets
/// them on the way to a service and removes them before the app.
const ROUTE_SERVICE_HEADERS: [&str; 3] =
    [crate::route_service::FORWARDED_URL, crate::route_service::SIGNATURE, crate::route_service::METADATA];

impl Forward {
    /// The URL the request was sent to, as `X-CF-Forwarded-Url` states
    /// it (gorouter's: the scheme, the Host without its port, the target
    /// as received, here in origin-form).
    pub fn forwarded_url(&self, scheme: &str) -> String {
        let host = crate::host::without_port(&self.host);
        let target = self.target();
        match host.contains(':') {
            true => format!("{scheme}://[{host}]{target}"),
            false => format!("{scheme}://{host}{target}"),
        }
    }

    /// The request target of the head to send (origin-form).
    fn target(&self) -> &str {
        let line = self.head.split(|&b| b == b'\n').next().unwrap_or_default();
        let line = std::str::from_utf8(line).unwrap_or_default();
        line.split(' ').nth(1).unwrap_or("/")
    }

    /// Sends the request to its route service instead of the app: the
    /// target becomes the service URL's path and query, the Host the
    /// service's, and the contract's headers are set (any the client sent
    /// are replaced), as gorouter does.
    pub fn to_route_service(
        &mut self,
        target: &str,
        host: &str,
        forwarded_url: &str,
        sealed: &crate::route_service::Sealed,
    ) {
        let set = [
            ("X-CF-Forwarded-Url", forwarded_url.as_bytes()),
            ("X-CF-Proxy-Signature", sealed.signature.as_bytes()),
            ("X-CF-Proxy-Metadata", sealed.metadata.as_bytes()),
        ];
        self.head = edit_head(&self.head, Some(target), Some(host), &set);
    }

    /// The head for one attempt at the request, to the backend it went
    /// to: a backend that registered as an app instance (an endpoint
    /// learned from NATS) is told which, as gorouter tells it —
    /// `X-CF-ApplicationID`, `X-CF-InstanceIndex` and `X-CF-InstanceID`
    /// (the backend's address when it registered no instance id); any
    /// other backend gets none (the client's were removed).
    pub fn head_to(&self, instance: Option<&AppInstance>, addr: SocketAddr) -> Cow<'_, [u8]> {
        let Some(instance) = instance else { return Cow::Borrowed(&self.head) };
        let addr = addr.to_string();
        let instance_id = match &*instance.instance_id {
            "" => addr.as_str(),
            id => id,
        };
        let body = self.head.strip_suffix(b"\r\n").unwrap_or(&self.head);
        let mut head = Vec::with_capacity(self.head.len() + 96 + instance.app_id.len() + instance_id.len());
        head.extend_from_slice(body);
        push_header(&mut head, "X-CF-ApplicationID", instance.app_id.as_bytes());
        push_header(&mut head, "X-CF-InstanceIndex", instance.instance_index.as_bytes());
        push_header(&mut head, "X-CF-InstanceID", instance_id.as_bytes());
        head.extend_from_slice(b"\r\n");
        Cow::Owned(head)
    }

    /// A checked callback from the route service goes on to the app
    /// without the contract's headers (gorouter removes them).
    pub fn strip_route_service_headers(&mut self) {
        self.head = edit_head(&self.head, None, None, &[]);
    }
}

/// Rebuilds a head this module made: a new target and Host if given, the
/// route-service headers removed, then `set` added.
fn edit_head(head: &[u8], target: Option<&str>, host: Option<&str>, set: &[(&str, &[u8])]) -> Vec<u8> {
    let mut out = Vec::with_capacity(head.len() + set.iter().map(|(n, v)| n.len() + v.len() + 4).sum::<usize>());
    let body = head.strip_suffix(b"\r\n\r\n").unwrap_or(head);
    let mut lines = body.split(|&b| b == b'\n').map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let request_line = lines.next().unwrap_or_default();
    match target {
        Some(t) => {
            let mut parts = request_line.splitn(3, |&b| b == b' ');
            let (method, _, version) = (parts.next(), parts.next(), parts.next());
            out.extend_from_slice(method.unwrap_or(b"GET"));
            out.push(b' ');
            out.extend_from_slice(t.as_bytes());
            out.push(b' ');
            out.extend_from_slice(version.unwrap_or(b"HTTP/1.1"));
        }
        None => out.extend_from_slice(request_line),
    }
    out.extend_from_slice(b"\r\n");
    if let Some(h) = host {
        push_header(&mut out, "Host", h.as_bytes());
    }
    for line in lines {
        let name = line.split(|&b| b == b':').next().unwrap_or_default();
        let is = |n: &str| name.eq_ignore_ascii_case(n.as_bytes());
        if ROUTE_SERVICE_HEADERS.iter().any(|n| is(n)) || (host.is_some() && is("host")) {
            continue;
        }
        out.extend_from_slice(line);
        out.extend_from_slice(b"\r\n");
    }
    for (name, value) in set {
        push_header(&mut out, name, value);
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Response headers that concern one connection, never relayed.
const RESPONSE_HOP_BY_HOP: &[&str] = &["connection", "keep-alive", "proxy-connection"];

/// The head of a final (non-101) response as the client gets it: the
/// backend's status and headers less its hop-by-hop ones (those
/// `Connection` names too, except framing), and the router's own say on
/// the connection: `Connection: close` when it closes after this
/// response, `Connection: keep-alive` to an HTTP/1.0 client whose
/// connection stays (HTTP/1.1 keeps it by default). The status line says
/// HTTP/1.1, the router's own version (RFC 9110 §6.2).
pub fn response_head(resp: &Response, keep_alive: bool, client_version: u8) -> Vec<u8> {
    // Transfer-Encoding overrides Content-Length, and a proxy removes the
    // Content-Length (RFC 9112 §6.3): a client that read it would take the
    // rest for its next response.
    let chunked = values(&resp.headers, "transfer-encoding").next().is_some();
    let dropped = |name: &str| {
        RESPONSE_HOP_BY_HOP.iter().any(|d| name.eq_ignore_ascii_case(d))
            || named_by_connection(&resp.headers).any(|t| t.eq_ignore_ascii_case(name.as_bytes()))
            || (chunked && name.eq_ignore_ascii_case("content-length"))
    };
    let mut head = Vec::with_capacity(resp.head_len + 32);
    // Written into the head, not through a `format!`ed String.
    write!(head, "HTTP/1.1 {} {}", resp.status, resp.reason()).expect("a Vec takes every write");
    head.extend_from_slice(b"\r\n");
    for h in resp.headers.iter().filter(|h| !dropped(h.name)) {
        push_header(&mut head, h.name, h.value);
    }
    match (keep_alive, client_version) {
        (false, _) => push_header(&mut head, "Connection", b"close"),
        (true, 0) => push_header(&mut head, "Connection", b"keep-alive"),
        (true, _) => {}
    }
    head.extend_from_slice(b"\r\n");
    head
}

/// The headers a message's `Connection` header names (hop-by-hop by
/// that), less those that frame or route it ([`PROTECTED`]).
fn named_by_connection(headers: &Headers) -> impl Iterator<Item = &[u8]> + '_ {
    tokens(headers, "connection").filter(|t| !PROTECTED.iter().any(|p| t.eq_ignore_ascii_case(p.as_bytes())))
}

/// The protocols an `Upgrade` header offers, less h2c (the router does
/// not speak HTTP/2), as one list; None when it offers nothing else.
fn offered_protocols(headers: &Headers) -> Option<String> {
    let mut offered = tokens(headers, "upgrade").filter(|t| !t.eq_ignore_ascii_case(b"h2c")).peekable();
    offered.peek()?;
    let mut list = String::new();
    for t in offered {
        if !list.is_empty() {
            list.push_str(", ");
        }
        list.push_str(&String::from_utf8_lossy(t));
    }
    Some(list)
}

fn push_header(head: &mut Vec<u8>, name: &str, value: &[u8]) {
    head.extend_from_slice(name.as_bytes());
    head.extend_from_slice(b": ");
    head.extend_from_slice(value);
    head.extend_from_slice(b"\r\n");
}

/// Where a request goes, from its target and Host.
struct Target<'a> {
    /// The host to route by (maybe with a port).
    host: String,
    /// The target in origin-form (`/path?query`), or `*`: the request's
    /// own unless it came in absolute-form without a path.
    path: Cow<'a, str>,
    /// True when the target was in absolute-form: the forwarded head then
    /// carries `path` and `Host: host` instead of what the client sent.
    absolute: bool,
}

/// The host to route by and the path: from an absolute-form target if the
/// client sent one (it overrides Host, RFC 9112 §3.2.2), else from Host.
/// Targets that are neither origin-form, absolute-form (http/https) nor
/// `OPTIONS *` are refused.
fn target(req: &Request) -> Result<Target<'_>, Refusal> {
    let req_target = req.target();
    let scheme_is = |s: &str| req_target.get(..s.len()).is_some_and(|p| p.eq_ignore_ascii_case(s));
    if scheme_is("http://") || scheme_is("https://") {
        let rest = &req_target[req_target.find("://").map(|i| i + 3).unwrap_or(0)..];
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        // RFC 9110 §4.2.4: userinfo is deprecated and used to obscure the
        // authority; a recipient should treat it as an error.
        if authority.contains('@') {
            return Err(Refusal::bad_request("userinfo in the request target"));
        }
        if authority.is_empty() {
            return Err(Refusal::empty_host());
        }
        let path = if path.starts_with('/') { Cow::Borrowed(path) } else { Cow::Owned(format!("/{path}")) };
        return Ok(Target { host: checked_host(authority.as_bytes())?.to_string(), path, absolute: true });
    }
    let origin_form = req_target.starts_with('/');
    let asterisk = req_target == "*" && req.method().eq_ignore_ascii_case("OPTIONS");
    if !origin_form && !asterisk {
        return Err(Refusal::bad_request("the request target is not a path or an http(s) URL"));
    }
    let mut hosts = values(&req.headers, "host");
    let host = hosts.next().map(|h| h.trim_ascii()).unwrap_or_default();
    if hosts.next().is_some() {
        return Err(Refusal::bad_request("more than one Host header"));
    }
    if host.is_empty() {
        return Err(Refusal::empty_host());
    }
    Ok(Target { host: checked_host(host)?.to_string(), path: Cow::Borrowed(req_target), absolute: false })
}

/// A host (with an optional port) as received, if it looks like one.
fn checked_host(host: &[u8]) -> Result<&str, Refusal> {
    let host = std::str::from_utf8(host).map_err(|_| Refusal::bad_request("Host is not ASCII"))?;
    if host.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control() || b == b'/' || b == b'@') {
        return Err(Refusal::bad_request("Host is not a host name"));
    }
    Ok(host)
}

fn body_framing(req: &Request) -> Result<Body, Refusal> {
    let te: Vec<&[u8]> = tokens(&req.headers, "transfer-encoding").collect();
    let mut lengths =
        values(&req.headers, "content-length").flat_map(|v| v.split(|&b| b == b',')).map(|v| v.trim_ascii());
    let length = match lengths.next() {
        None => None,
        Some(first) => {
            let n = parse_length(first).ok_or_else(|| Refusal::bad_request("invalid Content-Length"))?;
            if lengths.any(|other| parse_length(other) != Some(n)) {
                return Err(Refusal::bad_request("conflicting Content-Length headers"));
            }
            Some(n)
        }
    };
    if !te.is_empty() {
        if length.is_some() {
            return Err(Refusal::bad_request("both Transfer-Encoding and Content-Length"));
        }
        if req.version == 0 {
            return Err(Refusal::bad_request("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if !te.last().is_some_and(|t| t.eq_ignore_ascii_case(b"chunked")) {
            return Err(Refusal::bad_request("Transfer-Encoding must end with chunked"));
        }
        // Chunked twice would be decoded twice by the backend but framed
        // once here (RFC 9112 §6.1: a sender must not apply it twice).
        if te.iter().filter(|t| t.eq_ignore_ascii_case(b"chunked")).count() > 1 {
            return Err(Refusal::bad_request("chunked applied more than once"));
        }
        // Only `chunked`, on one line: another coding before it is one the
        // router would pass on undecoded (RFC 9112 §6.1: 501), and the same
        // list split over two lines is read by some backends from its first
        // line only — which then frames no body.
        if values(&req.headers, "transfer-encoding").count() > 1 {
            return Err(Refusal::bad_request("more than one Transfer-Encoding header"));
        }
        if te.len() > 1 {
            return Err(Refusal::not_implemented("transfer codings other than chunked"));
        }
        return Ok(Body::Chunked);
    }
    Ok(match length {
        None | Some(0) => Body::None,
        Some(n) => Body::Length(n),
    })
}

fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::super::head::parse_request;
    use super::*;

    fn client(trusted: bool) -> ClientInfo<'static> {
        ClientInfo {
            peer: "192.0.2.7".parse().unwrap(),
            trusted,
            forwarded_proto: "https",
            now_ms: 1_700_000_000_123,
            request_id: "00000000-0000-4000-8000-000000000000",
            forwarded_client_cert: ForwardedClientCert::AlwaysForward,
            client_cert: None,
        }
    }

    fn fwd(raw: &str, trusted: bool) -> Result<Forward, Refusal> {
        let req = parse_request(raw.as_bytes(), 65536).unwrap().unwrap();
        rewrite(&req, &client(trusted), false)
    }

    fn head(f: &Forward) -> String {
        String::from_utf8(f.head.clone()).unwrap()
    }

    #[test]
    fn a_request_for_a_route_service_is_retargeted_and_carries_the_token() {
        let mut f = fwd(
            "POST /orders/7?x=%20y HTTP/1.1\r\nHost: shop.example.com:8080\r\nX-CF-Forwarded-Url: https://evil.example.com/\r\nX-CF-Proxy-Signature: forged\r\nContent-Length: 2\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(f.forwarded_url("https"), "https://shop.example.com/orders/7?x=%20y");
        let sealed = crate::route_service::Sealed { signature: "SIG=".into(), metadata: "META=".into() };
        f.to_route_service("/auth?app=1", "rs.example.com", &f.forwarded_url("https"), &sealed);
        let h = head(&f);
        assert!(h.starts_with("POST /auth?app=1 HTTP/1.1\r\nHost: rs.example.com\r\n"), "{h}");
        assert!(!h.contains("shop.example.com:8080") && !h.contains("evil") && !h.contains("forged"), "{h}");
        assert!(h.contains("\r\nContent-Length: 2\r\n") && h.contains("\r\nX-Forwarded-For: 192.0.2.7\r\n"), "{h}");
        assert!(h.ends_with(
            "X-CF-Forwarded-Url: https://shop.example.com/orders/7?x=%20y\r\nX-CF-Proxy-Signature: SIG=\r\nX-CF-Proxy-Metadata: META=\r\n\r\n"
        ), "{h}");
        assert_eq!(parse_request(h.as_bytes(), 65536).unwrap().unwrap().head_len, h.len());
    }

    #[test]
    fn app_instance_headers_are_the_routers_alone() {
        // Whoever sends them (a trusted peer too), the client's go.
        let sent = "GET /a HTTP/1.1\r\nHost: app.example.com\r\nX-CF-ApplicationID: spoofed\r\n\
                    x-cf-instanceid: spoofed\r\nX-Cf-InstanceIndex: 9\r\nAccept: */*\r\n\r\n";
        for trusted in [false, true] {
            let f = fwd(sent, trusted).unwrap();
            let addr: SocketAddr = "10.0.0.5:61001".parse().unwrap();
            // A backend that is no app instance (a route from the file) gets none.
            let plain = String::from_utf8(f.head_to(None, addr).into_owned()).unwrap();
            assert!(!plain.to_ascii_lowercase().contains("x-cf-") && plain.contains("Accept: */*"), "{plain}");
            assert!(!plain.contains("spoofed"), "{plain}");
            let app = AppInstance::new("b8c2", "c1a2\r\nX-Evil: 1", "2");
            let h = String::from_utf8(f.head_to(Some(&app), addr).into_owned()).unwrap();
            assert!(
                h.ends_with(
                    "X-CF-ApplicationID: b8c2\r\nX-CF-InstanceIndex: 2\r\nX-CF-InstanceID: c1a2X-Evil: 1\r\n\r\n"
                ),
                "{h}"
            );
            assert!(!h.contains("spoofed") && !h.contains(": 9\r\n"), "{h}");
            assert_eq!(parse_request(h.as_bytes(), 65536).unwrap().unwrap().head_len, h.len());
            // No instance id registered: the backend's address, as gorouter sends it.
            let h = String::from_utf8(f.head_to(Some(&AppInstance::new("", "", "")), addr).into_owned()).unwrap();
            assert!(
                h.ends_with("X-CF-ApplicationID: \r\nX-CF-InstanceIndex: \r\nX-CF-InstanceID: 10.0.0.5:61001\r\n\r\n"),
                "{h}"
            );
        }
    }

    #[test]
    fn a_callback_reaches_the_app_without_the_route_service_headers() {
        let mut f = fwd(
            "GET /a HTTP/1.1\r\nHost: shop.example.com\r\nx-cf-forwarded-url: https://shop.example.com/a\r\nX-CF-Proxy-Signature: s\r\nX-Cf-Proxy-Metadata: m\r\nAccept: */*\r\n\r\n",
            false,
        )
        .unwrap();
        let before = head(&f);
        f.strip_route_service_headers();
        let after = head(&f);
        assert!(after.starts_with("GET /a HTTP/1.1\r\nHost: shop.example.com\r\nAccept: */*\r\n"), "{after}");
        assert!(!after.to_ascii_lowercase().contains("x-cf-"), "{after}");
        assert_eq!(before.lines().count(), after.lines().count() + 3);
    }

    #[test]
    fn websocket_upgrade_keeps_upgrade_and_sets_forwarded_headers() {
        let f = fwd(
            "GET /chat HTTP/1.1\r\nHost: chat.example.com\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Key: k\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: http\r\n\r\n",
            false,
        )
        .unwrap();
        assert_eq!(f.upgrade.as_deref(), Some("websocket"));
        assert_eq!(f.host, "chat.example.com");
        let h = head(&f);
        assert!(h.starts_with("GET /chat HTTP/1.1\r\nHost: chat.example.com\r\nSec-WebSocket-Key: k\r\n"), "{h}");
        assert!(h.contains("\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"), "{h}");
        assert!(h.contains("\r\nX-Forwarded-For: 192.0.2.7\r\n"), "untrusted XFF replaced: {h}");
        assert!(h.contains("\r\nX-Forwarded-Proto: https\r\n"), "untrusted XFP replaced: {h}");
        assert!(h.contains("\r\nX-Request-Start: 1700000000123\r\n"));
        assert!(!h.contains("6.6.6.6") && !h.contains("keep-alive"));
        assert!(h.ends_with("\r\n\r\n"));
    }

    #[test]
    fn trusted_peer_keeps_and_extends() {
        let f = fwd("GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-For: 10.1.1.1\r\nX-Forwarded-For: 10.2.2.2\r\nX-Forwarded-Proto: https\r\n\r\n", true).unwrap();
        let h = head(&f);
        assert!(h.contains("\r\nX-Forwarded-For: 10.1.1.1, 10.2.2.2, 192.0.2.7\r\n"), "{h}");
        assert!(h.contains("\r\nX-Forwarded-Proto: https\r\n"), "{h}");
        assert!(h.contains("\r\nConnection: close\r\n"));
        assert_eq!(f.upgrade, None);
    }

    #[test]
    fn forwarded_client_cert_follows_the_listener_mode() {
        let raw = "GET / HTTP/1.1\r\nHost: h\r\nX-Forwarded-Client-Cert: claimed\r\n\r\n";
        let req = parse_request(raw.as_bytes(), 8192).unwrap().unwrap();
        let xfcc = |mode, trusted, cert: Option<&'static [u8]>| {
            let info = ClientInfo { forwarded_client_cert: mode, client_cert: cert, ..client(trusted) };
            let h = head(&rewrite(&req, &info, false).unwrap());
            h.lines().filter_map(|l| l.strip_prefix("X-Forwarded-Client-Cert: ")).map(String::from).collect::<Vec<_>>()
        };
        use ForwardedClientCert::*;
        assert_eq!(xfcc(AlwaysForward, true, None), ["claimed"]);
        assert!(xfcc(AlwaysForward, false, None).is_empty(), "only from trusted peers");
        assert!(xfcc(Forward, true, None).is_empty(), "forward: removed without mTLS");
        assert_eq!(xfcc(Forward, false, Some(b"der")), ["claimed"], "forward: kept on mTLS");
        assert!(xfcc(SanitizeSet, true, None).is_empty(), "sanitize_set: always removed");
        assert_eq!(xfcc(SanitizeSet, true, Some(b"der")), ["ZGVy"], "sanitize_set: the client's certificate");
    }

    #[test]
    fn client_claims_are_kept_only_from_trusted_peers() {
        let raw = "GET / HTTP/1.1\r\nHost: h\r\nForwarded: for=6.6.6.6;proto=https\r\nX-Real-IP: 6.6.6.6\r\nX-Forwarded-Host: admin.internal\r\nx-forwarded-port: 443\r\nX-Forwarded-Ssl: on\r\nX-Forwarded-Scheme: https\r\nX-Forwarded-Client-Cert: Hash=x\r\nX-Vcap-Request-Id: fixed\r\nX-Request-Start: 1600000000000\r\nX-Other: kept\r\n\r\n";
        let untrusted = head(&fwd(raw, false).unwrap());
        for claim in UNTRUSTED_DROPPED {
            let line = format!("\r\n{claim}:");
            let count = untrusted.to_ascii_lowercase().matches(&line).count();
            // The router sets its own request id in place of the client's.
            let own = usize::from(*claim == "x-vcap-request-id");
            assert_eq!(count, own, "{claim} kept from an untrusted peer: {untrusted}");
        }
        assert!(untrusted.contains("\r\nX-Vcap-Request-Id: 00000000-0000-4000-8000-000000000000\r\n"), "{untrusted}");
        assert!(untrusted.contains("\r\nX-Request-Start: 1700000000123\r\n"), "{untrusted}");
        assert!(untrusted.contains("\r\nX-Other: kept\r\n"), "{untrusted}");
        let trusted = head(&fwd(raw, true).unwrap());
        for line in raw.split("\r\n").skip(1).filter(|l| !l.is_empty()) {
            assert_eq!(trusted.matches(&format!("\r\n{line}\r\n")).count(), 1, "{line}: {trusted}");
        }
    }

    #[test]
    fn h2c_offer_is_dropped() {
        let f = fwd("GET / HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n", false).unwrap();
        assert_eq!(f.upgrade, None);
        let h = head(&f);
        assert!(!h.to_ascii_lowercase().contains("h2c") && !h.contains("HTTP2-Settings"), "{h}");
        assert!(h.contains("Connection: close"));
        // A backend connection kept for reuse is not told to close.
        let req = super::super::head::parse_request(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n", 4096).unwrap().unwrap();
        let kept = String::from_utf8(rewrite(&req, &client(false), true).unwrap().head).unwrap();
        assert!(!kept.contains("Connection"), "{kept}");
    }

    #[test]
    fn connection_tokens_drop_named_headers_but_not_framing() {
        let f = fwd("POST / HTTP/1.1\r\nHost: h\r\nConnection: X-Secret, Content-Length\r\nX-Secret: 1\r\nContent-Length: 3\r\n\r\nabc", false).unwrap();
        let h = head(&f);
        assert!(!h.contains("X-Secret") && h.contains("Content-Length: 3"), "{h}");
        assert_eq!(f.body, Body::Length(3));
    }

    #[test]
    fn refusals() {
        assert_eq!(fwd("GET / HTTP/1.1\r\n\r\n", false).unwrap_err().cf_error, Some("empty_host"));
        assert_eq!(fwd("GET / HTTP/1.1\r\nHost:  \r\n\r\n", false).unwrap_err().cf_error, Some("empty_host"));
        assert_eq!(fwd("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", false).unwrap_err().status, 400);
        assert_eq!(
            fwd("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", false)
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            fwd("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", false)
                .unwrap_err()
                .status,
            400
        );
        assert_eq!(
            fwd("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", false).unwrap_err().status,
            400
        );
        assert_eq!(fwd("CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", false).unwrap_err().status, 400);
        assert_eq!(
            fwd(
                "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
                false
            )
            .unwrap_err()
            .status,
            400
        );
    }

    #[test]
    fn response_head_says_close_and_drops_hop_by_hop() {
        let raw = b"HTTP/1.0 200 Fine\r\nConnection: keep-alive, X-Hop, Content-Length\r\nKeep-Alive: timeout=5\r\nX-Hop: 1\r\nContent-Length: 2\r\nSet-Cookie: a=b\r\n\r\nok";
        let resp = super::super::head::parse_response(raw, 1024).unwrap().unwrap();
        let h = String::from_utf8(response_head(&resp, false, 1)).unwrap();
        assert_eq!(h, "HTTP/1.1 200 Fine\r\nContent-Length: 2\r\nSet-Cookie: a=b\r\nConnection: close\r\n\r\n");
        // Kept: an HTTP/1.1 client needs no word; an HTTP/1.0 client is told.
        let h = String::from_utf8(response_head(&resp, true, 1)).unwrap();
        assert_eq!(h, "HTTP/1.1 200 Fine\r\nContent-Length: 2\r\nSet-Cookie: a=b\r\n\r\n");
        let h = String::from_utf8(response_head(&resp, true, 0)).unwrap();
        assert!(h.ends_with("Set-Cookie: a=b\r\nConnection: keep-alive\r\n\r\n"), "{h}");
    }

    #[test]
    fn absolute_form_target_overrides_host() {
        let f = fwd("GET http://chat.example.com:8080/ws?x=1 HTTP/1.1\r\nHost: other\r\nX: y\r\n\r\n", false).unwrap();
        assert_eq!((f.host.as_str(), f.path.as_str()), ("chat.example.com:8080", "/ws"));
        let h = head(&f);
        assert!(h.starts_with("GET /ws?x=1 HTTP/1.1\r\nHost: chat.example.com:8080\r\nX: y\r\n"), "{h}");
        assert!(!h.contains("other"), "{h}");
        for (target, path) in [("HTTPS://h", "/"), ("http://h?q=1", "/?q=1"), ("http://h/", "/")] {
            let f = fwd(&format!("GET {target} HTTP/1.1\r\n\r\n"), false).unwrap();
            assert_eq!((f.host.as_str(), f.path.as_str()), ("h", "/"), "{target}");
            assert!(head(&f).starts_with(&format!("GET {path} HTTP/1.1\r\nHost: h\r\n")), "{target}");
        }
    }

    #[test]
    fn routed_by_the_normalised_path_forwarded_as_received() {
        let f = fwd("GET /x/../%61pi//v2?q=/.. HTTP/1.1\r\nHost: h\r\n\r\n", false).unwrap();
        assert_eq!(f.path, "/api/v2");
        assert!(head(&f).starts_with("GET /x/../%61pi//v2?q=/.. HTTP/1.1\r\n"), "{}", head(&f));
        for bad in ["/a%zz", "/a%00", "/%"] {
            let r = fwd(&format!("GET {bad} HTTP/1.1\r\nHost: h\r\n\r\n"), false);
            assert!(r.as_ref().is_err_and(|e| e.status == 400), "{bad}: {r:?}");
        }
    }

    #[test]
    fn odd_targets_are_refused() {
        for target in ["http://user@h/", "http:///x", "h/x", "ftp://h/x", "*"] {
            let r = fwd(&format!("GET {target} HTTP/1.1\r\nHost: h\r\n\r\n"), false);
            assert!(r.as_ref().is_err_and(|e| e.status == 400), "{target}: {r:?}");
        }
        assert!(fwd("OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n", false).is_ok());
    }
}
