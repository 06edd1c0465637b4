//! upsplice: a router for WebSocket and other HTTP/1.1 Upgrade traffic.
//!
//! The control plane (listener → handshake → route → upstream) parses only
//! the first request of a connection; after a `101 Switching Protocols` the
//! connection pair goes to a data plane ([`dataplane`]) that relays it,
//! ideally without userspace touching the payload again.

pub mod config;
pub mod dataplane;
pub mod metrics;
pub mod route;
