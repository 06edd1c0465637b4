//! Many tunnels at once, each carrying 64-byte round trips to an echo
//! backend, through the copy plane (the baseline) and the uring plane in
//! the same run: messages per second as a ratio to copy, and this
//! process's CPU time per message.
//!
//! `cargo bench -p upsplice-benches --bench small_messages`
//!
//! * `UPSPLICE_BENCH_TUNNELS` (200): tunnels at once;
//! * `UPSPLICE_BENCH_TRIPS` (500): round trips per tunnel.

use std::sync::Arc;

use futures_util::future::join_all;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use upsplice::dataplane::copy::CopyPlane;
use upsplice::dataplane::uring::UringPlane;
use upsplice::dataplane::DataPlane;
use upsplice::dataplane::Settings;
use upsplice_benches::cpu::Start;
use upsplice_benches::setting;
use upsplice_benches::tunnel::{relayed, tunnel, Ends};

fn main() {
    let tunnels = setting("UPSPLICE_BENCH_TUNNELS", 200, 10);
    let trips = setting("UPSPLICE_BENCH_TRIPS", 500, 20);
    if let Err(why) = UringPlane::probe() {
        println!("SKIPPED: uring plane unavailable on this kernel: {}", upsplice::dataplane::error::chain(&why));
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(run(tunnels, trips));
}

async fn run(tunnels: usize, trips: usize) {
    let uring =
        Arc::new(UringPlane::start(&Settings { uring_workers: 2, ..Settings::default() }).expect("uring plane"));
    let copy = Arc::new(CopyPlane::new(&Settings::default()));
    println!("small messages: {tunnels} tunnels x {trips} round trips of 64 bytes");
    for round in 0..2 {
        let mut copy_rate = f64::NAN;
        for mode in ["copy", "uring"] {
            let mut relays = Vec::new();
            let mut clients = Vec::new();
            for _ in 0..tunnels {
                let Ends { client, mut backend, tunnel } = tunnel().await;
                let (u, c) = (uring.clone(), copy.clone());
                relays.push(tokio::spawn(async move {
                    if mode == "copy" {
                        relayed("copy", c.relay(tunnel).await)
                    } else {
                        relayed("uring", u.relay(tunnel).await)
                    }
                }));
                // Echo backend: bounded by the client's round trips.
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while backend.read_exact(&mut buf).await.is_ok() {
                        if backend.write_all(&buf).await.is_err() {
                            break;
                        }
                    }
                });
                clients.push(client);
            }
            let start = Start::now();
            let done = join_all(clients.into_iter().map(|mut c| {
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    for i in 0..trips {
                        buf[0] = i as u8;
                        c.write_all(&buf).await.unwrap();
                        c.read_exact(&mut buf).await.unwrap();
                        assert_eq!(buf[0], i as u8);
                    }
                    c
                })
            }))
            .await;
            let usage = start.usage();
            drop(done);
            for r in join_all(relays).await {
                r.unwrap();
            }
            let msgs = (tunnels * trips * 2) as f64;
            let rate = msgs / usage.secs;
            if mode == "copy" {
                copy_rate = rate;
            }
            println!(
                "round {round} {mode:>5}: {rate:8.0} messages/s relayed  ratio to copy {:.2}  {:5.2} µs CPU per message (process)",
                rate / copy_rate,
                usage.process_cpu / msgs * 1e6
            );
        }
    }
}
