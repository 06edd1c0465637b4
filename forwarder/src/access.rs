//! The access record: what the access log says about one connection when
//! it ends, filled in as the connection goes, and the three ways it is
//! written (`[access_log] format`): `text` (key=value), `json` (one object
//! per line, field names in the README) and `gorouter` (gorouter's line,
//! so existing Cloud Foundry log pipelines keep parsing).

use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;

use crate::dataplane::{Legs, Mode};
use crate::upstream::AppInstance;

mod texts;

pub use self::texts::{Text, Texts};

/// `[access_log] format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// `key=value` pairs, as the diagnostic log writes them.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
    /// gorouter's access-log line.
    Gorouter,
}

/// A request's HTTP version, as the access log names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    Http10,
    Http11,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Http10 => "HTTP/1.0",
            Proto::Http11 => "HTTP/1.1",
        }
    }
}

/// A time since the accept, as a record keeps it: microseconds in 8
/// bytes, where an `Option<Duration>` takes 16 (the record stays for a
/// tunnel's whole life).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lap(NonZeroU64);

impl Lap {
    pub fn of(d: Duration) -> Lap {
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).min(u64::MAX - 1);
        Lap(NonZeroU64::MIN.saturating_add(micros))
    }

    pub fn duration(self) -> Duration {
        Duration::from_micros(self.0.get() - 1)
    }
}

/// What the access log says about a connection when it ends.
#[derive(Debug)]
pub struct AccessRecord {
    pub peer: SocketAddr,
    pub listener: Arc<str>,
    /// Wall-clock time of the accept (the line's timestamp).
    pub start: SystemTime,
    pub started: Instant,
    /// The request's strings: method, target, headers as forwarded, the
    /// route service's URL when it went to one rather than to the app.
    pub texts: Texts,
    pub proto: Option<Proto>,
    pub route: Option<Arc<str>>,
    pub backend: Option<SocketAddr>,
    /// The app instance the backend registered as (an endpoint learned
    /// from NATS): `app`, `private_instance_index`, `private_instance_id`;
    /// None when it registered none, or the backend is no app instance.
    ///
    /// The endpoint's own `Arc` (8 bytes, where three `Arc<str>` copies
    /// were 48 in a record kept for the tunnel's life); an empty field
    /// reads as none ([`AccessRecord::app`]).
    pub instance: Option<Arc<AppInstance>>,
    /// The status answered (101 for tunnels); 0 when none was seen (tcp
    /// listeners, a backend that never answered).
    pub status: u16,
    /// `X-Cf-Routererror` of the router's own answer.
    pub router_error: Option<&'static str>,
    /// From the accept to the request head written to the backend: the
    /// router's own part before the backend has the request.
    pub forwarded: Option<Lap>,
    /// From the accept to the backend's response head (time to first
    /// backend byte, as the client waits for it).
    pub first_byte: Option<Lap>,
    /// From the accept to the 101 written to the client (upgrades).
    pub upgraded: Option<Lap>,
    pub data_plane: Option<Mode>,
    /// The planes the tunnel used and what each carried, when it moved
    /// between planes (empty when it ended where it started).
    pub planes: Legs,
    pub to_backend: u64,
    pub to_client: u64,
    pub reason: &'static str,
}

impl AccessRecord {
    pub fn new(peer: SocketAddr, listener: Arc<str>) -> AccessRecord {
        AccessRecord {
            peer,
            listener,
            start: SystemTime::now(),
            started: Instant::now(),
            texts: Texts::default(),
            proto: None,
            route: None,
            backend: None,
            instance: None,
            status: 0,
            router_error: None,
            forwarded: None,
            first_byte: None,
            upgraded: None,
            data_plane: None,
            planes: Legs::default(),
            to_backend: 0,
            to_client: 0,
            reason: "done",
        }
    }

    /// One field of the app instance, None when it registered none or
    /// left it empty.
    fn app(&self, field: fn(&AppInstance) -> &Arc<str>) -> Option<&str> {
        self.instance.as_deref().map(|i| &**field(i)).filter(|v| !v.is_empty())
    }

    /// Starts the record's clocks again: a request on a kept-alive
    /// connection is timed from its own start, not the connection's.
    pub fn restart(&mut self) {
        self.start = SystemTime::now();
        self.started = Instant::now();
    }

