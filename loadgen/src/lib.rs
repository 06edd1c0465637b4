//! upsplice-loadgen: an open-loop WebSocket / HTTP / TCP load generator that
//! records coordinated-omission-corrected latency into HdrHistograms, and the
//! echo backend it is measured against. See README.md.

pub mod churn;
pub mod cli;
pub mod codec;
pub mod echo;
pub mod engine;
pub mod handshake;
pub mod hgrm;
pub mod hlog;
pub mod hold;
pub mod httphead;
pub mod lifecycle;
pub mod nats;
pub mod net;
pub mod outputs;
pub mod plot;
pub mod progress;
pub mod proxy;
pub mod readbuf;
pub mod recorder;
pub mod report;
pub mod rusage;
pub mod schedule;
pub mod search;
pub mod target;
pub mod tcpbulk;
pub mod timeline;
pub mod timer;
pub mod tls;
pub mod watch;
pub mod ws;
pub mod wsproto;
