//! The loaded eBPF program and its maps (see `ebpf/src/main.rs` for what
//! each map means; their value types and names are `upsplice_common`'s,
//! which the program builds from too). One [`Kernel`] per plane: loaded and
//! attached once.

use std::collections::HashMap as StdHashMap;
use std::future::Future;
use std::mem::size_of;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::thread::JoinHandle;

use aya::maps::{HashMap, IterableMap, MapData, MapError, PerCpuArray, RingBuf, SockHash};
use aya::programs::SkSkb;
use aya::Pod;
use aya::{Ebpf, EbpfLoader};
use futures_util::task::AtomicWaker;
use upsplice_common::{names, Control, PeerEntry, Stats};

use super::deadlines::Deadlines;
use crate::dataplane::PlaneError;

/// What wakes one tunnel: the events thread records socket events here
/// (per side: 0 client, 1 backend) and wakes it; so do ring-buffer events
/// (the direction from that side moved another budget of bytes, or broke),
/// the tunnel's idle deadline ([`Deadlines`]), and the node-wide bound's
/// crossing and the drain, which wake every tunnel ([`wake_all`]).
///
/// A flag and a waker rather than a `Notify`: a tunnel's task is the only
/// one that waits, and its wait ([`Signal::woken`]) stays in the future of
/// every idle tunnel (8 bytes here, 64 for a `Notified`).
#[derive(Debug, Default)]
pub struct Signal {
    /// The tunnel's task, while it waits.
    waker: AtomicWaker,
    /// Woken since the last wait took it: kept until the next wait when
    /// the task is not waiting (as a `Notify` keeps a permit).
    woken: AtomicBool,
    events: [AtomicU32; 2],
    budget: [AtomicBool; 2],
    /// The tunnel's idle deadline passed.
    deadline: AtomicBool,
}

impl Signal {
    /// Wakes the tunnel's task, or its next wait.
    fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Completes once the events thread woke the tunnel since the last
    /// time this completed. Dropped unfinished, it leaves a wake for the
    /// next one.
    pub fn woken(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| self.poll_woken(cx))
    }

    /// [`Signal::woken`] as a poll.
    pub fn poll_woken(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.woken.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        // A wake between the check and the registration found no waker.
        if self.woken.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// The epoll bits reported for `side` since the last call.
    pub fn take(&self, side: usize) -> u32 {
        self.events[side].swap(0, Ordering::AcqRel)
    }

    /// Whether the ring buffer reported the socket of `side` since the last
    /// call.
    pub fn take_budget(&self, side: usize) -> bool {
        self.budget[side].swap(false, Ordering::AcqRel)
    }

    /// Whether the idle deadline passed since the last call.
    pub fn take_deadline(&self) -> bool {
        self.deadline.swap(false, Ordering::AcqRel)
    }
}

/// Socket cookie → (the tunnel's signal, which side the socket is).
pub type Registry = Mutex<StdHashMap<u64, (Arc<Signal>, usize)>>;

/// Wakes every registered tunnel once (through its client socket's entry).
pub fn wake_all(registry: &Registry) {
    for (signal, side) in lock(registry).values() {
        if *side == 0 {
            signal.wake();
        }
    }
}

/// Epoll token of the ring buffer; socket cookies are never 0 or this.
const RING_TOKEN: u64 = u64::MAX;

pub struct Kernel {
    active: Mutex<SockHash<MapData, u64>>,
    targets: Mutex<SockHash<MapData, u64>>,
    peers: Mutex<HashMap<MapData, u64, PeerEntry>>,
    control: Mutex<HashMap<MapData, u64, Control>>,
    stats: PerCpuArray<MapData, Stats>,
    pub registry: Arc<Registry>,
    /// Every tunnel's idle deadline, which the events thread waits on.
    pub deadlines: Arc<Deadlines>,
    /// One epoll set for every socket of every tunnel of this plane (and the
    /// ring buffer), waited on by the events thread: no descriptor and no
    /// tokio registration per tunnel.
    epoll: Arc<OwnedFd>,
    stop: Arc<AtomicBool>,
    events_thread: Option<JoinHandle<()>>,
    /// Holds the program and its attachment: dropping it detaches.
    _ebpf: Ebpf,
}

