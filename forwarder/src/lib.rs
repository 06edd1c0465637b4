//! upsplice: a router for WebSocket and other HTTP/1.1 Upgrade traffic.
//!
//! The control plane (listener → [`handshake`] → [`route`] → [`upstream`])
//! parses only the first request of a connection; after a `101 Switching
//! Protocols` the connection pair goes to a data plane ([`dataplane`]) that
//! relays it, ideally without userspace touching the payload again.
//! [`server`] owns the lifecycle (accept, reload, drain), [`metrics`] and
//! [`admin`] the observability.

pub mod access;
pub mod admin;
pub mod config;
pub mod connection;
pub mod dataplane;
pub mod handshake;
pub mod metrics;
pub mod path;
pub mod route;
pub mod server;
pub mod state;
pub mod units;
pub mod upstream;
