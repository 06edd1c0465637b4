//! Handing a tunnel to the kernel.
//!
//! In this order (each step is there for a failure reproduced on 6.18 by a
//! test in `tests/sockmap.rs` or the conformance suite):
//! 0. a socket that is not ESTABLISHED (already got FIN) cannot join a
//!    sockmap: the tunnel is refused untouched → [`Rejected`]. The bytes
//!    queued on either socket are read into the leftovers: the verdict reads
//!    whole segments, so a segment the control plane read in part would be
//!    sent again from its start. What each socket consumed so far is noted
//!    for the exactness check when the tunnel leaves, and what each was
//!    written for step 4 (read with the state: [`admit`]);
//! 1. both sockets join `TARGETS` (no program: nothing changes for them);
//! 2. `PEERS` and `CONTROL` entries are written;
//! 3. userspace writes the leftovers while neither socket is active: bytes
//!    arriving meanwhile wait in TCP's receive queue, under its own flow
//!    control;
//! 4. the destinations' byte counts are taken (exact: only userspace wrote
//!    since step 0 read them, and step 3 adds what it wrote);
//! 5. both sockets join `ACTIVE`; the second one refused (it got FIN
//!    meanwhile) makes the tunnel step aside at once;
//! 6. both sockets are kicked ([`sys::kick`]): segments that arrived before
//!    step 5 are verdicted now instead of waiting for the next one (the
//!    stall).
//!
//! Then the sockets leave tokio for the plane's events thread
//! ([`super::watch`]).
//!
//! A step stops the handoff one of two ways ([`Stop`]): the plane hands
//! the tunnel back (with its leftovers, or with them delivered and counted
//! as relayed), or the tunnel ends here, through [`Membership::end`].

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::net::TcpStream;
use upsplice_common::{PeerEntry, DIR_TO_BACKEND, DIR_TO_CLIENT};

use super::super::kernel::{Kernel, Signal};
use super::super::sys;
use super::bounds::Limits;
use super::direction::{ended, Dir};
use super::membership::{reset_if, Membership};
use super::pace::TICK_MIN;
use super::step_aside::leave;
use crate::dataplane::{Cause, CloseReason, Direction, Outcome, Rejected, Tunnel};

/// How a handoff ended: the tunnel is over already, or the kernel relays it.
#[expect(
    clippy::large_enum_variant,
    reason = "returned once per tunnel and taken apart at once; a box would cost an allocation per handoff"
)]
pub(super) enum Handoff<'k> {
    Ended(Outcome),
    Watch(Handed<'k>),
}

/// A tunnel the kernel relays: what its watch needs, and what ends with it.
pub(super) struct Handed<'k> {
    pub members: Membership<'k>,
    pub up: Dir<'k>,
    pub down: Dir<'k>,
    pub signal: Arc<Signal>,
    /// Client, backend: out of tokio, closed when the tunnel ends.
    pub sockets: (std::net::TcpStream, std::net::TcpStream),
    pub idle_timeout: Duration,
    pub drain: tokio_util::sync::CancellationToken,
}

/// Why a step stopped the handoff.
enum Stop {
    /// The plane hands the tunnel back: it goes on through the next plane,
    /// with what this one relayed so far (its leftovers, once delivered).
    Refuse(String),
    /// The tunnel ends here.
    End(CloseReason),
}

/// What step 0 learned of the sockets: (client, backend) each.
struct Admitted {
    cookies: [u64; 2],
    /// Bytes each source consumed before the handoff.
    consumed: [u64; 2],
    /// Bytes written into each socket so far (acknowledged + queued), when
    /// step 0's reads give it exactly; step 4 adds the leftovers to it.
    written: [Option<u64>; 2],
}

