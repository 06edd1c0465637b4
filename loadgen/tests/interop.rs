//! Interoperability with a third-party WebSocket implementation: Python's
//! `websockets` as the server for our client, and as the client of our echo
//! server.

mod common;
use common::{run, tmpdir, Server};
use std::process::Command;

const PY_SERVER: &str = r#"
import asyncio
import websockets

async def echo(ws):
    async for m in ws:
        await ws.send(m)

async def main():
    async with websockets.serve(echo, "127.0.0.1", 0, ping_interval=None) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"listening on 127.0.0.1:{port}", flush=True)
        await asyncio.Future()

asyncio.run(main())
"#;

const PY_CLIENT: &str = r#"
import asyncio, sys
import websockets

async def main(addr):
    hdrs = {"X-Forwarded-For": "203.0.113.9"}
    async with websockets.connect(f"ws://{addr}/some/path", additional_headers=hdrs) as ws:
        await ws.send("hello text")
        assert await ws.recv() == "hello text"
        blob = bytes(range(256)) * 300  # 76800 bytes: 64-bit length encoding
        await ws.send(blob)
        assert await ws.recv() == blob
        pong = await ws.ping(b"are you there")
        await asyncio.wait_for(pong, 5)
        await ws.close(code=1000, reason="done")
        assert ws.close_code == 1000, ws.close_code
    print("python client ok")

asyncio.run(main(sys.argv[1]))
"#;

/// True when `python3 -c "import websockets"` works; otherwise says so loudly.
fn have_python_websockets() -> bool {
    let ok = Command::new("python3").args(["-c", "import websockets"]).status().is_ok_and(|s| s.success());
    if !ok {
        // Written to the stderr handle, not with eprintln!, so the test
        // harness does not capture it: a skip must be seen.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\
             SKIPPING interop test: python3 cannot import `websockets`\n\
             (pip install websockets; CI installs it)\n\
             !!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n"
        );
    }
    ok
}

#[test]
fn our_client_against_python_websockets_server() {
    if !have_python_websockets() {
        return;
    }
    let mut cmd = Command::new("python3");
    cmd.args(["-c", PY_SERVER]);
    let server = Server::start(cmd);
    let dir = tmpdir();
    let r = run(
        &[
            "ws",
            "--target",
            &server.addr,
            "--host",
            "example.test",
            "--path",
            "/chat",
            "-c",
            "4",
            "-r",
            "400",
            "-d",
            "2s",
            "-w",
            "500ms",
            "--size",
            "200",
        ],
        dir.path(),
        "py",
    );
    let s = &r.summary;
    assert!(r.output.status.success(), "{}\n{}", r.stdout, r.stderr);
    assert_eq!(s.connections_ok, 4, "{}", r.stdout);
    assert_eq!(s.total_errors, 0, "{}", r.stdout);
    assert!(s.received >= 780 && s.received == s.sent, "{}", r.stdout);
    assert_eq!(s.latency_us.upgrade.count, 4);
}

#[test]
fn python_websockets_client_against_our_echo() {
    if !have_python_websockets() {
        return;
    }
    let echo = Server::echo(&[]);
    let out = Command::new("python3").args(["-c", PY_CLIENT, &echo.addr]).output().expect("python3");
    assert!(
        out.status.success(),
        "python client failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("python client ok"));
    // And the echo server shuts down cleanly on SIGTERM.
    let status = echo.terminate();
    assert!(status.success(), "echo exit status {status:?}");
}
