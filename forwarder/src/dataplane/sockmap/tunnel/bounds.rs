//! What a tunnel may hold: the per-direction bound ([`Limits`]) and the
//! node-wide one ([`NodeHeld`]), with each tunnel's share of the latter
//! ([`HeldShare`]).
//!
//! What one tunnel can add to the node's memory beyond its sockets' own
//! TCP buffers: [`Limits::per_tunnel`], plus what arrives between the
//! crossing and the watch's reaction (a notification and a wakeup: up to
//! about 20 MB at 1.3 GB/s on a loaded 2-core machine).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::super::kernel::{wake_all, Registry};

/// Bounds, per direction, in bytes.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// A direction with more than this redirected and not yet acknowledged
    /// by its reader makes the tunnel step aside.
    pub high: u64,
    /// Check a direction's queues each time it moved this much.
    pub budget: u64,
    /// A direction that moved more than this many bytes per second over
    /// `rate_window` makes the tunnel step aside (`adaptive`'s
    /// `demote_rate`); 0: never for its rate.
    pub demote_rate: u64,
    pub rate_window: Duration,
}

impl Limits {
    pub fn new(queue_limit: u64) -> Limits {
        let high = queue_limit.max(64 * 1024);
        Limits { high, budget: (high / 4).max(16 * 1024), demote_rate: 0, rate_window: Duration::from_secs(1) }
    }

    /// The same, stepping aside also for a direction's rate.
    pub fn with_demotion(self, rate: u64, window: Duration) -> Limits {
        Limits { demote_rate: rate, rate_window: window, ..self }
    }

    /// A direction holding more than this (bytes written to its destination
    /// and not acknowledged) makes the tunnel step aside: `high`, or one
    /// budget while the plane's node-wide bound is exceeded.
    pub(super) fn threshold(&self, node_over: bool) -> u64 {
        if node_over {
            self.budget
        } else {
            self.high
        }
    }

    /// Most bytes userspace reads from a direction's source while the
    /// tunnel steps aside, given what the direction holds in the kernel:
    /// kernel and userspace together stay within one threshold and one
    /// budget ([`Limits::per_tunnel`]). Reading into this tail is what lets
    /// an echo that stops reading while its writes wait drain the other
    /// way; reading without a bound let four stalled tunnels hold 12 MiB
    /// each against a 16 MiB node-wide bound (the tail grew to `high`).
    pub(super) fn tail_max(&self, node_over: bool, in_kernel: u64) -> u64 {
        (self.threshold(node_over) + self.budget).saturating_sub(in_kernel)
    }

    /// The receive buffer a source keeps once it left `ACTIVE`: what TCP
    /// had made it before its low-water mark went up (`before`), or `high`
    /// if that is more (a young socket's 128 KiB would slow the bulk tunnel
    /// the next plane carries).
    pub(super) fn rcvbuf_after(&self, before: i32) -> i32 {
        before.max(i32::try_from(self.high).unwrap_or(i32::MAX))
    }

    /// What one tunnel adds at most to the memory its sockets' own TCP
    /// buffers hold (which every plane has), both directions: bytes
    /// redirected and not yet acknowledged before it steps aside, plus one
    /// notification budget of lag; bytes userspace holds while stepping
    /// aside count within it ([`Limits::tail_max`]).
    pub fn per_tunnel(&self) -> u64 {
        2 * (self.high + self.budget)
    }
}

/// Why a tunnel steps aside for a direction's rate ([`Rate`]).
pub(super) const RATE_REASON: &str = "a direction passed demote_rate";

/// How fast each direction moves, judged over windows of
/// [`Limits::rate_window`] from the tunnel's first ring-buffer event (a
/// direction moved a budget). Looked at only when the watch looks (a
/// ring-buffer event every `budget` bytes, a report, a timer): a tunnel
/// that moves less than a budget per window is never judged fast, and one
/// looked at after a longer stretch is judged on the whole stretch.
#[derive(Debug)]
pub(super) struct Rate {
    since: Instant,
    base: [u64; 2],
}

