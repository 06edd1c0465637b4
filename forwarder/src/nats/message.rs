//! gorouter's `router.register` / `router.unregister` message
//! (`RegistryMessage` in its mbus/subscriber.go), parsed with the types
//! gorouter's senders use, and checked: a message either yields a whole
//! [`Registration`] or is dropped with a [`Bad`] reason, never a part.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::config::Balance;
use crate::upstream::AppInstance;

/// The message as sent. Types follow gorouter's Go struct: a number where
/// it has an integer (a string there fails its parser too), strings where
/// it has strings (`private_instance_index` is one); `null` is as absent;
/// unknown fields are ignored.
#[derive(Debug, Deserialize)]
struct Wire {
    host: Option<String>,
    port: Option<serde_json::Number>,
    tls_port: Option<serde_json::Number>,
    uris: Option<Vec<String>>,
    app: Option<String>,
    private_instance_id: Option<String>,
    private_instance_index: Option<String>,
    route_service_url: Option<String>,
    server_cert_domain_san: Option<String>,
    tags: Option<BTreeMap<String, String>>,
    stale_threshold_in_seconds: Option<i64>,
    isolation_segment: Option<String>,
    availability_zone: Option<String>,
    protocol: Option<String>,
    endpoint_updated_at_ns: Option<i64>,
    options: Option<WireOptions>,
}

#[derive(Debug, Deserialize)]
struct WireOptions {
    loadbalancing: Option<String>,
}

/// One endpoint as registered: what routing and `/routes` need of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// `app`, `private_instance_id`, `private_instance_index`: what the
    /// requests to it are told, shared by every pool that lists it.
    pub instance: Arc<AppInstance>,
    pub route_service_url: Option<Arc<str>>,
    pub server_cert_domain_san: String,
    pub tags: Tags,
    /// Its own stale threshold, if it gave one (`stale_threshold_in_seconds` > 0).
    pub stale_threshold: Option<Duration>,
    pub isolation_segment: String,
    pub availability_zone: String,
    pub protocol: String,
    pub updated_at_ns: i64,
    pub balance: Balance,
    /// It registered a `tls_port` (its `addr`'s port): TLS to it, with
    /// `[backend_tls]`, verified against `server_cert_domain_san`.
    pub tls: bool,
}

/// An endpoint's `tags`, sorted by name: a map as it arrived, kept as
/// one allocation of exact size (a B-tree of one or two tags costs a
/// whole node, ~500 bytes, per endpoint: a quarter of a big table).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tags(Box<[(Box<str>, Box<str>)]>);

impl Tags {
    /// The value of tag `name`.
    pub fn get(&self, name: &str) -> Option<&str> {
        let i = self.0.binary_search_by(|(n, _)| (**n).cmp(name)).ok()?;
        Some(&self.0[i].1)
    }
}

impl From<BTreeMap<String, String>> for Tags {
    fn from(map: BTreeMap<String, String>) -> Tags {
        Tags(map.into_iter().map(|(n, v)| (n.into_boxed_str(), v.into_boxed_str())).collect())
    }
}

impl serde::Serialize for Tags {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter().map(|(n, v)| (n, v)))
    }
}

/// A valid message: its endpoint and the URIs it is registered for
/// (normalised: the host lower-cased without a trailing dot, the path
/// without a trailing slash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registration {
    pub endpoint: Arc<Endpoint>,
    pub uris: Vec<Arc<str>>,
}

/// Why a message was dropped (the `reason` label of
/// `upsplice_nats_bad_messages_total`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Bad {
    #[error("not a registry message: {0}")]
    InvalidJson(String),
    #[error("no host")]
    MissingHost,
    #[error("host {0:?} is not an IP address")]
    InvalidHost(String),
    #[error("no port")]
    MissingPort,
    #[error("port {0} is not 1-65535")]
    InvalidPort(String),
    #[error("no uris")]
    MissingUris,
    #[error("uri {0:?}: {1}")]
    InvalidUri(String, String),
    #[error("route_service_url {0:?} is not https")]
    RouteServiceUrl(String),
}

impl Bad {
    pub fn reason(&self) -> &'static str {
        match self {
            Bad::InvalidJson(_) => "invalid_json",
            Bad::MissingHost => "missing_host",
            Bad::InvalidHost(_) => "invalid_host",
            Bad::MissingPort => "missing_port",
            Bad::InvalidPort(_) => "invalid_port",
            Bad::MissingUris => "missing_uris",
            Bad::InvalidUri(..) => "invalid_uri",
            Bad::RouteServiceUrl(_) => "route_service_url",
        }
    }
}

