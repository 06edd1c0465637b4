//! The access log as an operator ships it: `[access_log] path` and
//! `format` (gorouter's line, JSON), every field filled from a real
//! exchange through the router, and the file reopened on SIGHUP.

mod common;

use std::path::Path;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

fn router_logging_to(path: &Path, format: &str, backend: &RawBackend) -> Router {
    let extra = format!("[access_log]\npath = \"{}\"\nformat = \"{format}\"\n", path.display());
    Router::start(Setup {
        mode: "copy",
        limits: "handshake_timeout = \"2s\"",
        routing: main_pool(&[backend.addr], "app.test"),
        extra: &extra,
    })
}

/// One plain request (the client asks to close after it): answers 200 from
/// the backend, returns the head the backend received.
async fn plain_request(router: &Router, backend: &mut RawBackend, extra_headers: &str) -> String {
    let mut client = TcpStream::connect(router.http).await.unwrap();
    let req = format!(
        "GET /chat?room=1 HTTP/1.1\r\nHost: app.test\r\nUser-Agent: probe/1.0\r\nReferer: http://r.test/\r\nConnection: close\r\n{extra_headers}\r\n"
    );
    client.write_all(req.as_bytes()).await.unwrap();
    let mut server = backend.accept().await;
    let (head, _) = read_head(&mut server).await;
    server.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await.unwrap();
    drop(server);
    read_to_end(&mut client).await;
    head
}

fn header<'a>(head: &'a str, name: &str) -> &'a str {
    head.lines()
        .find_map(|l| l.split_once(": ").filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v))
        .unwrap_or_else(|| panic!("no {name} in {head}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gorouter_format_parses_as_gorouter_writes_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let mut backend = RawBackend::start().await;
    let router = router_logging_to(&path, "gorouter", &backend);
    let head = plain_request(&router, &mut backend, "X-Forwarded-For: 6.6.6.6\r\n").await;
    let id = header(&head, "X-Vcap-Request-Id");
    assert_eq!(id.len(), 36, "a UUID: {id}");
    let line = &wait_lines(&path, 1)[0];
    let start = line.find("] ").unwrap();
    assert!(line.starts_with("app.test - [20"), "{line}");
    let rest = &line[start + 2..];
    let expected = format!(
        "\"GET /chat?room=1 HTTP/1.1\" 200 {} {} \"http://r.test/\" \"probe/1.0\" 127.0.0.1:",
        head.len(),
        "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok".len()
    );
    assert!(rest.starts_with(&expected), "expected {expected:?} at the start of {rest:?}");
    assert!(
        rest.contains(&format!(" {} x_forwarded_for:\"127.0.0.1\" x_forwarded_proto:\"https\" ", backend.addr)),
        "{rest}"
    );
    assert!(rest.contains(&format!(" vcap_request_id:{id} response_time:")), "{rest}");
    assert!(rest.ends_with(" app_id:- app_index:- x_cf_routererror:-"), "{rest}");

    // The router's own answer carries its X-Cf-Routererror.
    raw_exchange(router.http, b"GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n").await;
    let line = &wait_lines(&path, 2)[1];
    assert!(line.starts_with("nowhere.test - [") && line.contains("\"GET / HTTP/1.1\" 404 "), "{line}");
    assert!(line.ends_with(" x_cf_routererror:unknown_route"), "{line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_format_and_reopen_on_sighup() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.json");
    let mut backend = RawBackend::start().await;
    let router = router_logging_to(&path, "json", &backend);

    // A tunnel: its line comes when it ends, with the upgrade's timings.
    let (client, server, _, _) = raw_tunnel(&router, &mut backend, "app.test", b"", b"").await;
    drop((client, server));
    let v: serde_json::Value = serde_json::from_str(&wait_lines(&path, 1)[0]).unwrap();
    assert_eq!(v["status"], 101);
    assert_eq!(v["data_plane"], "copy");
    assert_eq!(v["listener"], "web");
    assert_eq!(v["host"], "app.test");
    assert!(v["upgrade_ms"].as_f64().unwrap() >= v["first_byte_ms"].as_f64().unwrap(), "{v}");
    assert!(v["duration_ms"].as_f64().unwrap() >= v["upgrade_ms"].as_f64().unwrap(), "{v}");
    assert_eq!(v["request_id"].as_str().unwrap().len(), 36, "{v}");

    // logrotate: move the file away, SIGHUP, and the next line goes to a
    // new file at the path.
    let rotated = dir.path().join("access.json.1");
    std::fs::rename(&path, &rotated).unwrap();
    router.signal(nix::sys::signal::Signal::SIGHUP);
    router.wait_log("access log: reopened");
    plain_request(&router, &mut backend, "").await;
    let v: serde_json::Value = serde_json::from_str(&wait_lines(&path, 1)[0]).unwrap();
    assert_eq!(
        (v["method"].as_str(), v["path"].as_str(), v["status"].as_u64()),
        (Some("GET"), Some("/chat?room=1"), Some(200))
    );
    assert_eq!(v["user_agent"], "probe/1.0");
    assert_eq!(wait_lines(&rotated, 1).len(), 1, "the rotated file keeps its line");
}
