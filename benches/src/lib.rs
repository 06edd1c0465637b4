//! What the benchmarks in `benches/` share. Each runs with one command:
//!
//! * `cargo bench -p upsplice-benches --bench handshake` (criterion): the
//!   control plane's per-connection work on one upgrade request;
//! * `cargo bench -p upsplice-benches --bench bulk`: one bulk stream
//!   through each data plane, against a direct loopback connection;
//! * `cargo bench -p upsplice-benches --bench small_messages`: many
//!   tunnels of 64-byte round trips, uring against copy;
//! * `cargo bench -p upsplice-benches --bench idle_tunnels`: what idle
//!   tunnels cost in threads and buffers, uring against an io_uring splice
//!   prototype.
//!
//! The data-plane benchmarks print figures as a ratio to a baseline
//! measured in the same run (this machine is shared: absolute figures vary
//! between runs more than ratios do), with CPU time per unit of work, and
//! skip a plane this kernel or build cannot run, saying why. Sizes come
//! from `UPSPLICE_BENCH_*` variables (each program's docs list them).
//! Built for `cargo test --benches`, they run once with small sizes.

pub mod cpu;
pub mod splice_prototype;
pub mod tunnel;

/// Whether the program runs as a benchmark (`cargo bench` passes
/// `--bench`) or as a smoke test (`cargo test --benches`: small sizes).
pub fn benchmarking() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// A number from the environment variable `name`, else `default` (else
/// `smoke` when not benchmarking).
pub fn setting(name: &str, default: usize, smoke: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v}: not a number")),
        Err(_) if benchmarking() => default,
        Err(_) => smoke,
    }
}

/// The median of `values` (sorted in place).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

pub const MIB: usize = 1024 * 1024;
