//! The route-service token, gorouter's format exactly.
//!
//! A request on a route bound to a route service goes to the service
//! with `X-CF-Forwarded-Url` (where it was going), `X-CF-Proxy-Signature`
//! and `X-CF-Proxy-Metadata`; the service calls back through a router
//! with those headers, and the router lets the request through to the app
//! only if the signature opens with the foundation's shared key and is
//! younger than `[route_services] timeout`. The callback may land on any
//! node of the fleet, or on a gorouter during a migration, so the token
//! is gorouter's (routeservice/signature.go, common/secure/crypto.go):
//!
//! - key: PBKDF2-HMAC-SHA256 of the secret, empty salt, 100,001
//!   iterations, 16 bytes → AES-128-GCM;
//! - signature: the JSON `{"forwarded_url": …, "requested_time": RFC 3339
//!   with nanoseconds}` sealed with a random 12-byte nonce and no
//!   associated data, then base64 with the URL alphabet, padded;
//! - metadata: base64 (URL alphabet, padded) of the JSON `{"nonce":
//!   standard base64 of the nonce}` (Go encodes `[]byte` so).
//!
//! The previous key (`previous_key`, gorouter's decrypt-only secret) opens
//! tokens the current one cannot; it never seals.

use std::num::NonZeroU32;
use std::time::Duration;

use base64::engine::general_purpose::{STANDARD, URL_SAFE};
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use base64::Engine;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The request headers of the contract (gorouter's names).
pub const FORWARDED_URL: &str = "x-cf-forwarded-url";
pub const SIGNATURE: &str = "x-cf-proxy-signature";
pub const METADATA: &str = "x-cf-proxy-metadata";

/// gorouter's key derivation parameters (common/secure/crypto.go).
const PBKDF2_ITERATIONS: u32 = 100_001;
const KEY_LEN: usize = 16;

/// Base64 with the URL alphabet that reads padded and unpadded text:
/// gorouter writes padded (`base64.URLEncoding`); a proxy in between
/// that trims `=` should not break the callback.
const URL_SAFE_LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a callback's token was not accepted. `Expired` is gorouter's 504
/// `expired_route_service_signature`; every other one its 400
/// `invalid_route_service_signature`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenError {
    #[error("no {METADATA} header")]
    NoMetadata,
    #[error("{0} is not base64 (URL alphabet)")]
    NotBase64(&'static str),
    #[error("{METADATA} is not the JSON {{\"nonce\": …}} with a 12-byte nonce")]
    BadMetadata,
    #[error("the signature does not open with the current or the previous key")]
    Sealed,
    #[error("the opened signature is not the JSON {{forwarded_url, requested_time}}")]
    BadSignature,
    #[error("the signature is {age:?} old, more than the {timeout:?} allowed")]
    Expired { age: Duration, timeout: Duration },
}

impl TokenError {
    pub fn is_expired(&self) -> bool {
        matches!(self, TokenError::Expired { .. })
    }
}

/// The keys of `[route_services]`, derived once per config load (the
/// derivation is deliberately slow: 100,001 rounds).
pub struct Keys {
    current: LessSafeKey,
    previous: Option<LessSafeKey>,
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key material.
        f.debug_struct("Keys").field("previous", &self.previous.is_some()).finish_non_exhaustive()
    }
}

impl Keys {
    pub fn derive(key: &str, previous: Option<&str>) -> Keys {
        Keys { current: derive(key), previous: previous.map(derive) }
    }