    /// Writes the record to the diagnostic log (target `upsplice::access`),
    /// as `key=value` fields.
    pub fn trace(&self) {
        let ms = |d: Option<Lap>| d.map_or(-1, |d| d.duration().as_millis() as i64);
        tracing::info!(
            target: "upsplice::access",
            client = %self.peer,
            listener = %self.listener,
            method = self.texts.get(Text::Method).unwrap_or("-"),
            path = self.texts.get(Text::Target).unwrap_or("-"),
            host = self.texts.get(Text::Host).unwrap_or("-"),
            route = self.route.as_deref().unwrap_or("-"),
            backend = %self.backend.map(|b| b.to_string()).unwrap_or_else(|| "-".into()),
            status = self.status,
            data_plane = self.data_plane.map(Mode::as_str).unwrap_or("-"),
            bytes_to_backend = self.to_backend,
            bytes_to_client = self.to_client,
            user_agent = self.texts.get(Text::UserAgent).unwrap_or("-"),
            x_forwarded_for = self.texts.get(Text::XForwardedFor).unwrap_or("-"),
            request_id = self.texts.get(Text::RequestId).unwrap_or("-"),
            first_byte_ms = ms(self.first_byte),
            upgrade_ms = ms(self.upgraded),
            duration_ms = self.started.elapsed().as_millis() as u64,
            close = self.reason,
            planes = %self.planes,
        );
    }

    /// The record as one line (no newline) in `format`; `ended` is its
    /// duration.
    pub fn line(&self, format: Format, ended: Duration) -> String {
        match format {
            Format::Text => self.text(ended),
            Format::Json => self.json(ended),
            Format::Gorouter => self.gorouter(ended),
        }
    }

    fn text(&self, ended: Duration) -> String {
        let q = |v: Option<&str>| format!("{:?}", v.unwrap_or("-"));
        format!(
            "time={} client={} listener={} method={} path={} host={} route={} backend={} status={} data_plane={} \
             bytes_to_backend={} bytes_to_client={} user_agent={} referer={} x_forwarded_for={} \
             x_forwarded_proto={} request_id={} app_id={} app_index={} instance_id={} router_error={} \
             first_byte_ms={} upgrade_ms={} duration_ms={} close={} planes={}",
            humantime::format_rfc3339_millis(self.start),
            self.peer,
            q(Some(&self.listener)),
            q(self.texts.get(Text::Method)),
            q(self.texts.get(Text::Target)),
            q(self.texts.get(Text::Host)),
            q(self.route.as_deref()),
            self.backend.map_or("-".into(), |b| b.to_string()),
            self.status,
            self.data_plane.map_or("-", Mode::as_str),
            self.to_backend,
            self.to_client,
            q(self.texts.get(Text::UserAgent)),
            q(self.texts.get(Text::Referer)),
            q(self.texts.get(Text::XForwardedFor)),
            q(self.texts.get(Text::XForwardedProto)),
            q(self.texts.get(Text::RequestId)),
            q(self.app(|i| &i.app_id)),
            q(self.app(|i| &i.instance_index)),
            q(self.app(|i| &i.instance_id)),
            self.router_error.unwrap_or("-"),
            millis(self.first_byte),
            millis(self.upgraded),
            ended.as_millis(),
            self.reason,
            self.planes,
        )
    }

    fn json(&self, ended: Duration) -> String {
        let ms = |d: Option<Lap>| d.map(|d| d.duration().as_secs_f64() * 1000.0);
        serde_json::json!({
            "time": humantime::format_rfc3339_millis(self.start).to_string(),
            "client": self.peer.to_string(),
            "listener": &*self.listener,
            "method": self.texts.get(Text::Method),
            "path": self.texts.get(Text::Target),
            "proto": self.proto.map(Proto::as_str),
            "host": self.texts.get(Text::Host),
            "route": self.route.as_deref(),
            "route_service": self.texts.get(Text::RouteService),
            "backend": self.backend.map(|b| b.to_string()),
            "app_id": self.app(|i| &i.app_id),
            "app_index": self.app(|i| &i.instance_index),
            "instance_id": self.app(|i| &i.instance_id),
            "status": self.status,
            "data_plane": self.data_plane.map(Mode::as_str),
            "bytes_to_backend": self.to_backend,
            "bytes_to_client": self.to_client,
            "user_agent": self.texts.get(Text::UserAgent),
            "referer": self.texts.get(Text::Referer),
            "x_forwarded_for": self.texts.get(Text::XForwardedFor),
            "x_forwarded_proto": self.texts.get(Text::XForwardedProto),
            "request_id": self.texts.get(Text::RequestId),
            "router_error": self.router_error,
            "first_byte_ms": ms(self.first_byte),
            "upgrade_ms": ms(self.upgraded),
            "duration_ms": ended.as_secs_f64() * 1000.0,
            "close": self.reason,
            "planes": (!self.planes.is_empty()).then(|| self.planes.iter().map(|l| serde_json::json!({
                "data_plane": l.mode.as_str(),
                "bytes_to_backend": l.to_backend,
                "bytes_to_client": l.to_client,
            })).collect::<Vec<_>>()),
        })
        .to_string()
    }

