//! When a tunnel driven by polling its two directions in one task (the
//! readiness planes' [`super::pair`], the TLS [`super::stream`] relay) ends
//! for a reason other than a direction failing: both directions finished,
//! the drain deadline came, or nothing moved for `idle_timeout`.
//!
//! The idle timer is re-armed only when it fires early (bytes moved since
//! it was set), not on every chunk: a busy tunnel does not touch the timer
//! wheel per burst.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use super::CloseReason;

/// The part of a tunnel's state that decides its end besides its
/// directions: what moved last, and when.
pub struct Lifetime {
    idle_timeout: Duration,
    last_moved: (u64, u64),
    last_active: Instant,
}

impl Lifetime {
    pub fn new(idle_timeout: Duration) -> Lifetime {
        Lifetime { idle_timeout, last_moved: (0, 0), last_active: Instant::now() }
    }

    /// Ready with why the tunnel ends, given whether each direction is
    /// done, the bytes each has moved, the tunnel's idle timer (armed for
    /// `idle_timeout` when the tunnel started) and its drain signal.
    pub fn poll_end(
        &mut self,
        cx: &mut Context<'_>,
        done: [bool; 2],
        moved: (u64, u64),
        mut idle: Pin<&mut Sleep>,
        drained: Pin<&mut impl Future<Output = ()>>,
    ) -> Poll<CloseReason> {
        if done == [true, true] {
            return Poll::Ready(CloseReason::Done);
        }
        if drained.poll(cx).is_ready() {
            return Poll::Ready(CloseReason::Drain);
        }
        if moved != self.last_moved {
            self.last_moved = moved;
            self.last_active = Instant::now();
        }
        while idle.as_mut().poll(cx).is_ready() {
            let deadline = self.last_active + self.idle_timeout;
            if deadline <= Instant::now() {
                return Poll::Ready(CloseReason::Idle);
            }
            idle.as_mut().reset(deadline);
        }
        Poll::Pending
    }
}
