//! Every tunnel's idle deadline, in one ordered set the events thread
//! waits on: a tunnel that only waits for its idle deadline keeps no timer
//! of its own (a tokio `Sleep` is 112 bytes in the future of every idle
//! tunnel), and the events thread wakes it through its signal when the
//! deadline passes.
//!
//! A `BTreeSet` of (deadline, cookie) rather than a heap: a tunnel that
//! ends or moves its deadline takes its entry out at once, where a heap
//! would keep it until it fell due (an idle timeout of an hour, at 2,000
//! short tunnels a second, is millions of dead entries).
//!
//! Deadlines are whole milliseconds since the set's epoch, rounded up: a
//! tunnel is woken at or after its deadline, never before.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The idle deadlines of a plane's tunnels, each under its client
/// socket's cookie (the registry's key for the tunnel).
#[derive(Debug)]
pub struct Deadlines {
    epoch: Instant,
    set: Mutex<BTreeSet<(u64, u64)>>,
}

impl Default for Deadlines {
    fn default() -> Self {
        Deadlines { epoch: Instant::now(), set: Mutex::default() }
    }
}

/// A tunnel's entry as its owner remembers it: the key it was set with,
/// 0 when none is set.
pub type Entry = u64;

impl Deadlines {
    /// `at` as a key: milliseconds since the epoch, rounded up, plus one
    /// (0 is "none").
    fn key(&self, at: Instant) -> u64 {
        let micros = at.saturating_duration_since(self.epoch).as_micros();
        u64::try_from(micros.div_ceil(1000)).unwrap_or(u64::MAX - 1) + 1
    }

    /// The last key due at `now`.
    fn due_key(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX - 1) + 1
    }

    /// Sets the deadline of the tunnel `cookie` to `at`, in place of the
    /// one `entry` says it set. Also when unchanged: the events thread
    /// takes an entry out when it falls due, and the owner cannot tell
    /// which of its deadlines woke it.
    pub fn set(&self, cookie: u64, at: Instant, entry: &mut Entry) {
        let key = self.key(at);
        let mut set = lock(&self.set);
        if *entry != 0 && *entry != key {
            set.remove(&(*entry, cookie));
        }
        set.insert((key, cookie));
        *entry = key;
    }

    /// Takes the tunnel's deadline out (it ends or leaves the plane).
    pub fn clear(&self, cookie: u64, entry: &mut Entry) {
        if *entry != 0 {
            lock(&self.set).remove(&(std::mem::take(entry), cookie));
        }
    }

    /// How long the events thread may wait at `now`: until the first
    /// deadline, at most `max`.
    pub fn wait(&self, now: Instant, max: Duration) -> Duration {
        let Some(&(key, _)) = lock(&self.set).first() else {
            return max;
        };
        let due = self.epoch + Duration::from_millis(key - 1);
        due.saturating_duration_since(now).min(max)
    }

    /// Takes out every deadline due at `now`, earliest first, and calls
    /// `due` with its tunnel's cookie (outside the lock).
    pub fn take_due(&self, now: Instant, mut due: impl FnMut(u64)) {
        let last = self.due_key(now);
        loop {
            let next = {
                let mut set = lock(&self.set);
                match set.first() {
                    Some(&(key, _)) if key <= last => set.pop_first(),
                    _ => None,
                }
            };
            match next {
                Some((_, cookie)) => due(cookie),
                None => return,
            }
        }
    }

    /// Deadlines set now: one per tunnel being watched.
    pub fn count(&self) -> usize {
        lock(&self.set).len()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock left the set whole (each operation
    // is one insert or remove): go on with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn due(d: &Deadlines, now: Instant) -> Vec<u64> {
        let mut v = Vec::new();
        d.take_due(now, |c| v.push(c));
        v
    }

    #[test]
    fn a_deadline_falls_due_at_its_time_never_before_and_once() {
        let d = Deadlines::default();
        let t0 = d.epoch;
        let (mut a, mut b) = (0, 0);
        d.set(1, t0 + Duration::from_millis(30), &mut a);
        d.set(2, t0 + Duration::from_micros(10_500), &mut b);
        assert_eq!(due(&d, t0 + Duration::from_millis(10)), Vec::<u64>::new(), "10.5 ms is not due at 10");
        assert_eq!(due(&d, t0 + Duration::from_micros(10_999)), Vec::<u64>::new(), "rounded up, never early");
        assert_eq!(due(&d, t0 + Duration::from_millis(11)), vec![2]);
        assert_eq!(due(&d, t0 + Duration::from_millis(11)), Vec::<u64>::new(), "taken out when due");
        assert_eq!(due(&d, t0 + Duration::from_secs(1)), vec![1]);
        assert_eq!(d.count(), 0);
    }

    #[test]
    fn setting_again_moves_the_deadline_and_clearing_takes_it_out() {
        let d = Deadlines::default();
        let t0 = d.epoch;
        let mut e = 0;
        d.set(7, t0 + Duration::from_millis(5), &mut e);
        d.set(7, t0 + Duration::from_millis(50), &mut e);
        assert_eq!(d.count(), 1, "moved, not added");
        assert_eq!(due(&d, t0 + Duration::from_millis(20)), Vec::<u64>::new());
        d.clear(7, &mut e);
        assert_eq!((d.count(), e), (0, 0));
        d.clear(7, &mut e);
        assert_eq!(due(&d, t0 + Duration::from_secs(1)), Vec::<u64>::new());
    }

    #[test]
    fn an_entry_taken_when_due_is_set_again_when_unchanged() {
        let d = Deadlines::default();
        let t0 = d.epoch;
        let mut e = 0;
        let at = t0 + Duration::from_millis(5);
        d.set(3, at, &mut e);
        assert_eq!(due(&d, t0 + Duration::from_millis(6)), vec![3]);
        d.set(3, at, &mut e);
        assert_eq!(d.count(), 1, "the owner cannot tell which of its deadlines woke it");
        d.set(3, at, &mut e);
        assert_eq!(d.count(), 1);
    }

    #[test]
    fn the_events_thread_waits_until_the_first_deadline_at_most_max() {
        let d = Deadlines::default();
        let t0 = d.epoch;
        let max = Duration::from_millis(100);
        assert_eq!(d.wait(t0, max), max, "nothing set");
        let (mut a, mut b) = (0, 0);
        d.set(1, t0 + Duration::from_secs(5), &mut a);
        assert_eq!(d.wait(t0, max), max);
        d.set(2, t0 + Duration::from_millis(40), &mut b);
        assert_eq!(d.wait(t0, max), Duration::from_millis(40));
        assert_eq!(d.wait(t0 + Duration::from_millis(60), max), Duration::ZERO, "late: at once");
    }
}