/// Steps 0–6 (module docs): on success the sockets are in the maps, out of
/// tokio and ready to be watched. `user`: where the bytes userspace writes
/// are added up (to backend, to client).
pub(super) async fn handoff<'k>(
    kernel: &'k Kernel,
    limits: Limits,
    user: [&'k AtomicU64; 2],
    mut t: Tunnel,
) -> Result<Handoff<'k>, Rejected> {
    let fds = [t.client.as_raw_fd(), t.backend.as_raw_fd()];
    let admitted = match admit(limits, &mut t, fds) {
        Ok(admitted) => admitted,
        Err(Stop::Refuse(reason)) => return Err(Rejected::untouched(t, reason)),
        Err(Stop::End(reason)) => {
            reset_if(reason, fds);
            return Ok(Handoff::Ended(Outcome { to_backend: 0, to_client: 0, reason }));
        }
    };
    let mut joining = Joining::new(kernel, limits, user, fds, &admitted);
    match joining.join(&mut t, admitted.written).await {
        Ok(()) => Ok(joining.leave_tokio(t)),
        Err(Stop::Refuse(reason)) => {
            // A tunnel handed back after step 3 has had its leftovers
            // delivered (and `t`'s are empty): they count as relayed here.
            let relayed = (joining.up.moved(), joining.down.moved());
            drop(joining);
            Err(Rejected { tunnel: t, reason, relayed, cause: Cause::Refused })
        }
        Err(Stop::End(reason)) => Ok(Handoff::Ended(joining.end(reason))),
    }
}

/// Step 0. Only ESTABLISHED sockets can join a sockmap: refuse the others
/// untouched. Then everything queued on either socket is read into the
/// leftovers, until the queue is empty, so that no partly read segment is
/// left for the verdict (it would resend the part already read); this must
/// happen before the sockets join any map. Too many (a sender at full
/// speed): the copy planes handle them better.
///
/// The `TCP_INFO` read that checks the state, and one more after the
/// leftovers were read, also give what each socket consumed and was
/// written so far (for the exactness check when the tunnel leaves, and
/// for step 4): exact when neither count moved between the two reads
/// ([`sys::consumed_between`], [`sys::written_between`]); otherwise they
/// are read again the slower way. One `TCP_INFO` and one `SIOCOUTQ` per
/// socket more than the state check, where reading each count on its own
/// took three round trips.
fn admit(limits: Limits, t: &mut Tunnel, [c_fd, b_fd]: [RawFd; 2]) -> Result<Admitted, Stop> {
    let cookies = match (sys::cookie(c_fd), sys::cookie(b_fd)) {
        (Ok(c), Ok(b)) => [c, b],
        (Err(e), _) | (_, Err(e)) => return Err(Stop::Refuse(format!("SO_COOKIE: {e}"))),
    };
    let mut before = [sys::TcpCounters::default(); 2];
    for (i, fd, side) in [(0, c_fd, Direction::ToBackend.source_name()), (1, b_fd, Direction::ToClient.source_name())] {
        match sys::tcp_counters(fd) {
            Ok(info) if info.state == sys::TCP_ESTABLISHED => before[i] = info,
            Ok(info) => {
                let state = sys::tcp_state_name(info.state);
                return Err(Stop::Refuse(format!("{side} socket not established ({state})")));
            }
            Err(e) => return Err(Stop::Refuse(format!("{side} socket: TCP_INFO: {e}"))),
        }
    }
    // Between the two `TCP_INFO` reads: what each send queue holds.
    let queued_out = match (sys::outq(c_fd), sys::outq(b_fd)) {
        (Ok(c), Ok(b)) => [c, b],
        (Err(e), _) | (_, Err(e)) => return Err(Stop::Refuse(format!("TCP counters: {e}"))),
    };
    let max = limits.high as usize;
    for (fd, from) in [(c_fd, Direction::ToBackend), (b_fd, Direction::ToClient)] {
        let side = from.source_name();
        let leftover = match from {
            Direction::ToBackend => &mut t.to_backend,
            Direction::ToClient => &mut t.to_client,
        };
        let mut bytes = leftover.to_vec();
        let drained = sys::read_queued(fd, &mut bytes, max);
        if bytes.len() != leftover.len() {
            *leftover = Bytes::from(bytes);
        }
        // Whatever was read is in the leftovers: a refused tunnel is whole.
        match drained {
            Ok(true) => {}
            Ok(false) => {
                return Err(Stop::Refuse(format!("more than {max} bytes queued on the {side} socket at handoff")))
            }
            // The read took the socket's error (a reset): handed on, the
            // tunnel would see a clean EOF instead. Pass the reset on.
            Err(e) => {
                tracing::debug!("sockmap: {side} socket failed at handoff: {e}");
                return Err(Stop::End(from.source_failed()));
            }
        }
    }
    // What each source consumed so far (the leftovers): leaving the maps
    // later checks the kernel consumed nothing this tunnel missed. The
    // receive queues were just emptied: nothing is queued unless a segment
    // arrived since the first read, which the received count then shows.
    let settled = |fd: RawFd, before: &sys::TcpCounters, queued_out: u64| -> io::Result<(u64, Option<u64>)> {
        let after = sys::tcp_counters(fd)?;
        let consumed = match sys::consumed_between(before, 0, &after) {
            Some(consumed) => consumed,
            None => sys::consumed(fd)?,
        };
        Ok((consumed, sys::written_between(before, queued_out, &after)))
    };
    match (settled(c_fd, &before[0], queued_out[0]), settled(b_fd, &before[1], queued_out[1])) {
        (Ok((c, c_written)), Ok((b, b_written))) => {
            Ok(Admitted { cookies, consumed: [c, b], written: [c_written, b_written] })
        }
        (Err(e), _) | (_, Err(e)) => Err(Stop::Refuse(format!("TCP counters: {e}"))),
    }
}