    /// The signature and metadata header values for a request going to
    /// its route service, stamped `now`.
    pub fn seal(&self, forwarded_url: &str, now: OffsetDateTime) -> Sealed {
        let requested_time = now.format(&Rfc3339).expect("an OffsetDateTime formats as RFC 3339");
        let mut sealed = serde_json::to_vec(&SignatureJson { forwarded_url: forwarded_url.into(), requested_time })
            .expect("two strings serialise");
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new().fill(&mut nonce).expect("the system's random source works");
        self.current
            .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut sealed)
            .expect("a short JSON seals");
        let metadata = serde_json::to_vec(&MetadataJson { nonce: STANDARD.encode(nonce) }).expect("one string");
        Sealed { signature: URL_SAFE.encode(&sealed), metadata: URL_SAFE.encode(metadata) }
    }

    /// Opens a callback's token and checks its age against `timeout`.
    pub fn open(
        &self,
        signature: &str,
        metadata: Option<&str>,
        now: OffsetDateTime,
        timeout: Duration,
    ) -> Result<Signed, TokenError> {
        let metadata = metadata.filter(|m| !m.is_empty()).ok_or(TokenError::NoMetadata)?;
        let metadata = URL_SAFE_LENIENT.decode(metadata.trim()).map_err(|_| TokenError::NotBase64(METADATA))?;
        let metadata: MetadataJson = serde_json::from_slice(&metadata).map_err(|_| TokenError::BadMetadata)?;
        let nonce: [u8; NONCE_LEN] =
            STANDARD.decode(&metadata.nonce).ok().and_then(|n| n.try_into().ok()).ok_or(TokenError::BadMetadata)?;
        let sealed = URL_SAFE_LENIENT.decode(signature.trim()).map_err(|_| TokenError::NotBase64(SIGNATURE))?;
        let opened = [Some(&self.current), self.previous.as_ref()]
            .into_iter()
            .flatten()
            .find_map(|key| {
                let mut buf = sealed.clone();
                let plain = key.open_in_place(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut buf).ok()?;
                Some(plain.to_vec())
            })
            .ok_or(TokenError::Sealed)?;
        let json: SignatureJson = serde_json::from_slice(&opened).map_err(|_| TokenError::BadSignature)?;
        let requested = OffsetDateTime::parse(&json.requested_time, &Rfc3339).map_err(|_| TokenError::BadSignature)?;
        // A token from the future (a node's clock ahead) counts as new.
        let age = Duration::try_from(now - requested).unwrap_or(Duration::ZERO);
        if age > timeout {
            return Err(TokenError::Expired { age, timeout });
        }
        Ok(Signed { forwarded_url: json.forwarded_url, requested_time: requested })
    }
}

/// The forwarded URL as gorouter signs it: query-unescaped (Go's
/// `url.QueryUnescape`: `%XX` decoded, `+` as a space); None when a `%`
/// is not followed by two hex digits (gorouter fails such a request).
pub fn query_unescape(url: &str) -> Option<String> {
    let bytes = url.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    Some(String::from_utf8_lossy(&out).into_owned())
}

/// Header values for a request on its way to a route service.
#[derive(Debug, Clone)]
pub struct Sealed {
    pub signature: String,
    pub metadata: String,
}

/// What an accepted callback's token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// The URL the request was going to when it was sent to the service
    /// (its host and path must lead to the route the callback arrives
    /// on: a token for one app does not open another).
    pub forwarded_url: String,
    pub requested_time: OffsetDateTime,
}

impl Signed {
    /// The host (without port) and the path of `forwarded_url`, as
    /// routing needs them; None when it is not an absolute http(s) URL.
    pub fn host_and_path(&self) -> Option<(&str, &str)> {
        let rest =
            self.forwarded_url.strip_prefix("https://").or_else(|| self.forwarded_url.strip_prefix("http://"))?;
        let (authority, path) = rest.find(['/', '?', '#']).map_or((rest, "/"), |i| (&rest[..i], &rest[i..]));
        let path = path.split(['?', '#']).next().filter(|p| !p.is_empty()).unwrap_or("/");
        let host = authority.rsplit('@').next().unwrap_or(authority);
        let host = match host.strip_prefix('[') {
            Some(v6) => &host[..v6.find(']')? + 2],
            None => host.split(':').next().unwrap_or(host),
        };
        (!host.is_empty()).then_some((host, path))
    }
}

#[derive(Serialize, Deserialize)]
struct SignatureJson {
    forwarded_url: String,
    requested_time: String,
}

#[derive(Serialize, Deserialize)]
struct MetadataJson {
    nonce: String,
}

