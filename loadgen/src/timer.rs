//! A per-thread microsecond timer. tokio's timer wheel has millisecond ticks,
//! so a send scheduled with `sleep_until` goes out up to 1 ms late, and that
//! lateness would be charged to the target as corrected latency. This timer
//! keeps deadlines in a heap and arms one `timerfd` (CLOCK_MONOTONIC, the clock
//! behind `Instant`) for the earliest of them.
//!
//! It must be driven by [`Timer::drive`] on the same current-thread runtime
//! (a `LocalSet`) as the tasks that sleep on it.

use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};
use tokio::io::unix::AsyncFd;

struct Entry {
    deadline: Instant,
    waker: Waker,
}

impl PartialEq for Entry {
    fn eq(&self, o: &Self) -> bool {
        self.deadline == o.deadline
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Entry {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        self.deadline.cmp(&o.deadline)
    }
}

/// A heap of deadlines behind one timerfd.
pub struct Timer {
    fd: AsyncFd<OwnedFd>,
    heap: RefCell<BinaryHeap<Reverse<Entry>>>,
    armed: Cell<Option<Instant>>,
}

impl Timer {
    /// Creates the timerfd; must be called inside a tokio runtime.
    pub fn new() -> std::io::Result<Timer> {
        // SAFETY: plain syscall with constant flags; the returned fd is checked
        // before use and then owned by exactly one OwnedFd.
        let raw = unsafe { libc::timerfd_create(libc::CLOCK_MONOTONIC, libc::TFD_NONBLOCK | libc::TFD_CLOEXEC) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh, valid descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: `fd` is a valid open OwnedFd moved into the AsyncFd, which then
        // owns it for its whole life, so as_raw_fd() keeps naming the same timerfd.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        Ok(Timer { fd, heap: RefCell::new(BinaryHeap::new()), armed: Cell::new(None) })
    }

    /// A future that completes at `deadline`.
    pub fn sleep_until(&self, deadline: Instant) -> Sleep<'_> {
        Sleep { timer: self, deadline }
    }

    fn arm(&self, deadline: Instant) {
        let d = deadline.saturating_duration_since(Instant::now()).max(Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: libc::timespec { tv_sec: 0, tv_nsec: 0 },
            it_value: libc::timespec { tv_sec: d.as_secs() as libc::time_t, tv_nsec: d.subsec_nanos() as libc::c_long },
        };
        // SAFETY: the fd is our live timerfd; `spec` is a fully initialised
        // itimerspec that outlives the call; a null old-value pointer is allowed.
        unsafe {
            libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut());
        }
        self.armed.set(Some(deadline));
    }

    fn register(&self, deadline: Instant, waker: &Waker) {
        self.heap.borrow_mut().push(Reverse(Entry { deadline, waker: waker.clone() }));
        if self.armed.get().is_none_or(|a| deadline < a) {
            self.arm(deadline);
        }
    }

    /// Wakes sleepers whose deadline passed, forever; spawn it with `spawn_local`.
    pub async fn drive(&self) {
        let mut sink = [0u8; 8];
        loop {
            if let Ok(mut guard) = self.fd.readable().await {
                // SAFETY: reading at most 8 bytes into an 8-byte stack buffer from
                // our own non-blocking timerfd.
                let n = unsafe { libc::read(self.fd.as_raw_fd(), sink.as_mut_ptr().cast(), sink.len()) };
                let _ = n;
                // A read drains the expiry count, so the fd is not readable now.
                guard.clear_ready();
            }
            self.armed.set(None);
            let now = Instant::now();
            let mut heap = self.heap.borrow_mut();
            while heap.peek().is_some_and(|e| e.0.deadline <= now) {
                if let Some(Reverse(e)) = heap.pop() {
                    e.waker.wake();
                }
            }
            if let Some(next) = heap.peek().map(|e| e.0.deadline) {
                self.arm(next);
            }
        }
    }
}

/// Future returned by [`Timer::sleep_until`].
pub struct Sleep<'a> {
    timer: &'a Timer,
    deadline: Instant,
}

impl Future for Sleep<'_> {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if Instant::now() >= self.deadline {
            return Poll::Ready(());
        }
        self.timer.register(self.deadline, cx.waker());
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    #[test]
    fn wakes_in_order_and_close_to_the_deadline() {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let local = tokio::task::LocalSet::new();
        local.block_on(&rt, async {
            let timer = Rc::new(Timer::new().unwrap());
            let t = timer.clone();
            let driver = tokio::task::spawn_local(async move { t.drive().await });
            let start = Instant::now();
            let mut worst = Duration::ZERO;
            for i in 1..=50u64 {
                let deadline = start + Duration::from_micros(300 * i);
                timer.sleep_until(deadline).await;
                let now = Instant::now();
                assert!(now >= deadline);
                worst = worst.max(now - deadline);
            }
            driver.abort();
            // tokio's own sleep would be up to 1 ms late; allow for a loaded CI box.
            assert!(worst < Duration::from_millis(20), "{worst:?}");
        });
    }
}