/// A tunnel joining the maps (steps 1–6), and out of them again through
/// `members` whichever way the handoff stops.
struct Joining<'k> {
    members: Membership<'k>,
    /// Client → backend: its source is the client socket.
    up: Dir<'k>,
    down: Dir<'k>,
    signal: Arc<Signal>,
}

impl<'k> Joining<'k> {
    fn new(
        kernel: &'k Kernel,
        limits: Limits,
        user: [&'k AtomicU64; 2],
        fds: [RawFd; 2],
        admitted: &Admitted,
    ) -> Joining<'k> {
        let ([c_fd, b_fd], [c_ck, b_ck]) = (fds, admitted.cookies);
        let mut up = Dir::new(user[0], c_fd, b_fd, c_ck, limits.budget);
        let mut down = Dir::new(user[1], b_fd, c_fd, b_ck, limits.budget);
        up.consumed_base = admitted.consumed[0];
        down.consumed_base = admitted.consumed[1];
        Joining {
            members: Membership::new(kernel, admitted.cookies, fds),
            up,
            down,
            signal: Arc::new(Signal::default()),
        }
    }

    /// Steps 1–6. `written`: what step 0 read of each socket's written
    /// count (client, backend), if it was exact.
    async fn join(&mut self, t: &mut Tunnel, written: [Option<u64>; 2]) -> Result<(), Stop> {
        let kernel = self.members.kernel;
        let ([c_ck, b_ck], [c_fd, b_fd]) = (self.members.cookies, self.members.fds);

        // 1. Redirect targets; a refusal here leaves the tunnel untouched.
        kernel
            .add_target(c_ck, c_fd)
            .map_err(|e| Stop::Refuse(format!("client socket refused by the sockmap: {e}")))?;
        kernel
            .add_target(b_ck, b_fd)
            .map_err(|e| Stop::Refuse(format!("backend socket refused by the sockmap: {e}")))?;

        // 2. Pair: the verdict will redirect every byte it sees.
        //    The first notification comes one budget in (`Dir::new`).
        let peers = [
            PeerEntry { peer: b_ck, dir: DIR_TO_BACKEND, ..PeerEntry::default() },
            PeerEntry { peer: c_ck, dir: DIR_TO_CLIENT, ..PeerEntry::default() },
        ];
        kernel
            .pair_both([c_ck, b_ck], peers, [self.up.control(), self.down.control()])
            .map_err(|e| Stop::Refuse(format!("sockmap peer entries: {e}")))?;

        self.deliver_leftovers(t).await?;

        // 4. Bases: what each destination was written so far (exact: only
        //    userspace wrote to it, and it is done): step 0's count and the
        //    leftovers written since, or read now if step 0's did not settle.
        let base = |written: Option<u64>, fd: RawFd, leftover: u64| match written {
            Some(w) => Ok(w + leftover),
            None => sys::written_exact(fd),
        };
        match (base(written[1], b_fd, self.up.leftover), base(written[0], c_fd, self.down.leftover)) {
            (Ok(u), Ok(d)) => {
                self.up.base = u;
                self.down.base = d;
            }
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!("sockmap: TCP counters: {e}");
                return Err(Stop::End(CloseReason::Error));
            }
        }

        // From here on, a tunnel handed back has had its leftovers delivered.
        if let Err(e) = kernel.register([c_ck, b_ck], [c_fd, b_fd], &self.signal) {
            kernel.unregister([c_ck, b_ck], [c_fd, b_fd]);
            return Err(Stop::Refuse(format!("sockmap events: {e}")));
        }
        self.members.registered = true;

