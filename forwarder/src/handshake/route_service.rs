//! Which way a request on a route bound to a route service goes:
//! refused, on to its service with a fresh token, or — a callback whose
//! token checks out — on to the app (gorouter's handlers/routeservice.go).

use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use super::answer::Refusal;
use super::head::{self, Headers};
use crate::route::{RouteTarget, Router};
use crate::route_service::{self as token, Keys};

/// Where the request goes next.
#[derive(Debug)]
pub enum Leg {
    /// To the route service at this URL, with these header values.
    Service { url: String, forwarded_url: String, sealed: token::Sealed },
    /// The service sent it back and the token checks out: on to the app,
    /// without the contract's headers.
    App,
}

/// What decides a leg: the keys (None: route services disabled), the
/// `[route_services]` settings, the routing table the token's URL must
/// lead back through.
pub struct Decide<'a> {
    pub keys: Option<&'a Keys>,
    pub timeout: Duration,
    pub websockets: bool,
    pub router: &'a Router,
}

impl Decide<'_> {
    /// The leg of a request on `route` (which has a route service, `url`).
    /// `forwarded_url` is the URL the request was sent to (made only for
    /// the service leg).
    pub fn leg(
        &self,
        route: &RouteTarget,
        url: &str,
        headers: &Headers,
        upgrade: bool,
        forwarded_url: impl FnOnce() -> String,
        now: OffsetDateTime,
    ) -> Result<Leg, Refusal> {
        let Some(keys) = self.keys else {
            // Nothing reaches the app around its route service (often its
            // authentication): gorouter's answers when they are disabled.
            return Err(if upgrade { Refusal::route_service_unsupported() } else { Refusal::route_service_disabled() });
        };
        if upgrade && !self.websockets {
            return Err(Refusal::route_service_unsupported());
        }
        let value = |name| head::values(headers, name).next().map(|v| std::str::from_utf8(v).unwrap_or("\u{fffd}"));
        let Some(signature) = value(token::SIGNATURE).filter(|s| !s.is_empty()) else {
            // The header carries the URL as received; the token, as
            // gorouter seals it, the URL query-unescaped.
            let forwarded_url = forwarded_url();
            let signed = token::query_unescape(&forwarded_url)
                .ok_or_else(|| Refusal::bad_request("invalid percent-encoding in the request target"))?;
            let sealed = keys.seal(&signed, now);
            return Ok(Leg::Service { url: url.to_owned(), forwarded_url, sealed });
        };
        let signed =
            keys.open(signature, value(token::METADATA), now, self.timeout).map_err(|e| match e.is_expired() {
                true => Refusal::route_service_expired_signature(e),
                false => Refusal::route_service_invalid_signature(e),
            })?;
        // A token opens only the route it was made for: its URL must lead
        // to the route this request arrived on (gorouter's pool check).
        let (host, path) = signed
            .host_and_path()
            .ok_or_else(|| Refusal::route_service_invalid_signature("the signed URL is not an http(s) URL"))?;
        let path = crate::path::normalize(path)
            .map_err(|e| Refusal::route_service_invalid_signature(format!("the signed URL's path: {e}")))?;
        match self.router.lookup(host, &path) {
            Some(t) if Arc::ptr_eq(&t.pool, &route.pool) && t.name == route.name => Ok(Leg::App),
            _ => Err(Refusal::route_service_invalid_signature(format!(
                "signed for {}, which is not route {}",
                signed.forwarded_url, route.name
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn router() -> Router {
        let registry = crate::upstream::Registry::new();
        let t = |name: &str| {
            let (settings, kind) = (Default::default(), crate::upstream::Learned::Nats);
            let pool = crate::upstream::Pool::learned(name, [], Default::default(), &settings, &registry, kind);
            RouteTarget { pool: Arc::new(pool), name: name.into(), route_service: Some("https://rs".into()) }
        };
        let routes = [
            ("shop.example.com", None, t("shop.example.com")),
            ("shop.example.com", Some("/admin"), t("shop.example.com/admin")),
        ];
        Router::build(routes)
    }

    fn headers(pairs: &[(&str, &str)]) -> Headers {
        let fields: String = pairs.iter().map(|(n, v)| format!("{n}: {v}\r\n")).collect();
        let raw = format!("GET / HTTP/1.1\r\n{fields}\r\n");
        head::parse_request(raw.as_bytes(), raw.len()).unwrap().unwrap().headers
    }

    struct Case {
        keys: Option<Arc<Keys>>,
        websockets: bool,
        router: Router,
    }

    impl Case {
        fn new() -> Case {
            Case { keys: Some(Arc::new(Keys::derive("k", None))), websockets: false, router: router() }
        }
        fn leg(&self, route: usize, hs: &[(&str, &str)], upgrade: bool) -> Result<Leg, Refusal> {
            let d = Decide {
                keys: self.keys.as_deref(),
                timeout: Duration::from_secs(60),
                websockets: self.websockets,
                router: &self.router,
            };
            let target = self.router.lookup("shop.example.com", if route == 0 { "/" } else { "/admin/x" }).unwrap();
            assert_eq!(target.pool.name, ["shop.example.com", "shop.example.com/admin"][route]);
            let fwd = || "https://shop.example.com/x?y=1".to_string();
            d.leg(target, "https://rs.example.com/auth", &headers(hs), upgrade, fwd, OffsetDateTime::now_utc())
        }
    }

    #[test]
    fn disabled_route_services_refuse_like_gorouter() {
        let c = Case { keys: None, ..Case::new() };
        assert_eq!(c.leg(0, &[], false).unwrap_err().status, 502);
        assert_eq!(c.leg(0, &[], true).unwrap_err().status, 503);
        // A forged callback is no way around it.
        assert_eq!(c.leg(0, &[("X-CF-Proxy-Signature", "x")], false).unwrap_err().status, 502);
    }

    #[test]
    fn upgrades_go_through_only_when_websockets_is_on() {
        assert_eq!(Case::new().leg(0, &[], true).unwrap_err().cf_error, Some("route_service_unsupported"));
        let c = Case { websockets: true, ..Case::new() };
        assert!(matches!(c.leg(0, &[], true), Ok(Leg::Service { .. })));
    }

    #[test]
    fn a_first_request_goes_to_the_service_and_its_callback_to_the_app() {
        let c = Case::new();
        let Ok(Leg::Service { url, forwarded_url, sealed }) = c.leg(0, &[], false) else { panic!("service leg") };
        assert_eq!(url, "https://rs.example.com/auth");
        assert_eq!(forwarded_url, "https://shop.example.com/x?y=1");
        let back = [("X-CF-Proxy-Signature", sealed.signature.as_str()), ("x-cf-proxy-metadata", &sealed.metadata)];
        assert!(matches!(c.leg(0, &back, false), Ok(Leg::App)));
    }

    #[test]
    fn bad_expired_and_misdirected_tokens_are_refused() {
        let c = Case::new();
        let forged = c.leg(0, &[("X-CF-Proxy-Signature", "AAAA"), ("X-CF-Proxy-Metadata", "AAAA")], false);
        let e = forged.unwrap_err();
        assert_eq!((e.status, e.cf_error), (400, Some("invalid_route_service_signature")));
        let keys = c.keys.clone().unwrap();
        let old = keys.seal("https://shop.example.com/x", OffsetDateTime::now_utc() - time::Duration::minutes(2));
        let e = c.leg(0, &[("X-CF-Proxy-Signature", &old.signature), ("X-CF-Proxy-Metadata", &old.metadata)], false);
        assert_eq!(e.unwrap_err().status, 504);
        // Signed for the shop's / route: it does not open /admin.
        let t = keys.seal("https://shop.example.com/x", OffsetDateTime::now_utc());
        let e = c.leg(1, &[("X-CF-Proxy-Signature", &t.signature), ("X-CF-Proxy-Metadata", &t.metadata)], false);
        assert_eq!(e.unwrap_err().status, 400);
        // Dot segments do not smuggle a token from / onto /admin either way.
        let t = keys.seal("https://shop.example.com/x/../admin/y", OffsetDateTime::now_utc());
        let back = [("X-CF-Proxy-Signature", t.signature.as_str()), ("X-CF-Proxy-Metadata", &t.metadata)];
        assert!(matches!(c.leg(1, &back, false), Ok(Leg::App)));
        assert_eq!(c.leg(0, &back, false).unwrap_err().status, 400);
    }
}
