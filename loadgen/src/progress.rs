//! The live progress line: threads feed counters and the latest corrected
//! latencies into a shared [`Live`]; a printer thread shows one line a second
//! on a terminal (stderr) and stays quiet otherwise.

use crate::recorder::{new_histogram, Recorder};
use hdrhistogram::Histogram;
use std::cell::RefCell;
use std::io::Write;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How often generator threads publish their counters.
const FEED_EVERY: Duration = Duration::from_millis(100);

/// Counters and recent latencies shared by all generator threads.
#[derive(Debug)]
pub struct Live {
    sent: AtomicU64,
    received: AtomicU64,
    errors: AtomicU64,
    recent: Mutex<Histogram<u64>>,
}

impl Default for Live {
    fn default() -> Self {
        Live {
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            recent: Mutex::new(new_histogram()),
        }
    }
}

impl Live {
    /// Pushes one thread's news every [`FEED_EVERY`], forever (the caller aborts it).
    pub async fn feed_forever(&self, rec: &Rc<RefCell<Recorder>>) {
        let mut prev = Recorder::new(false);
        loop {
            tokio::time::sleep(FEED_EVERY).await;
            let r = rec.borrow();
            self.sent.fetch_add(r.sent - prev.sent, Ordering::Relaxed);
            self.received.fetch_add(r.received - prev.received, Ordering::Relaxed);
            self.errors.fetch_add(r.total_errors() - prev.total_errors(), Ordering::Relaxed);
            let mut delta = r.corrected.clone();
            // `prev.corrected` only ever holds values that are also in `r.corrected`.
            let _ = delta.subtract(&prev.corrected);
            if let Ok(mut h) = self.recent.lock() {
                let _ = h.add(&delta);
            }
            prev.sent = r.sent;
            prev.received = r.received;
            prev.errors = r.errors.clone();
            prev.corrected = r.corrected.clone();
        }
    }
}

/// A running progress printer; stops and clears its line when dropped.
pub struct Printer {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Printer {
    /// Starts printing once a second. `warmup` is shown as such; `target` is the rate goal.
    pub fn start(live: Arc<Live>, warmup: Duration, target: f64, unit: &'static str) -> Printer {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let t0 = Instant::now();
            let mut last = Instant::now();
            while !flag.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                if last.elapsed() < Duration::from_secs(1) {
                    continue;
                }
                last = Instant::now();
                // Only messages due in the measured window are counted, so the
                // average over the window so far is the achieved rate.
                // Counters are on average half a feed interval old.
                let in_window = t0.elapsed().saturating_sub(warmup + FEED_EVERY / 2).as_secs_f64();
                let sent = live.sent.load(Ordering::Relaxed);
                let rate = if in_window > 0.0 { sent as f64 / in_window } else { 0.0 };
                let p99 = live
                    .recent
                    .lock()
                    .map(|mut h| {
                        let v = h.value_at_quantile(0.99);
                        h.reset();
                        v
                    })
                    .unwrap_or(0);
                let el = t0.elapsed();
                let phase = if el < warmup { " (warm-up)" } else { "" };
                let mut err = std::io::stderr().lock();
                let _ = write!(
                    err,
                    "\r\x1b[2K{:>6.1}s{phase} | {rate:>10.0} / {target:.0} {unit}/s | recv {} | errors {} | p99 {:.3} ms",
                    el.as_secs_f64(),
                    live.received.load(Ordering::Relaxed),
                    live.errors.load(Ordering::Relaxed),
                    p99 as f64 / 1000.0
                );
                let _ = err.flush();
            }
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
        });
        Printer { stop, handle: Some(handle) }
    }
}

impl Drop for Printer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
