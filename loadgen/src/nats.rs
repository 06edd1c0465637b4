//! `nats-register`: gorouter's `router.register` messages on a raw NATS
//! connection, the way a Cloud Foundry route emitter sends them, to
//! measure a router's route table at scale.
//!
//! Two jobs:
//! - a burst: `--endpoints` registrations over `--uris` URIs, at `--rate`
//!   per second or as fast as the connection takes them, optionally again
//!   every `--repeat-every` (a route emitter's refresh) until `--duration`;
//!   with `--wait-metrics`, it then polls the router's `/metrics` until
//!   `upsplice_nats_endpoints` shows them all (registrations absorbed);
//! - `--first-route`: `--samples` times, register one new URI pointing at
//!   `--backend` and time the request loop until the router answers it
//!   with something else than 404 (register to first routed request).
//!
//! The NATS text protocol needs no client library here: `CONNECT`, `PUB`,
//! and a `PING` answered by `PONG` once the server has read everything
//! before it. Everything is blocking I/O on one thread.

use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde::Serialize;

/// What `nats-register` is asked to do (see `cli::NatsRegisterArgs`).
#[derive(Debug, Clone)]
pub struct Plan {
    pub server: String,
    pub uris: u32,
    pub endpoints: u32,
    /// Registrations per second; None: as fast as the connection takes them.
    pub rate: Option<u32>,
    pub domain: String,
    pub repeat_every: Option<Duration>,
    pub duration: Duration,
    pub wait_metrics: Option<String>,
    pub timeout: Duration,
}

/// The summary of a burst (printed as one JSON line).
#[derive(Debug, Serialize)]
pub struct BurstReport {
    pub uris: u32,
    pub endpoints: u32,
    pub rounds: u32,
    pub published: u64,
    pub bytes: u64,
    /// From the first PUB to the server's PONG after the first round.
    pub publish_s: f64,
    pub published_per_s: f64,
    /// From the first PUB until `/metrics` showed every endpoint (None: not asked, or timed out).
    pub absorbed_s: Option<f64>,
    pub absorbed_per_s: Option<f64>,
    /// `upsplice_nats_endpoints` and `upsplice_nats_routes` at the end.
    pub router_endpoints: Option<u64>,
    pub router_routes: Option<u64>,
}

/// One raw NATS connection that publishes.
struct Nats {
    out: BufWriter<TcpStream>,
    inp: BufReader<TcpStream>,
    bytes: u64,
}

impl Nats {
    fn connect(server: &str) -> anyhow::Result<Nats> {
        let hostport = server.strip_prefix("nats://").unwrap_or(server);
        let (auth, hostport) = match hostport.rsplit_once('@') {
            Some((auth, rest)) => (Some(auth), rest),
            None => (None, hostport),
        };
        let addr = hostport
            .to_socket_addrs()
            .with_context(|| format!("NATS server {server}"))?
            .next()
            .with_context(|| format!("NATS server {server}: no address"))?;
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connect to NATS at {addr}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut inp = BufReader::new(stream.try_clone()?);
        let mut info = String::new();
        inp.read_line(&mut info).context("read the server's INFO")?;
        if !info.starts_with("INFO ") {
            bail!("NATS server {addr} did not start with INFO: {info:?}");
        }
        let mut connect = serde_json::json!({"verbose": false, "pedantic": false, "name": "upsplice-loadgen"});
        if let Some(auth) = auth {
            match auth.split_once(':') {
                Some((user, pass)) => {
                    connect["user"] = user.into();
                    connect["pass"] = pass.into();
                }
                None => connect["auth_token"] = auth.into(),
            }
        }
        let mut nats = Nats { out: BufWriter::with_capacity(64 * 1024, stream), inp, bytes: 0 };
        write!(nats.out, "CONNECT {connect}\r\n")?;
        nats.flush_sync()?;
        Ok(nats)
    }

    fn publish(&mut self, subject: &str, payload: &[u8]) -> anyhow::Result<()> {
        write!(self.out, "PUB {subject} {}\r\n", payload.len())?;
        self.out.write_all(payload)?;
        self.out.write_all(b"\r\n")?;
        self.bytes += payload.len() as u64;
        Ok(())
    }

