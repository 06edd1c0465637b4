//! The router's own answers: complete HTTP/1.1 responses with
//! `Content-Length`, a short text body and `Connection: close`, carrying
//! gorouter's `X-Cf-Routererror` header where gorouter sets one.

use std::fmt;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::tls::client::Failure;

/// An answer the router gives instead of forwarding the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub status: u16,
    /// Value of `X-Cf-Routererror` (gorouter's contract), if any.
    pub cf_error: Option<&'static str>,
    /// Short machine-readable reason for logs and metrics.
    pub reason: &'static str,
    /// One human sentence for the body: never internals (pool names,
    /// backend addresses, OS errors), which go to `detail`.
    pub message: String,
    /// What the log says beyond the message (why a backend failed).
    pub detail: Option<String>,
    /// The protocol the answer is written in: the client's.
    pub wire: Wire,
}

/// The protocol of an answer: HTTP/1.1, or — to a client that does not
/// speak it — the refusal its own protocol has, which its tools report
/// clearly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wire {
    Http1,
    /// A fatal TLS alert, `handshake_failure` (RFC 8446 §6): openssl and
    /// curl report "alert handshake failure".
    TlsAlert,
    /// HTTP/2 frames that refuse the client's first stream (if it opened
    /// one) and the connection with `HTTP_1_1_REQUIRED` ([`super::h2`]).
    Http2 {
        stream: Option<u32>,
    },
}

impl Refusal {
    fn new(status: u16, cf_error: Option<&'static str>, reason: &'static str, message: impl Into<String>) -> Refusal {
        Refusal { status, cf_error, reason, message: message.into(), detail: None, wire: Wire::Http1 }
    }

