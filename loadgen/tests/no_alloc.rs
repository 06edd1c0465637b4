//! The WebSocket hot path does not allocate per message: a run with five
//! times as many messages makes (almost) no more allocations.

mod common;
use common::Server;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use upsplice_loadgen::engine::{self, Proto, RunConfig};

/// Counts allocations made anywhere in this test process.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);

// SAFETY: every call is forwarded unchanged to the system allocator, which
// upholds the GlobalAlloc contract; we only add a relaxed counter increment.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same layout contract as our caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with this layout (via `alloc`).
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `ptr`/`layout` come from `System` via this allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocations_for(addr: &str, rate: f64) -> (u64, u64) {
    let cfg = RunConfig {
        proto: Proto::Ws,
        target: addr.parse().unwrap(),
        wire: Default::default(),
        host: addr.to_string(),
        path: "/".into(),
        connections: 4,
        rate,
        duration: Duration::from_secs(2),
        warmup: Duration::from_millis(200),
        size: 64,
        max_inflight: 256,
        ramp_rate: None,
        source_ips: Vec::new(),
        threads: 1,
        connect_timeout: Duration::from_secs(2),
        drain: Duration::from_secs(1),
        keep_intervals: false,
    };
    let before = ALLOCS.load(Ordering::Relaxed);
    let out = engine::run(&cfg, None);
    let allocs = ALLOCS.load(Ordering::Relaxed) - before;
    assert_eq!(out.recorder.total_errors(), 0);
    (allocs, out.recorder.received)
}

#[test]
fn allocations_do_not_grow_with_messages() {
    let echo = Server::echo(&[]);
    let (a_small, n_small) = allocations_for(&echo.addr, 1000.0);
    let (a_big, n_big) = allocations_for(&echo.addr, 5000.0);
    assert!(n_big >= n_small + 7000, "{n_small} vs {n_big} messages");
    eprintln!("{a_small} allocations for {n_small} messages, {a_big} for {n_big}");
    let extra = a_big.saturating_sub(a_small);
    // A handful of buffer/heap growths are fine; one per message is not.
    assert!(extra * 50 < n_big - n_small, "{a_small} allocations for {n_small} messages, {a_big} for {n_big}");
}