    /// Sends PING and waits for PONG: the server has read all before it.
    fn flush_sync(&mut self) -> anyhow::Result<()> {
        self.out.write_all(b"PING\r\n")?;
        self.out.flush()?;
        let mut line = String::new();
        loop {
            line.clear();
            if self.inp.read_line(&mut line).context("wait for PONG")? == 0 {
                bail!("the NATS server closed the connection");
            }
            match line.trim_end() {
                "PONG" => return Ok(()),
                "PING" => self.out.write_all(b"PONG\r\n")?,
                l if l.starts_with("-ERR") => bail!("NATS server: {l}"),
                _ => {}
            }
        }
    }
}

/// Registration `i` of `uris` URIs: URI `i % uris`, its own address.
pub fn registration(i: u32, uris: u32, domain: &str, backend: Option<SocketAddr>) -> Vec<u8> {
    let app = i % uris.max(1);
    let (host, port) = match backend {
        Some(addr) => (addr.ip().to_string(), addr.port()),
        None => (format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255), 61000 + (i >> 24) as u16),
    };
    serde_json::json!({
        "host": host,
        "port": port,
        "uris": [format!("app-{app}.{domain}")],
        "app": format!("00000000-0000-4000-8000-{app:012}"),
        "private_instance_id": format!("00000000-0000-4000-9000-{i:012}"),
        "private_instance_index": (i / uris.max(1)).to_string(),
        "tags": {"component": "route-emitter", "app_name": format!("app-{app}")},
    })
    .to_string()
    .into_bytes()
}