    pub fn bad_request(message: impl Into<String>) -> Refusal {
        Refusal::new(400, None, "malformed_request", message)
    }
    pub fn empty_host() -> Refusal {
        Refusal::new(400, Some("empty_host"), "empty_host", "Request had empty Host header")
    }
    pub fn unknown_route(host: &str) -> Refusal {
        Refusal::new(404, Some("unknown_route"), "unknown_route", format!("Requested route ('{host}') does not exist."))
    }
    /// `X-CF-APP-INSTANCE` is not `APP_GUID:APP_INDEX` (gorouter's answer).
    pub fn invalid_app_instance_header() -> Refusal {
        Refusal::new(
            400,
            Some("invalid_cf_app_instance_header"),
            "invalid_cf_app_instance_header",
            "Invalid X-CF-App-Instance Header",
        )
    }
    /// No endpoint of the route is instance `index` of app `app_id`
    /// (gorouter's answer since routing-release 0.197.0; 404 before).
    pub fn unknown_app_instance(host: &str, app_id: &str, index: &str) -> Refusal {
        Refusal::new(
            400,
            Some("unknown_route"),
            "unknown_app_instance",
            format!("Requested instance ('{index}') with guid ('{app_id}') does not exist for route ('{host}')"),
        )
    }
    pub fn timeout() -> Refusal {
        Refusal::new(408, None, "handshake_timeout", "The request head did not arrive in time.")
    }
    pub fn too_large(max: usize) -> Refusal {
        Refusal::new(431, None, "header_too_large", format!("The request head is larger than {max} bytes."))
    }
    pub fn too_many_headers(max: usize) -> Refusal {
        Refusal::new(431, None, "too_many_headers", format!("The request has more than {max} header fields."))
    }
    /// The backend failed; `detail` (which backend, the OS error) goes to
    /// the log only. The body is gorouter's sentence.
    pub fn endpoint_failure(detail: impl Into<String>) -> Refusal {
        Refusal {
            detail: Some(detail.into()),
            ..Refusal::new(
                502,
                Some("endpoint_failure"),
                "endpoint_failure",
                "Registered endpoint failed to handle the request.",
            )
        }
    }
    /// TLS to the backend failed (gorouter's statuses, with
    /// `X-Cf-Routererror: endpoint_failure`): 525 the handshake, 526 an
    /// untrusted certificate, 503 a certificate for another name, 496 the
    /// backend refused the router's client certificate. `detail` (which
    /// backend, rustls's error) goes to the log only.
    pub fn backend_tls(failure: Failure, detail: impl Into<String>) -> Refusal {
        let (status, reason, message) = match failure {
            Failure::Handshake => {
                (525, "backend_tls_handshake", "The TLS handshake with the registered endpoint failed.")
            }
            Failure::Untrusted => {
                (526, "backend_tls_untrusted", "The registered endpoint's certificate is not trusted.")
            }
            Failure::NameMismatch => {
                (503, "backend_tls_hostname", "The registered endpoint's certificate is not valid for its name.")
            }
            Failure::CertificateRefused => {
                (496, "backend_tls_client_certificate", "The registered endpoint refused the router's certificate.")
            }
        };
        Refusal { detail: Some(detail.into()), ..Refusal::new(status, Some("endpoint_failure"), reason, message) }
    }
    pub fn no_endpoints(host: &str) -> Refusal {
        Refusal::new(
            503,
            Some("no_endpoints"),
            "no_endpoints",
            format!("Requested route ('{host}') has no available endpoints."),
        )
    }
    /// Every backend of the pool is at `[backends] max_conns` (gorouter's
    /// answer for `backends.max_conns`).
    pub fn connection_limit(host: &str) -> Refusal {
        Refusal::new(
            503,
            Some("Connection Limit Reached"),
            "backend_connection_limit",
            format!("Requested route ('{host}') has reached the connection limit."),
        )
    }
    /// An upgrade on a route bound to a route service (gorouter's 503).
    pub fn route_service_unsupported() -> Refusal {
        Refusal::new(
            503,
            Some("route_service_unsupported"),
            "route_service_unsupported",
            "Support for WebSockets or TCP upgrade is not implemented for routes bound to route services.",
        )
    }
    /// A plain request on a route bound to a route service: route services
    /// are not implemented, which gorouter answers like this when they are
    /// disabled. The app must not be reached around its route service.
    pub fn route_service_disabled() -> Refusal {
        Refusal::new(
            502,
            Some("route_service_unsupported"),
            "route_service_unsupported",
            "Support for route services is disabled.",
        )
    }
    /// A route service called back with a token that does not open with
    /// the foundation's keys, or that was made for another route
    /// (gorouter's 400).
    pub fn route_service_invalid_signature(why: impl std::fmt::Display) -> Refusal {
        Refusal {
            detail: Some(format!("route service signature: {why}")),
            ..Refusal::new(
                400,
                Some("invalid_route_service_signature"),
                "invalid_route_service_signature",
                "Failed to validate Route Service Signature",
            )
        }
    }
    /// A route service called back later than `[route_services] timeout`
    /// after the router sent the request to it (gorouter's 504).
    pub fn route_service_expired_signature(why: impl std::fmt::Display) -> Refusal {
        Refusal {
            detail: Some(format!("route service signature: {why}")),
            ..Refusal::new(
                504,
                Some("expired_route_service_signature"),
                "expired_route_service_signature",
                "Failed to validate Route Service Signature: the request took too long through the route service",
            )
        }
    }
    /// The backend did not start its response within `[limits]
    /// response_timeout` (gorouter's `endpoint_timeout`).
    pub fn endpoint_timeout(after: Duration) -> Refusal {
        Refusal {
            detail: Some(format!("no response head within response_timeout ({after:?})")),
            ..Refusal::new(
                504,
                Some("endpoint_failure"),
                "response_timeout",
                "Registered endpoint did not respond in time.",
            )
        }
    }
    /// Something the router does not implement (a transfer coding).
    pub fn not_implemented(what: &str) -> Refusal {
        Refusal::new(501, None, "not_implemented", format!("This router does not implement {what}."))
    }
    /// A request body larger than `[limits] max_request_body`.
    pub fn body_too_large(max: u64) -> Refusal {
        Refusal::new(413, None, "body_too_large", format!("The request body is larger than {max} bytes."))
    }
    pub fn over_limit() -> Refusal {
        Refusal::new(503, None, "connection_limit", "The router is at its connection limit; try again later.")
    }
    /// An HTTP/2 prior-knowledge client (curl --http2-prior-knowledge, gRPC):
    /// answered in HTTP/2 (GOAWAY, HTTP_1_1_REQUIRED).
    pub fn http2_unsupported(stream: Option<u32>) -> Refusal {
        Refusal {
            wire: Wire::Http2 { stream },
            ..Refusal::new(
                505,
                None,
                "http2_unsupported",
                "HTTP/2 is not supported here; use HTTP/1.1 (WebSockets over HTTP/2, RFC 8441, are not supported).",
            )
        }
    }
    /// A TLS ClientHello on a listener without TLS: answered with a TLS
    /// alert, so the client's TLS stack says what happened.
    pub fn tls_unsupported() -> Refusal {
        Refusal {
            wire: Wire::TlsAlert,
            ..Refusal::new(400, None, "tls_unsupported", "This listener does not speak TLS; use http://.")
        }
    }