impl Kernel {
    /// Loads `object`, creates the maps, attaches the verdict program to
    /// `ACTIVE` and starts the thread that reads `EVENTS`.
    pub fn load(object: &[u8], max_sockets: u32) -> Result<Kernel, PlaneError> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries(names::ACTIVE, max_sockets)
            .map_max_entries(names::TARGETS, max_sockets)
            .map_max_entries(names::PEERS, max_sockets)
            .map_max_entries(names::CONTROL, max_sockets)
            .load(object)
            .map_err(PlaneError::ebpf("loading the eBPF object"))?;
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| PlaneError::Unsupported(format!("map {name} missing from the eBPF object")))
        };
        let active: SockHash<MapData, u64> =
            SockHash::try_from(take(&mut ebpf, names::ACTIVE)?).map_err(PlaneError::ebpf::<MapError>(names::ACTIVE))?;
        let targets: SockHash<MapData, u64> = SockHash::try_from(take(&mut ebpf, names::TARGETS)?)
            .map_err(PlaneError::ebpf::<MapError>(names::TARGETS))?;
        let peers =
            HashMap::try_from(take(&mut ebpf, names::PEERS)?).map_err(PlaneError::ebpf::<MapError>(names::PEERS))?;
        let control = HashMap::try_from(take(&mut ebpf, names::CONTROL)?)
            .map_err(PlaneError::ebpf::<MapError>(names::CONTROL))?;
        let stats = PerCpuArray::try_from(take(&mut ebpf, names::STATS)?)
            .map_err(PlaneError::ebpf::<MapError>(names::STATS))?;
        let events =
            RingBuf::try_from(take(&mut ebpf, names::EVENTS)?).map_err(PlaneError::ebpf::<MapError>(names::EVENTS))?;

        let name = names::PROGRAM;
        let program: &mut SkSkb = ebpf
            .program_mut(name)
            .ok_or_else(|| PlaneError::Unsupported(format!("program {name} missing from the eBPF object")))?
            .try_into()
            .map_err(PlaneError::ebpf(name))?;
        program.load().map_err(PlaneError::ebpf(format!("loading {name} (verifier)")))?;
        program.attach(active.fd()).map_err(PlaneError::ebpf(format!("attaching {name} to {}", names::ACTIVE)))?;

        let registry: Arc<Registry> = Arc::default();
        let deadlines: Arc<Deadlines> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        // SAFETY: plain syscall; the result is checked before use.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if epfd < 0 {
            return Err(PlaneError::io("epoll_create1")(std::io::Error::last_os_error()));
        }
        // SAFETY: `epfd` is a new descriptor owned from here on.
        let epoll = Arc::new(unsafe { OwnedFd::from_raw_fd(epfd) });
        epoll_ctl(epfd, libc::EPOLL_CTL_ADD, events.as_raw_fd(), RING_TOKEN, libc::EPOLLIN as u32)
            .map_err(PlaneError::io("epoll for EVENTS"))?;
        let events_thread = std::thread::Builder::new()
            .name("sockmap-events".into())
            .spawn({
                let registry = registry.clone();
                let deadlines = deadlines.clone();
                let stop = stop.clone();
                let epoll = epoll.clone();
                move || read_events(events, &epoll, &registry, &deadlines, &stop)
            })
            .map_err(PlaneError::io("starting the events thread"))?;

        Ok(Kernel {
            active: Mutex::new(active),
            targets: Mutex::new(targets),
            peers: Mutex::new(peers),
            control: Mutex::new(control),
            stats,
            registry,
            deadlines,
            epoll,
            stop,
            events_thread: Some(events_thread),
            _ebpf: ebpf,
        })
    }

    /// Makes `fd` a redirect target (no verdict runs for it yet).
    pub fn add_target(&self, cookie: u64, fd: RawFd) -> Result<(), MapError> {
        lock(&self.targets).insert(cookie, fd, 0)
    }

    pub fn remove_target(&self, cookie: u64) {
        let _ = lock(&self.targets).remove(&cookie);
    }

    /// Runs the verdict for bytes arriving on `fd` from now on.
    pub fn activate(&self, cookie: u64, fd: RawFd) -> Result<(), MapError> {
        lock(&self.active).insert(cookie, fd, 0)
    }

    /// Stops running the verdict for `fd`: its bytes stay in its receive queue.
    pub fn deactivate(&self, cookie: u64) {
        let _ = lock(&self.active).remove(&cookie);
    }

    /// Registers a tunnel's sockets (`cookies`/`fds`: client, backend) with
    /// the events thread; it wakes `signal` for them. Each is armed at once
    /// for [`Self::ARMED_AT_REGISTER`] (what a tunnel waits for first: its
    /// FIN), as [`Self::arm`] would: one `epoll_ctl` per socket, not two.
    pub fn register(&self, cookies: [u64; 2], fds: [RawFd; 2], signal: &Arc<Signal>) -> std::io::Result<()> {
        {
            let mut registry = lock(&self.registry);
            for (side, c) in cookies.iter().enumerate() {
                registry.insert(*c, (signal.clone(), side));
            }
        }
        let events = Self::ARMED_AT_REGISTER | libc::EPOLLONESHOT as u32;
        for (c, fd) in cookies.iter().zip(fds) {
            epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, *c, events)?;
        }
        Ok(())
    }

    /// What [`Self::register`] arms each socket for: FIN (errors and
    /// hang-ups are always reported).
    pub const ARMED_AT_REGISTER: u32 = libc::EPOLLRDHUP as u32;

    /// Reports the next of `events` (EPOLLIN/OUT/RDHUP; errors and hang-ups
    /// always) on `fd` once: each report disarms the socket until this is
    /// called again.
    pub fn arm(&self, cookie: u64, fd: RawFd, events: u32) -> std::io::Result<()> {
        epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_MOD, fd, cookie, events | libc::EPOLLONESHOT as u32)
    }

    /// Undoes [`Self::register`] for sockets that stay open.
    pub fn unregister(&self, cookies: [u64; 2], fds: [RawFd; 2]) {
        for fd in fds {
            let _ = epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_DEL, fd, 0, 0);
        }
        self.forget(cookies);
    }

    /// Undoes [`Self::register`] for sockets about to close (closing takes
    /// them out of the epoll set): events that still come are ignored.
    pub fn forget(&self, cookies: [u64; 2]) {
        let mut registry = lock(&self.registry);
        for c in cookies {
            registry.remove(&c);
        }
    }

    pub fn pair(&self, cookie: u64, entry: PeerEntry) -> Result<(), MapError> {
        lock(&self.peers).insert(cookie, entry, 0)
    }

    /// Writes a tunnel's `PEERS` and `CONTROL` entries (`cookies`, `peers`,
    /// `controls`: client, backend), one batch per map.
    pub fn pair_both(&self, cookies: [u64; 2], peers: [PeerEntry; 2], controls: [Control; 2]) -> Result<(), MapError> {
        update_both(&mut lock(&self.peers), &cookies, &peers)?;
        update_both(&mut lock(&self.control), &cookies, &controls)
    }

    /// Removes a tunnel's `PEERS` and `CONTROL` entries (`cookies`: client,
    /// backend), one batch per map; missing ones are skipped.
    pub fn unpair(&self, cookies: [u64; 2]) {
        remove_both(&mut lock(&self.peers), &cookies);
        remove_both(&mut lock(&self.control), &cookies);
    }

    /// The program's counters for the socket `cookie` (zero when unpaired).
    pub fn peer(&self, cookie: u64) -> PeerEntry {
        lock(&self.peers).get(&cookie, 0).unwrap_or_default()
    }

    /// Tells the program after how many redirected bytes to report the
    /// socket `cookie` in `EVENTS`.
    pub fn control(&self, cookie: u64, control: Control) -> Result<(), MapError> {
        lock(&self.control).insert(cookie, control, 0)
    }

    /// Sum over CPUs of one `STATS` slot.
    pub fn stats(&self, slot: u32) -> Stats {
        let mut sum = Stats::default();
        if let Ok(values) = self.stats.get(&slot, 0) {
            for v in values.iter() {
                sum.bytes += v.bytes;
                sum.segments += v.segments;
            }
        }
        sum
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.events_thread.take() {
            let _ = t.join();
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves the map itself intact.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// `BPF_MAP_UPDATE_BATCH`: both entries in one `bpf()` (aya has no batch
/// calls); on any error, one at a time, which also says what failed.
/// Writing an entry twice is harmless (`BPF_ANY`).
fn update_both<V: Pod>(map: &mut HashMap<MapData, u64, V>, keys: &[u64; 2], values: &[V; 2]) -> Result<(), MapError> {
    if map_batch(map, BPF_MAP_UPDATE_BATCH, keys, Some(values)).is_ok() {
        return Ok(());
    }
    for (key, value) in keys.iter().zip(values) {
        map.insert(key, value, 0)?;
    }
    Ok(())
}

/// `BPF_MAP_DELETE_BATCH`: both entries in one `bpf()`. The kernel stops at
/// the first missing key, so on any error: one at a time, ignoring the
/// missing.
fn remove_both<V: Pod>(map: &mut HashMap<MapData, u64, V>, keys: &[u64; 2]) {
    if map_batch::<V>(map, BPF_MAP_DELETE_BATCH, keys, None).is_ok() {
        return;
    }
    for key in keys {
        let _ = map.remove(key);
    }
}

const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The `batch` member of `union bpf_attr` (linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// One batch command over `keys` (and `values`, for an update) of a hash
/// map whose value type is `V` (aya checked its size against the map's).
fn map_batch<V: Pod>(
    map: &HashMap<MapData, u64, V>,
    cmd: libc::c_long,
    keys: &[u64; 2],
    values: Option<&[V; 2]>,
) -> std::io::Result<()> {
    // Mutable: the kernel writes `count` back into it.
    let mut attr = BatchAttr {
        keys: keys.as_ptr() as u64,
        values: values.map_or(0, |v| v.as_ptr() as u64),
        count: keys.len() as u32,
        map_fd: map.map().fd().as_fd().as_raw_fd() as u32,
        ..BatchAttr::default()
    };
    // SAFETY: `attr` is a valid `bpf_attr` prefix for the batch commands, its
    // size is passed; `keys` and `values` hold `count` keys and values of the
    // map's sizes and outlive the call; the map's descriptor is open (`map`
    // is borrowed). The kernel only reads them, and writes `count` back
    // into `attr`, which is passed as the exclusive borrow it is.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, cmd, &mut attr as *mut BatchAttr, size_of::<BatchAttr>() as libc::c_uint)
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn epoll_ctl(epfd: RawFd, op: libc::c_int, fd: RawFd, token: u64, events: u32) -> std::io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: `ev` is a valid epoll_event; both descriptors are open for the call.
    if unsafe { libc::epoll_ctl(epfd, op, fd, &mut ev) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Until `stop`: waits on the plane's epoll set, at most until the first
/// idle deadline; wakes the tunnel whose socket reported something
/// (recording the bits), for each cookie in `EVENTS` the tunnel that owns
/// it, and each tunnel whose idle deadline passed.
fn read_events(
    mut events: RingBuf<MapData>,
    epoll: &OwnedFd,
    registry: &Registry,
    deadlines: &Deadlines,
    stop: &AtomicBool,
) {
    // How long a stop waits at most; and how late a deadline set earlier
    // than the one the thread sleeps until can be (idle deadlines are
    // seconds away: the wait is not cut short for them).
    const MAX_WAIT: std::time::Duration = std::time::Duration::from_millis(100);
    let mut ready = [libc::epoll_event { events: 0, u64: 0 }; 64];
    while !stop.load(Ordering::Relaxed) {
        let wait = deadlines.wait(std::time::Instant::now(), MAX_WAIT);
        let timeout = wait.as_micros().div_ceil(1000) as libc::c_int;
        // SAFETY: `ready` is valid for its length.
        let n = unsafe { libc::epoll_wait(epoll.as_raw_fd(), ready.as_mut_ptr(), ready.len() as libc::c_int, timeout) };
        for ev in &ready[..n.max(0) as usize] {
            let (token, bits) = (ev.u64, ev.events);
            if token == RING_TOKEN {
                while let Some(item) = events.next() {
                    let Ok(bytes) = <[u8; 8]>::try_from(&item[..]) else {
                        continue;
                    };
                    let found = lock(registry).get(&u64::from_ne_bytes(bytes)).cloned();
                    if let Some((signal, side)) = found {
                        signal.budget[side].store(true, Ordering::Release);
                        signal.wake();
                    }
                }
            } else if let Some((signal, side)) = lock(registry).get(&token).cloned() {
                signal.events[side].fetch_or(bits, Ordering::AcqRel);
                signal.wake();
            }
        }
        deadlines.take_due(std::time::Instant::now(), |cookie| {
            if let Some((signal, _)) = lock(registry).get(&cookie).cloned() {
                signal.deadline.store(true, Ordering::Release);
                signal.wake();
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::pin::pin;
    use std::task::{Context, Poll, Waker};

    use super::Signal;

    #[test]
    fn a_wake_reaches_the_wait_or_the_next_one_once() {
        let signal = Signal::default();
        let mut cx = Context::from_waker(Waker::noop());
        assert_eq!(pin!(signal.woken()).poll(&mut cx), Poll::Pending, "nothing yet");
        signal.wake();
        {
            // A wait dropped before it was polled leaves the wake.
            let _unpolled = signal.woken();
        }
        assert_eq!(pin!(signal.woken()).poll(&mut cx), Poll::Ready(()), "kept for the next wait");
        assert_eq!(pin!(signal.woken()).poll(&mut cx), Poll::Pending, "taken once");
        let mut waiting = pin!(signal.woken());
        assert_eq!(waiting.as_mut().poll(&mut cx), Poll::Pending);
        signal.wake();
        signal.wake();
        assert_eq!(waiting.as_mut().poll(&mut cx), Poll::Ready(()), "woken while waiting");
        assert_eq!(pin!(signal.woken()).poll(&mut cx), Poll::Pending, "two wakes, one wait");
    }
}
