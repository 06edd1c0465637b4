//! Host names as routes and requests spell them. One normal form serves
//! both sides, so that a route written `Chat.Example.com.` or `[::1]`
//! matches the requests a client sends for it (`chat.example.com:8080`,
//! `[::1]:80`): lower case, no port, no brackets, no trailing dot.

/// The normal form of a Host header value or a configured route host.
pub fn normalize(host: &str) -> String {
    without_port(host).trim_end_matches('.').to_ascii_lowercase()
}

/// `host[:port]` or `[v6]:port` → host (an IPv6 literal without brackets).
pub fn without_port(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

/// Checks a configured route host: a DNS name (a trailing dot is allowed,
/// as requests may carry one), `*.` followed by one, an IPv4 address, or
/// an IPv6 literal in brackets (`[::1]`).
pub fn validate_route_host(host: &str) -> Result<(), String> {
    if let Some(inner) = host.strip_prefix('[') {
        return match inner.strip_suffix(']').map(str::parse::<std::net::Ipv6Addr>) {
            Some(Ok(_)) => Ok(()),
            _ => Err(format!("{host:?} is not an IPv6 literal such as \"[::1]\"")),
        };
    }
    let name = host.strip_prefix("*.").unwrap_or(host);
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.contains('*') {
        return Err(format!("{host:?}: a wildcard is only allowed as the whole first label (\"*.example.com\")"));
    }
    if name.contains(':') {
        return Err(format!("{host:?}: a route host has no port (requests match whatever port they name)"));
    }
    let ok = name.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    });
    if !ok || name.len() > 253 {
        return Err(format!("{host:?} is not a host name"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_normal_form_for_routes_and_requests() {
        for (written, normal) in [
            ("Chat.Example.com", "chat.example.com"),
            ("chat.example.com.", "chat.example.com"),
            ("chat.example.com.:8080", "chat.example.com"),
            ("[::1]", "::1"),
            ("[::1]:80", "::1"),
            ("10.0.0.1:443", "10.0.0.1"),
            ("*.Example.com", "*.example.com"),
        ] {
            assert_eq!(normalize(written), normal, "{written}");
        }
    }

    #[test]
    fn route_hosts() {
        for ok in ["chat.example.com", "chat.example.com.", "*.example.com", "10.0.0.1", "[::1]", "[2001:db8::1]", "h"]
        {
            assert_eq!(validate_route_host(ok), Ok(()), "{ok}");
        }
        for bad in ["", "*.", "*.*.example.com", "a..b", "chat.example.com:80", "[::1", "[nope]", "a b"] {
            assert!(validate_route_host(bad).is_err(), "{bad}");
        }
    }
}
