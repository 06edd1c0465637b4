//! Interoperability with a WebSocket implementation outside Rust: Python's
//! `websockets` as the client through the router, and as the backend behind
//! it. scripts/test installs it; set UPSPLICE_REQUIRE_PEERS=1 (CI does) to
//! make a missing peer a failure instead of a skip.

#![allow(clippy::result_large_err)] // tungstenite's types, not ours

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::peer::python_websockets;
use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

const PY_CLIENT: &str = r#"
import asyncio, sys, websockets
async def main(url):
    async with websockets.connect(url, max_size=None) as ws:
        for i in range(20):
            msg = "py message %d " % i + "y" * (i * 500)
            await ws.send(msg)
            assert await ws.recv() == msg
        blob = bytes(range(256)) * 4096
        await ws.send(blob)
        assert await ws.recv() == blob
    print("python client ok")
asyncio.run(main(sys.argv[1]))
"#;

const PY_SERVER: &str = r#"
import asyncio, sys, websockets
async def echo(ws):
    assert ws.request.headers["X-Forwarded-Proto"] == "https"
    async for msg in ws:
        await ws.send(msg)
async def main(port):
    async with websockets.serve(echo, "127.0.0.1", int(port), max_size=None):
        print("ready", flush=True)
        await asyncio.sleep(60)
asyncio.run(main(sys.argv[1]))
"#;

async fn rust_echo_backend() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(s).await else {
                    return;
                };
                while let Some(Ok(msg)) = ws.next().await {
                    if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_client_through_the_router() {
    if !python_websockets() {
        return;
    }
    let backend = rust_echo_backend().await;
    let router =
        Router::start(Setup { mode: "splice", limits: "", routing: main_pool(&[backend], "127.0.0.1"), extra: "" });
    let url = format!("ws://{}/py", router.http);
    let out =
        tokio::task::spawn_blocking(move || Command::new("python3").args(["-c", PY_CLIENT, &url]).output().unwrap())
            .await
            .unwrap();
    assert!(out.status.success(), "python client failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("python client ok"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_server_behind_the_router() {
    if !python_websockets() {
        return;
    }
    let port = free_port();
    let mut server =
        Command::new("python3").args(["-c", PY_SERVER, &port.to_string()]).stdout(Stdio::piped()).spawn().unwrap();
    let mut stdout = std::io::BufReader::new(server.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    assert_eq!(line.trim(), "ready");
    let router = Router::start(Setup {
        mode: "copy",
        limits: "",
        routing: main_pool(&[([127, 0, 0, 1], port).into()], "app.test"),
        extra: "",
    });
    let mut req = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(format!(
        "ws://{}/",
        router.http
    ))
    .unwrap();
    req.headers_mut().insert("Host", "app.test".parse().unwrap());
    let (mut ws, _) =
        tokio::time::timeout(Duration::from_secs(10), tokio_tungstenite::connect_async(req)).await.unwrap().unwrap();
    for i in 0..20 {
        let msg = Message::text(format!("to python {i}"));
        ws.send(msg.clone()).await.unwrap();
        assert_eq!(ws.next().await.unwrap().unwrap(), msg);
    }
    ws.close(None).await.unwrap();
    let _ = server.kill();
    let _ = server.wait();
}
