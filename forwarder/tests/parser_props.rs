//! Property tests: arbitrary bytes into the head parser and rewriter never
//! panic, and every outcome is an error answer or a well-formed forwarded head.

use std::path::Path;

use proptest::prelude::*;
use upsplice::handshake::head::{parse_request, HeadError};
use upsplice::handshake::rewrite::{rewrite, ClientInfo};

const MAX: usize = 4096;

fn client() -> ClientInfo<'static> {
    ClientInfo {
        peer: "127.0.0.1".parse().unwrap(),
        trusted: false,
        forwarded_proto: "http",
        now_ms: 1,
        request_id: "r",
        forwarded_client_cert: Default::default(),
        client_cert: None,
    }
}

/// Requests that look like HTTP: a valid start, then mutated headers.
fn requestish() -> impl Strategy<Value = Vec<u8>> {
    let method = prop::sample::select(vec!["GET", "POST", "HEAD", "CONNECT", "OPTIONS", "G\0T"]);
    let header = (
        prop::sample::select(vec![
            "Host",
            "Connection",
            "Upgrade",
            "Content-Length",
            "Transfer-Encoding",
            "X-Forwarded-For",
            "X-Forwarded-Proto",
            "HTTP2-Settings",
            "X",
        ]),
        "[ -~]{0,40}",
    );
    (method, "/[ -~&&[^ ]]{0,30}", prop::collection::vec(header, 0..12), prop::collection::vec(any::<u8>(), 0..32))
        .prop_map(|(m, p, hs, tail)| {
            let mut out = format!("{m} {p} HTTP/1.1\r\n").into_bytes();
            for (k, v) in hs {
                out.extend_from_slice(format!("{k}: {v}\r\n").as_bytes());
            }
            out.extend_from_slice(b"\r\n");
            out.extend_from_slice(&tail);
            out
        })
}

fn check(input: &[u8]) {
    match parse_request(input, MAX) {
        Ok(None) => assert!(input.len() < MAX),
        Err(HeadError::TooLarge(_)) => {}
        Err(_) => {}
        Ok(Some(req)) => {
            assert!(req.head_len <= input.len() && req.head_len <= MAX);
            match rewrite(&req, &client(), false) {
                Err(refusal) => {
                    let answer = refusal.render();
                    let text = String::from_utf8(answer).unwrap();
                    assert!(text.starts_with("HTTP/1.1 4") || text.starts_with("HTTP/1.1 5"));
                    assert!(text.contains("\r\nConnection: close\r\n"));
                }
                Ok(fwd) => {
                    // The forwarded head parses back as one complete request
                    // with exactly one Host-derived route key and our headers.
                    let back = parse_request(&fwd.head, usize::MAX).unwrap().unwrap();
                    assert_eq!(back.head_len, fwd.head.len());
                    assert_eq!(back.method(), req.method());
                    let count = |name: &str| back.headers.iter().filter(|h| h.name.eq_ignore_ascii_case(name)).count();
                    assert_eq!(count("x-forwarded-for"), 1);
                    assert_eq!(count("x-forwarded-proto"), 1);
                    assert_eq!(count("connection"), 1);
                    assert!(!fwd.host.is_empty());
                }
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_bytes_never_panic(input in prop::collection::vec(any::<u8>(), 0..600)) {
        check(&input);
    }

    #[test]
    fn requestish_bytes_give_an_answer_or_a_valid_head(input in requestish()) {
        check(&input);
    }
}

#[test]
fn config_parser_never_panics_on_garbage() {
    proptest!(|(text in "\\PC{0,300}")| {
        let _ = upsplice::config::Config::parse(Path::new("p.toml"), &text);
    });
}