    /// gorouter's line (its `accesslog/schema`): `<Host> - [<Start>]
    /// "<Method> <URL> <Proto>" <Status> <BytesReceived> <BytesSent>
    /// "<Referer>" "<User-Agent>" <RemoteAddr> <BackendAddr>
    /// x_forwarded_for:"…" x_forwarded_proto:"…" vcap_request_id:…
    /// response_time:… gorouter_time:… app_id:… app_index:…
    /// x_cf_routererror:…`, a missing value as `-`. Bytes received are the
    /// client's (to the backend), bytes sent the client's share; times in
    /// seconds. app_id and app_index are the registration's `app` and
    /// `private_instance_index` (routes from NATS); a route from the file
    /// has neither.
    fn gorouter(&self, ended: Duration) -> String {
        let dash = |v: Option<&str>| v.filter(|v| !v.is_empty()).unwrap_or("-").to_string();
        let quoted = |v: Option<&str>| format!("\"{}\"", dash(v).replace('"', "\\\""));
        let request = match (self.texts.get(Text::Method), self.texts.get(Text::Target)) {
            (Some(m), Some(t)) => format!("\"{m} {t} {}\"", self.proto.unwrap_or(Proto::Http11).as_str()),
            _ => "\"-\"".into(),
        };
        format!(
            "{} - [{}] {} {} {} {} {} {} {} {} x_forwarded_for:{} x_forwarded_proto:{} vcap_request_id:{} \
             response_time:{} gorouter_time:{} app_id:{} app_index:{} x_cf_routererror:{}",
            dash(self.texts.get(Text::Host)),
            humantime::format_rfc3339_nanos(self.start),
            request,
            self.status,
            self.to_backend,
            self.to_client,
            quoted(self.texts.get(Text::Referer)),
            quoted(self.texts.get(Text::UserAgent)),
            self.peer,
            self.backend.map_or("-".into(), |b| b.to_string()),
            quoted(self.texts.get(Text::XForwardedFor)),
            quoted(self.texts.get(Text::XForwardedProto)),
            dash(self.texts.get(Text::RequestId)),
            seconds(Some(ended)),
            seconds(self.forwarded.map(Lap::duration)),
            dash(self.app(|i| &i.app_id)),
            dash(self.app(|i| &i.instance_index)),
            self.router_error.unwrap_or("-"),
        )
    }
}

fn millis(d: Option<Lap>) -> String {
    d.map_or("-".into(), |d| d.duration().as_millis().to_string())
}

