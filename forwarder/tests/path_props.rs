//! Property tests for the path normaliser routes are matched with
//! (RFC 3986 §6.2.2): every spelling of a path a backend may read as the
//! same path normalises to one string, and normalising never changes what
//! an encoded '/' or a reserved escape means.

use proptest::prelude::*;
use upsplice::path::{normalize, PathError};

/// A path segment: unreserved characters, some reserved ones, escapes of
/// reserved bytes (`%2F` among them), and dot segments now and then.
fn segment(dot_dot: u32) -> impl Strategy<Value = String> {
    prop_oneof![
        6 => "[A-Za-z0-9._~-]{0,6}".prop_filter("not ..", |s| s != ".."),
        1 => Just(".".to_string()),
        dot_dot => Just("..".to_string()),
        1 => Just(String::new()),
        1 => "[A-Za-z0-9]{0,3}(%2F|%2f|%3B|%25|%C3%A9|[:@!$&'()*+,;=])[A-Za-z0-9]{0,3}",
    ]
}

fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(segment(1), 0..8).prop_map(|s| format!("/{}", s.join("/")))
}

/// A path without ".." segments: nothing in it climbs.
fn path_without_dot_dot() -> impl Strategy<Value = String> {
    prop::collection::vec(segment(0), 0..8).prop_map(|s| format!("/{}", s.join("/")))
}

/// `p` with the unreserved characters chosen by `mask` percent-encoded
/// (in either case of hex digits).
fn encode_some(p: &str, mask: &[bool]) -> String {
    let mut out = String::new();
    let mut in_escape: u8 = 0;
    for (i, c) in p.chars().enumerate() {
        if c == '%' {
            in_escape = 3;
        }
        let unreserved = c.is_ascii_alphanumeric() || "-._~".contains(c);
        if in_escape == 0 && unreserved && mask.get(i).copied().unwrap_or(false) {
            if i % 2 == 0 {
                out.push_str(&format!("%{:02X}", c as u8));
            } else {
                out.push_str(&format!("%{:02x}", c as u8));
            }
        } else {
            out.push(c);
        }
        in_escape = in_escape.saturating_sub(1);
    }
    out
}

fn no_dot_or_empty_segments(n: &str) -> bool {
    n.starts_with('/')
        && n[1..].split('/').rev().skip(1).all(|s| !s.is_empty() && s != "." && s != "..")
        && n.rsplit('/').next().is_some_and(|last| last != "." && last != "..")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn normal_form_is_a_fixed_point_without_dot_segments(p in path()) {
        let n = normalize(&p).unwrap();
        prop_assert!(no_dot_or_empty_segments(&n), "{p} → {n}");
        prop_assert_eq!(normalize(&n).unwrap(), n.clone(), "not idempotent for {}", p);
        // No escape of an unreserved character is left, and escapes are upper case.
        let bytes = n.as_bytes();
        for (i, _) in n.match_indices('%') {
            let esc = &n[i + 1..i + 3];
            prop_assert_eq!(esc.to_ascii_uppercase(), esc.to_string(), "{}", n);
            let byte = u8::from_str_radix(esc, 16).unwrap();
            prop_assert!(!(byte.is_ascii_alphanumeric() || b"-._~".contains(&byte)), "{} left in {}", esc, n);
            prop_assert!(bytes.len() >= i + 3);
        }
    }

    #[test]
    fn encoding_unreserved_characters_changes_nothing(p in path(), mask in prop::collection::vec(any::<bool>(), 64)) {
        let encoded = encode_some(&p, &mask);
        prop_assert_eq!(normalize(&encoded).unwrap(), normalize(&p).unwrap(), "{} vs {}", encoded, p);
    }

    #[test]
    fn a_detour_through_another_segment_changes_nothing(
        p in path_without_dot_dot(),
        at in 0usize..8,
        detour in "[A-Za-z0-9]{1,5}",
    ) {
        // "/a/b" and "/a/./x/../b" are the same path. (Inserted before an
        // existing segment: at the end it would make "/a" a directory, "/a/".)
        let segments: Vec<&str> = p[1..].split('/').collect();
        let at = at.min(segments.len() - 1);
        let mut with_detour: Vec<String> = segments.iter().map(|s| s.to_string()).collect();
        with_detour.insert(at, "..".into());
        with_detour.insert(at, detour);
        with_detour.insert(at, ".".into());
        let detoured = format!("/{}", with_detour.join("/"));
        prop_assert_eq!(normalize(&detoured).unwrap(), normalize(&p).unwrap(), "{} vs {}", detoured, p);
    }

    #[test]
    fn encoded_slashes_and_reserved_escapes_stay(p in path_without_dot_dot()) {
        // Without ".." nothing is removed but dot and empty segments, so
        // every escape of a reserved byte survives, upper-cased.
        let n = normalize(&p).unwrap();
        let reserved = |s: &str| s.to_ascii_uppercase().matches("%2F").count();
        prop_assert_eq!(reserved(&n), reserved(&p), "{} → {}", p, n);
        let count = |s: &str| s.to_ascii_uppercase().matches('%').count();
        prop_assert_eq!(count(&n), count(&p), "{} → {}", p, n);
    }

    #[test]
    fn the_query_is_ignored(p in path(), q in "[ -~]{0,20}") {
        prop_assert_eq!(normalize(&format!("{p}?{q}")).unwrap(), normalize(&p).unwrap());
    }

    #[test]
    fn arbitrary_targets_never_panic_and_errors_mean_bad_escapes(t in "/[ -~]{0,40}") {
        let path = &t[..t.find(['?', '#']).unwrap_or(t.len())];
        let bad = path.match_indices('%').any(|(i, _)| {
            !path.get(i + 1..i + 3).is_some_and(|h| h.bytes().all(|b| b.is_ascii_hexdigit()))
                || path.get(i + 1..i + 3) == Some("00")
        });
        match normalize(&t) {
            Ok(n) => {
                prop_assert!(!bad, "{} accepted as {}", t, n);
                prop_assert!(no_dot_or_empty_segments(&n), "{} → {}", t, n);
            }
            Err(PathError::BadEscape(_) | PathError::Nul) => prop_assert!(bad, "{} refused", t),
        }
    }
}
