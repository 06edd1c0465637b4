//! Whether this kernel could carry TLS tunnels itself (kTLS: the `tls`
//! upper-layer protocol), for `upsplice check` and the startup log.
//!
//! A TLS tunnel relays decrypted bytes, so today it runs on the userspace
//! `tls` relay (`dataplane/stream.rs`). With kTLS the kernel would
//! encrypt and decrypt and the tunnel could use splice or sockmap; that
//! path is not built, because it cannot be tested on a kernel without
//! `CONFIG_TLS`. This module is the seam: it says which case a machine is.

use std::path::Path;

/// Where the kernel lists the upper-layer protocols it offers.
const AVAILABLE_ULP: &str = "/proc/sys/net/ipv4/tcp_available_ulp";

/// What this kernel offers for TLS tunnels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ktls {
    /// The kernel offers the `tls` ULP (upsplice does not use it yet).
    Offered,
    /// It does not, and why.
    Unavailable(String),
}

impl std::fmt::Display for Ktls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Ktls::Offered => f.write_str(
                "kTLS offered by the kernel (the `tls` ULP); not used yet: TLS tunnels run on the userspace tls relay",
            ),
            Ktls::Unavailable(why) => write!(f, "kTLS unavailable: {why}; TLS tunnels run on the userspace tls relay"),
        }
    }
}

/// This machine's case.
pub fn probe() -> Ktls {
    probe_at(Path::new(AVAILABLE_ULP))
}

fn probe_at(path: &Path) -> Ktls {
    match std::fs::read_to_string(path) {
        Ok(list) if list.split_whitespace().any(|ulp| ulp == "tls") => Ktls::Offered,
        Ok(list) => Ktls::Unavailable(format!(
            "the kernel offers no `tls` ULP ({} lists {:?}): CONFIG_TLS is off, or `modprobe tls` has not run",
            path.display(),
            list.trim()
        )),
        Err(e) => Ktls::Unavailable(format!("{} cannot be read: {e}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ulp_list_decides() {
        let dir = tempfile::tempdir().unwrap();
        let at = |text: &str| {
            let p = dir.path().join("ulp");
            std::fs::write(&p, text).unwrap();
            probe_at(&p)
        };
        assert_eq!(at("espintcp mptcp tls\n"), Ktls::Offered);
        let without = at("espintcp mptcp\n");
        assert!(matches!(&without, Ktls::Unavailable(w) if w.contains("CONFIG_TLS") && w.contains("espintcp mptcp")));
        assert!(matches!(probe_at(&dir.path().join("absent")), Ktls::Unavailable(w) if w.contains("cannot be read")));
        // Whatever this machine is, it says so in one line.
        assert!(!probe().to_string().contains('\n'));
    }
}
