//! Tunnels through a plane's library API: loopback socket pairs, a
//! `Tunnel` between the two router-side ends, and bulk bytes pushed
//! through it.

use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use upsplice::dataplane::{Outcome, Rejected, Tunnel};

use crate::cpu::{Start, Usage};

/// A connected loopback pair: (the far end the benchmark drives, the end a
/// tunnel holds).
pub async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    let (far, near) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (far.expect("connect"), near.expect("accept").0)
}

/// The far ends of a tunnel, and the tunnel between them.
pub struct Ends {
    pub client: TcpStream,
    pub backend: TcpStream,
    pub tunnel: Tunnel,
}

/// A tunnel with no leftovers and an idle timeout longer than any run.
pub async fn tunnel() -> Ends {
    let (client, router_client) = pair().await;
    let (backend, router_backend) = pair().await;
    let tunnel = Tunnel {
        client: router_client,
        backend: router_backend,
        to_backend: Bytes::new(),
        to_client: Bytes::new(),
        idle_timeout: Duration::from_secs(3600),
        drain: CancellationToken::new(),
        promote: None,
    };
    Ends { client, backend, tunnel }
}

/// The outcome of `plane`'s relay, which is not expected to hand the
/// tunnel back.
pub fn relayed(plane: &str, result: Result<Outcome, Rejected>) -> Outcome {
    match result {
        Ok(outcome) => outcome,
        Err(rejected) => panic!("{plane} refused the tunnel: {}", rejected.reason),
    }
}

/// Pushes `total` bytes from `w` to `r` (256 KiB writes and reads), then
/// FIN; returns the time and CPU it took once `r` saw the last byte.
pub async fn push(mut w: TcpStream, mut r: TcpStream, total: usize) -> Usage {
    let start = Start::now();
    let writer = tokio::spawn(async move {
        let buf = vec![0x5au8; 256 * 1024];
        let mut left = total;
        while left > 0 {
            let n = left.min(buf.len());
            w.write_all(&buf[..n]).await.expect("write");
            left -= n;
        }
        w.shutdown().await.expect("FIN");
        w
    });
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0;
    loop {
        let n = r.read(&mut buf).await.expect("read");
        if n == 0 {
            break;
        }
        got += n;
    }
    assert_eq!(got, total, "bytes lost on the way");
    let usage = start.usage();
    drop(writer.await.expect("writer"));
    usage
}
