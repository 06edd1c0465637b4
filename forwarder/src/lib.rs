//! upsplice: a router for WebSocket and other HTTP/1.1 Upgrade traffic.
//!
//! One connection goes down one chain of modules (docs/architecture.md):
//! [`server`] (lifecycle: bind, accept, reload, drain; on the threads of
//! [`workers`]) → [`connection`]
//! (one connection to its access-log line) → [`handshake`] (the first
//! request: head, rewrite, [`route`], [`upstream`], the backend's 101) →
//! [`dataplane`] (the tunnel, relayed by one of the planes behind the
//! `DataPlane` seam). Beside the chain: [`state`] (what connections
//! share), [`access`] (the access record), [`metrics`] and [`admin`]
//! (observability); [`config`] is plain data, parsed with [`units`];
//! [`path`] is the path normaliser routing matches with; [`tls`] builds
//! the TLS listeners' rustls configs; [`sni`] reads a passthrough
//! listener's ClientHello and routes it by its server name.

pub mod access;
pub mod access_log;
pub mod admin;
pub mod config;
pub mod connection;
pub mod dataplane;
pub mod handshake;
pub mod host;
pub mod metrics;
pub mod nats;
pub mod path;
pub mod proxy;
pub mod route;
pub mod route_service;
pub mod server;
pub mod sni;
pub mod socket;
pub mod state;
pub mod tls;
pub mod units;
pub mod upstream;
pub mod workers;