impl Rate {
    pub fn new(now: Instant, moved: [u64; 2]) -> Rate {
        Rate { since: now, base: moved }
    }

    /// Which directions (from the client, from the backend) moved faster
    /// than `limits.demote_rate` over the window that ended, given what
    /// each moved so far; none while the window lasts, or with no rate set.
    pub fn over(&mut self, limits: &Limits, now: Instant, moved: [u64; 2]) -> [bool; 2] {
        let elapsed = now.saturating_duration_since(self.since);
        if limits.demote_rate == 0 || elapsed < limits.rate_window {
            return [false; 2];
        }
        let fast = |i: usize| {
            let bytes = moved[i].saturating_sub(self.base[i]) as u128;
            bytes * 1_000_000_000 > limits.demote_rate as u128 * elapsed.as_nanos()
        };
        let over = [fast(0), fast(1)];
        *self = Rate::new(now, moved);
        over
    }
}

/// Why a tunnel steps aside, given whether the node is over its bound.
pub(super) fn step_aside_reason(node_over: bool) -> &'static str {
    if node_over {
        "the plane's node-wide bound was reached"
    } else {
        "a direction reached sockmap_queue_limit"
    }
}

/// The node-wide bound: bytes all tunnels of the plane hold in the kernel
/// and in their userspace buffers. Past `limit`, a tunnel steps aside as
/// soon as a direction holds more than one notification budget instead of
/// `high`, so the sum cannot grow with the number of tunnels.
#[derive(Debug)]
pub struct NodeHeld {
    pub total: AtomicU64,
    pub limit: u64,
    /// How often `total` crossed above `limit`. Each crossing wakes every
    /// registered tunnel, which checks itself against the lower threshold
    /// then (a stalled one would not wake by itself: no byte moves); a
    /// tunnel tells that wake from its own reports by this count. Through
    /// the tunnels' own signals, not a `Notify` each tunnel's watch would
    /// wait on (64 bytes in every idle tunnel).
    pub(super) crossings: AtomicU64,
    registry: Arc<Registry>,
}

impl NodeHeld {
    pub fn new(limit: u64, registry: Arc<Registry>) -> NodeHeld {
        NodeHeld { total: AtomicU64::new(0), limit, crossings: AtomicU64::new(0), registry }
    }

    /// How often the bound was crossed so far.
    pub(super) fn crossings(&self) -> u64 {
        self.crossings.load(Ordering::Acquire)
    }

    pub(super) fn over(&self) -> bool {
        self.total.load(Ordering::Relaxed) > self.limit
    }
}

/// One tunnel's share of [`NodeHeld`], given back when the tunnel ends.
pub(super) struct HeldShare<'k> {
    node: &'k NodeHeld,
    reported: [u64; 2],
}

impl<'k> HeldShare<'k> {
    pub fn new(node: &'k NodeHeld) -> HeldShare<'k> {
        HeldShare { node, reported: [0, 0] }
    }
}

impl HeldShare<'_> {
    /// Direction `side` now holds `held` bytes.
    pub fn set(&mut self, side: usize, held: u64) {
        let old = std::mem::replace(&mut self.reported[side], held);
        if held > old {
            let before = self.node.total.fetch_add(held - old, Ordering::Relaxed);
            let limit = self.node.limit;
            if before <= limit && before + (held - old) > limit {
                self.node.crossings.fetch_add(1, Ordering::Release);
                wake_all(&self.node.registry);
            }
        } else if old > held {
            self.node.total.fetch_sub(old - held, Ordering::Relaxed);
        }
    }
}

