//! Why a data plane cannot run or could not start.

use std::error::Error;
use std::io;

use super::Mode;

/// A plane's probe or start failed: which step, and the error underneath
/// when there is one (kept as the [`Error::source`], not flattened into a
/// string). Print it with [`chain`] (or anyhow's `{:#}`) to see the sources.
#[derive(Debug, thiserror::Error)]
pub enum PlaneError {
    /// This kernel or build lacks what the plane needs (probe).
    #[error("{0}")]
    Unsupported(String),
    /// A system call the plane needs failed: which step (probe, ring
    /// setup, a pipe of the configured size, a worker thread…).
    #[error("{step}")]
    Io {
        step: String,
        #[source]
        source: io::Error,
    },
    /// Loading or attaching the eBPF program or one of its maps failed
    /// (sockmap): which step, and aya's error.
    #[error("{step}")]
    Ebpf {
        step: String,
        #[source]
        source: Box<dyn Error + Send + Sync>,
    },
    /// A `[data_plane]` value the plane cannot use.
    #[error("{0}")]
    Settings(String),
    /// The plane started, but relaying its self-test's tunnels failed on
    /// this kernel: the checks that failed, and why.
    #[error("{0}")]
    SelfTest(String),
    /// The mode the config asks for by name cannot start.
    #[error("data_plane.mode = \"{mode}\" cannot start")]
    CannotStart {
        mode: Mode,
        #[source]
        source: Box<PlaneError>,
    },
}

impl PlaneError {
    /// For `map_err`: the step that failed with an I/O error.
    pub fn io(step: impl Into<String>) -> impl FnOnce(io::Error) -> PlaneError {
        move |source| PlaneError::Io { step: step.into(), source }
    }

    /// For `map_err`: the eBPF step that failed.
    pub fn ebpf<E: Error + Send + Sync + 'static>(step: impl Into<String>) -> impl FnOnce(E) -> PlaneError {
        move |source| PlaneError::Ebpf { step: step.into(), source: Box::new(source) }
    }
}

/// An error and its sources on one line, `: `-separated (for logs and
/// `upsplice check`).
pub fn chain(e: &dyn Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_keeps_every_source() {
        let e = PlaneError::CannotStart {
            mode: Mode::Splice,
            source: Box::new(PlaneError::io("a pipe of data_plane.pipe_size")(io::Error::from_raw_os_error(
                libc::EPERM,
            ))),
        };
        let io_text = io::Error::from_raw_os_error(libc::EPERM).to_string();
        assert_eq!(
            chain(&e),
            format!("data_plane.mode = \"splice\" cannot start: a pipe of data_plane.pipe_size: {io_text}")
        );
    }
}
