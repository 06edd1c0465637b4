//! A fleet (issue 16): three upsplice nodes, each its own process on its
//! own loopback address (127.0.0.11, .12, .13), taking routes from one real
//! `nats-server`, behind HAProxy in TCP mode with PROXY v2 (from
//! 127.0.0.2, the nodes' only trusted balancer). Clients connect from
//! 127.0.0.5. One `router.register` from a client other than the router's
//! reaches every node; a node killed mid-run touches no other node's
//! tunnels; a NATS restart keeps every table and re-syncs it.
//!
//! scripts/setup installs nats-server and haproxy; with
//! UPSPLICE_REQUIRE_PEERS=1 (CI) a missing one fails the test.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::fleet::{metric_sum, node_config, Balancer, Emitter, BALANCER};
use common::nats::{NatsClient, NatsServer};
use common::peer::have;
use common::{free_port, pattern, read_head, Router, WS_101, WS_REQUEST};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use upsplice::config::SendProxy;

const CLIENT: &str = "127.0.0.5";

/// A backend that answers a plain request with the X-Forwarded-For it got
/// (or "none") and a WebSocket upgrade with 101, then echoes every byte.
async fn backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (head, early) = read_head(&mut s).await;
                let xff = head.lines().find_map(|l| l.strip_prefix("X-Forwarded-For: ")).unwrap_or("none").to_string();
                if !head.to_ascii_lowercase().contains("\r\nupgrade: websocket\r\n") {
                    let answer =
                        format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{xff}", xff.len());
                    let _ = s.write_all(answer.as_bytes()).await;
                    return;
                }
                // A tunnel that does not come from the client's address is
                // answered with a 403 instead of a 101: the client sees it.
                if xff != CLIENT {
                    let _ = s.write_all(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n").await;
                    return;
                }
                if s.write_all(WS_101).await.is_err() || s.write_all(&early).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

async fn connect_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(format!("{from}:0").parse().unwrap())?;
    socket.connect(to).await
}

/// (status, body) of a GET for `host` over `s` (bounded).
async fn get_on(mut s: TcpStream, host: &str) -> (u16, String) {
    let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let work = async {
        s.write_all(req.as_bytes()).await?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&out).into_owned())
    };
    let resp = match tokio::time::timeout(Duration::from_secs(5), work).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(_)) => return (0, String::new()),
        Err(_) => panic!("GET {host} hung"),
    };
    let status = resp.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// A GET from 127.0.0.5 through `front` (HAProxy).
async fn get_via(front: SocketAddr, host: &str) -> (u16, String) {
    get_on(connect_from(CLIENT, front).await.unwrap(), host).await
}

/// A GET straight to `node`, playing the balancer: from 127.0.0.2 with a
/// PROXY v2 header that names 127.0.0.5.
async fn get_direct(node: SocketAddr, host: &str) -> (u16, String) {
    let mut s = connect_from(BALANCER, node).await.unwrap();
    // The header a pool with send_proxy = "v2" sends (ppp's encoder).
    let header = upsplice::proxy::header(SendProxy::V2, format!("{CLIENT}:40000").parse().unwrap(), node);
    s.write_all(&header).await.unwrap();
    get_on(s, host).await
}