/// Parses and checks one message's payload.
pub fn parse(payload: &[u8]) -> Result<Registration, Bad> {
    let w: Wire = serde_json::from_slice(payload).map_err(|e| Bad::InvalidJson(e.to_string()))?;
    let host = w.host.filter(|h| !h.is_empty()).ok_or(Bad::MissingHost)?;
    let ip: IpAddr = host.parse().map_err(|_| Bad::InvalidHost(host.clone()))?;
    let tls_port = port(w.tls_port)?;
    let port = match (port(w.port)?, tls_port) {
        (_, Some(tls)) => tls,
        (Some(p), None) => p,
        (None, None) => return Err(Bad::MissingPort),
    };
    let uris = w.uris.filter(|u| !u.is_empty()).ok_or(Bad::MissingUris)?;
    let uris = uris.iter().map(|u| uri(u)).collect::<Result<Vec<_>, _>>()?;
    let route_service_url = w.route_service_url.filter(|u| !u.is_empty());
    if let Some(url) = &route_service_url {
        // gorouter's check: the URL starts with "https".
        if !url.starts_with("https") {
            return Err(Bad::RouteServiceUrl(url.clone()));
        }
    }
    let balance = match w.options.and_then(|o| o.loadbalancing).as_deref() {
        Some("least-connection") => Balance::LeastConn,
        _ => Balance::RoundRobin,
    };
    let endpoint = Endpoint {
        addr: SocketAddr::new(ip, port),
        instance: Arc::new(AppInstance::new(
            w.app.as_deref().unwrap_or_default(),
            w.private_instance_id.as_deref().unwrap_or_default(),
            w.private_instance_index.as_deref().unwrap_or_default(),
        )),
        route_service_url: route_service_url.map(Arc::from),
        server_cert_domain_san: w.server_cert_domain_san.unwrap_or_default(),
        tags: Tags::from(w.tags.unwrap_or_default()),
        stale_threshold: w.stale_threshold_in_seconds.filter(|&s| s > 0).map(|s| Duration::from_secs(s.unsigned_abs())),
        isolation_segment: w.isolation_segment.unwrap_or_default(),
        availability_zone: w.availability_zone.unwrap_or_default(),
        protocol: w.protocol.unwrap_or_default(),
        updated_at_ns: w.endpoint_updated_at_ns.unwrap_or_default(),
        balance,
        tls: tls_port.is_some(),
    };
    Ok(Registration { endpoint: Arc::new(endpoint), uris })
}

/// A port: absent or 0 is none (Go's zero value); otherwise an integer
/// 1-65535 (gorouter's uint16).
fn port(n: Option<serde_json::Number>) -> Result<Option<u16>, Bad> {
    match n {
        None => Ok(None),
        Some(n) => match n.as_u64() {
            Some(0) => Ok(None),
            Some(p) => u16::try_from(p).map(Some).map_err(|_| Bad::InvalidPort(n.to_string())),
            None => Err(Bad::InvalidPort(n.to_string())),
        },
    }
}

