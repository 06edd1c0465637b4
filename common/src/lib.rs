//! What the sockmap plane's eBPF program (`ebpf/`) and its userspace
//! (`forwarder/src/dataplane/sockmap/`) share: the layout of each map value,
//! the flag bits and slots inside them, and the names userspace looks the
//! maps and the program up by. Both sides build from this one definition, so
//! a change to a layout reaches both or neither.
//!
//! `no_std`, for the eBPF program; the `user` feature adds `aya::Pod` for
//! userspace, as in the aya template.
//!
//! What each map holds and who writes it is described in `ebpf/src/main.rs`.

#![no_std]

/// Most sockets (two per tunnel) each map holds; userspace sets the same
/// number at load time.
pub const MAX_SOCKETS: u32 = 65_536;

/// Names of the maps and the program in the eBPF object. The `#[map]` and
/// `#[stream_verdict]` macros take the name from the static's or the
/// function's identifier, which must therefore be spelled as here; a
/// mismatch fails loading ("missing from the eBPF object").
pub mod names {
    /// Sockets whose arriving bytes the program handles; it is attached here.
    pub const ACTIVE: &str = "ACTIVE";
    /// Every socket of every tunnel, as redirect target.
    pub const TARGETS: &str = "TARGETS";
    /// Socket cookie → [`PeerEntry`](crate::PeerEntry).
    pub const PEERS: &str = "PEERS";
    /// Socket cookie → [`Control`](crate::Control).
    pub const CONTROL: &str = "CONTROL";
    /// Per-CPU [`Stats`](crate::Stats), [`STATS_SLOTS`](crate::STATS_SLOTS) of them.
    pub const STATS: &str = "STATS";
    /// Ring buffer of socket cookies whose tunnel userspace should check.
    pub const EVENTS: &str = "EVENTS";
    /// The `sk_skb` stream_verdict program.
    pub const PROGRAM: &str = "upsplice_verdict";
}

/// Value of the `PEERS` map, per socket: written by userspace once when the
/// tunnel is paired, then only by the program (which the kernel runs for one
/// socket at a time).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct PeerEntry {
    /// Cookie of the socket this socket's bytes go to.
    pub peer: u64,
    /// Bytes redirected from this socket so far.
    pub bytes: u64,
    /// Segments redirected from this socket so far.
    pub segments: u64,
    /// Bytes cut off the head of segments that repeated bytes the program
    /// had already handled (`trim_repeat` in `ebpf/src/main.rs`).
    pub trimmed: u64,
    /// Slot of [`Stats`] this socket's bytes count in: [`DIR_TO_BACKEND`]
    /// or [`DIR_TO_CLIENT`].
    pub dir: u32,
    /// TCP sequence number of the first byte the program has not seen yet
    /// (valid once [`PEER_SEQ_KNOWN`] is set).
    pub next_seq: u32,
    /// [`PEER_SEQ_KNOWN`], [`PEER_BROKEN`].
    pub flags: u32,
    pub _pad: u32,
}

// 4 × u64 + 4 × u32, 8-aligned: no padding bytes.
const _: () = assert!(core::mem::size_of::<PeerEntry>() == 48);

// SAFETY: `repr(C)`, integers only, no padding bytes (size asserted above):
// every bit pattern is a valid value.
#[cfg(feature = "user")]
unsafe impl aya::Pod for PeerEntry {}

/// [`PeerEntry::flags`]: [`PeerEntry::next_seq`] holds the sequence number
/// after the last segment.
pub const PEER_SEQ_KNOWN: u32 = 1;
/// [`PeerEntry::flags`]: a repeated segment head could not be cut off; the
/// stream is no longer exact, so the program drops every later byte of the
/// socket and userspace resets the tunnel.
pub const PEER_BROKEN: u32 = 2;

/// Value of the `CONTROL` map, per socket, written by userspace only (and
/// replaced whole: the map is not preallocated).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Control {
    /// Report the socket in `EVENTS` when its redirected bytes cross this.
    pub notify_at: u64,
}

// One u64: no padding bytes.
const _: () = assert!(core::mem::size_of::<Control>() == 8);

// SAFETY: `repr(C)`, one u64, no padding bytes (size asserted above).
#[cfg(feature = "user")]
unsafe impl aya::Pod for Control {}

/// One slot of the per-CPU `STATS` map.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub bytes: u64,
    pub segments: u64,
}

// 2 × u64: no padding bytes.
const _: () = assert!(core::mem::size_of::<Stats>() == 16);

// SAFETY: `repr(C)`, two u64, no padding bytes (size asserted above).
#[cfg(feature = "user")]
unsafe impl aya::Pod for Stats {}

/// `STATS` slot (and [`PeerEntry::dir`]) of bytes from client to backend.
pub const DIR_TO_BACKEND: u32 = 0;
/// `STATS` slot (and [`PeerEntry::dir`]) of bytes from backend to client.
pub const DIR_TO_CLIENT: u32 = 1;
/// `STATS` slot of redirects the kernel refused (peer socket gone).
pub const STATS_FAILED: u32 = 2;
/// `STATS` slot of repeated bytes cut off the head of segments (TCP queued
/// a retransmission overlapping bytes already handled).
pub const STATS_TRIMMED: u32 = 3;
/// Slots in `STATS`.
pub const STATS_SLOTS: u32 = 4;
