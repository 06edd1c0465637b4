//! The loaded eBPF program and its maps (see `ebpf/src/main.rs` for what
//! each map means). One [`Kernel`] per plane: loaded and attached once.

use std::collections::HashMap as StdHashMap;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use aya::maps::{HashMap, MapData, MapError, PerCpuArray, RingBuf, SockHash};
use aya::programs::SkSkb;
use aya::{Ebpf, EbpfLoader};
use tokio::sync::Notify;

/// `Peer` of the eBPF program's `PEERS` map; same layout.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerEntry {
    pub peer: u64,
    pub bytes: u64,
    pub segments: u64,
    pub passed: u64,
    pub dir: u32,
    pub pad: u32,
}

// SAFETY: plain old data: integers only, `repr(C)`, no padding bytes
// (4 × u64 + 2 × u32 = 40 bytes, 8-aligned).
unsafe impl aya::Pod for PeerEntry {}

/// `Control` of the eBPF program's `CONTROL` map; same layout.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Control {
    pub copied: u64,
    pub paused: u32,
    pub pad: u32,
}

// SAFETY: integers only, `repr(C)`, no padding (u64 + 2 × u32 = 16 bytes).
unsafe impl aya::Pod for Control {}

/// `Stats` of the eBPF program's `STATS` map; same layout.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub bytes: u64,
    pub segments: u64,
}

// SAFETY: two u64, `repr(C)`, no padding.
unsafe impl aya::Pod for Stats {}

/// Direction slots of `STATS` and `PeerEntry::dir`.
pub const DIR_TO_BACKEND: u32 = 0;
pub const DIR_TO_CLIENT: u32 = 1;
/// `STATS` slot of redirects the kernel refused.
pub const STATS_FAILED: u32 = 2;

/// Wakes the tunnel that owns a socket cookie when its redirected bytes
/// cross the threshold set in `NOTIFY`.
pub type Registry = Mutex<StdHashMap<u64, Arc<Notify>>>;

pub struct Kernel {
    active: Mutex<SockHash<MapData, u64>>,
    targets: Mutex<SockHash<MapData, u64>>,
    peers: Mutex<HashMap<MapData, u64, PeerEntry>>,
    notify: Mutex<HashMap<MapData, u64, u64>>,
    control: Mutex<HashMap<MapData, u64, Control>>,
    stats: PerCpuArray<MapData, Stats>,
    pub registry: Arc<Registry>,
    stop: Arc<AtomicBool>,
    events_thread: Option<JoinHandle<()>>,
    /// Holds the program and its attachment: dropping it detaches.
    _ebpf: Ebpf,
}

fn map_err(what: &str) -> impl FnOnce(MapError) -> String + '_ {
    move |e| format!("{what}: {e}")
}

impl Kernel {
    /// Loads `object`, creates the maps, attaches the verdict program to
    /// `ACTIVE` and starts the thread that reads `EVENTS`.
    pub fn load(object: &[u8], max_sockets: u32) -> Result<Kernel, String> {
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("ACTIVE", max_sockets)
            .map_max_entries("TARGETS", max_sockets)
            .map_max_entries("PEERS", max_sockets)
            .map_max_entries("NOTIFY", max_sockets)
            .map_max_entries("CONTROL", max_sockets)
            .load(object)
            .map_err(|e| format!("loading the eBPF object: {e}"))?;
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name).ok_or_else(|| format!("map {name} missing from the eBPF object"))
        };
        let active: SockHash<MapData, u64> =
            SockHash::try_from(take(&mut ebpf, "ACTIVE")?).map_err(map_err("ACTIVE"))?;
        let targets: SockHash<MapData, u64> =
            SockHash::try_from(take(&mut ebpf, "TARGETS")?).map_err(map_err("TARGETS"))?;
        let peers = HashMap::try_from(take(&mut ebpf, "PEERS")?).map_err(map_err("PEERS"))?;
        let notify = HashMap::try_from(take(&mut ebpf, "NOTIFY")?).map_err(map_err("NOTIFY"))?;
        let control = HashMap::try_from(take(&mut ebpf, "CONTROL")?).map_err(map_err("CONTROL"))?;
        let stats = PerCpuArray::try_from(take(&mut ebpf, "STATS")?).map_err(map_err("STATS"))?;
        let events = RingBuf::try_from(take(&mut ebpf, "EVENTS")?).map_err(map_err("EVENTS"))?;

        let program: &mut SkSkb = ebpf
            .program_mut("upsplice_verdict")
            .ok_or("program upsplice_verdict missing from the eBPF object")?
            .try_into()
            .map_err(|e| format!("upsplice_verdict: {e}"))?;
        program.load().map_err(|e| format!("loading upsplice_verdict (verifier): {e}"))?;
        program.attach(active.fd()).map_err(|e| format!("attaching upsplice_verdict to ACTIVE: {e}"))?;

        let registry: Arc<Registry> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let events_thread = std::thread::Builder::new()
            .name("sockmap-events".into())
            .spawn({
                let registry = registry.clone();
                let stop = stop.clone();
                move || read_events(events, &registry, &stop)
            })
            .map_err(|e| format!("starting the events thread: {e}"))?;

        Ok(Kernel {
            active: Mutex::new(active),
            targets: Mutex::new(targets),
            peers: Mutex::new(peers),
            notify: Mutex::new(notify),
            control: Mutex::new(control),
            stats,
            registry,
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

    pub fn pair(&self, cookie: u64, entry: PeerEntry) -> Result<(), MapError> {
        lock(&self.peers).insert(cookie, entry, 0)
    }

    pub fn unpair(&self, cookie: u64) {
        let _ = lock(&self.peers).remove(&cookie);
        let _ = lock(&self.notify).remove(&cookie);
        let _ = lock(&self.control).remove(&cookie);
    }

    /// The program's counters for the socket `cookie` (zero when unpaired).
    pub fn peer(&self, cookie: u64) -> PeerEntry {
        lock(&self.peers).get(&cookie, 0).unwrap_or_default()
    }

    /// Tells the program whether to pause the socket `cookie` and how many
    /// of its passed bytes userspace has forwarded.
    pub fn control(&self, cookie: u64, control: Control) -> Result<(), MapError> {
        lock(&self.control).insert(cookie, control, 0)
    }

    /// Asks for an event once the socket `cookie` redirected `at` bytes.
    pub fn notify_at(&self, cookie: u64, at: u64) -> Result<(), MapError> {
        lock(&self.notify).insert(cookie, at, 0)
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

/// Reads cookies from `EVENTS` and wakes their tunnels until `stop`.
fn read_events(mut events: RingBuf<MapData>, registry: &Registry, stop: &AtomicBool) {
    let fd = events.as_raw_fd();
    while !stop.load(Ordering::Relaxed) {
        let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd; the timeout bounds how long a stop waits.
        let _ = unsafe { libc::poll(&mut pfd, 1, 100) };
        while let Some(item) = events.next() {
            let Ok(bytes) = <[u8; 8]>::try_from(&item[..]) else {
                continue;
            };
            let cookie = u64::from_ne_bytes(bytes);
            let waker = lock(registry).get(&cookie).cloned();
            if let Some(waker) = waker {
                waker.notify_one();
            }
        }
    }
}