        // 5. Activate. A refusal of the first socket (it got FIN meanwhile)
        //    hands the tunnel on with its leftovers delivered. A refusal of
        //    the second comes after the first one's bytes began to be
        //    redirected: the tunnel steps aside at once (`leave`), with what
        //    was redirected counted.
        kernel.activate(c_ck, c_fd).map_err(|e| Stop::Refuse(format!("client socket refused by the sockmap: {e}")))?;
        if let Err(e) = kernel.activate(b_ck, b_fd) {
            kernel.deactivate(c_ck);
            tokio::time::sleep(TICK_MIN).await;
            if let Err(why) = leave(&mut self.members, &mut self.up, &mut self.down).await {
                tracing::warn!("sockmap: backend socket refused, and leaving failed: {why}");
                return Err(Stop::End(CloseReason::Error));
            }
            // Nothing was read into the tails: `t`'s leftovers stay empty.
            return Err(Stop::Refuse(format!("backend socket refused by the sockmap: {e}")));
        }

        // 6. Kick: bytes queued before activation are verdicted now. A socket
        //    error it reports stays for the watch to find (SO_ERROR is gone,
        //    but the socket is closed: the next read or write fails).
        let _ = sys::kick(c_fd);
        let _ = sys::kick(b_fd);
        Ok(())
    }

    /// 3. Leftovers, by userspace, before either socket is active: bytes
    ///    arriving meanwhile wait in TCP's receive queue, under its own flow
    ///    control, and are verdicted after the leftovers went out. Once
    ///    delivered they are the tunnel's first relayed bytes, and no longer
    ///    `t`'s.
    async fn deliver_leftovers(&mut self, t: &mut Tunnel) -> Result<(), Stop> {
        let leftovers =
            async { tokio::join!(write_all(&t.backend, &t.to_backend), write_all(&t.client, &t.to_client)) };
        let (wrote_up, wrote_down) = tokio::select! {
            r = leftovers => r,
            _ = t.drain.cancelled() => return Err(Stop::End(CloseReason::Drain)),
            _ = tokio::time::sleep(t.idle_timeout) => return Err(Stop::End(CloseReason::Idle)),
        };
        self.up.leftover = t.to_backend.len() as u64;
        self.down.leftover = t.to_client.len() as u64;
        let failed = match (wrote_up, wrote_down) {
            (Err((n, _)), _) => {
                self.up.leftover = n as u64;
                Some(Direction::ToBackend.destination_failed())
            }
            (_, Err((n, _))) => {
                self.down.leftover = n as u64;
                Some(Direction::ToClient.destination_failed())
            }
            _ => None,
        };
        self.up.user_total.fetch_add(self.up.leftover, Ordering::Relaxed);
        self.down.user_total.fetch_add(self.down.leftover, Ordering::Relaxed);
        if let Some(reason) = failed {
            return Err(Stop::End(reason));
        }
        t.to_backend = Bytes::new();
        t.to_client = Bytes::new();
        Ok(())
    }

    /// From here on only this plane touches the sockets: take them away
    /// from tokio, so that bytes the kernel redirects no longer wake its
    /// reactor (a wakeup per segment); the events thread reports what
    /// matters.
    fn leave_tokio(self, t: Tunnel) -> Handoff<'k> {
        let Tunnel { client, backend, idle_timeout, drain, .. } = t;
        match (client.into_std(), backend.into_std()) {
            (Ok(client), Ok(backend)) => {
                let Joining { members, up, down, signal, .. } = self;
                let sockets = (client, backend);
                Handoff::Watch(Handed { members, up, down, signal, sockets, idle_timeout, drain })
            }
            (c, b) => {
                tracing::warn!("sockmap: leaving tokio: {:?} {:?}", c.err(), b.err());
                Handoff::Ended(self.end(CloseReason::Error))
            }
        }
    }

    /// The tunnel ends during the handoff: out of the maps, reset if
    /// `reason` says so ([`Membership::end`]); its sockets close with `t`.
    fn end(self, reason: CloseReason) -> Outcome {
        let outcome = ended(&self.up, &self.down, reason);
        self.members.end(reason);
        outcome
    }
}

/// Writes all of `buf` to `dst`; the count written so far on error.
async fn write_all(dst: &TcpStream, buf: &[u8]) -> Result<(), (usize, io::Error)> {
    let mut done = 0;
    while done < buf.len() {
        if let Err(e) = dst.writable().await {
            return Err((done, e));
        }
        match dst.try_write(&buf[done..]) {
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err((done, e)),
        }
    }
    Ok(())
}
