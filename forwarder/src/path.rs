//! The path a request is routed by: its target's path normalised as
//! RFC 3986 §6.2.2 says, so that spellings a backend treats as one path
//! match one route.
//!
//! * percent-escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`) are
//!   decoded (`/%61pi` → `/api`), other escapes keep their byte and get
//!   upper-case hex digits (`%2f` → `%2F`); an encoded `/` is not decoded,
//!   so `/a%2Fb` is one segment, as in gorouter;
//! * dot segments are removed (§5.2.4: `/x/../api` → `/api`, never above
//!   the root), after decoding, so `%2E%2E` counts too;
//! * empty segments are merged (`//api` → `/api`), as servers that merge
//!   slashes (nginx's default) read them — beyond RFC 3986, so that such a
//!   spelling cannot reach a shorter prefix's pool either;
//! * the query is not part of it.
//!
//! Invalid percent-encoding and an encoded NUL are errors (400): the
//! backends behind would each read them their own way.
//!
//! Hand-rolled rather than taken from a crate: `percent-encoding` decodes
//! every escape (`%2F` too) and does not report invalid ones, and `url`
//! follows the WHATWG URL standard (backslashes, its own dot-segment rules),
//! which is not what the request's origin server reads.
//!
//! The path is used for matching only; the request goes on as received.

use std::fmt::Write;

/// Why a request path cannot be matched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("invalid percent-encoding in the path at byte {0}")]
    BadEscape(usize),
    #[error("encoded NUL in the path")]
    Nul,
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// The normalised path of a request target (`/path?query` or `*`), for
/// matching against route prefixes. A target that does not start with `/`
/// (`*`) is returned as it is.
pub fn normalize(target: &str) -> Result<String, PathError> {
    let end = target.find(['?', '#']).unwrap_or(target.len());
    let path = &target[..end];
    if !path.starts_with('/') {
        return Ok(path.to_string());
    }
    let decoded = decode_unreserved(path)?;
    Ok(remove_dot_segments(&decoded))
}

/// A configured path prefix, normalised as request paths are, without its
/// trailing slash ("/" and none → "").
pub fn normalize_prefix(path: Option<&str>) -> String {
    let path = path.unwrap_or("");
    // A prefix that does not normalise (a bad escape) can match nothing
    // that does; kept as written, it matches nothing, as it should.
    let normal = normalize(path).unwrap_or_else(|_| path.to_string());
    normal.trim_end_matches('/').to_string()
}

/// Decodes escapes of unreserved characters; upper-cases the others.
fn decode_unreserved(path: &str) -> Result<String, PathError> {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            // Copy the run up to the next escape as it is (it may hold
            // non-ASCII UTF-8, which is never split here).
            let next = path[i..].find('%').map_or(path.len(), |n| i + n);
            out.push_str(&path[i..next]);
            i = next;
            continue;
        }
        let (Some(hi), Some(lo)) = (bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex))
        else {
            return Err(PathError::BadEscape(i));
        };
        let byte = hi << 4 | lo;
        if byte == 0 {
            return Err(PathError::Nul);
        }
        if is_unreserved(byte) {
            out.push(byte as char);
        } else {
            write!(out, "%{byte:02X}").expect("writing to a String");
        }
        i += 3;
    }
    Ok(out)
}

/// RFC 3986 §5.2.4 on an absolute path, with empty segments merged.
fn remove_dot_segments(path: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    // Whether the result ends in '/': after a last segment that is empty,
    // "." or "..", a directory is meant.
    let mut trailing_slash = false;
    for segment in path.split('/').skip(1) {
        trailing_slash = matches!(segment, "" | "." | "..");
        match segment {
            "" | "." => {}
            ".." => {
                kept.pop();
            }
            s => kept.push(s),
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &kept {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || kept.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_path_normalise_alike() {
        for (target, want) in [
            ("/api/v2", "/api/v2"),
            ("/x/../api/v2", "/api/v2"),
            ("/%61pi/v2", "/api/v2"),
            ("/%61%50%69/v2", "/aPi/v2"),
            ("/api/./v2/", "/api/v2/"),
            ("/api/v2/.", "/api/v2/"),
            ("/api/v2/..", "/api/"),
            ("/../../api", "/api"),
            ("/%2e%2E/api", "/api"),
            ("//api//v2", "/api/v2"),
            ("/api/v2?x=/../../other", "/api/v2"),
            ("/", "/"),
            ("/..", "/"),
            ("/.", "/"),
            ("*", "*"),
            ("/caf%c3%a9/é", "/caf%C3%A9/é"),
            ("/a%2fb/../c", "/c"),
            ("/a%2Fb", "/a%2Fb"),
            ("/a%2f..%2fb", "/a%2F..%2Fb"),
            ("/~user/%7Euser", "/~user/~user"),
        ] {
            assert_eq!(normalize(target).as_deref(), Ok(want), "{target}");
        }
    }

    #[test]
    fn bad_escapes_and_nul_are_errors() {
        assert_eq!(normalize("/a%zz"), Err(PathError::BadEscape(2)));
        assert_eq!(normalize("/a%2"), Err(PathError::BadEscape(2)));
        assert_eq!(normalize("/a%"), Err(PathError::BadEscape(2)));
        assert_eq!(normalize("/a%00b"), Err(PathError::Nul));
        // The query is not checked: it is the app's.
        assert_eq!(normalize("/a?%zz"), Ok("/a".to_string()));
    }
}
