//! For tests that drive one data plane through its library API: loopback
//! socket pairs, a `Tunnel` between the router-side ends, and hashed
//! streams of [`pattern`] bytes.

use std::time::Duration;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use upsplice::dataplane::Tunnel;

use super::pattern;

/// A connected loopback pair: (the far end a test drives, the end a
/// tunnel holds).
pub async fn pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("local address");
    let (far, near) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (far.expect("connect"), near.expect("accept").0)
}

/// (client peer, backend peer, the tunnel between them): the tunnel's
/// leftovers are `to_backend` and `to_client`.
pub async fn setup(to_backend: &[u8], to_client: &[u8], idle_timeout: Duration) -> (TcpStream, TcpStream, Tunnel) {
    let (client_peer, client) = pair().await;
    let (backend_peer, backend) = pair().await;
    let tunnel = Tunnel {
        client,
        backend,
        to_backend: Bytes::copy_from_slice(to_backend),
        to_client: Bytes::copy_from_slice(to_client),
        idle_timeout,
        drain: CancellationToken::new(),
        promote: None,
    };
    (client_peer, backend_peer, tunnel)
}

/// The chunks [`send_stream`] writes: 256 KiB of `pattern(seed + i)` each.
const CHUNK: usize = 256 * 1024;

/// Writes `len` bytes of stream `seed`, then FIN; returns their hash.
pub async fn send_stream(mut s: impl AsyncWriteExt + Unpin, seed: u64, len: usize) -> [u8; 32] {
    let mut hash = Sha256::new();
    let mut sent = 0;
    let mut chunk_seed = seed;
    while sent < len {
        let chunk = pattern(chunk_seed, (len - sent).min(CHUNK));
        chunk_seed += 1;
        s.write_all(&chunk).await.expect("send");
        hash.update(&chunk);
        sent += chunk.len();
    }
    s.shutdown().await.expect("FIN");
    hash.finalize().into()
}

/// `prefix` followed by what `send_stream(seed, len)` sends.
pub fn stream_bytes(prefix: &[u8], seed: u64, len: usize) -> Vec<u8> {
    let mut out = prefix.to_vec();
    let mut chunk_seed = seed;
    while out.len() < prefix.len() + len {
        out.extend_from_slice(&pattern(chunk_seed, (prefix.len() + len - out.len()).min(CHUNK)));
        chunk_seed += 1;
    }
    out
}

/// Reads to EOF; returns (length, hash).
pub async fn recv_stream(mut s: impl AsyncReadExt + Unpin) -> (usize, [u8; 32]) {
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0;
    loop {
        let n = s.read(&mut buf).await.expect("recv");
        if n == 0 {
            return (total, hash.finalize().into());
        }
        hash.update(&buf[..n]);
        total += n;
    }
}
