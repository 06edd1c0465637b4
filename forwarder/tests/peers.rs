//! The deployment the product was started for: a load balancer in front of
//! upsplice that passes WebSocket upgrades through (HAProxy in `mode http`
//! and nginx with upgrade headers) or forwards a port in TCP mode (HAProxy
//! `mode tcp`, the 443/8443 setup). The load balancer's address is in the
//! listener's trusted_cidrs, so its X-Forwarded-For is extended, not replaced.
//!
//! scripts/setup installs haproxy and nginx; with UPSPLICE_REQUIRE_PEERS=1
//! (CI) a missing one fails the test instead of skipping it.

#![allow(clippy::result_large_err)] // tungstenite's types, not ours

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::peer::{have, Peer};
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

fn haproxy(mode: &str, upsplice: SocketAddr) -> (Peer, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let forwardfor = if mode == "http" { "option forwardfor" } else { "" };
    // HAProxy's default (safe) gives each client's first request a
    // connection of its own; always shares idle ones across clients.
    let reuse = if mode == "http" { "http-reuse always" } else { "" };
    let cfg = format!(
        "global\n  maxconn 2000\ndefaults\n  mode {mode}\n  timeout connect 2s\n  timeout client 30s\n  timeout server 30s\n  timeout tunnel 1h\n\
         frontend fe\n  bind 127.0.0.1:{port}\n  {forwardfor}\n  default_backend be\n\
         backend be\n  {reuse}\n  server upsplice {upsplice} source 127.0.0.2\n"
    );
    let addr = ([127, 0, 0, 1], port).into();
    (Peer::haproxy(dir, &cfg, addr), addr)
}

fn nginx(upsplice: SocketAddr) -> (Peer, SocketAddr) {
    nginx_in_front(upsplice, false)
}

/// nginx in front of upsplice, connecting from 127.0.0.2 and extending
/// X-Forwarded-For. `pooled`: plain requests over an upstream `keepalive`
/// pool; else each connection passed through with its upgrade headers.
fn nginx_in_front(upsplice: SocketAddr, pooled: bool) -> (Peer, SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let d = dir.path().display();
    let (upstream, target, connection) = if pooled {
        (format!(" upstream up {{\n  server {upsplice};\n  keepalive 8;\n }}\n"), "up".to_string(), "\"\"")
    } else {
        (
            String::new(),
            upsplice.to_string(),
            "\"upgrade\";\n   proxy_set_header Upgrade $http_upgrade;\n   proxy_read_timeout 1h",
        )
    };
    let cfg = format!(
        "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\nevents {{}}\n\
         http {{\n access_log off;\n client_body_temp_path {d}/b;\n proxy_temp_path {d}/p;\n fastcgi_temp_path {d}/f;\n uwsgi_temp_path {d}/u;\n scgi_temp_path {d}/s;\n\
         {upstream}\
          server {{\n  listen 127.0.0.1:{port};\n  location / {{\n   proxy_pass http://{target};\n   proxy_bind 127.0.0.2;\n   proxy_http_version 1.1;\n\
           proxy_set_header Connection {connection};\n   proxy_set_header Host $host;\n\
           proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n  }}\n }}\n}}\n"
    );
    let addr = ([127, 0, 0, 1], port).into();
    (Peer::nginx(dir, &cfg, addr), addr)
}

/// WebSocket echo through `front` → upsplice → echo backend; returns the
/// X-Forwarded-For the backend saw.
async fn echo_through(
    front: SocketAddr,
    heads: &mut tokio::sync::mpsc::UnboundedReceiver<Vec<(String, String)>>,
) -> String {
    let mut req =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{front}/lb"))
            .unwrap();
    req.headers_mut().insert("Host", "app.test".parse().unwrap());
    let (mut ws, resp) =
        tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::connect_async(req)).await.unwrap().unwrap();
    assert_eq!(resp.status(), 101);
    for i in 0..20 {
        let m = Message::binary(pattern(i, 1000 + i as usize * 3000));
        ws.send(m.clone()).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), m);
    }
    ws.close(None).await.unwrap();
    let headers = heads.recv().await.unwrap();
    headers.iter().find(|(k, _)| k.eq_ignore_ascii_case("x-forwarded-for")).map(|(_, v)| v.clone()).unwrap_or_default()
}

async fn upsplice(mode: &str) -> (Router, tokio::sync::mpsc::UnboundedReceiver<Vec<(String, String)>>) {
    let (backend, heads) = ws_echo_backend().await;
    (Router::start(Setup { mode, limits: "", routing: main_pool(&[backend], "app.test"), extra: "" }), heads)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_haproxy_mode_http() {
    if !have("haproxy") {
        return;
    }
    let (router, mut heads) = upsplice("splice").await;
    let (_lb, front) = haproxy("http", router.http);
    // HAProxy (trusted, connecting from 127.0.0.2) says the client is
    // 127.0.0.1; upsplice appends HAProxy's address.
    assert_eq!(echo_through(front, &mut heads).await, "127.0.0.1, 127.0.0.2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_haproxy_mode_tcp() {
    if !have("haproxy") {
        return;
    }
    let (router, mut heads) = upsplice("copy").await;
    let (_lb, front) = haproxy("tcp", router.http);
    // In TCP mode nobody adds a header: the peer upsplice sees is the LB.
    assert_eq!(echo_through(front, &mut heads).await, "127.0.0.2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_nginx() {
    if !have("nginx") {
        return;
    }
    let (router, mut heads) = upsplice("splice").await;
    let (_lb, front) = nginx(router.http);
    assert_eq!(echo_through(front, &mut heads).await, "127.0.0.1, 127.0.0.2");
}

/// Load balancers pool their connections to the router (HAProxy's
/// `http-reuse`, nginx's upstream `keepalive`): upsplice keeps them, and
/// routes and rewrites every request that arrives on them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_balancers_pool_plain_requests_to_upsplice() {
    for lb in ["haproxy", "nginx"] {
        if !have(lb) {
            continue;
        }
        let app = common::recorder::Recorder::start("app").await;
        let router =
            Router::start(Setup { mode: "copy", limits: "", routing: main_pool(&[app.addr], "app.test"), extra: "" });
        let (_lb, front) =
            if lb == "haproxy" { haproxy("http", router.http) } else { nginx_in_front(router.http, true) };
        for i in 0..30 {
            // A new client connection to the load balancer each time.
            let request = format!("GET /n{i} HTTP/1.1\r\nHost: app.test\r\nConnection: close\r\n\r\n");
            let answer = raw_exchange(front, request.as_bytes()).await;
            assert!(answer.starts_with("HTTP/1.1 200 ") && answer.ends_with("app"), "{lb}: {answer}");
        }
        let accepted = router.metric("upsplice_connections_accepted_total{listener=\"web\"}");
        assert!(accepted <= 4.0, "{lb}: 30 requests took {accepted} connections to upsplice");
        let got = app.received();
        assert_eq!(got.matches("GET /n").count(), 30, "{lb}: {got}");
        // The LB (127.0.0.2, trusted) appended the client; upsplice appended the LB.
        assert_eq!(got.matches("\r\nX-Forwarded-For: 127.0.0.1, 127.0.0.2\r\n").count(), 30, "{lb}: {got}");
    }
}
