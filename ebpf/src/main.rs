//! upsplice's sockmap data plane, kernel side: an `sk_skb` stream_verdict
//! program that moves tunnel bytes from the socket they arrived on straight
//! to the egress of its peer, so userspace never touches the payload.
//!
//! Maps (userspace in `forwarder/src/dataplane/sockmap/` owns their contents):
//!
//! * [`ACTIVE`]: sockets whose arriving bytes this program handles; the
//!   program is attached to this map.
//! * [`TARGETS`]: every socket of every tunnel, as redirect target. It has no
//!   program, so a socket in it alone is not diverted; a socket is put here
//!   before any socket can be redirected to it.
//! * [`PEERS`]: socket cookie → [`Peer`] (peer cookie, direction, bytes
//!   redirected, bytes passed to userspace); written by userspace once, then
//!   only by this program.
//! * [`CONTROL`]: socket cookie → [`Control`], written only by userspace:
//!   whether the direction is paused, and how many passed bytes userspace
//!   has copied to the peer so far.
//! * [`STATS`]: per-CPU [`Stats`] per direction, plus failed redirects.
//! * [`NOTIFY`]: socket cookie → a byte count; when this socket's redirected
//!   bytes cross it, the program puts the cookie into [`EVENTS`] so that
//!   userspace checks that tunnel's queues (backpressure) without polling.
//!
//! Pausing (backpressure): while a direction is paused, or while userspace
//! has not yet copied every byte passed to it, its bytes get `SK_PASS`: they
//! queue on the socket itself, charged to its receive buffer, so TCP flow
//! control holds the sender back; userspace reads and forwards them. Only
//! when `passed == copied` (as userspace reports after writing) and the
//! direction is not paused does the program redirect again — so a
//! redirected byte can never overtake a passed one. (Removing the socket
//! from `ACTIVE` instead would be simpler, but a segment being verdicted at
//! that moment finds no program and is dropped: lost 64 KiB in a test.)
//!
//! A socket without a `PEERS` entry gets `SK_PASS`: its bytes go to its own
//! receive queue, never dropped. Zero-length segments (FIN) are dropped.

#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::sk_action,
    helpers::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, PerCpuArray, RingBuf, SockHash},
    programs::SkBuffContext,
    EbpfContext as _,
};

/// Most sockets (two per tunnel); userspace may change it at load time.
const MAX_SOCKETS: u32 = 65_536;

/// Per-socket entry of [`PEERS`]. The layout is shared with userspace
/// (`forwarder/src/dataplane/sockmap/maps.rs`): change both together.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Peer {
    /// Cookie of the socket this socket's bytes go to.
    pub peer: u64,
    /// Bytes redirected from this socket so far (written only by this
    /// program, which the kernel runs for one socket at a time).
    pub bytes: u64,
    /// Segments redirected from this socket so far.
    pub segments: u64,
    /// Bytes passed to this socket's own queue (for userspace) so far.
    pub passed: u64,
    /// Index into [`STATS`]: 0 client → backend, 1 backend → client.
    pub dir: u32,
    pub _pad: u32,
}

/// Per-socket entry of [`CONTROL`], written by userspace only.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Control {
    /// Of the bytes passed to userspace, how many it forwarded so far.
    pub copied: u64,
    /// Non-zero: pass every byte to userspace (backpressure).
    pub paused: u32,
    pub _pad: u32,
}

/// One slot of [`STATS`].
#[repr(C)]
pub struct Stats {
    pub bytes: u64,
    pub segments: u64,
}

/// [`STATS`] slot counting redirects the kernel refused (peer socket gone).
const STATS_FAILED: u32 = 2;

#[map]
static ACTIVE: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map]
static TARGETS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map]
static PEERS: HashMap<u64, Peer> = HashMap::with_max_entries(MAX_SOCKETS, 0);

/// Not preallocated: userspace replaces values whole, and a preallocated
/// element may be reused while the program still reads it.
#[map]
static CONTROL: HashMap<u64, Control> = HashMap::with_max_entries(MAX_SOCKETS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map]
static STATS: PerCpuArray<Stats> = PerCpuArray::with_max_entries(3, 0);

#[map]
static NOTIFY: HashMap<u64, u64> = HashMap::with_max_entries(MAX_SOCKETS, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

#[stream_verdict]
pub fn upsplice_verdict(ctx: SkBuffContext) -> u32 {
    // SAFETY: the context pointer is the sk_buff the kernel passed to this
    // program, which is what bpf_get_socket_cookie expects in sk_skb programs.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let Some(entry) = PEERS.get_ptr_mut(cookie) else {
        // Not (or no longer) paired: keep the bytes on this socket.
        return sk_action::SK_PASS;
    };
    let len = u64::from(ctx.len());
    if len == 0 {
        // The FIN segment runs the verdict too (tcp_read_skb) with no bytes.
        // Redirected, the target's psock would send zero bytes, take that
        // for a broken pipe (EPIPE on the target) and stop transmitting.
        // Nothing to deliver: drop it; userspace passes FIN on itself.
        return sk_action::SK_DROP;
    }
    // SAFETY: `entry` points into a PEERS value; only this program writes
    // it, for one socket at a time (the kernel serialises the verdict per
    // socket under the socket lock); userspace only reads it.
    let (mut peer, dir, passed) = unsafe { ((*entry).peer, (*entry).dir, (*entry).passed) };
    // SAFETY: a value of a non-preallocated map: userspace replaces it
    // whole, the old one stays valid (RCU) while this program reads it.
    let (copied, paused) = match unsafe { CONTROL.get(cookie) } {
        Some(c) => (c.copied, c.paused),
        None => (0, 0),
    };
    if paused != 0 || passed != copied {
        // SAFETY: as for `entry` above.
        unsafe { (*entry).passed = passed + len };
        return sk_action::SK_PASS;
    }
    let verdict = TARGETS.redirect_skb(&ctx, &mut peer, 0) as u32;
    if verdict == sk_action::SK_PASS {
        // SAFETY: as above.
        let before = unsafe { (*entry).bytes };
        let after = before + len;
        // SAFETY: as above.
        unsafe {
            (*entry).bytes = after;
            (*entry).segments += 1;
        }
        count(dir, len);
        // SAFETY: a plain u64 value; userspace replaces it whole.
        if let Some(&at) = unsafe { NOTIFY.get(cookie) } {
            if before < at && after >= at {
                // A full ring only delays the check to userspace's next timer.
                let _ = EVENTS.output::<u64>(cookie, 0);
            }
        }
    } else {
        count(STATS_FAILED, len);
    }
    verdict
}

fn count(slot: u32, len: u64) {
    if let Some(stats) = STATS.get_ptr_mut(slot) {
        // SAFETY: `stats` points to this CPU's slot, valid for the run.
        unsafe {
            (*stats).bytes += len;
            (*stats).segments += 1;
        }
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 11] = *b"Apache-2.0\0";