fn derive(secret: &str) -> LessSafeKey {
    let mut key = [0u8; KEY_LEN];
    let rounds = NonZeroU32::new(PBKDF2_ITERATIONS).expect("not zero");
    ring::pbkdf2::derive(ring::pbkdf2::PBKDF2_HMAC_SHA256, rounds, b"", secret.as_bytes(), &mut key);
    LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &key).expect("16 bytes is an AES-128 key"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    fn now() -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }

    #[test]
    fn a_sealed_token_opens_with_the_same_key_and_says_what_was_sealed() {
        let keys = Keys::derive("s3cret", None);
        let t = keys.seal("https://app.example.com/a/b?c=d", now());
        let signed = keys.open(&t.signature, Some(&t.metadata), now(), MINUTE).unwrap();
        assert_eq!(signed.forwarded_url, "https://app.example.com/a/b?c=d");
        assert_eq!(signed.host_and_path(), Some(("app.example.com", "/a/b")));
        // gorouter's header alphabet and padding.
        assert!(t.signature.len().is_multiple_of(4) && !t.signature.contains(['+', '/']));
    }

    #[test]
    fn the_metadata_is_gorouters_json_with_a_standard_base64_nonce() {
        let t = Keys::derive("k", None).seal("http://a.example.com/", now());
        let meta: serde_json::Value = serde_json::from_slice(&URL_SAFE.decode(&t.metadata).unwrap()).unwrap();
        let nonce = STANDARD.decode(meta["nonce"].as_str().unwrap()).unwrap();
        assert_eq!(nonce.len(), 12);
    }

    #[test]
    fn another_key_does_not_open_it_and_the_previous_key_does() {
        let old = Keys::derive("old", None);
        let t = old.seal("https://app.example.com/", now());
        let other = Keys::derive("new", None);
        assert_eq!(other.open(&t.signature, Some(&t.metadata), now(), MINUTE), Err(TokenError::Sealed));
        let rotated = Keys::derive("new", Some("old"));
        assert!(rotated.open(&t.signature, Some(&t.metadata), now(), MINUTE).is_ok());
        // The previous key never seals: a token from the rotated keys does
        // not open with the old key alone.
        let fresh = rotated.seal("https://app.example.com/", now());
        assert_eq!(old.open(&fresh.signature, Some(&fresh.metadata), now(), MINUTE), Err(TokenError::Sealed));
    }

    #[test]
    fn an_old_token_is_expired_and_a_clock_ahead_is_not_punished() {
        let keys = Keys::derive("k", None);
        let then = now() - time::Duration::seconds(61);
        let t = keys.seal("https://app.example.com/", then);
        let e = keys.open(&t.signature, Some(&t.metadata), now(), MINUTE).unwrap_err();
        assert!(e.is_expired(), "{e}");
        let ahead = keys.seal("https://app.example.com/", now() + time::Duration::seconds(5));
        assert!(keys.open(&ahead.signature, Some(&ahead.metadata), now(), MINUTE).is_ok());
    }

    #[test]
    fn tampering_and_garbage_are_refused_with_what_is_wrong() {
        let keys = Keys::derive("k", None);
        let t = keys.seal("https://app.example.com/", now());
        let open = |sig: &str, meta: Option<&str>| keys.open(sig, meta, now(), MINUTE).unwrap_err();
        assert_eq!(open(&t.signature, None), TokenError::NoMetadata);
        assert_eq!(open(&t.signature, Some("")), TokenError::NoMetadata);
        assert_eq!(open(&t.signature, Some("%%%")), TokenError::NotBase64(METADATA));
        assert_eq!(open(&t.signature, Some(&URL_SAFE.encode("{}"))), TokenError::BadMetadata);
        assert_eq!(open(&t.signature, Some(&URL_SAFE.encode(r#"{"nonce":"AAAA"}"#))), TokenError::BadMetadata);
        assert_eq!(open("!!", Some(&t.metadata)), TokenError::NotBase64(SIGNATURE));
        let mut flipped = URL_SAFE.decode(&t.signature).unwrap();
        flipped[3] ^= 1;
        assert_eq!(open(&URL_SAFE.encode(flipped), Some(&t.metadata)), TokenError::Sealed);
        // Another token's nonce does not open this one.
        let other = keys.seal("https://app.example.com/", now());
        assert_eq!(open(&t.signature, Some(&other.metadata)), TokenError::Sealed);
        // Unpadded text (a proxy trimmed the '=') still reads.
        let unpadded = t.signature.trim_end_matches('=');
        assert!(keys.open(unpadded, Some(t.metadata.trim_end_matches('=')), now(), MINUTE).is_ok());
    }

    #[test]
    fn go_style_times_with_offsets_and_short_fractions_are_read() {
        // gorouter writes time.Time as RFC 3339 with nanoseconds, trailing
        // zeros trimmed, in the node's own zone.
        let keys = Keys::derive("k", None);
        for stamp in ["2026-12-06T18:00:00.5+01:00", "2026-12-06T17:00:00Z", "2026-12-06T17:00:00.123456789Z"] {
            let json = format!(r#"{{"forwarded_url":"https://a.example.com/x","requested_time":"{stamp}"}}"#);
            let mut sealed = json.into_bytes();
            let nonce = [7u8; NONCE_LEN];
            keys.current
                .seal_in_place_append_tag(Nonce::assume_unique_for_key(nonce), Aad::empty(), &mut sealed)
                .unwrap();
            let meta = URL_SAFE.encode(format!(r#"{{"nonce":"{}"}}"#, STANDARD.encode(nonce)));
            let at = OffsetDateTime::parse("2026-12-06T17:00:30Z", &Rfc3339).unwrap();
            let signed = keys.open(&URL_SAFE.encode(&sealed), Some(&meta), at, MINUTE).unwrap();
            assert_eq!(signed.host_and_path(), Some(("a.example.com", "/x")));
        }
    }

    #[test]
    fn a_token_sealed_by_another_implementation_opens() {
        // Made with Python's hashlib.pbkdf2_hmac and cryptography's AESGCM
        // following gorouter's recipe (secret "route-service-secret", nonce
        // 00..0b): the key derivation, the cipher and both encodings agree.
        let signature = "e-wqGUf1g2fCp4WZo1o4iWImEtnOUndyeH2EszcRrrTIQ17az5ySWxrGEc78DVHexJe8dv8qKSYQzpQy0fK23p8HJ7iR6ct6Lt8HBuQQquzKSFbV0lIltL1lQS62adDyDHGtSxFG6UnQ1UGYL6dB31_7vXPUgg==";
        let metadata = "eyJub25jZSI6IkFBRUNBd1FGQmdjSUNRb0wifQ==";
        let keys = Keys::derive("route-service-secret", None);
        let at = OffsetDateTime::parse("2026-12-06T17:00:10Z", &Rfc3339).unwrap();
        let signed = keys.open(signature, Some(metadata), at, MINUTE).unwrap();
        assert_eq!(signed.forwarded_url, "https://app.example.com/path?x=1");
        assert_eq!(signed.requested_time, OffsetDateTime::parse("2026-12-06T17:00:00.123456789Z", &Rfc3339).unwrap());
    }

    #[test]
    fn forwarded_urls_are_signed_query_unescaped_like_go() {
        assert_eq!(query_unescape("https://a.test/x%20y?q=a+b&r=%2F").as_deref(), Some("https://a.test/x y?q=a b&r=/"));
        assert_eq!(query_unescape("https://a.test/plain").as_deref(), Some("https://a.test/plain"));
        assert_eq!(query_unescape("https://a.test/%zz"), None);
        assert_eq!(query_unescape("https://a.test/%2"), None);
    }

    #[test]
    fn host_and_path_of_forwarded_urls() {
        let s = |u: &str| Signed { forwarded_url: u.into(), requested_time: OffsetDateTime::UNIX_EPOCH };
        assert_eq!(s("https://a.example.com:8443/p?q#f").host_and_path(), Some(("a.example.com", "/p")));
        assert_eq!(s("http://a.example.com").host_and_path(), Some(("a.example.com", "/")));
        assert_eq!(s("http://a.example.com?x=1").host_and_path(), Some(("a.example.com", "/")));
        assert_eq!(s("http://[::1]:80/v6").host_and_path(), Some(("[::1]", "/v6")));
        assert_eq!(s("ftp://a.example.com/").host_and_path(), None);
        assert_eq!(s("https:///nohost").host_and_path(), None);
    }
}