/// Runs a burst (and its refreshes) and reports it.
pub fn burst(plan: &Plan) -> anyhow::Result<BurstReport> {
    if plan.uris == 0 || plan.endpoints < plan.uris {
        bail!("--endpoints must be at least --uris, and --uris at least 1");
    }
    let payloads: Vec<Vec<u8>> = (0..plan.endpoints).map(|i| registration(i, plan.uris, &plan.domain, None)).collect();
    let mut nats = Nats::connect(&plan.server)?;
    let t0 = Instant::now();
    let deadline = t0 + plan.duration;
    let mut published = 0u64;
    let mut rounds = 0u32;
    let mut publish_s = 0.0;
    let mut absorbed_s = None;
    let mut router = (None, None);
    loop {
        let round0 = Instant::now();
        for (n, p) in payloads.iter().enumerate() {
            if let Some(rate) = plan.rate {
                // Paced against the round's start: no drift, no burst catch-up beyond one tick.
                let due = round0 + Duration::from_secs_f64(n as f64 / f64::from(rate.max(1)));
                let now = Instant::now();
                if due > now {
                    nats.out.flush()?;
                    std::thread::sleep(due - now);
                }
            }
            nats.publish("router.register", p)?;
            published += 1;
        }
        nats.flush_sync()?;
        rounds += 1;
        if rounds == 1 {
            publish_s = t0.elapsed().as_secs_f64();
            if let Some(url) = &plan.wait_metrics {
                let limit = Instant::now() + plan.timeout;
                loop {
                    router = nats_gauges(url).unwrap_or((None, None));
                    if router.0.is_some_and(|e| e >= u64::from(plan.endpoints)) {
                        absorbed_s = Some(t0.elapsed().as_secs_f64());
                        break;
                    }
                    if Instant::now() >= limit {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
        let Some(every) = plan.repeat_every else { break };
        let next = round0 + every;
        if next >= deadline {
            break;
        }
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let per_s = |s: f64| if s > 0.0 { f64::from(plan.endpoints) / s } else { 0.0 };
    Ok(BurstReport {
        uris: plan.uris,
        endpoints: plan.endpoints,
        rounds,
        published,
        bytes: nats.bytes,
        publish_s,
        published_per_s: per_s(publish_s),
        absorbed_s,
        absorbed_per_s: absorbed_s.map(per_s),
        router_endpoints: router.0,
        router_routes: router.1,
    })
}

/// The summary of `--first-route` (printed as one JSON line).
#[derive(Debug, Serialize)]
pub struct FirstRouteReport {
    pub samples: usize,
    /// Register to the first answer that was not 404, in ms, per sample.
    pub ms: Vec<f64>,
    pub p50_ms: f64,
    pub max_ms: f64,
    /// Requests sent while waiting, in all samples.
    pub polls: u64,
}

/// `samples` times: register `first-<prefix><i>.<domain>` at `backend`,
/// then request it through `router` every `poll` until it is routed.
pub fn first_route(
    server: &str,
    router: SocketAddr,
    backend: SocketAddr,
    samples: usize,
    domain: &str,
    prefix: &str,
    timeout: Duration,
) -> anyhow::Result<FirstRouteReport> {
    let mut nats = Nats::connect(server)?;
    let mut ms = Vec::with_capacity(samples);
    let mut polls = 0u64;
    for i in 0..samples {
        let host = format!("first-{prefix}{i}.{domain}");
        let payload = serde_json::json!({
            "host": backend.ip().to_string(), "port": backend.port(), "uris": [host],
            "app": "first-route", "private_instance_id": format!("first-{prefix}{i}"),
            "private_instance_index": "0", "tags": {"component": "route-emitter"},
        })
        .to_string();
        // The router hands changes to its table on a timer: samples that
        // each start right after the last was routed would all start at
        // the same phase of it. A step of 37 ms spreads them over 100 ms.
        std::thread::sleep(Duration::from_millis((i as u64 * 37) % 100));
        let t0 = Instant::now();
        nats.publish("router.register", payload.as_bytes())?;
        nats.out.flush()?;
        loop {
            polls += 1;
            match http_status(router, &host, "/") {
                Ok(status) if status != 404 => break,
                _ if t0.elapsed() > timeout => bail!("{host}: not routed within {timeout:?}"),
                _ => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        ms.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    let mut sorted = ms.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(FirstRouteReport {
        samples,
        p50_ms: sorted.get(sorted.len() / 2).copied().unwrap_or(0.0),
        max_ms: sorted.last().copied().unwrap_or(0.0),
        ms,
        polls,
    })
}

/// One `GET` on a new connection: the status code.
fn http_status(addr: SocketAddr, host: &str, path: &str) -> anyhow::Result<u16> {
    let (status, _) = http_get(addr, host, path)?;
    Ok(status)
}

/// One `GET` with `Connection: close`: the status code and the body.
fn http_get(addr: SocketAddr, host: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf);
    let status =
        text.split(' ').nth(1).and_then(|c| c.parse().ok()).with_context(|| format!("no HTTP status from {addr}"))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b).to_string();
    Ok((status, body))
}

/// `upsplice_nats_endpoints` and `upsplice_nats_routes` from a `/metrics` URL.
fn nats_gauges(url: &str) -> anyhow::Result<(Option<u64>, Option<u64>)> {
    let rest = url.strip_prefix("http://").context("--wait-metrics: an http:// URL")?;
    let (hostport, path) = rest.split_once('/').map_or((rest, "/metrics".to_string()), |(h, p)| (h, format!("/{p}")));
    let addr = hostport.to_socket_addrs()?.next().context("--wait-metrics: no address")?;
    let (_, body) = http_get(addr, hostport, &path)?;
    let gauge = |name: &str| {
        body.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok()).map(|v| v as u64)
    };
    Ok((gauge("upsplice_nats_endpoints"), gauge("upsplice_nats_routes")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrations_are_gorouters_json() {
        let v: serde_json::Value = serde_json::from_slice(&registration(70_001, 50_000, "nats.bench", None)).unwrap();
        assert_eq!(v["host"], "10.1.17.113");
        assert_eq!(v["port"], 61000);
        assert_eq!(v["uris"][0], "app-20001.nats.bench");
        assert_eq!(v["private_instance_index"], "1");
        assert_eq!(v["tags"]["component"], "route-emitter");
    }
}