    /// The complete answer's bytes, in the client's protocol.
    pub fn render(&self) -> Vec<u8> {
        match self.wire {
            Wire::Http1 => self.render_http1(),
            // An alert record (21) in the TLS 1.0 record version servers use
            // before a version is agreed, 2 bytes long: fatal (2),
            // handshake_failure (40).
            Wire::TlsAlert => vec![21, 3, 1, 0, 2, 2, 40],
            Wire::Http2 { stream } => super::h2::refusal(stream, self.message.as_bytes()),
        }
    }

    fn render_http1(&self) -> Vec<u8> {
        let body = format!("{} {}: {}\n", self.status, status_text(self.status), self.message);
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n",
            self.status,
            status_text(self.status),
            body.len()
        );
        if let Some(e) = self.cf_error {
            out.push_str("X-Cf-Routererror: ");
            out.push_str(e);
            out.push_str("\r\n");
        }
        out.push_str("Connection: close\r\n\r\n");
        out.push_str(&body);
        out.into_bytes()
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.status, self.reason, self.message)?;
        match &self.detail {
            Some(detail) => write!(f, " ({detail})"),
            None => Ok(()),
        }
    }
}

fn status_text(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Content Too Large",
        431 => "Request Header Fields Too Large",
        // gorouter's (and Cloudflare's) names for the backend TLS failures.
        496 => "SSL Certificate Required",
        502 => "Bad Gateway",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        525 => "SSL Handshake Failed",
        526 => "Invalid SSL Certificate",
        _ => "Error",
    }
}

/// Closes a connection after the router's own answer so that the answer is
/// not lost: shut the write side, then read and discard what the client
/// still sends (bounded in bytes and time) before the socket is dropped.
/// Dropping a socket with unread bytes sends RST, which can discard the
/// answer in flight.
pub async fn linger_close<S: AsyncRead + AsyncWrite + Unpin>(client: &mut S) {
    let _ = client.shutdown().await;
    let drain = async {
        // On the heap: an array here would sit in every connection's future.
        let mut sink = vec![0u8; 4096];
        let mut total = 0usize;
        while total < 256 * 1024 {
            match client.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), drain).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_complete_response() {
        let r = Refusal::unknown_route("x.example.com").render();
        let text = String::from_utf8(r).unwrap();
        let (head, body) = text.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(head.contains("\r\nX-Cf-Routererror: unknown_route"));
        assert!(head.contains("\r\nConnection: close"));
        assert!(head.contains(&format!("\r\nContent-Length: {}", body.len())));
        assert!(body.contains("x.example.com"));
    }
}
