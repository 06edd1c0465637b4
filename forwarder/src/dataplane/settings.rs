//! The `[data_plane]` section: which plane relays tunnels and each plane's
//! sizes and bounds. It lives with the planes (they read it at start); the
//! config file embeds it as plain data.

use std::time::Duration;

use serde::Deserialize;

use super::ktls::KtlsMode;
use super::Mode;
use crate::units::{de_duration, de_opt_size, de_size};

/// `[data_plane]` settings (README, "Configuration"). Read when the planes
/// start; SIGHUP does not change them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub mode: Mode,
    /// Size of each splice pipe (rounded by the kernel to a power of two pages).
    #[serde(deserialize_with = "de_opt_size")]
    pub pipe_size: Option<u64>,
    /// Most pipe pairs the splice plane keeps open at once; past it, copy.
    pub max_pipes: usize,
    /// Userspace buffer of the copy plane, per direction, taken only while
    /// bytes are in flight.
    #[serde(deserialize_with = "de_size")]
    pub copy_buffer: u64,
    /// io_uring workers (0 = one per core).
    pub uring_workers: usize,
    /// Size of each buffer in a uring worker's shared pool (16MiB per
    /// worker); a tunnel direction holds at most about two while its reader
    /// is slow, none while idle.
    #[serde(deserialize_with = "de_size")]
    pub uring_buffer: u64,
    /// sockmap: most bytes one direction of a tunnel may have in the kernel
    /// (redirected but not yet acknowledged by the reader) before the
    /// tunnel steps aside to the next plane.
    #[serde(deserialize_with = "de_size")]
    pub sockmap_queue_limit: u64,
    /// sockmap: most bytes all tunnels together may hold in the kernel and
    /// in the plane's buffers; past it, tunnels step aside at a quarter of
    /// `sockmap_queue_limit`.
    #[serde(deserialize_with = "de_size")]
    pub sockmap_node_limit: u64,
    /// `adaptive`: a tunnel's traffic is judged over windows this long,
    /// from its start ([`super::Promote`]).
    #[serde(deserialize_with = "de_duration")]
    pub promote_after: Duration,
    /// `adaptive`: a window whose reads averaged at most this many bytes
    /// (and were at least [`super::PROMOTE_MIN_READS`]) promotes its tunnel.
    #[serde(deserialize_with = "de_size")]
    pub promote_message_size: u64,
    /// `adaptive`: at most this many promotions per second on the node
    /// ([`super::pacer`]).
    pub promote_rate: u32,
    /// `adaptive`: a promoted tunnel one of whose directions carries more
    /// than this many bytes per second over a `promote_after` window steps
    /// aside back to splice (bulk: splice carries it faster and cheaper);
    /// 0: never for its rate.
    #[serde(deserialize_with = "de_size")]
    pub demote_rate: u64,
    /// TLS tunnels: hand the session to the kernel (kTLS) and splice, or
    /// relay in userspace (`auto`, `on`, `off`).
    pub ktls: KtlsMode,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            mode: Mode::Auto,
            pipe_size: None,
            max_pipes: 16384,
            copy_buffer: 64 * 1024,
            uring_workers: 0,
            uring_buffer: 128 * 1024,
            sockmap_queue_limit: 4 * 1024 * 1024,
            sockmap_node_limit: 1024 * 1024 * 1024,
            promote_after: Duration::from_secs(1),
            promote_message_size: 4096,
            promote_rate: 200,
            demote_rate: 32 * 1024 * 1024,
            ktls: KtlsMode::Auto,
        }
    }
}

impl Settings {
    /// Checks the values against what the planes accept: Err((key, what is
    /// wrong)), the key relative to `[data_plane]`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(size) = self.pipe_size {
            if !(4096..=1 << 30).contains(&size) {
                return Err(("pipe_size", "must be between 4KiB and 1GiB".into()));
            }
        }
        if !(1024..=1 << 26).contains(&self.copy_buffer) {
            return Err(("copy_buffer", "must be between 1KiB and 64MiB".into()));
        }
        if self.sockmap_node_limit < self.sockmap_queue_limit {
            return Err(("sockmap_node_limit", "must be at least sockmap_queue_limit".into()));
        }
        if !(Duration::from_millis(10)..=Duration::from_secs(3600)).contains(&self.promote_after) {
            return Err(("promote_after", "must be between 10ms and 1h".into()));
        }
        if !(1..=1 << 24).contains(&self.promote_message_size) {
            return Err(("promote_message_size", "must be between 1 byte and 16MiB".into()));
        }
        if !(1..=1_000_000).contains(&self.promote_rate) {
            return Err(("promote_rate", "must be between 1 and 1000000 (promotions per second)".into()));
        }
        if self.demote_rate != 0 && !(64 * 1024..=1 << 40).contains(&self.demote_rate) {
            return Err(("demote_rate", "must be 0 (off) or between 64KiB and 1TiB (bytes per second)".into()));
        }
        let ub = self.uring_buffer;
        if !(4096..=1 << 20).contains(&ub) || !ub.is_power_of_two() {
            return Err(("uring_buffer", "must be a power of two between 4KiB and 1MiB".into()));
        }
        Ok(())
    }
}
