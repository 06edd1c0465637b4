//! One bulk stream, one way, through each data plane and through a direct
//! loopback connection in the same run: throughput as a ratio to direct,
//! and CPU time per GiB (this process's, and the machine's).
//!
//! `cargo bench -p upsplice-benches --bench bulk`
//!
//! * `UPSPLICE_BENCH_MIB` (2048): bytes per run;
//! * `UPSPLICE_BENCH_ROUNDS` (3): runs per mode, the median is reported;
//! * `UPSPLICE_BENCH_MODES` (all): a comma-separated subset of `direct`,
//!   `copy`, `uring`, `uring-64k`, `uring-256k` (the uring plane with other
//!   buffer sizes), `uring-splice` (the io_uring splice prototype) and
//!   `sockmap`;
//! * `UPSPLICE_BENCH_LIMIT_MIB` (4): sockmap's queue limit. A tunnel that
//!   reaches it steps aside and goes on through the copy plane, as the
//!   dispatcher's chain would carry it; the report says how much of the
//!   stream sockmap carried itself.

use upsplice::dataplane::copy::CopyPlane;
use upsplice::dataplane::sockmap::SockmapPlane;
use upsplice::dataplane::uring::UringPlane;
use upsplice::dataplane::{DataPlane, Settings, Tunnel};
use upsplice_benches::cpu::Usage;
use upsplice_benches::tunnel::{pair, push, relayed, tunnel, Ends};
use upsplice_benches::{median, setting, splice_prototype, MIB};

const MODES: [&str; 7] = ["direct", "copy", "uring", "uring-64k", "uring-256k", "uring-splice", "sockmap"];

fn main() {
    let mib = setting("UPSPLICE_BENCH_MIB", 2048, 16);
    let rounds = setting("UPSPLICE_BENCH_ROUNDS", 3, 1);
    let limit_mib = setting("UPSPLICE_BENCH_LIMIT_MIB", 4, 4) as u64;
    let mut modes = MODES.to_vec();
    if let Ok(only) = std::env::var("UPSPLICE_BENCH_MODES") {
        let only: Vec<&str> = only.split(',').collect();
        modes.retain(|m| only.contains(m));
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(run(mib, rounds, limit_mib, modes));
}

/// The planes under test; None where this kernel or build cannot run one.
struct Planes {
    copy: CopyPlane,
    /// Default buffers, 64 KiB, 256 KiB.
    uring: Option<[UringPlane; 3]>,
    sockmap: Option<SockmapPlane>,
}

impl Planes {
    fn start(limit_mib: u64) -> Planes {
        let uring = match UringPlane::probe() {
            Ok(()) => {
                let with_buffer = |size: Option<u64>| {
                    let defaults = Settings::default();
                    let uring_buffer = size.unwrap_or(defaults.uring_buffer);
                    UringPlane::start(&Settings { uring_workers: 2, uring_buffer, ..defaults }).expect("uring plane")
                };
                Some([with_buffer(None), with_buffer(Some(64 << 10)), with_buffer(Some(256 << 10))])
            }
            Err(why) => {
                println!("SKIPPED uring modes: {}", upsplice::dataplane::error::chain(&why));
                None
            }
        };
        let sockmap = match SockmapPlane::probe() {
            Ok(()) => {
                let settings = Settings { sockmap_queue_limit: limit_mib << 20, ..Settings::default() };
                Some(SockmapPlane::start(&settings).expect("sockmap plane"))
            }
            Err(why) => {
                println!("SKIPPED sockmap: {}", upsplice::dataplane::error::chain(&why));
                None
            }
        };
        Planes { copy: CopyPlane::new(&Settings::default()), uring, sockmap }
    }

    fn runs(&self, mode: &str) -> bool {
        match mode {
            "sockmap" => self.sockmap.is_some(),
            m if m.starts_with("uring") => self.uring.is_some(),
            _ => true,
        }
    }

    /// Relays `t` through `mode`; returns the bytes that mode's plane
    /// carried itself (sockmap: before it stepped aside).
    async fn relay(&self, mode: &str, t: Tunnel) -> u64 {
        let uring = |i: usize| &self.uring.as_ref().expect("uring runs")[i];
        match mode {
            "copy" => relayed(mode, self.copy.relay(t).await).to_backend,
            "uring" => relayed(mode, uring(0).relay(t).await).to_backend,
            "uring-64k" => relayed(mode, uring(1).relay(t).await).to_backend,
            "uring-256k" => relayed(mode, uring(2).relay(t).await).to_backend,
            "uring-splice" => {
                let src = t.client.into_std().unwrap();
                let dst = t.backend.into_std().unwrap();
                src.set_nonblocking(false).unwrap();
                dst.set_nonblocking(false).unwrap();
                tokio::task::spawn_blocking(move || splice_prototype::relay_one_way(src, dst)).await.unwrap()
            }
            "sockmap" => match self.sockmap.as_ref().expect("sockmap runs").relay(t).await {
                Ok(outcome) => outcome.to_backend,
                Err(rejected) => {
                    relayed("copy", self.copy.relay(rejected.tunnel).await);
                    rejected.relayed.0
                }
            },
            other => unreachable!("mode {other}"),
        }
    }
}

async fn run(mib: usize, rounds: usize, limit_mib: u64, modes: Vec<&str>) {
    let planes = Planes::start(limit_mib);
    let modes: Vec<&str> = modes.into_iter().filter(|m| planes.runs(m)).collect();
    let total = mib * MIB;
    // Per mode: each round's usage, and the share of the stream the plane
    // carried itself.
    let mut results: Vec<(&str, Vec<Usage>, Vec<f64>)> = modes.iter().map(|&m| (m, vec![], vec![])).collect();
    for _ in 0..rounds {
        for (mode, usages, own) in results.iter_mut() {
            let (usage, carried) = if *mode == "direct" {
                let (a, b) = pair().await;
                (push(a, b, total).await, total as u64)
            } else {
                let Ends { client, backend, tunnel } = tunnel().await;
                let (carried, usage) = tokio::join!(planes.relay(mode, tunnel), push(client, backend, total));
                (usage, carried)
            };
            usages.push(usage);
            own.push(carried as f64 / total as f64);
        }
    }
    println!(
        "bulk: {mib} MiB one way per run, median of {rounds}, 256 KiB writes; uring = default {} KiB buffers; \
         sockmap queue limit {limit_mib} MiB",
        Settings::default().uring_buffer / 1024
    );
    let gib = total as f64 / (1u64 << 30) as f64;
    let mut direct_secs = f64::NAN;
    for (mode, usages, own) in &mut results {
        let secs = median(&mut usages.iter().map(|u| u.secs).collect::<Vec<_>>());
        let process = median(&mut usages.iter().map(|u| u.process_cpu).collect::<Vec<_>>());
        let machine = median(&mut usages.iter().map(|u| u.machine_cpu).collect::<Vec<_>>());
        if *mode == "direct" {
            direct_secs = secs;
        }
        let own =
            if *mode == "sockmap" { format!("  carried itself {:.0}%", median(own) * 100.0) } else { String::new() };
        println!(
            "{mode:>12}: {:8.1} MiB/s  ratio to direct {:.2}  CPU {:.2} s/GiB process, {:.2} s/GiB machine{own}",
            mib as f64 / secs,
            direct_secs / secs,
            process / gib,
            machine / gib
        );
    }
}