fn seconds(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.6}", d.as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lap_keeps_microseconds_and_saturates() {
        assert_eq!(Lap::of(Duration::ZERO).duration(), Duration::ZERO, "zero is a time, not None");
        assert_eq!(Lap::of(Duration::from_nanos(1_500_999)).duration(), Duration::from_micros(1500));
        let hours = Duration::from_secs(36_000);
        assert_eq!(Lap::of(hours).duration(), hours);
        assert_eq!(Lap::of(Duration::MAX).duration(), Duration::from_micros(u64::MAX - 1));
        assert_eq!(std::mem::size_of::<Option<Lap>>(), 8);
    }

    fn record() -> AccessRecord {
        let mut r = AccessRecord::new("192.0.2.7:51000".parse().unwrap(), "web".into());
        r.start = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        r.texts.set(Text::Method, "GET");
        r.texts.set(Text::Target, "/chat?room=1");
        r.proto = Some(Proto::Http11);
        r.texts.set(Text::Host, "chat.example.com");
        r.texts.set(Text::UserAgent, "Mozilla \"x\"");
        r.texts.set(Text::XForwardedFor, "192.0.2.7");
        r.texts.set(Text::XForwardedProto, "https");
        r.texts.set(Text::RequestId, "6f1c1c3e-0000-4000-8000-000000000001");
        r.route = Some("chat.example.com".into());
        r.backend = Some("10.0.0.5:8080".parse().unwrap());
        r.status = 101;
        r.forwarded = Some(Lap::of(Duration::from_micros(1500)));
        r.first_byte = Some(Lap::of(Duration::from_millis(3)));
        r.upgraded = Some(Lap::of(Duration::from_millis(4)));
        r.data_plane = Some(Mode::Splice);
        r.to_backend = 1200;
        r.to_client = 3400;
        r
    }

    #[test]
    fn gorouter_line() {
        let line = record().line(Format::Gorouter, Duration::from_millis(2500));
        assert_eq!(
            line,
            "chat.example.com - [2023-11-14T22:13:20.123000000Z] \"GET /chat?room=1 HTTP/1.1\" 101 1200 3400 \"-\" \
             \"Mozilla \\\"x\\\"\" 192.0.2.7:51000 10.0.0.5:8080 x_forwarded_for:\"192.0.2.7\" \
             x_forwarded_proto:\"https\" vcap_request_id:6f1c1c3e-0000-4000-8000-000000000001 \
             response_time:2.500000 gorouter_time:0.001500 app_id:- app_index:- x_cf_routererror:-"
        );
        let mut app = record();
        app.instance = Some(Arc::new(AppInstance::new("b8c2", "c1a2", "2")));
        let line = app.line(Format::Gorouter, Duration::from_millis(2500));
        assert!(line.ends_with(" app_id:b8c2 app_index:2 x_cf_routererror:-"), "{line}");
        let bare =
            AccessRecord::new("192.0.2.7:1".parse().unwrap(), "raw".into()).line(Format::Gorouter, Duration::ZERO);
        assert!(bare.starts_with("- - ["), "{bare}");
        assert!(bare.contains("] \"-\" 0 0 0 \"-\" \"-\" 192.0.2.7:1 - x_forwarded_for:\"-\""), "{bare}");
    }

    #[test]
    fn json_line_has_the_documented_fields() {
        use serde_json::Value::Null;
        let line = record().line(Format::Json, Duration::from_millis(2500));
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["time"], "2023-11-14T22:13:20.123Z");
        assert_eq!(v["method"], "GET");
        assert_eq!(v["path"], "/chat?room=1");
        assert_eq!(v["status"], 101);
        assert_eq!(v["data_plane"], "splice");
        assert_eq!(v["user_agent"], "Mozilla \"x\"");
        assert_eq!(v["request_id"], "6f1c1c3e-0000-4000-8000-000000000001");
        assert_eq!(v["first_byte_ms"], 3.0);
        assert_eq!(v["upgrade_ms"], 4.0);
        assert_eq!(v["duration_ms"], 2500.0);
        assert_eq!(v["referer"], serde_json::Value::Null);
        assert_eq!((&v["app_id"], &v["app_index"], &v["instance_id"]), (&Null, &Null, &Null));
        assert!(!line.contains('\n'));
        let mut app = record();
        app.instance = Some(Arc::new(AppInstance::new("b8c2", "c1a2", "2")));
        let v: serde_json::Value = serde_json::from_str(&app.line(Format::Json, Duration::ZERO)).unwrap();
        assert_eq!((&v["app_id"], &v["app_index"], &v["instance_id"]), (&"b8c2".into(), &"2".into(), &"c1a2".into()));
    }

    #[test]
    fn text_line_quotes_what_may_hold_spaces() {
        let line = record().line(Format::Text, Duration::from_millis(7));
        assert!(
            line.starts_with("time=2023-11-14T22:13:20.123Z client=192.0.2.7:51000 listener=\"web\" method=\"GET\"")
        );
        assert!(line.contains(" user_agent=\"Mozilla \\\"x\\\"\" "), "{line}");
        assert!(line.ends_with(" first_byte_ms=3 upgrade_ms=4 duration_ms=7 close=done planes=-"), "{line}");
    }

    /// A tunnel that moved names each plane and what it carried; the
    /// record's byte counts are their sum.
    #[test]
    fn a_tunnel_that_moved_names_its_planes() {
        let mut r = record();
        r.data_plane = Some(Mode::Sockmap);
        r.planes.push(Mode::Splice, (200, 400), false);
        r.planes.push(Mode::Sockmap, (1000, 3000), true);
        let text = r.line(Format::Text, Duration::ZERO);
        assert!(text.ends_with(" planes=splice:200/400,sockmap:1000/3000"), "{text}");
        let v: serde_json::Value = serde_json::from_str(&r.line(Format::Json, Duration::ZERO)).unwrap();
        assert_eq!(v["data_plane"], "sockmap");
        assert_eq!(
            v["planes"],
            serde_json::json!([
                {"data_plane": "splice", "bytes_to_backend": 200, "bytes_to_client": 400},
                {"data_plane": "sockmap", "bytes_to_backend": 1000, "bytes_to_client": 3000},
            ])
        );
        let v: serde_json::Value = serde_json::from_str(&record().line(Format::Json, Duration::ZERO)).unwrap();
        assert_eq!(v["planes"], serde_json::Value::Null, "a tunnel that stayed on its plane");
    }
}