impl Drop for HeldShare<'_> {
    fn drop(&mut self) {
        self.set(0, 0);
        self.set(1, 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_have_floors_and_a_lower_threshold_past_the_node_bound() {
        let small = Limits::new(0);
        assert_eq!((small.high, small.budget), (64 * 1024, 16 * 1024));
        let l = Limits::new(4 << 20);
        assert_eq!((l.high, l.budget), (4 << 20, 1 << 20));
        assert_eq!(l.threshold(false), l.high);
        assert_eq!(l.threshold(true), l.budget);
        assert_eq!(l.per_tunnel(), 2 * (5 << 20));
        assert_ne!(step_aside_reason(true), step_aside_reason(false));
    }

    #[test]
    fn a_direction_is_fast_only_over_a_whole_window_above_the_rate() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let l = Limits::new(4 << 20).with_demotion(32 << 20, Duration::from_secs(1));
        let mut r = Rate::new(t0, [0, 0]);
        assert_eq!(r.over(&l, ms(500), [1 << 30, 0]), [false, false], "the window is not over");
        assert_eq!(r.over(&l, ms(1000), [40 << 20, 1 << 20]), [true, false], "40 MiB in 1 s, and 1 MiB");
        assert_eq!(r.over(&l, ms(2000), [70 << 20, 1 << 20]), [false, false], "30 MiB in the next second");
        // A direction looked at seldom is judged on the whole stretch.
        assert_eq!(r.over(&l, ms(12_000), [(70 << 20) + (40 << 20), 1 << 20]), [false, false]);
        let off = Limits::new(4 << 20);
        assert_eq!(Rate::new(t0, [0, 0]).over(&off, ms(1000), [1 << 40, 1 << 40]), [false, false], "0: off");
    }

    #[test]
    fn the_tail_and_the_kernel_share_one_bound() {
        let l = Limits::new(4 << 20);
        assert_eq!(l.tail_max(false, 0), l.high + l.budget);
        assert_eq!(l.tail_max(false, l.high), l.budget);
        assert_eq!(l.tail_max(true, 0), 2 * l.budget);
        assert_eq!(l.tail_max(true, 10 * l.budget), 0, "never below zero");
    }

    #[test]
    fn the_receive_buffer_goes_back_to_at_least_high() {
        let l = Limits::new(4 << 20);
        assert_eq!(l.rcvbuf_after(131_072), 4 << 20);
        assert_eq!(l.rcvbuf_after(6 << 20), 6 << 20);
        assert_eq!(Limits::new(u64::MAX).rcvbuf_after(1), i32::MAX);
    }

    #[test]
    fn a_share_adds_up_and_is_given_back() {
        let node = NodeHeld::new(100, Arc::new(Registry::default()));
        {
            let mut a = HeldShare::new(&node);
            let mut b = HeldShare::new(&node);
            a.set(0, 60);
            a.set(1, 30);
            assert!(!node.over());
            b.set(0, 20);
            assert!(node.over());
            a.set(0, 10);
            assert_eq!(node.total.load(Ordering::Relaxed), 60);
            assert!(!node.over());
        }
        assert_eq!(node.total.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn crossing_the_node_bound_wakes_each_tunnel_once() {
        use std::future::Future;
        use std::pin::pin;
        use std::task::{Context, Poll, Waker};

        use super::super::super::kernel::Signal;

        let registry = Arc::new(Registry::default());
        let signal = Arc::new(Signal::default());
        // A tunnel's two sockets, client (side 0) and backend (side 1).
        registry.lock().unwrap().insert(7, (signal.clone(), 0));
        registry.lock().unwrap().insert(8, (signal.clone(), 1));
        let node = NodeHeld::new(100, registry);
        let mut share = HeldShare::new(&node);
        let mut cx = Context::from_waker(Waker::noop());
        share.set(0, 100);
        assert_eq!(node.crossings(), 0);
        assert_eq!(pin!(signal.woken()).poll(&mut cx), Poll::Pending, "at the bound, not past it");
        share.set(1, 1);
        assert_eq!(node.crossings(), 1);
        assert_eq!(pin!(signal.woken()).poll(&mut cx), Poll::Ready(()), "woken at the crossing");
        assert_eq!(pin!(signal.woken()).poll(&mut cx), Poll::Pending, "once, not once per socket");
        share.set(1, 2);
        assert_eq!(node.crossings(), 1, "still over: no new crossing");
    }
}
