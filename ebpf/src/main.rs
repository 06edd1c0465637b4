//! upsplice's sockmap data plane, kernel side: an `sk_skb` stream_verdict
//! program that moves tunnel bytes from the socket they arrived on straight
//! to the egress of its peer, so userspace never touches the payload
//! (`src/program.rs`).
//!
//! `forwarder/build.rs` builds it for bpfel with aya-build. Built for any
//! other target (`cargo build --workspace`, `cargo clippy --workspace`) the
//! crate is an empty program, so that the whole workspace builds anywhere.

#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod program;

#[cfg(not(target_arch = "bpf"))]
fn main() {}