/// Polls until `host` answers 200 with X-Forwarded-For 127.0.0.5 on every
/// node, directly and through its own HAProxy frontend, by `deadline`.
async fn wait_everywhere(nodes: &[&Router], lb: &Balancer, host: &str, deadline: Instant) {
    for (i, node) in nodes.iter().enumerate() {
        let per_node = lb.per_node[node_slot(lb, node)];
        loop {
            let direct = get_direct(node.http, host).await;
            let via = get_via(per_node, host).await;
            if direct == (200, CLIENT.to_string()) && via == (200, CLIENT.to_string()) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{host} on node {i} answers {direct:?} directly, {via:?} through HAProxy:\n{}",
                node.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Which of the balancer's per-node frontends serves `node` (by address order).
fn node_slot(lb: &Balancer, node: &Router) -> usize {
    let last = match node.http.ip() {
        std::net::IpAddr::V4(ip) => ip.octets()[3],
        _ => unreachable!(),
    };
    let slot = usize::from(last - 11);
    assert!(slot < lb.per_node.len());
    slot
}

/// A tunnel through HAProxy from 127.0.0.5: upgraded, then echoing.
async fn open_tunnel(front: SocketAddr, host: &str) -> TcpStream {
    let mut s = connect_from(CLIENT, front).await.unwrap();
    s.write_all(WS_REQUEST.replace("{host}", host).as_bytes()).await.unwrap();
    let (head, rest) = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(rest.is_empty());
    s
}

/// One echo round: `len` bytes of pattern `seed` out and the same back,
/// byte-exact, within 10 s. Err says how the tunnel ended.
async fn echo(s: &mut TcpStream, seed: u64, len: usize) -> Result<(), String> {
    let data = pattern(seed, len);
    let work = async {
        let (mut r, mut w) = s.split();
        let send = async {
            w.write_all(&data).await.map_err(|e| format!("write: {e}"))?;
            Ok::<_, String>(())
        };
        let recv = async {
            let mut got = vec![0u8; len];
            let mut n = 0;
            while n < len {
                match r.read(&mut got[n..]).await {
                    Ok(0) => return Err(format!("closed after {n} of {len} bytes")),
                    Ok(k) => n += k,
                    Err(e) => return Err(format!("read after {n} of {len} bytes: {e}")),
                }
            }
            Ok(got)
        };
        // The first failure ends the round: a closed tunnel may take no more writes.
        let ((), got) = tokio::try_join!(send, recv)?;
        if got != data {
            let at = got.iter().zip(&data).position(|(a, b)| a != b);
            panic!("tunnel echoed other bytes (first difference at {at:?})");
        }
        Ok(())
    };
    tokio::time::timeout(Duration::from_secs(10), work)
        .await
        .unwrap_or_else(|_| panic!("a tunnel hung (no echo, no end)"))
}

/// gorouter's registration for `uri` at `addr`.
fn register(addr: SocketAddr, uri: &str) -> String {
    format!(
        r#"{{"host":"{}","port":{},"uris":["{uri}"],"app":"app-guid","private_instance_id":"inst-1","private_instance_index":"0"}}"#,
        addr.ip(),
        addr.port()
    )
}

/// Waits (bounded) until `metric` summed over its labels satisfies `ok`.
fn wait_metric(router: &Router, metric: &str, ok: impl Fn(f64) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok(metric_sum(router, metric)) {
        assert!(Instant::now() < deadline, "{metric} is {}:\n{}", metric_sum(router, metric), router.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_behind_haproxy_takes_one_registration_survives_a_dead_node_and_a_nats_restart() {
    if !have("nats-server") || !have("haproxy") {
        return;
    }
    let port = free_port();
    let nats = NatsServer::start(port);
    let mut client = NatsClient::connect(port);
    client.subscribe("router.start");
    // An endpoint not re-registered within 3 s is stale; the emitter below
    // re-registers every 300 ms while NATS is up. While NATS is down the
    // nodes keep the table (suspend_pruning_if_nats_unavailable), as
    // gorouter does with the same key: it skips pruning while its NATS
    // client is not connected, and on reconnect freshens every route's
    // timestamp so that none is pruned before its emitter had a chance to
    // register it again. Without the key gorouter prunes on as usual, and
    // an outage longer than the stale threshold empties its table.
    let keys = "droplet_stale_threshold = \"3s\"\nprune_stale_droplets_interval = \"200ms\"\n\
                suspend_pruning_if_nats_unavailable = true";
    let mut nodes: Vec<Router> = (1..=3).map(|i| Router::start_config(&node_config(i, &nats.url(), keys))).collect();
    let mut ids = Vec::new();
    for _ in 0..3 {
        let start = client.next_on("router.start", Duration::from_secs(5)).expect("router.start from every node");
        let start: serde_json::Value = serde_json::from_str(&start.payload).unwrap();
        ids.push(start["id"].as_str().unwrap().to_string());
    }
    ids.sort();
    assert_eq!(ids.iter().map(|id| &id[..2]).collect::<Vec<_>>(), ["1-", "2-", "3-"], "{ids:?}");
    let lb = Balancer::start(&nodes.iter().map(|n| n.http).collect::<Vec<_>>());

    // One registration: the app is reachable through every node within a second.
    let app = backend().await;
    let sent = Instant::now();
    client.publish("router.register", &register(app, "app.test"));
    wait_everywhere(&nodes.iter().collect::<Vec<_>>(), &lb, "app.test", sent + Duration::from_secs(1)).await;
    let emitter = Emitter::start(port, register(app, "app.test"), Duration::from_millis(300));

    // Long-lived tunnels through HAProxy, spread over the nodes.
    let mut tunnels = Vec::new();
    for _ in 0..9 {
        tunnels.push(open_tunnel(lb.front, "app.test").await);
    }
    for (i, t) in tunnels.iter_mut().enumerate() {
        echo(t, i as u64, 64 * 1024).await.unwrap_or_else(|e| panic!("tunnel {i}: {e}"));
    }
    let per_node: Vec<f64> = nodes.iter().map(|n| metric_sum(n, "upsplice_tunnels_active")).collect();
    assert_eq!(per_node.iter().sum::<f64>(), 9.0, "{per_node:?}");
    assert!(per_node.iter().all(|&n| n >= 1.0), "tunnels not spread over the nodes: {per_node:?}");

    // SIGKILL one node mid-run.
    let mut dead = nodes.remove(1);
    let dead_tunnels = per_node[1] as usize;
    dead.signal(nix::sys::signal::Signal::SIGKILL);
    dead.wait_exit(Duration::from_secs(5));
    // Every tunnel either echoes byte-exact or ends (never hangs); exactly
    // the dead node's ended.
    let mut ended = 0;
    let mut alive = Vec::new();
    for (i, mut t) in tunnels.into_iter().enumerate() {
        match echo(&mut t, 100 + i as u64, 256 * 1024).await {
            Ok(()) => alive.push(t),
            Err(_) => ended += 1,
        }
    }
    assert_eq!(ended, dead_tunnels, "tunnels that ended: the dead node had {dead_tunnels}");
    // New connections through HAProxy succeed at once (a refused connect is
    // redispatched) and after the health check has marked the node down.
    for round in 0..2 {
        for _ in 0..6 {
            assert_eq!(get_via(lb.front, "app.test").await, (200, CLIENT.to_string()), "round {round}");
        }
        alive.push(open_tunnel(lb.front, "app.test").await);
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    for (i, t) in alive.iter_mut().enumerate() {
        echo(t, 200 + i as u64, 256 * 1024).await.unwrap_or_else(|e| panic!("surviving tunnel {i}: {e}"));
    }

    // Restart nats-server mid-run: the tables stay (requests keep routing)
    // for longer than the stale threshold.
    drop(client);
    drop(nats);
    for n in &nodes {
        wait_metric(n, "upsplice_nats_connected", |v| v == 0.0);
    }
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(4) {
        for n in &nodes {
            assert_eq!(get_direct(n.http, "app.test").await, (200, CLIENT.to_string()), "{}", n.log());
        }
        assert_eq!(get_via(lb.front, "app.test").await, (200, CLIENT.to_string()));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for n in &nodes {
        assert_eq!(metric_sum(n, "upsplice_nats_pruned_total"), 0.0, "pruned while NATS was down");
    }
    for (i, t) in alive.iter_mut().enumerate() {
        echo(t, 300 + i as u64, 64 * 1024).await.unwrap_or_else(|e| panic!("tunnel {i} while NATS was down: {e}"));
    }

    let _nats = NatsServer::start(port);
    let mut client = NatsClient::connect(port);
    client.subscribe("router.start");
    // Every live node says router.start again on its reconnect.
    let want: Vec<&String> = [&ids[0], &ids[2]].into();
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.len() < want.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(start) = client.next_on("router.start", left) else {
            panic!("router.start after the reconnect from {seen:?} only, want {want:?}")
        };
        let start: serde_json::Value = serde_json::from_str(&start.payload).unwrap();
        let id = start["id"].as_str().unwrap().to_string();
        assert!(want.contains(&&id), "router.start from {id}, not a live node");
        if !seen.contains(&id) {
            seen.push(id);
        }
    }
    for n in &nodes {
        wait_metric(n, "upsplice_nats_connected", |v| v == 1.0);
        assert_eq!(metric_sum(n, "upsplice_nats_reconnects_total"), 1.0);
    }
    // Re-synced: a new registration reaches every live node within a second.
    let sent = Instant::now();
    client.publish("router.register", &register(app, "late.test"));
    wait_everywhere(&nodes.iter().collect::<Vec<_>>(), &lb, "late.test", sent + Duration::from_secs(1)).await;
    // The old route stayed (freshened on reconnect, re-registered since).
    tokio::time::sleep(Duration::from_millis(500)).await;
    for n in &nodes {
        assert_eq!(get_direct(n.http, "app.test").await, (200, CLIENT.to_string()));
        assert_eq!(metric_sum(n, "upsplice_nats_pruned_total"), 0.0);
    }
    for (i, t) in alive.iter_mut().enumerate() {
        echo(t, 400 + i as u64, 64 * 1024).await.unwrap_or_else(|e| panic!("tunnel {i} after the NATS restart: {e}"));
    }
    drop(emitter);
}
