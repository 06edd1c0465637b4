//! One tunnel through the sockmap plane, along its life:
//!
//! * `handoff`: steps 0–6, from a tokio tunnel to sockets in the maps
//!   that the kernel relays (or a refusal, untouched or with its leftovers
//!   delivered);
//! * `watch`: the task that watches the tunnel until it ends or steps
//!   aside, waking on the events thread's reports, its idle deadline, and
//!   `pace`'s clock only while something nothing reports is pending;
//!   each look updates both directions (`carry`: counters, the userspace
//!   tail, FIN) and asks whether to step aside;
//! * `step_aside`: the bounds at work: leaving `ACTIVE` one source at a
//!   time, then the maps, with the accounting checked, for the next plane;
//! * `direction`: one direction's phase and counters, and every decision
//!   above as a pure function of them;
//! * `bounds`: the per-direction and node-wide bounds;
//! * `membership`: the tunnel's place in the maps and the epoll set, and
//!   the one way a tunnel that does not move on ends.
//!
//! [`relay`] strings them together.

mod bounds;
mod carry;
mod direction;
mod handoff;
mod membership;
mod pace;
mod step_aside;
mod watch;

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use self::bounds::{step_aside_reason, HeldShare, RATE_REASON};
pub use self::bounds::{Limits, NodeHeld};
use self::direction::{ended, Dir};
use self::handoff::{handoff, Handed, Handoff};
use self::membership::Membership;
use self::step_aside::leave;
use self::watch::{Ended, Watch, Watched};
use super::kernel::Kernel;
use crate::dataplane::{Cause, CloseReason, Outcome, Rejected, Tunnel};

/// Bytes userspace wrote itself (leftovers, and bytes carried while the
/// tunnel steps aside), per direction, for the plane's totals.
#[derive(Debug, Default)]
pub struct UserBytes {
    pub to_backend: AtomicU64,
    pub to_client: AtomicU64,
}

/// Why and how often tunnels left the plane (for `/metrics`).
#[derive(Debug, Default)]
pub struct StepAsides {
    /// Handed to the next plane with every byte accounted for.
    pub handed_over: AtomicU64,
    /// Could not leave exactly: reset both sides instead.
    pub reset: AtomicU64,
}

/// What every tunnel of the plane shares: bounds, totals and counters.
#[derive(Debug)]
pub struct Shared {
    pub limits: Limits,
    /// Bytes userspace wrote itself.
    pub user: UserBytes,
    pub node: NodeHeld,
    pub step_asides: StepAsides,
    /// The drain deadline passed ([`crate::dataplane::DataPlane::drain`]):
    /// every tunnel ends, woken through its signal (a wait on the drain
    /// token in each would stay in every idle tunnel's future).
    pub draining: AtomicBool,
}

/// Relays `t` through the kernel until it ends. Hands it back when its
/// sockets cannot join the maps (untouched, or with its leftovers already
/// delivered and nothing else), and when it stepped aside: then out of the
/// maps, with what userspace still holds as leftovers and the bytes this
/// plane relayed in [`Rejected::relayed`].
///
/// Not an `async fn`: a coroutine keeps room for each of its arguments
/// for its whole life, even once moved out, and `t` would stay there
/// beside the watch of every idle tunnel. The handoff takes `t` here.
pub fn relay<'k>(
    kernel: &'k Kernel,
    shared: &'k Shared,
    t: Tunnel,
) -> impl Future<Output = Result<Outcome, Rejected>> + Send + 'k {
    // Boxed: the handoff's state (the tunnel, leftover writes, refusal
    // paths) is freed before the watch, which is what stays for the
    // tunnel's life.
    let handoff = Box::pin(handoff(kernel, shared.limits, [&shared.user.to_backend, &shared.user.to_client], t));
    async move {
        let Handed { mut members, up, down, signal, sockets, idle_timeout, drain } = match handoff.await? {
            Handoff::Ended(outcome) => return Ok(outcome),
            Handoff::Watch(handed) => handed,
        };
        let watch = Watch { kernel, shared, signal, idle_timeout, drain };
        let watched = Watched { up, down, share: HeldShare::new(&shared.node) };
        let (end, watch, Watched { mut up, mut down, share }) = watch.run(watched, &mut members.deadline).await;
        let reason = match end {
            Ended::Closed(reason) => reason,
            Ended::StepAside(why) => match Box::pin(leave(&mut members, &mut up, &mut down)).await {
                Ok(()) => {
                    shared.step_asides.handed_over.fetch_add(1, Ordering::Relaxed);
                    drop(share);
                    return hand_over(members, up, down, sockets, watch.idle_timeout, watch.drain, why);
                }
                Err(e) => {
                    shared.step_asides.reset.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!("sockmap: stepping aside failed, resetting the tunnel: {e}");
                    CloseReason::Error
                }
            },
        };
        drop(share);
        // The last counts, before the entries go (a direction that passed FIN
        // on had its last count read then: the verdict had seen every byte).
        for d in [&mut up, &mut down] {
            if !d.done() {
                d.redirected = kernel.peer(d.src_cookie).bytes;
            }
        }
        let outcome = ended(&up, &down, reason);
        members.closing = true;
        members.end(reason);
        drop(sockets);
        Ok(outcome)
    }
}

/// A tunnel that stepped aside and left the maps ([`leave`]) goes back to
/// tokio for the next plane, with what userspace still holds as its
/// leftovers and what this plane relayed.
#[expect(clippy::result_large_err, reason = "the seam's Rejected carries the whole tunnel")]
fn hand_over(
    members: Membership<'_>,
    mut up: Dir<'_>,
    mut down: Dir<'_>,
    (client, backend): (std::net::TcpStream, std::net::TcpStream),
    idle_timeout: Duration,
    drain: CancellationToken,
    why: &'static str,
) -> Result<Outcome, Rejected> {
    let (client, backend) = match (TcpStream::from_std(client), TcpStream::from_std(backend)) {
        (Ok(c), Ok(b)) => (c, b),
        (c, b) => {
            tracing::warn!("sockmap: back to tokio: {:?} {:?}", c.err(), b.err());
            let outcome = ended(&up, &down, CloseReason::Error);
            members.end(CloseReason::Error);
            return Ok(outcome);
        }
    };
    let relayed = (up.moved(), down.moved());
    let tunnel = Tunnel {
        client,
        backend,
        to_backend: up.take_tail().freeze(),
        to_client: down.take_tail().freeze(),
        idle_timeout,
        drain,
        promote: None,
    };
    tracing::info!(
        reason = why,
        to_backend = relayed.0,
        to_client = relayed.1,
        "sockmap: tunnel stepped aside to the next data plane"
    );
    let bound = match why {
        RATE_REASON => "rate",
        why if why == step_aside_reason(true) => "node_limit",
        _ => "queue_limit",
    };
    Err(Rejected { tunnel, reason: format!("stepped aside: {why}"), relayed, cause: Cause::Demoted(bound) })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What an idle sockmap tunnel keeps beside its task and record is
    /// this future (boxed at its size by the dispatcher): 768 bytes with
    /// a `select!` over the drain, the signal and a timer, and references
    /// to the relay's state in the watch; 520 since.
    #[test]
    fn the_relay_future_of_an_idle_tunnel_stays_small() {
        fn output_size<F, R>(_: F) -> usize
        where
            F: FnOnce(&'static Kernel, &'static Shared, Tunnel) -> R,
        {
            std::mem::size_of::<R>()
        }
        let size = output_size(relay);
        assert!(size <= 520, "the sockmap relay future grew to {size} bytes");
    }
}
