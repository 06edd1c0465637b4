//! Routes from NATS against a real `nats-server` (Debian's package), driven
//! by a NATS client that is not the router's (tests/common/nats.rs), with
//! gorouter's messages.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::nats::{NatsClient, NatsServer};
use common::peer::have;
use common::tls_backend::{Pki, TlsBackend};
use common::{free_port, raw_exchange, render, ws_echo_backend, Router, Setup};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;

/// A router with `[nats]` at `url` (plus `nats`), an http listener and no
/// NATS-independent route but `file.test` → pool "main" (`main`).
fn config(url: &str, nats: &str, main: SocketAddr) -> String {
    let extra = format!("[nats]\nservers = [\"{url}\"]\nstart_response_delay_interval = \"1s\"\nindex = 7\n{nats}\n");
    let routing = format!(
        "[[pool]]\nname = \"main\"\nbackends = [\"{main}\"]\n\n[[route]]\nhost = \"file.test\"\npool = \"main\"\n"
    );
    render(&Setup { mode: "copy", limits: "", routing, extra: &extra })
}

/// An HTTP backend that answers every request with `name`.
async fn http_backend(name: &'static str) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0; 4096];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let answer =
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}", name.len());
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

/// (status, body) of a GET for `host`.
async fn get(router: &Router, host: &str) -> (u16, String) {
    let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
    let resp = raw_exchange(router.http, req.as_bytes()).await;
    let status = resp.get(9..12).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, resp.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

/// Polls a GET for `host` until it answers `status`; how long that took.
async fn wait_status(router: &Router, host: &str, status: u16, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let (got, _) = get(router, host).await;
        if got == status {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{host} still answers {got}, not {status}, after {within:?}:\n{}",
            router.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn register(addr: SocketAddr, uri: &str) -> String {
    format!(
        r#"{{"host":"{}","port":{},"uris":["{uri}"],"app":"app-guid","private_instance_id":"inst-1","private_instance_index":"0","tags":{{"component":"route-emitter"}},"unknown_field":true}}"#,
        addr.ip(),
        addr.port()
    )
}

/// Waits until `metric` (a line prefix) reaches `value`.
fn wait_metric(router: &Router, metric: &str, value: f64) {
    wait_metric_until(router, metric, |v| v >= value);
}

/// Waits until `metric` (a line prefix) satisfies `ok`.
fn wait_metric_until(router: &Router, metric: &str, ok: impl Fn(f64) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok(router.metric(metric)) {
        assert!(Instant::now() < deadline, "{metric} is {}:\n{}", router.metric(metric), router.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_routes_carry_requests_and_websockets_until_unregistered() {
    if !have("nats-server") {
        return;
    }
    let nats = NatsServer::start(free_port());
    let mut client = NatsClient::connect(nats.port);
    client.subscribe("router.start");
    let file_backend = http_backend("file").await;
    let router = Router::start_config(&config(&nats.url(), "", file_backend));

    // router.start, then greet answered with the same message.
    let start = client.next_on("router.start", Duration::from_secs(5)).expect("router.start published");
    let start: serde_json::Value = serde_json::from_str(&start.payload).unwrap();
    assert!(start["id"].as_str().unwrap().starts_with("7-"), "{start}");
    assert_eq!(start["hosts"], serde_json::json!(["127.0.0.1"]));
    assert_eq!(start["minimumRegisterIntervalInSeconds"], 1);
    assert_eq!(start["pruneThresholdInSeconds"], 120);
    client.subscribe("_INBOX.greet");
    client.request("router.greet", "_INBOX.greet", "");
    let greet = client.next_on("_INBOX.greet", Duration::from_secs(5)).expect("router.greet answered");
    let greet: serde_json::Value = serde_json::from_str(&greet.payload).unwrap();
    assert_eq!(greet["id"], start["id"]);

    let one = http_backend("one").await;
    let (ws_addr, _heads) = ws_echo_backend().await;
    let sent = Instant::now();
    client.publish("router.register", &register(one, "app.test"));
    client.publish("router.register", &register(ws_addr, "ws.test/chat"));
    // The config's route for the same host and path wins.
    client.publish("router.register", &register(one, "file.test"));
    wait_status(&router, "app.test", 200, Duration::from_secs(1)).await;
    assert!(sent.elapsed() < Duration::from_secs(1), "routed {:?} after router.register", sent.elapsed());
    wait_metric(&router, "upsplice_nats_endpoints ", 3.0);
    assert_eq!(get(&router, "app.test").await.1, "one");
    assert_eq!(get(&router, "file.test").await.1, "file");
    assert_eq!(get(&router, "other.test").await.0, 404);

    let url = format!("ws://{}/chat/room", router.http);
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url).unwrap();
    req.headers_mut().insert("Host", "ws.test".parse().unwrap());
    let (mut ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.status(), 101);
    ws.send(Message::text("hello")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("hello"));

    // /routes in gorouter's shape; the metrics.
    let (status, body) = router.admin_get("/routes").unwrap();
    assert_eq!(status, 200);
    let routes: serde_json::Value = serde_json::from_str(&body).unwrap();
    let e = &routes["app.test"][0];
    assert_eq!(e["address"], one.to_string());
    assert_eq!((e["tls"].clone(), e["ttl"].clone()), (false.into(), 120.into()));
    assert_eq!(e["private_instance_id"], "inst-1");
    assert_eq!(e["tags"]["component"], "route-emitter");
    assert_eq!(routes["ws.test/chat"][0]["address"], ws_addr.to_string());
    assert_eq!(routes["file.test"][0]["address"], file_backend.to_string());
    assert_eq!(routes["file.test"][0]["ttl"], 0);
    assert_eq!(router.metric("upsplice_nats_endpoints "), 3.0);
    assert_eq!(router.metric("upsplice_nats_routes_shadowed "), 1.0);
    assert_eq!(router.metric("upsplice_nats_messages_total{kind=\"register\"}"), 3.0);
    assert_eq!(router.metric("upsplice_nats_connected "), 1.0);
    // Nothing dropped at this rate (the series exists from the start).
    assert_eq!(router.metric("upsplice_nats_dropped_messages_total "), 0.0);

    // A reload keeps the routes from NATS.
    router.signal(nix::sys::signal::Signal::SIGHUP);
    router.wait_log("SIGHUP: reloaded");
    assert_eq!(get(&router, "app.test").await.1, "one");

    // Unregistered: new requests get 404; the open tunnel keeps working.
    client.publish("router.unregister", &register(ws_addr, "ws.test/chat"));
    client.publish("router.unregister", &register(one, "app.test"));
    wait_status(&router, "app.test", 404, Duration::from_secs(1)).await;
    let (_, body) = get(&router, "ws.test").await;
    assert!(!body.contains("hello"));
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
        "ws://{}/chat",
        router.http
    ))
    .unwrap();
    req.headers_mut().insert("Host", "ws.test".parse().unwrap());
    assert!(
        tokio_tungstenite::connect_async(req).await.is_err(),
        "a new WebSocket to an unregistered route is refused"
    );
    ws.send(Message::text("still here")).await.unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap(), Message::text("still here"));
    assert_eq!(router.metric("upsplice_nats_endpoints "), 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_are_counted_and_dropped_and_the_next_good_one_works() {
    if !have("nats-server") {
        return;
    }
    let nats = NatsServer::start(free_port());
    let mut client = NatsClient::connect(nats.port);
    let router = Router::start_config(&config(&nats.url(), "", "127.0.0.1:9".parse().unwrap()));
    let one = http_backend("one").await;
    for (bad, reason) in [
        ("{not json", "invalid_json"),
        (r#"{"port":8080,"uris":["bad.test"]}"#, "missing_host"),
        (r#"{"host":"127.0.0.1","port":70000,"uris":["bad.test"]}"#, "invalid_port"),
        (r#"{"host":"127.0.0.1","port":"8080","uris":["bad.test"]}"#, "invalid_json"),
        (r#"{"host":"127.0.0.1","port":8080}"#, "missing_uris"),
        (r#"{"host":"127.0.0.1","port":8080,"uris":["good.test","bad host"]}"#, "invalid_uri"),
    ] {
        client.publish("router.register", bad);
        wait_metric(&router, &format!("upsplice_nats_bad_messages_total{{reason=\"{reason}\"}}"), 1.0);
    }
    client.publish("router.register", r#"{"host":"127.0.0.1","port":8080,"tls_port":8443,"uris":["tls.test"]}"#);
    wait_metric(&router, "upsplice_nats_endpoints_skipped_total{reason=\"no_backend_tls_ca\"}", 1.0);
    client.publish("router.register", &register(one, "good.test"));
    wait_status(&router, "good.test", 200, Duration::from_secs(1)).await;
    assert_eq!(router.metric("upsplice_nats_bad_messages_total{reason=\"invalid_json\"}"), 2.0);
    assert_eq!(get(&router, "bad.test").await.0, 404, "no partial route");
    assert_eq!(get(&router, "tls.test").await.0, 404, "a tls_port endpoint without [backend_tls] ca is skipped");
    assert!(router.is_running());

    // A route service is stored, and refused as the file's are (not built yet).
    let rs = r#"{"host":"127.0.0.1","port":1,"uris":["rs.test"],"route_service_url":"https://rs.example.com"}"#;
    client.publish("router.register", rs);
    let took = wait_status(&router, "rs.test", 502, Duration::from_secs(1)).await;
    assert!(took < Duration::from_secs(1));
    let (_, routes) = router.admin_get("/routes").unwrap();
    let routes: serde_json::Value = serde_json::from_str(&routes).unwrap();
    assert_eq!(routes["rs.test"][0]["route_service_url"], "https://rs.example.com");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_port_endpoint_is_dialled_with_backend_tls_and_its_san() {
    if !have("nats-server") {
        return;
    }
    let pki = Pki::new();
    let ca = pki.ca("ca");
    pki.leaf(&ca, "app", "c1a2-instance.internal", false);
    let backend = TlsBackend::start(&pki, "app", None, false);
    let nats = NatsServer::start(free_port());
    let mut client = NatsClient::connect(nats.port);
    let backend_tls = format!("[backend_tls]\nca = {:?}\n", pki.path("ca.pem"));
    let router = Router::start_config(&config(&nats.url(), &backend_tls, "127.0.0.1:9".parse().unwrap()));
    let registration = |uri: &str, san: &str| {
        format!(
            r#"{{"host":"127.0.0.1","port":1,"tls_port":{},"uris":["{uri}"],"server_cert_domain_san":"{san}"}}"#,
            backend.addr.port()
        )
    };
    client.publish("router.register", &registration("tls.test", "c1a2-instance.internal"));
    wait_status(&router, "tls.test", 200, Duration::from_secs(2)).await;
    assert!(get(&router, "tls.test").await.1.starts_with("hello over tls"));
    let (_, routes) = router.admin_get("/routes").unwrap();
    let routes: serde_json::Value = serde_json::from_str(&routes).unwrap();
    assert_eq!(routes["tls.test"][0]["tls"], true);
    // Another instance's name on the same certificate: verified, refused.
    client.publish("router.register", &registration("other.test", "other-instance.internal"));
    wait_status(&router, "other.test", 503, Duration::from_secs(2)).await;
    // No name to verify: not taken, counted.
    client.publish("router.register", &registration("nameless.test", ""));
    wait_metric(&router, "upsplice_nats_endpoints_skipped_total{reason=\"no_server_cert_domain_san\"}", 1.0);
    assert_eq!(get(&router, "nameless.test").await.0, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_not_registered_again_is_pruned() {
    if !have("nats-server") {
        return;
    }
    let nats = NatsServer::start(free_port());
    let mut client = NatsClient::connect(nats.port);
    let nats_keys = "droplet_stale_threshold = \"1s\"\nprune_stale_droplets_interval = \"200ms\"";
    let router = Router::start_config(&config(&nats.url(), nats_keys, "127.0.0.1:9".parse().unwrap()));
    let one = http_backend("one").await;
    client.publish("router.register", &register(one, "stale.test"));
    client.publish("router.register", &register(one, "fresh.test"));
    wait_status(&router, "stale.test", 200, Duration::from_secs(1)).await;
    // fresh.test is re-registered (as route emitters do); stale.test is not.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(2500) {
        client.publish("router.register", &register(one, "fresh.test"));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(get(&router, "stale.test").await.0, 404);
    assert_eq!(get(&router, "fresh.test").await.0, 200);
    assert!(router.metric("upsplice_nats_pruned_total ") >= 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suspend_pruning_keeps_the_table_while_nats_is_unreachable() {
    if !have("nats-server") {
        return;
    }
    let port = free_port();
    let nats = NatsServer::start(port);
    let mut client = NatsClient::connect(port);
    let nats_keys = "droplet_stale_threshold = \"1s\"\nprune_stale_droplets_interval = \"200ms\"\n\
                     suspend_pruning_if_nats_unavailable = true";
    let router = Router::start_config(&config(&nats.url(), nats_keys, "127.0.0.1:9".parse().unwrap()));
    let one = http_backend("one").await;
    client.publish("router.register", &register(one, "app.test"));
    wait_status(&router, "app.test", 200, Duration::from_secs(1)).await;
    drop(client);
    drop(nats);
    wait_metric_until(&router, "upsplice_nats_connected ", |v| v == 0.0);
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert_eq!(get(&router, "app.test").await.0, 200, "not pruned while NATS is unreachable");
    assert_eq!(router.metric("upsplice_nats_pruned_total "), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_nats_restart_the_router_reconnects_says_start_and_keeps_its_table() {
    if !have("nats-server") {
        return;
    }
    let port = free_port();
    let nats = NatsServer::start(port);
    let mut client = NatsClient::connect(port);
    let router = Router::start_config(&config(&nats.url(), "", "127.0.0.1:9".parse().unwrap()));
    let one = http_backend("one").await;
    client.publish("router.register", &register(one, "app.test"));
    wait_status(&router, "app.test", 200, Duration::from_secs(1)).await;

    drop(client);
    drop(nats);
    wait_metric_until(&router, "upsplice_nats_connected ", |v| v == 0.0);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(get(&router, "app.test").await.0, 200, "the table stays while NATS is gone");

    let _nats = NatsServer::start(port);
    let mut client = NatsClient::connect(port);
    client.subscribe("router.start");
    let start = client.next_on("router.start", Duration::from_secs(10));
    assert!(start.is_some(), "no router.start after the reconnect:\n{}", router.log());
    assert_eq!(router.metric("upsplice_nats_reconnects_total "), 1.0);
    assert_eq!(router.metric("upsplice_nats_connected "), 1.0);
    assert_eq!(get(&router, "app.test").await.0, 200);
    // The subscription is back too.
    let two = http_backend("two").await;
    client.publish("router.register", &register(two, "two.test"));
    wait_status(&router, "two.test", 200, Duration::from_secs(1)).await;
}

#[test]
fn healthz_waits_for_router_start_and_the_delay() {
    if !have("nats-server") {
        return;
    }
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let router = Router::spawn_config(&config(&url, "", "127.0.0.1:9".parse().unwrap()));
    std::thread::sleep(Duration::from_millis(1500));
    let (status, body) = router.admin_get("/healthz").unwrap();
    assert_eq!(status, 503, "no NATS yet: {body}");
    assert!(body.contains("NATS"), "{body}");
    let _nats = NatsServer::start(port);
    let up = Instant::now();
    let deadline = up + Duration::from_secs(15);
    while router.admin_get("/healthz").unwrap().0 != 200 {
        assert!(Instant::now() < deadline, "healthz never 200:\n{}", router.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(up.elapsed() >= Duration::from_secs(1), "200 before start_response_delay_interval");
}

/// An HTTP backend that answers every request with `name`, a newline and
/// the request head it received.
async fn head_echo_backend(name: &'static str) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let (head, _) = common::read_head(&mut s).await;
                let body = format!("{name}\n{head}");
                let answer =
                    format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    addr
}

/// A backend that reads each request head and closes without an answer
/// (the router retries on the next endpoint); counts its connections.
async fn closing_backend() -> (SocketAddr, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let reached = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = reached.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            tokio::spawn(async move {
                let _ = common::read_head(&mut s).await;
            });
        }
    });
    (addr, reached)
}

fn register_instance(addr: SocketAddr, uri: &str, id: &str, index: &str) -> String {
    format!(
        r#"{{"host":"{}","port":{},"uris":["{uri}"],"app":"app-guid","private_instance_id":"{id}","private_instance_index":"{index}"}}"#,
        addr.ip(),
        addr.port()
    )
}

/// The value of header `name` in `head` (case-insensitive), if sent.
fn header_of<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| l.split_once(": ").filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_request_names_the_app_instance_that_served_it() {
    if !have("nats-server") {
        return;
    }
    let nats = NatsServer::start(free_port());
    let mut client = NatsClient::connect(nats.port);
    let dir = tempfile::tempdir().unwrap();
    let file_backend = head_echo_backend("file").await;
    // Two routers on the same NATS: one logs gorouter's line, one JSON.
    let logs = [("gorouter", dir.path().join("access.log")), ("json", dir.path().join("access.json"))];
    let routers: Vec<Router> = logs
        .iter()
        .map(|(format, path)| {
            let log = format!("[access_log]\npath = \"{}\"\nformat = \"{format}\"\n", path.display());
            Router::start_config(&config(&nats.url(), &log, file_backend))
        })
        .collect();

    let a = head_echo_backend("a").await;
    let b = head_echo_backend("b").await;
    let (dead, reached_dead) = closing_backend().await;
    client.publish("router.register", &register_instance(a, "app.test", "inst-a", "0"));
    client.publish("router.register", &register_instance(b, "app.test", "inst-b", "1"));
    client.publish("router.register", &register_instance(dead, "app.test", "inst-dead", "2"));
    let spoofed = "X-CF-ApplicationID: spoofed\r\nX-CF-InstanceID: spoofed\r\nX-CF-InstanceIndex: 9\r\n";
    for router in &routers {
        wait_metric(router, "upsplice_nats_endpoints ", 3.0);
        let dead_before = reached_dead.load(std::sync::atomic::Ordering::Relaxed);
        let mut served = Vec::new();
        // Round robin over three endpoints: the closing one is tried once
        // (then backed off), and that request goes on to the next endpoint.
        for _ in 0..6 {
            let req = format!("GET / HTTP/1.1\r\nHost: app.test\r\n{spoofed}Connection: close\r\n\r\n");
            let resp = raw_exchange(router.http, req.as_bytes()).await;
            let (head, body) = resp.split_once("\r\n\r\n").unwrap();
            assert!(head.starts_with("HTTP/1.1 200"), "{resp}\n{}", router.log());
            let (name, got) = body.split_once('\n').unwrap();
            let (id, index) = match name {
                "a" => ("inst-a", "0"),
                "b" => ("inst-b", "1"),
                other => panic!("served by {other}"),
            };
            assert_eq!(header_of(got, "X-CF-ApplicationID"), Some("app-guid"), "{got}");
            assert_eq!(header_of(got, "X-CF-InstanceID"), Some(id), "{got}");
            assert_eq!(header_of(got, "X-CF-InstanceIndex"), Some(index), "{got}");
            assert_eq!(got.matches("X-CF-").count(), 3, "one of each, none of the client's: {got}");
            assert!(!got.contains("spoofed") && !got.contains("inst-dead"), "{got}");
            served.push(name.to_string());
        }
        assert!(served.iter().any(|n| n == "a") && served.iter().any(|n| n == "b"), "{served:?}");
        let dead_after = reached_dead.load(std::sync::atomic::Ordering::Relaxed);
        assert!(dead_after > dead_before, "a request was retried from the closing endpoint");

        // A route from the file: no app instance, and none of the client's.
        let req = format!("GET / HTTP/1.1\r\nHost: file.test\r\n{spoofed}Connection: close\r\n\r\n");
        let resp = raw_exchange(router.http, req.as_bytes()).await;
        let got = resp.split_once("\r\n\r\nfile\n").map(|(_, h)| h).unwrap_or_else(|| panic!("{resp}"));
        assert!(!got.to_ascii_lowercase().contains("x-cf-"), "{got}");
    }

    // The access log names the instance of each request's endpoint. A
    // record is written as its connection ends, after the client saw the
    // answer: two back-to-back requests' records may come in either order.
    let text = common::wait_lines(&logs[0].1, 7);
    let (file, app): (Vec<&String>, Vec<&String>) = text.iter().partition(|l| l.starts_with("file.test "));
    assert_eq!((file.len(), app.len()), (1, 6), "{text:#?}");
    for line in app {
        let backend_is = |addr: SocketAddr| line.contains(&format!(" {addr} x_forwarded_for:"));
        let app = if backend_is(a) { "0" } else { "1" };
        assert!(backend_is(a) || backend_is(b), "{line}");
        assert!(line.contains(&format!(" app_id:app-guid app_index:{app} x_cf_routererror:-")), "{line}");
    }
    assert!(file[0].contains(" app_id:- app_index:- "), "{}", file[0]);
    let json: Vec<serde_json::Value> =
        common::wait_lines(&logs[1].1, 7).iter().map(|line| serde_json::from_str(line).unwrap()).collect();
    let (file, app): (Vec<&serde_json::Value>, Vec<&serde_json::Value>) =
        json.iter().partition(|v| v["host"] == "file.test");
    assert_eq!((file.len(), app.len()), (1, 6), "{json:#?}");
    for v in app {
        let (id, index) = if v["backend"] == a.to_string() { ("inst-a", "0") } else { ("inst-b", "1") };
        assert_eq!(
            (v["app_id"].as_str(), v["app_index"].as_str(), v["instance_id"].as_str()),
            (Some("app-guid"), Some(index), Some(id)),
            "{v}"
        );
    }
    let v = file[0];
    assert_eq!(
        (&v["app_id"], &v["app_index"], &v["instance_id"]),
        (&serde_json::Value::Null, &serde_json::Value::Null, &serde_json::Value::Null),
        "{v}"
    );
}

/// gorouter's `X-CF-APP-INSTANCE: APP_GUID:APP_INDEX`: every request goes
/// to that instance of the route's app, whatever the balancer's turn; an
/// instance the route does not have, or a value that is not
/// `APP_GUID:APP_INDEX`, gets gorouter's 400 and its `X-Cf-Routererror`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_cf_app_instance_routes_to_that_instance_or_answers_400() {
    if !have("nats-server") {
        return;
    }
    let nats = NatsServer::start(free_port());
    let mut client = NatsClient::connect(nats.port);
    let file_backend = head_echo_backend("file").await;
    let router = Router::start_config(&config(&nats.url(), "", file_backend));
    let a = head_echo_backend("a").await;
    let b = head_echo_backend("b").await;
    client.publish("router.register", &register_instance(a, "app.test", "inst-a", "0"));
    client.publish("router.register", &register_instance(b, "app.test", "inst-b", "1"));
    wait_metric(&router, "upsplice_nats_endpoints ", 2.0);
    let ask = |value: &str| {
        format!("GET / HTTP/1.1\r\nHost: app.test\r\nX-CF-APP-INSTANCE: {value}\r\nConnection: close\r\n\r\n")
    };

    for (value, name) in [("app-guid:1", "b"), ("app-guid:0", "a")] {
        for _ in 0..4 {
            let resp = raw_exchange(router.http, ask(value).as_bytes()).await;
            let (head, body) = resp.split_once("\r\n\r\n").unwrap();
            assert!(head.starts_with("HTTP/1.1 200"), "{resp}\n{}", router.log());
            assert_eq!(body.split_once('\n').unwrap().0, name, "{value}: {resp}");
        }
    }

    let resp = raw_exchange(router.http, ask("app-guid:7").as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 400 "), "{resp}");
    assert_eq!(header_of(&resp, "X-Cf-Routererror"), Some("unknown_route"), "{resp}");
    assert!(
        resp.contains("Requested instance ('7') with guid ('app-guid') does not exist for route ('app.test')"),
        "{resp}"
    );
    let resp = raw_exchange(router.http, ask("other-app:0").as_bytes()).await;
    assert_eq!(header_of(&resp, "X-Cf-Routererror"), Some("unknown_route"), "another app's instance: {resp}");

    for bad in ["app-guid", "app-guid:", ":1", "app-guid:1:2"] {
        let resp = raw_exchange(router.http, ask(bad).as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 400 "), "{bad:?}: {resp}");
        assert_eq!(header_of(&resp, "X-Cf-Routererror"), Some("invalid_cf_app_instance_header"), "{bad:?}: {resp}");
        assert!(resp.ends_with("400 Bad Request: Invalid X-CF-App-Instance Header\n"), "{bad:?}: {resp}");
    }

    // An empty value is no value (gorouter's `Header.Get` == ""): balanced.
    let resp = raw_exchange(router.http, ask("").as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    // A route from the file has no instances.
    let req = "GET / HTTP/1.1\r\nHost: file.test\r\nX-CF-APP-INSTANCE: app-guid:0\r\nConnection: close\r\n\r\n";
    let resp = raw_exchange(router.http, req.as_bytes()).await;
    assert_eq!(header_of(&resp, "X-Cf-Routererror"), Some("unknown_route"), "{resp}");
}