/// A URI (`host` or `host/path`), normalised as the table keys it.
fn uri(u: &str) -> Result<Arc<str>, Bad> {
    let bad = |why: String| Bad::InvalidUri(u.to_string(), why);
    if u.bytes().any(|b| b.is_ascii_control() || b == b' ' || b == b'?' || b == b'#') {
        return Err(bad("spaces, control characters, '?' and '#' have no place in a route".into()));
    }
    let (host, path) = crate::route::split_uri(u);
    crate::host::validate_route_host(host).map_err(bad)?;
    let path = match path {
        Some(p) => crate::path::normalize(p).map_err(|e| bad(e.to_string()))?,
        None => String::new(),
    };
    Ok(format!("{}{}", crate::host::normalize(host), path.trim_end_matches('/')).into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(json: &str) -> Registration {
        parse(json.as_bytes()).unwrap_or_else(|e| panic!("{json}: {e}"))
    }

    fn bad(json: &str) -> &'static str {
        parse(json.as_bytes()).map(|r| panic!("{json} parsed: {r:?}")).unwrap_err().reason()
    }

    #[test]
    fn a_cloud_controller_registration_with_every_field() {
        let r = ok(r#"{"host":"10.0.16.4","port":61001,"uris":["App.Example.com","app.example.com/API/"],
            "app":"b8c2","private_instance_id":"c1a2","private_instance_index":"2","tags":{"component":"route-emitter"},
            "stale_threshold_in_seconds":30,"isolation_segment":"","availability_zone":"z1","protocol":"http1",
            "endpoint_updated_at_ns":1700000000000000000,"server_cert_domain_san":"c1a2",
            "options":{"loadbalancing":"least-connection"},"some_future_field":[1,2]}"#);
        let e = &r.endpoint;
        assert_eq!(e.addr, "10.0.16.4:61001".parse().unwrap());
        assert_eq!(r.uris, vec![Arc::from("app.example.com"), Arc::from("app.example.com/API")]);
        assert_eq!((&*e.instance.app_id, &*e.instance.instance_index), ("b8c2", "2"));
        assert_eq!((e.tags.get("component"), e.tags.get("other")), (Some("route-emitter"), None));
        assert_eq!(serde_json::to_string(&e.tags).unwrap(), r#"{"component":"route-emitter"}"#);
        assert_eq!(e.stale_threshold, Some(Duration::from_secs(30)));
        assert_eq!(e.balance, Balance::LeastConn);
        assert!(!r.endpoint.tls);
    }

    #[test]
    fn the_least_a_registration_needs_and_nulls_as_absent() {
        let r = ok(r#"{"host":"::1","port":8080,"uris":["*.apps.example.com"],"tags":null,"app":null}"#);
        assert_eq!(r.endpoint.addr, "[::1]:8080".parse().unwrap());
        assert_eq!(r.endpoint.stale_threshold, None);
        assert_eq!(r.endpoint.balance, Balance::RoundRobin);
    }

    #[test]
    fn tls_port_is_preferred_and_marks_the_endpoint() {
        let r = ok(r#"{"host":"10.0.0.1","port":8080,"tls_port":8443,"uris":["a.e.com"]}"#);
        assert_eq!(r.endpoint.addr.port(), 8443);
        assert!(r.endpoint.tls);
        assert!(ok(r#"{"host":"10.0.0.1","tls_port":8443,"uris":["a.e.com"]}"#).endpoint.tls);
    }

    #[test]
    fn what_is_dropped_and_why() {
        for (json, reason) in [
            ("{", "invalid_json"),
            ("[]", "invalid_json"),
            (r#"{"host":"10.0.0.1","port":"8080","uris":["a.e.com"]}"#, "invalid_json"),
            (r#"{"host":"10.0.0.1","port":8080,"uris":["a.e.com"],"private_instance_index":2}"#, "invalid_json"),
            (r#"{"host":"10.0.0.1","port":8080,"uris":["a.e.com"],"tags":{"n":1}}"#, "invalid_json"),
            (r#"{"host":"10.0.0.1","port":8080,"uris":"a.e.com"}"#, "invalid_json"),
            (r#"{"port":8080,"uris":["a.e.com"]}"#, "missing_host"),
            (r#"{"host":"","port":8080,"uris":["a.e.com"]}"#, "missing_host"),
            (r#"{"host":"app.internal","port":8080,"uris":["a.e.com"]}"#, "invalid_host"),
            (r#"{"host":"10.0.0.1","uris":["a.e.com"]}"#, "missing_port"),
            (r#"{"host":"10.0.0.1","port":0,"uris":["a.e.com"]}"#, "missing_port"),
            (r#"{"host":"10.0.0.1","port":70000,"uris":["a.e.com"]}"#, "invalid_port"),
            (r#"{"host":"10.0.0.1","port":-1,"uris":["a.e.com"]}"#, "invalid_port"),
            (r#"{"host":"10.0.0.1","port":80.5,"uris":["a.e.com"]}"#, "invalid_port"),
            (r#"{"host":"10.0.0.1","port":8080}"#, "missing_uris"),
            (r#"{"host":"10.0.0.1","port":8080,"uris":[]}"#, "missing_uris"),
            (r#"{"host":"10.0.0.1","port":8080,"uris":["a.e.com","bad host"]}"#, "invalid_uri"),
            (r#"{"host":"10.0.0.1","port":8080,"uris":["a.*.com"]}"#, "invalid_uri"),
            (r#"{"host":"10.0.0.1","port":8080,"uris":["a.e.com/%zz"]}"#, "invalid_uri"),
            (r#"{"host":"10.0.0.1","port":8080,"uris":["/x"]}"#, "invalid_uri"),
            (
                r#"{"host":"10.0.0.1","port":8080,"uris":["a.e.com"],"route_service_url":"http://rs"}"#,
                "route_service_url",
            ),
        ] {
            assert_eq!(bad(json), reason, "{json}");
        }
    }

    #[test]
    fn a_route_service_url_must_be_https() {
        let r = ok(r#"{"host":"10.0.0.1","port":8080,"uris":["a.e.com"],"route_service_url":"https://rs.e.com"}"#);
        assert_eq!(r.endpoint.route_service_url.as_deref(), Some("https://rs.e.com"));
    }
}
