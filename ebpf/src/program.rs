//! The `sk_skb` stream_verdict program and its maps.
//!
//! Maps (userspace in `forwarder/src/dataplane/sockmap/` owns their contents;
//! their value types, flag bits, slots and names are in `upsplice-common`,
//! which userspace builds from too):
//!
//! * [`ACTIVE`]: sockets whose arriving bytes this program handles; the
//!   program is attached to this map.
//! * [`TARGETS`]: every socket of every tunnel, as redirect target. It has no
//!   program, so a socket in it alone is not diverted; a socket is put here
//!   before any socket can be redirected to it.
//! * [`PEERS`]: socket cookie → [`PeerEntry`] (peer cookie, direction, bytes
//!   redirected); written by userspace once, then only by this program.
//! * [`CONTROL`]: socket cookie → [`Control`], written only by userspace:
//!   when to notify it (below).
//! * [`STATS`]: per-CPU [`Stats`] per direction, plus failed redirects.
//! * [`EVENTS`]: when a socket's redirected bytes cross its
//!   [`Control::notify_at`], the program puts the cookie here so that
//!   userspace checks that tunnel's queues (backpressure) without polling.
//!
//! Every byte of a paired socket is redirected: the program never passes
//! bytes to userspace. Backpressure is userspace's: a tunnel whose queues
//! grow leaves `ACTIVE` for good (the program no longer runs for it) and
//! goes on through another plane.
//!
//! Repeated heads: TCP may queue a segment whose head it already received
//! (a retransmission merged with new bytes); the kernel hands the verdict
//! whole segments, so the program cuts the repeated head off first
//! ([`trim_repeat`]), or, if it cannot, marks the socket broken and drops
//! its bytes so that userspace resets the tunnel rather than corrupt it.
//!
//! A socket without a `PEERS` entry gets `SK_PASS`: its bytes go to its own
//! receive queue, never dropped. Zero-length segments (FIN) are dropped.

use aya_ebpf::{
    bindings::sk_action,
    helpers::bpf_get_socket_cookie,
    macros::{map, stream_verdict},
    maps::{HashMap, PerCpuArray, RingBuf, SockHash},
    programs::SkBuffContext,
    EbpfContext as _,
};
use upsplice_common::{
    Control, PeerEntry, Stats, MAX_SOCKETS, PEER_BROKEN, PEER_SEQ_KNOWN, STATS_FAILED, STATS_SLOTS, STATS_TRIMMED,
};

/// Most bytes `bpf_skb_adjust_room` removes from an `sk_skb` in one call.
const ADJUST_ROOM_MAX: u32 = 0xfff;
/// Bound of the trimming loop: 64 steps cut a repeated head of up to
/// 256 KiB (seen: one 65,483-byte loopback segment at the head of a
/// 143,413-byte coalesced one). A longer repeat marks the socket broken.
const TRIM_STEPS: u32 = 64;

// Each map's name in the object is its identifier: `upsplice_common::names`.
#[map]
static ACTIVE: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map]
static TARGETS: SockHash<u64> = SockHash::with_max_entries(MAX_SOCKETS, 0);

#[map]
static PEERS: HashMap<u64, PeerEntry> = HashMap::with_max_entries(MAX_SOCKETS, 0);

/// Not preallocated: userspace replaces values whole, and a preallocated
/// element may be reused while the program still reads it.
#[map]
static CONTROL: HashMap<u64, Control> = HashMap::with_max_entries(MAX_SOCKETS, aya_ebpf::bindings::BPF_F_NO_PREALLOC);

#[map]
static STATS: PerCpuArray<Stats> = PerCpuArray::with_max_entries(STATS_SLOTS, 0);

#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Named as `upsplice_common::names::PROGRAM`.
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
    let (mut peer, dir, flags) = unsafe { ((*entry).peer, (*entry).dir, (*entry).flags) };
    if flags & PEER_BROKEN != 0 {
        // Tell userspace again (the first event may have found the ring
        // full): it resets the tunnel.
        let _ = EVENTS.output::<u64>(cookie, 0);
        return sk_action::SK_DROP;
    }
    let len = match trim_repeat(&ctx, entry, flags, len) {
        Ok(len) => len,
        Err(()) => {
            // SAFETY: as for `entry` above.
            unsafe { (*entry).flags = flags | PEER_BROKEN };
            let _ = EVENTS.output::<u64>(cookie, 0);
            return sk_action::SK_DROP;
        }
    };
    if len == 0 {
        // Every byte of it was handled before; nothing is left to send, and
        // an empty segment leaves the socket's counts alone when dropped.
        return sk_action::SK_DROP;
    }
    // SAFETY: a value of a non-preallocated map: userspace replaces it
    // whole, the old one stays valid (RCU) while this program reads it.
    let notify_at = match unsafe { CONTROL.get(cookie) } {
        Some(c) => c.notify_at,
        None => 0,
    };
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
        if before < notify_at && after >= notify_at {
            // A full ring only delays the check to userspace's next timer.
            let _ = EVENTS.output::<u64>(cookie, 0);
        }
    } else {
        count(STATS_FAILED, len);
    }
    verdict
}

/// Cuts off the head of a segment that repeats bytes this program already
/// handled; returns how many bytes are left.
///
/// The kernel hands this program whole queued segments (`tcp_read_skb`),
/// unlike `recv()`, which starts reading at the socket's copied sequence
/// number. TCP queues a segment whose head it already received when only
/// its tail is new — a retransmission merged with new bytes in the socket
/// backlog, or an out-of-order segment overlapping one that filled the
/// hole — so without this the peer gets the head twice (reproduced on 6.18:
/// one 65,483-byte segment twice in most 1 GiB runs against backpressure).
/// The segment's TCP sequence number is the first word of the control
/// buffer (`TCP_SKB_CB(skb)->seq`, which `__sk_buff.cb[0]` reads in an
/// `sk_skb` program); trimming the head before the verdict also keeps the
/// socket's copied sequence number exact, since the kernel adds the
/// segment's remaining length.
fn trim_repeat(ctx: &SkBuffContext, entry: *mut PeerEntry, flags: u32, len: u64) -> Result<u64, ()> {
    let seq = ctx.cb()[0];
    // SAFETY: `entry` as in the caller.
    let next = unsafe { (*entry).next_seq };
    let end = seq.wrapping_add(len as u32);
    if flags & PEER_SEQ_KNOWN == 0 {
        // SAFETY: as above.
        unsafe {
            (*entry).next_seq = end;
            (*entry).flags = flags | PEER_SEQ_KNOWN;
        }
        return Ok(len);
    }
    // Serial-number arithmetic: positive when `seq` is before `next`.
    let repeated = next.wrapping_sub(seq) as i32;
    if repeated <= 0 {
        // SAFETY: as above.
        unsafe { (*entry).next_seq = end };
        return Ok(len);
    }
    let cut = (repeated as u64).min(len) as u32;
    let mut left = cut;
    for _ in 0..TRIM_STEPS {
        if left == 0 {
            break;
        }
        let step = left.min(ADJUST_ROOM_MAX);
        // Shrinking an sk_skb pulls `step` bytes off its head.
        ctx.adjust_room(-(step as i32), 0, 0).map_err(|_| ())?;
        left -= step;
    }
    if left != 0 {
        return Err(());
    }
    if end.wrapping_sub(next) as i32 > 0 {
        // SAFETY: as above.
        unsafe { (*entry).next_seq = end };
    }
    // SAFETY: as above.
    unsafe { (*entry).trimmed += u64::from(cut) };
    count(STATS_TRIMMED, u64::from(cut));
    Ok(len - u64::from(cut))
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
