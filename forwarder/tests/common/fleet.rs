//! A fleet of router nodes as a foundation runs them: each node its own
//! process on its own loopback address, taking routes from one
//! `nats-server`, behind HAProxy in TCP mode with PROXY v2; and a route
//! emitter that re-registers as route emitters do, across NATS restarts.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use super::peer::Peer;
use super::{free_port, render, Router, Setup};

/// HAProxy's address towards the nodes (the only one they trust a PROXY
/// header from).
pub const BALANCER: &str = "127.0.0.2";

/// Node `index` (1, 2, 3, …): its http listener on 127.0.0.1<index>, PROXY
/// v2 from [`BALANCER`] only, routes from NATS at `nats` with `nats_keys`.
pub fn node_config(index: u8, nats: &str, nats_keys: &str) -> String {
    let extra = format!(
        "[nats]\nservers = [\"{nats}\"]\nindex = {index}\nstart_response_delay_interval = \"1s\"\n{nats_keys}\n"
    );
    // The tcp listener needs a pool; nothing routes to it.
    let routing = "[[pool]]\nname = \"main\"\nbackends = [\"127.0.0.1:9\"]\n".to_string();
    let web = "name = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\n";
    let config = render(&Setup { mode: "copy", limits: "", routing, extra: &extra });
    assert!(config.contains(web), "render() changed its web listener:\n{config}");
    config.replace(
        web,
        &format!(
            "name = \"web\"\nbind = \"127.0.0.1{index}:0\"\nprotocol = \"http\"\nproxy_protocol = \"v2\"\n\
             proxy_trusted_cidrs = [\"{BALANCER}/32\"]\n"
        ),
    )
}

/// HAProxy in TCP mode in front of `nodes`' http listeners, sending PROXY
/// v2 from [`BALANCER`]: one frontend that balances over every node, with
/// health checks that mark a dead node down within a check (200 ms), and
/// one frontend per node (to reach each through the balancer).
pub struct Balancer {
    _peer: Peer,
    pub front: SocketAddr,
    pub per_node: Vec<SocketAddr>,
}

impl Balancer {
    pub fn start(nodes: &[SocketAddr]) -> Balancer {
        let dir = tempfile::tempdir().unwrap();
        let front: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let per_node: Vec<SocketAddr> = nodes.iter().map(|_| ([127, 0, 0, 1], free_port()).into()).collect();
        let mut cfg = format!(
            "global\n  maxconn 500\ndefaults\n  mode tcp\n  timeout connect 1s\n  timeout client 60s\n  \
             timeout server 60s\n  timeout check 500ms\n  retries 3\n  option redispatch 1\n\
             frontend fe\n  bind {front}\n  default_backend fleet\nbackend fleet\n  balance roundrobin\n"
        );
        for (i, node) in nodes.iter().enumerate() {
            cfg += &format!(
                "  server n{i} {node} source {BALANCER} send-proxy-v2 check check-send-proxy inter 200ms fall 1 rise 2\n"
            );
        }
        for (i, (node, bind)) in nodes.iter().zip(&per_node).enumerate() {
            cfg += &format!(
                "frontend fe{i}\n  bind {bind}\n  default_backend only{i}\nbackend only{i}\n  \
                 server n{i} {node} source {BALANCER} send-proxy-v2\n"
            );
        }
        let peer = Peer::haproxy(dir, &cfg, front);
        for addr in &per_node {
            super::peer::wait_port(*addr);
        }
        Balancer { _peer: peer, front, per_node }
    }
}

/// The sum of every line of `metric` (all label sets) on `router`.
pub fn metric_sum(router: &Router, metric: &str) -> f64 {
    let (_, body) = router.admin_get("/metrics").unwrap();
    body.lines()
        .filter(|l| l.strip_prefix(metric).is_some_and(|rest| rest.starts_with(['{', ' '])))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A route emitter: publishes `payload` on `router.register` every
/// `every`, on a connection of its own each time, and shrugs off a NATS
/// that is down (as route emitters retry). Stopped and joined when dropped.
pub struct Emitter {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Emitter {
    pub fn start(nats_port: u16, payload: String, every: Duration) -> Emitter {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let _ = publish_once(nats_port, "router.register", &payload);
                std::thread::sleep(every);
            }
        });
        Emitter { stop, thread: Some(thread) }
    }
}

impl Drop for Emitter {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One PUB on a fresh connection, confirmed by the server's PONG (bounded).
fn publish_once(port: u16, subject: &str, payload: &str) -> std::io::Result<()> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_millis(500))?;
    s.set_read_timeout(Some(Duration::from_secs(1)))?;
    write!(s, "CONNECT {{\"verbose\":false}}\r\nPUB {subject} {}\r\n{payload}\r\nPING\r\n", payload.len())?;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    while !got.windows(6).any(|w| w == b"PONG\r\n") {
        let n = s.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got.extend_from_slice(&buf[..n]);
    }
    Ok(())
}
