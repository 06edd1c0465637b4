//! The access record: what the access log says about one connection when
//! it ends (target `upsplice::access`), filled in as the connection goes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use crate::dataplane::Mode;

/// What the access log says about a connection when it ends.
#[derive(Debug)]
pub struct AccessRecord {
    pub peer: SocketAddr,
    pub listener: Arc<str>,
    pub host: Option<String>,
    pub route: Option<Arc<str>>,
    pub backend: Option<SocketAddr>,
    /// The status answered (101 for tunnels); 0 when none was seen (tcp
    /// listeners, a backend that never answered).
    pub status: u16,
    pub data_plane: Option<Mode>,
    pub to_backend: u64,
    pub to_client: u64,
    pub started: Instant,
    pub reason: &'static str,
}

impl AccessRecord {
    pub fn new(peer: SocketAddr, listener: Arc<str>) -> AccessRecord {
        AccessRecord {
            peer,
            listener,
            host: None,
            route: None,
            backend: None,
            status: 0,
            data_plane: None,
            to_backend: 0,
            to_client: 0,
            started: Instant::now(),
            reason: "done",
        }
    }

    /// Writes the access-log line (target `upsplice::access`).
    pub fn log(&self) {
        tracing::info!(
            target: "upsplice::access",
            client = %self.peer,
            listener = %self.listener,
            host = self.host.as_deref().unwrap_or("-"),
            route = self.route.as_deref().unwrap_or("-"),
            backend = %self.backend.map(|b| b.to_string()).unwrap_or_else(|| "-".into()),
            status = self.status,
            data_plane = self.data_plane.map(Mode::as_str).unwrap_or("-"),
            bytes_to_backend = self.to_backend,
            bytes_to_client = self.to_client,
            duration_ms = self.started.elapsed().as_millis() as u64,
            close = self.reason,
        );
    }
}
