//! Data planes: what moves the bytes of a connection pair once the control
//! plane (listener, handshake, routing) is done with it.
//!
//! A [`Tunnel`] carries everything a data plane needs: the two sockets, the
//! bytes userspace already read past the heads (which must be delivered
//! first, in order), the idle timeout and a drain signal. Every plane honours
//! the same contract, which the conformance suite in `tests/conformance.rs`
//! checks for each of them:
//!
//! * leftover bytes (`to_backend`, `to_client`) go out before anything else;
//! * half-close: EOF from one side becomes `shutdown(SHUT_WR)` on the other
//!   while the other direction keeps flowing; when both are done both close;
//! * reset: an RST (or socket error) from one side aborts the other side with
//!   an RST of its own, so a truncated stream never looks complete;
//! * idle timeout: no byte either way for `idle_timeout` closes the tunnel;
//! * bounded memory: a slow reader never makes the router buffer without
//!   bound, and an idle tunnel holds no userspace buffer;
//! * drain: when `drain` fires, the tunnel is closed at once.
//!
//! A plane that cannot take one particular tunnel (no pipes left, sockmap
//! insert refused) returns it with [`Rejected`] so the dispatcher hands it to
//! the next plane; the client never sees an error for it.
//!
//! A tunnel also moves between planes as its traffic shows itself
//! (`mode = "adaptive"`, [`Promote`]): it starts on splice, cheap to set
//! up; one that lives on and carries small messages is handed back
//! ([`Cause::Promoted`]) between two bursts, holding nothing, and goes to
//! sockmap; one whose directions then saturate, or one that turns into
//! bulk (`demote_rate`), steps aside from sockmap ([`Cause::Demoted`]) and
//! goes back to splice, for good. Every move keeps
//! the contract above: the plane that lets go of a tunnel holds none of its
//! bytes, or hands them on as leftovers.

mod abort;
pub mod copy;
mod direction;
pub mod error;
pub mod ktls;
mod lifetime;
pub mod pacer;
pub mod pair;
pub mod pools;
mod queues;
pub mod selftest;
pub mod settings;
pub mod sockmap;
pub mod splice;
pub mod stream;
pub mod uring;

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

pub use self::abort::abort;
pub use self::direction::Direction;
pub use self::error::PlaneError;
pub use self::settings::Settings;

/// The data plane chosen in the config (`[data_plane] mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Auto,
    Sockmap,
    Uring,
    Splice,
    Copy,
    /// Tunnels start on splice and move: promoted to sockmap once they
    /// prove long-lived with small messages, back to splice when they
    /// saturate ([`Promote`]).
    Adaptive,
    /// The userspace relay of TLS tunnels ([`stream`]): not a mode the
    /// config chooses, the plane that carries what the kernel cannot.
    #[serde(skip)]
    Tls,
    /// TLS tunnels whose session the kernel carries ([`ktls`]): splice
    /// between a kTLS client socket and the backend. Not a mode either.
    #[serde(skip)]
    Ktls,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Sockmap => "sockmap",
            Mode::Uring => "uring",
            Mode::Splice => "splice",
            Mode::Copy => "copy",
            Mode::Adaptive => "adaptive",
            Mode::Tls => "tls",
            Mode::Ktls => "ktls",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A connection pair handed to a data plane.
#[derive(Debug)]
pub struct Tunnel {
    pub client: TcpStream,
    pub backend: TcpStream,
    /// Bytes read from the client past its request head: deliver first.
    pub to_backend: Bytes,
    /// Bytes read from the backend past its response head: deliver first.
    pub to_client: Bytes,
    /// Close the tunnel when no byte moved either way for this long.
    pub idle_timeout: Duration,
    /// Fires when the router's drain deadline passed: close at once. The
    /// server also calls [`DataPlanes::drain`] then: sockmap's idle
    /// tunnels keep no wait on this token and learn of the drain from
    /// there (they read it whenever they wake).
    pub drain: CancellationToken,
    /// Whether the plane carrying the tunnel should hand it back for
    /// promotion once its traffic shows it belongs on the promotion plane
    /// (`mode = "adaptive"`); None for every other tunnel, and for one that
    /// left the promotion plane already.
    pub promote: Option<Promote>,
}

/// How few reads a window must have seen before its tunnel can be
/// promoted: below it, a tunnel talks too seldom for sockmap's handoff (a
/// few dozen syscalls and map updates) to pay for itself.
pub const PROMOTE_MIN_READS: u64 = 8;

/// When a tunnel on a readiness plane is handed back for promotion
/// (`[data_plane] promote_after`, `promote_message_size`): it is judged
/// once per `window` (its first window lasts one to two windows, at
/// random, so tunnels opened together move at different times), on the
/// reads of the last window, and
/// promoted when there were at least [`PROMOTE_MIN_READS`] of them and
/// they averaged at most `message_size` bytes. A bulk tunnel's reads fill
/// the pipe (64 KiB): it stays where splice serves it best; an idle one
/// stays where it costs least, until it talks. A tunnel that earned it
/// moves when the node's `pacer` has room (`promote_rate`), else it is
/// judged again a window later.
#[derive(Debug, Clone, Copy)]
pub struct Promote {
    pub window: Duration,
    pub message_size: u64,
    /// The node's pace of promotions (one for the router's life).
    pub pacer: &'static pacer::Pacer,
}

impl Promote {
    /// Whether a window with `reads` reads carrying `bytes` in all earns
    /// the tunnel a promotion.
    pub fn earned(&self, reads: u64, bytes: u64) -> bool {
        reads >= PROMOTE_MIN_READS && bytes <= reads.saturating_mul(self.message_size)
    }
}

/// Why a plane handed a tunnel back, for the dispatcher (which plane
/// next) and `/metrics` (`kind`, `reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The plane could not take or keep this tunnel: the next plane of the
    /// chain takes it.
    Refused,
    /// The tunnel saturated a bound of the plane, or a direction passed
    /// `demote_rate`, and stepped aside (`reason`: which bound, or `rate`);
    /// it goes back to the start of the chain.
    Demoted(&'static str),
    /// The tunnel proved long-lived with small messages (`reason`); it goes
    /// to the promotion plane.
    Promoted(&'static str),
}

impl Cause {
    /// `fallback`, `demotion` or `promotion`.
    pub fn kind(self) -> &'static str {
        match self {
            Cause::Refused => "fallback",
            Cause::Demoted(_) => "demotion",
            Cause::Promoted(_) => "promotion",
        }
    }

    /// A short, fixed label (for metrics).
    pub fn reason(self) -> &'static str {
        match self {
            Cause::Refused => "refused",
            Cause::Demoted(why) | Cause::Promoted(why) => why,
        }
    }
}

/// Why a tunnel ended; goes to the access log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Both sides sent FIN and everything was delivered.
    Done,
    /// The client reset the connection (or its socket failed).
    ClientReset,
    /// The backend reset the connection (or its socket failed).
    BackendReset,
    /// No byte moved for `idle_timeout`.
    Idle,
    /// The drain deadline passed.
    Drain,
    /// The data plane itself failed (an I/O error it could not attribute).
    Error,
}

impl CloseReason {
    /// Whether both sockets are reset (RST) rather than closed (FIN): a
    /// reset from a peer is passed on, and a stream the router cuts short
    /// (a plane error, the drain deadline) must never look complete to
    /// either peer — a FIN would make a truncated tcp tunnel look whole.
    pub fn resets(self) -> bool {
        matches!(self, CloseReason::ClientReset | CloseReason::BackendReset | CloseReason::Error | CloseReason::Drain)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Done => "done",
            CloseReason::ClientReset => "client_reset",
            CloseReason::BackendReset => "backend_reset",
            CloseReason::Idle => "idle_timeout",
            CloseReason::Drain => "drain",
            CloseReason::Error => "dataplane_error",
        }
    }
}

/// What a data plane reports when a tunnel ends.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub to_backend: u64,
    pub to_client: u64,
    pub reason: CloseReason,
}

/// A tunnel a plane could not take, or stopped carrying, with the reason
/// (logged and counted). Its leftovers are what the next plane delivers
/// first.
#[derive(Debug)]
pub struct Rejected {
    pub tunnel: Tunnel,
    pub reason: String,
    /// Bytes (to backend, to client) this plane relayed before it handed the
    /// tunnel on: zero for a tunnel refused at the start; a sockmap tunnel
    /// that stepped aside has carried bytes already.
    pub relayed: (u64, u64),
    pub cause: Cause,
}

impl Rejected {
    /// A tunnel refused before this plane moved a byte of it.
    pub fn untouched(tunnel: Tunnel, reason: impl Into<String>) -> Rejected {
        Rejected { tunnel, reason: reason.into(), relayed: (0, 0), cause: Cause::Refused }
    }
}

/// One plane's part of a tunnel: the bytes it carried each way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leg {
    pub mode: Mode,
    pub to_backend: u64,
    pub to_client: u64,
}

/// The planes a tunnel used, in order, with the bytes each carried: empty
/// for a tunnel that stayed on the plane it started on (which allocates
/// nothing), else every plane that carried bytes of it and the one it
/// ended on, a plane that carried it twice in a row counted once.
/// Rendered `splice:1200/5400,sockmap:80000/81000` (to backend/to client).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Legs(Vec<Leg>);

impl Legs {
    /// Adds `mode`'s part; `last` for the plane the tunnel ended on, which
    /// counts even if it carried nothing.
    pub(crate) fn push(&mut self, mode: Mode, (to_backend, to_client): (u64, u64), last: bool) {
        if to_backend == 0 && to_client == 0 && !last {
            return;
        }
        match self.0.last_mut() {
            Some(leg) if leg.mode == mode => {
                leg.to_backend += to_backend;
                leg.to_client += to_client;
            }
            _ => self.0.push(Leg { mode, to_backend, to_client }),
        }
    }

    /// Bytes all legs carried (to backend, to client).
    fn total(&self) -> (u64, u64) {
        self.0.iter().fold((0, 0), |(b, c), l| (b + l.to_backend, c + l.to_client))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Leg> {
        self.0.iter()
    }
}

impl fmt::Display for Legs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("-");
        }
        for (i, leg) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            write!(f, "{sep}{}:{}/{}", leg.mode, leg.to_backend, leg.to_client)?;
        }
        Ok(())
    }
}

/// Bytes relayed by one data plane, in both directions.
#[derive(Debug, Default)]
pub struct ByteCounters {
    pub to_backend: AtomicU64,
    pub to_client: AtomicU64,
}

impl ByteCounters {
    /// Back to zero (after a plane's self-test, whose bytes are not traffic).
    pub fn reset(&self) {
        self.to_backend.store(0, Ordering::Relaxed);
        self.to_client.store(0, Ordering::Relaxed);
    }

    /// (to backend, to client) so far.
    pub fn load(&self) -> (u64, u64) {
        (self.to_backend.load(Ordering::Relaxed), self.to_client.load(Ordering::Relaxed))
    }

    pub fn add(&self, to_backend: u64, to_client: u64) {
        if to_backend > 0 {
            self.to_backend.fetch_add(to_backend, Ordering::Relaxed);
        }
        if to_client > 0 {
            self.to_client.fetch_add(to_client, Ordering::Relaxed);
        }
    }
}

/// The contract every data plane implements; [`Plane`] dispatches to it.
///
/// A plane says what it is ([`DataPlane::MODE`]), whether this kernel and
/// build can run it ([`DataPlane::probe`]: cheap, takes no resources), starts
/// from the `[data_plane]` settings ([`DataPlane::start`]: takes its
/// resources — pipes, rings, eBPF maps — and, where it has one, passes its
/// self-test on this kernel), relays one [`Tunnel`] at a time until it ends
/// ([`DataPlane::relay`]) and counts the bytes it relayed
/// ([`DataPlane::bytes_relayed`]). The conformance suite
/// (`tests/conformance.rs`) checks the behaviour the module docs list for
/// every implementation.
///
/// `relay` returns a future rather than being an `async fn` so that the
/// `Send` bound is part of the contract; [`Plane::relay`] boxes each plane's
/// future at its own size, and nothing else allocates per tunnel.
///
/// What the seam is meant to admit next:
///
/// * **A tunnel that moves between planes.** A plane may end its part of a
///   tunnel at any time by handing it back in a [`Rejected`], untouched or
///   with the bytes it carried ([`Rejected::relayed`]) and the leftovers the
///   next plane must deliver first; [`DataPlanes`] then hands it to the next
///   plane and adds up the bytes. sockmap's step-aside does this today. A
///   tunnel promoted the other way (to sockmap once it proves long-lived)
///   needs only a signal in [`Tunnel`], like `drain`, on which a plane hands
///   its tunnel back, and a dispatcher that picks the next plane by more
///   than chain order.
/// * **A userspace TLS relay.** Its tunnel's client side is a TLS stream
///   (any `AsyncRead + AsyncWrite`), not a socket the kernel can splice or
///   redirect. Such a side can join [`Tunnel`] as an alternative to the
///   client `TcpStream` (or a sibling type can carry it); the kernel planes
///   then refuse that tunnel untouched with [`Rejected`], as they refuse any
///   tunnel they cannot take, and the TLS plane — a `DataPlane` like the
///   others, relaying in userspace as copy does — takes it.
pub trait DataPlane: Sized + Send + Sync {
    /// The plane's name in the config and in logs and metrics.
    const MODE: Mode;

    /// Whether this kernel and build can run the plane, and if not, why.
    fn probe() -> Result<(), PlaneError>;

    /// Starts the plane: takes its resources and, where the plane has one,
    /// passes its self-test on this kernel; fails with the reason.
    fn start(settings: &Settings) -> Result<Self, PlaneError>;

    /// What [`DataPlane::start`] proved (for the startup log and `upsplice
    /// check`).
    fn startup_report(&self) -> String;

    /// Relays `t` until it ends, or hands it back (untouched, or with the
    /// bytes relayed so far) when this plane cannot take or keep it.
    fn relay(&self, t: Tunnel) -> impl Future<Output = Result<Outcome, Rejected>> + Send;

    /// The drain deadline passed: every tunnel of the plane ends now, as
    /// if each one's [`Tunnel::drain`] fired. The server calls it when it
    /// cancels those tokens. A plane whose tunnels each wait on their
    /// token needs nothing more; one that keeps no wait per tunnel (the
    /// memory of an idle tunnel) reaches them from here.
    fn drain(&self) {}

    /// Bytes relayed so far by all tunnels of this plane (to backend, to client).
    fn bytes_relayed(&self) -> (u64, u64);
}

/// One data plane, ready to relay: dispatch over the [`DataPlane`]s.
pub enum Plane {
    Copy(copy::CopyPlane),
    Splice(splice::SplicePlane),
    Uring(uring::UringPlane),
    Sockmap(sockmap::SockmapPlane),
}

impl Plane {
    pub fn mode(&self) -> Mode {
        match self {
            Plane::Copy(_) => copy::CopyPlane::MODE,
            Plane::Splice(_) => splice::SplicePlane::MODE,
            Plane::Uring(_) => uring::UringPlane::MODE,
            Plane::Sockmap(_) => sockmap::SockmapPlane::MODE,
        }
    }

    /// Relays `t` until it ends, or hands it back when this plane cannot take it.
    ///
    /// Each plane's future is boxed at its own size: inline, the largest
    /// would set the size of every tunnel's task, whatever its plane, for
    /// the tunnel's whole life (a uring or sockmap tunnel kept a task future
    /// of 2.3 KiB sized for the copy plane's state). Returned
    /// boxed rather than awaited here, so that no caller's future holds the
    /// tunnel a second time beside the box.
    pub fn relay(&self, t: Tunnel) -> RelayFuture<'_> {
        match self {
            Plane::Copy(p) => Box::pin(p.relay(t)),
            Plane::Splice(p) => Box::pin(p.relay(t)),
            Plane::Uring(p) => Box::pin(p.relay(t)),
            Plane::Sockmap(p) => Box::pin(p.relay(t)),
        }
    }

    /// [`DataPlane::drain`].
    pub fn drain(&self) {
        match self {
            Plane::Copy(p) => p.drain(),
            Plane::Splice(p) => p.drain(),
            Plane::Uring(p) => p.drain(),
            Plane::Sockmap(p) => p.drain(),
        }
    }

    /// Bytes relayed so far by all tunnels of this plane (to backend, to client).
    pub fn bytes_relayed(&self) -> (u64, u64) {
        match self {
            Plane::Copy(p) => p.bytes_relayed(),
            Plane::Splice(p) => p.bytes_relayed(),
            Plane::Uring(p) => p.bytes_relayed(),
            Plane::Sockmap(p) => p.bytes_relayed(),
        }
    }

    /// Starts the plane `mode` and has it pass its self-test on this
    /// kernel; fails with the reason (probe, resources or a failed check).
    /// Returns the plane and what its self-test passed.
    fn build(mode: Mode, cfg: &Settings) -> Result<(Plane, String), PlaneError> {
        fn started<P: DataPlane>(cfg: &Settings, wrap: fn(P) -> Plane) -> Result<(Plane, String), PlaneError> {
            let plane = P::start(cfg)?;
            let report = plane.startup_report();
            Ok((wrap(plane), report))
        }
        match mode {
            Mode::Copy => started(cfg, Plane::Copy),
            Mode::Splice => started(cfg, Plane::Splice),
            Mode::Uring => started(cfg, Plane::Uring),
            Mode::Sockmap => started(cfg, Plane::Sockmap),
            Mode::Auto | Mode::Adaptive => unreachable!("{mode} is resolved by DataPlanes::start"),
            Mode::Tls | Mode::Ktls => {
                Err(PlaneError::Settings(format!("{mode} is a relay of TLS tunnels, not a mode to choose")))
            }
        }
    }
}

/// What `upsplice check` reports for one plane.
pub enum PlaneCheck {
    /// The probe says this kernel or build cannot run it.
    Unavailable(String),
    /// It started but failed its self-test (or could not take its resources).
    Failed(String),
    /// It passed its self-test: what the self-test says.
    Passed(String),
}

/// Starts each plane in turn and runs its self-test (for `upsplice check`).
/// Copy, which `run` starts without one, runs the same checks here.
pub fn check_all(cfg: &Settings) -> Vec<(Mode, PlaneCheck)> {
    probe_all()
        .into_iter()
        .map(|(mode, probed)| {
            let state = match probed {
                Err(why) => PlaneCheck::Unavailable(why),
                Ok(()) if mode == Mode::Copy => {
                    let p = copy::CopyPlane::new(cfg);
                    let report = selftest::run_blocking(|t| p.relay(t));
                    match report.failure() {
                        Some(why) => PlaneCheck::Failed(why),
                        None => PlaneCheck::Passed(report.to_string()),
                    }
                }
                Ok(()) => match Plane::build(mode, cfg) {
                    Ok((_, report)) => PlaneCheck::Passed(report),
                    Err(why) => PlaneCheck::Failed(error::chain(&why)),
                },
            };
            (mode, state)
        })
        .collect()
}

/// Whether each concrete plane can run here, and if not, why with every
/// source (for `upsplice check`).
pub fn probe_all() -> Vec<(Mode, Result<(), String>)> {
    let why = |e: PlaneError| error::chain(&e);
    vec![
        (Mode::Sockmap, sockmap::SockmapPlane::probe().map_err(why)),
        (Mode::Uring, uring::UringPlane::probe().map_err(why)),
        (Mode::Splice, splice::SplicePlane::probe().map_err(why)),
        (Mode::Copy, copy::CopyPlane::probe().map_err(why)),
    ]
}

/// The order in which `auto` tries the planes: the first that starts and
/// passes its loopback self-test on the running kernel wins (copy, last,
/// needs no kernel feature).
///
/// sockmap is not in it while [`SOCKMAP_NOT_AUTO`] holds: it runs only when
/// a config asks for it by name.
pub const AUTO_ORDER: [Mode; 3] = [Mode::Uring, Mode::Splice, Mode::Copy];

/// Why `auto` does not pick sockmap even where it runs (logged at startup,
/// printed by `upsplice check`). It left `auto` when two-way bulk hung
/// through it; with that fixed (tunnels step aside), what keeps it out is
/// measured cost; `adaptive` promotes to it the tunnels that prove
/// long-lived with small messages.
pub const SOCKMAP_NOT_AUTO: &str = "not chosen by auto: its handshakes cost most (about 58 syscalls per \
     connect-upgrade-close against uring's 34) and its latency tails at moderate rates are the kernel \
     workqueue's, while bulk tunnels step aside to splice anyway; mode = \"sockmap\" selects it for every \
     tunnel (the least router CPU per message), mode = \"adaptive\" for the long-lived tunnels that carry \
     small messages";

/// A plane's relay of one tunnel, boxed at its own size (see [`Plane::relay`]).
pub type RelayFuture<'a> = Pin<Box<dyn Future<Output = Result<Outcome, Rejected>> + Send + 'a>>;

/// The chosen plane followed by its fallbacks (always ending with copy),
/// the plane tunnels are promoted to (`adaptive`), the stream relay TLS
/// tunnels take, and the kTLS relay they take instead where the kernel
/// carries TLS (`data_plane.ktls`).
pub struct DataPlanes {
    chain: Vec<Plane>,
    promotion: Option<Promotion>,
    pub stream: stream::StreamRelay,
    pub ktls: Option<ktls::KtlsRelay>,
}

/// `adaptive`: where tunnels are promoted to, and when.
pub struct Promotion {
    to: Plane,
    policy: Promote,
    /// `promote_rate` and `demote_rate`, for the policy's words.
    rate: u32,
    demote_rate: u64,
}

/// A tunnel's move from one plane to the next, as the dispatcher makes it
/// (the plane's own words for it are logged by the dispatcher).
#[derive(Debug, Clone, Copy)]
pub struct Move {
    pub from: Mode,
    pub to: Mode,
    pub cause: Cause,
}

/// How a tunnel ended: on which plane, its outcome over every plane it
/// used (bytes added up), and those planes when there were several.
#[derive(Debug)]
pub struct Relayed {
    pub mode: Mode,
    pub outcome: Outcome,
    pub legs: Legs,
}

impl DataPlanes {
    /// Builds the plane `cfg.mode` asks for. `auto` takes the first of
    /// [`AUTO_ORDER`] that starts and logs why the ones before it did not;
    /// `adaptive` starts sockmap and splice; an explicit mode that cannot
    /// start is an error naming the reason.
    pub fn start(cfg: &Settings) -> Result<DataPlanes, PlaneError> {
        let cannot = |mode: Mode| move |why: PlaneError| PlaneError::CannotStart { mode, source: Box::new(why) };
        let mut promotion = None;
        let primary = match cfg.mode {
            Mode::Auto => {
                if sockmap::SockmapPlane::probe().is_ok() {
                    tracing::info!(data_plane = "sockmap", "auto: sockmap {SOCKMAP_NOT_AUTO}");
                }
                let mut chosen = None;
                for mode in AUTO_ORDER {
                    match Plane::build(mode, cfg) {
                        Ok((p, report)) => {
                            tracing::info!(data_plane = %mode, "auto: chose {mode}: {report}");
                            chosen = Some(p);
                            break;
                        }
                        Err(why) => {
                            tracing::info!(data_plane = %mode, "auto: {mode} unavailable: {}", error::chain(&why))
                        }
                    }
                }
                chosen.expect("copy always starts")
            }
            Mode::Adaptive => {
                let (to, report) = Plane::build(Mode::Sockmap, cfg).map_err(cannot(Mode::Adaptive))?;
                tracing::info!(data_plane = "sockmap", "adaptive: promotion plane sockmap: {report}");
                let (start, report) = Plane::build(Mode::Splice, cfg).map_err(cannot(Mode::Adaptive))?;
                tracing::info!(data_plane = "splice", "adaptive: tunnels start on splice: {report}");
                // Leaked: one pacer for the planes' life, which is the
                // process's; every promoted tunnel refers to it.
                let pacer = Box::leak(Box::new(pacer::Pacer::new(cfg.promote_rate)));
                let policy = Promote { window: cfg.promote_after, message_size: cfg.promote_message_size, pacer };
                promotion = Some(Promotion { to, policy, rate: cfg.promote_rate, demote_rate: cfg.demote_rate });
                start
            }
            mode => {
                let (plane, report) = Plane::build(mode, cfg).map_err(cannot(mode))?;
                tracing::info!(data_plane = %mode, "{mode}: {report}");
                plane
            }
        };
        let mut chain = vec![];
        let primary_mode = primary.mode();
        chain.push(primary);
        // Per-tunnel fallbacks: splice after the kernel planes, copy last.
        if matches!(primary_mode, Mode::Sockmap | Mode::Uring) {
            match Plane::build(Mode::Splice, cfg) {
                Ok((p, _)) => chain.push(p),
                Err(why) => tracing::info!("splice fallback unavailable: {}", error::chain(&why)),
            }
        }
        if primary_mode != Mode::Copy {
            chain.push(Plane::Copy(copy::CopyPlane::new(cfg)));
        }
        let ktls = DataPlanes::start_ktls(cfg)?;
        let planes = DataPlanes { chain, promotion, stream: stream::StreamRelay::new(cfg.copy_buffer as usize), ktls };
        if let Some(policy) = planes.policy() {
            tracing::info!(data_plane = "adaptive", "{policy}");
        }
        Ok(planes)
    }

    /// The kTLS relay as `data_plane.ktls` asks: `auto` logs why it is not
    /// there, `on` fails the start.
    fn start_ktls(cfg: &Settings) -> Result<Option<ktls::KtlsRelay>, PlaneError> {
        if cfg.ktls == ktls::KtlsMode::Off {
            tracing::info!(data_plane = "ktls", "ktls = \"off\": TLS tunnels run on the userspace tls relay");
            return Ok(None);
        }
        match ktls::KtlsRelay::start(cfg) {
            Ok(relay) => {
                tracing::info!(data_plane = "ktls", "ktls: TLS tunnels go to the kernel: {}", relay.startup_report());
                Ok(Some(relay))
            }
            Err(why) if cfg.ktls == ktls::KtlsMode::Auto => {
                tracing::info!(
                    data_plane = "ktls",
                    "ktls unavailable, TLS tunnels run on the userspace tls relay: {}",
                    error::chain(&why)
                );
                Ok(None)
            }
            Err(why) => Err(PlaneError::Settings(format!(
                "data_plane.ktls = \"on\" but kTLS cannot run here: {}",
                error::chain(&why)
            ))),
        }
    }

    /// The plane tunnels go to first.
    pub fn mode(&self) -> Mode {
        self.chain[0].mode()
    }

    /// Every plane that may carry a tunnel: the chain, then the promotion
    /// plane.
    pub fn planes(&self) -> impl Iterator<Item = &Plane> {
        self.chain.iter().chain(self.promotion.as_ref().map(|p| &p.to))
    }

    /// The drain deadline passed: every plane ends its tunnels
    /// ([`DataPlane::drain`]), beside the tunnels' drain tokens.
    pub fn drain(&self) {
        for plane in self.planes() {
            plane.drain();
        }
    }

    /// The planes a tunnel falls back to, in order, after the first.
    pub fn fallbacks(&self) -> impl Iterator<Item = Mode> + '_ {
        self.chain[1..].iter().map(Plane::mode)
    }

    /// What moves tunnels between planes (`adaptive`), in words, for the
    /// startup log and `upsplice check`; None when they stay on their plane.
    pub fn policy(&self) -> Option<String> {
        let p = self.promotion.as_ref()?;
        Some(describe_policy(self.mode(), p.to.mode(), p.policy.window, p.policy.message_size, (p.rate, p.demote_rate)))
    }

    /// Relays `t` until it ends, through the first plane that takes it and
    /// every plane it moves to; returns the plane it ended on and its
    /// outcome over all of them. Copy takes every tunnel, so this always
    /// relays.
    ///
    /// Each time a tunnel moves, `on_move` hears from where to where and
    /// why, in order, as it happens (the caller counts them; the data
    /// planes report to no one else).
    ///
    /// Not an `async fn`: the first plane's (boxed) future is made here, so
    /// the future returned keeps that box, not the tunnel a second time
    /// beside it (an async fn keeps its arguments for its whole life).
    pub fn relay<'a>(
        &'a self,
        mut t: Tunnel,
        on_move: impl FnMut(&Move) + Send + 'a,
    ) -> impl Future<Output = Relayed> + Send + 'a {
        let first = &self.chain[0];
        t.promote = self.promotion.as_ref().map(|p| p.policy);
        let mut relaying = first.relay(t);
        async move {
            // Not awaited inside the match: its scrutinee (the whole
            // Result) would be kept across that await. Awaited through a
            // reference: `.await` on the box itself would keep a moved
            // copy of it beside the captured one.
            let moved = match (&mut relaying).await {
                Ok(outcome) => return Relayed { mode: first.mode(), outcome, legs: Legs::default() },
                // Boxed: the rare path's state stays out of every tunnel's task.
                Err(rejected) => Box::pin(self.move_on(first, rejected, on_move)),
            };
            moved.await
        }
    }

    /// The plane a tunnel `from` handed back for `cause` goes to next:
    /// the promotion plane when promoted; the start of the chain when it
    /// leaves the promotion plane; else the next plane of the chain.
    fn next(&self, from: &Plane, cause: Cause) -> &Plane {
        if let Some(p) = &self.promotion {
            if matches!(cause, Cause::Promoted(_)) {
                return &p.to;
            }
            if std::ptr::eq(from, &p.to) {
                return &self.chain[0];
            }
        }
        let at = self.chain.iter().position(|p| std::ptr::eq(p, from)).unwrap_or(0);
        self.chain.get(at + 1).unwrap_or_else(|| self.chain.last().expect("a chain has a plane"))
    }

    /// Hands a tunnel the plane `from` gave back to the planes it moves
    /// to; the outcome counts the bytes every plane relayed.
    async fn move_on(&self, mut from: &Plane, mut rejected: Rejected, mut on_move: impl FnMut(&Move)) -> Relayed {
        let mut legs = Legs::default();
        loop {
            let to = self.next(from, rejected.cause);
            // Debug, not info: on sockmap it happens to most plain requests
            // (the backend closed before the hand-off); counted in metrics.
            tracing::debug!(
                from = %from.mode(),
                to = %to.mode(),
                kind = rejected.cause.kind(),
                reason = %rejected.reason,
                "tunnel moves to another data plane"
            );
            on_move(&Move { from: from.mode(), to: to.mode(), cause: rejected.cause });
            legs.push(from.mode(), rejected.relayed, false);
            let mut tunnel = rejected.tunnel;
            // Once off the promotion plane, a tunnel stays where it lands:
            // no tunnel goes back and forth.
            if self.promotion.as_ref().is_some_and(|p| std::ptr::eq(from, &p.to)) {
                tunnel.promote = None;
            }
            match to.relay(tunnel).await {
                Ok(mut outcome) => {
                    legs.push(to.mode(), (outcome.to_backend, outcome.to_client), true);
                    (outcome.to_backend, outcome.to_client) = legs.total();
                    return Relayed { mode: to.mode(), outcome, legs };
                }
                Err(again) => {
                    from = to;
                    rejected = again;
                }
            }
        }
    }
}

/// The adaptive policy in words (startup log, `upsplice check`).
/// `rates`: `promote_rate` and `demote_rate`.
pub fn describe_policy(start: Mode, to: Mode, window: Duration, message_size: u64, rates: (u32, u64)) -> String {
    let (rate, demote_rate) = rates;
    let fast = match demote_rate {
        0 => String::new(),
        r => format!(", or carries more than {r} bytes per second over a window (demote_rate),"),
    };
    format!(
        "adaptive: tunnels start on {start}; one that carried at least {PROMOTE_MIN_READS} reads averaging at most \
         {message_size} bytes in a window of {window:?} (promote_after, promote_message_size; the first window 1-2x \
         as long, at random) moves to {to} between two bursts, at most {rate} tunnels per second (promote_rate); \
         one whose direction then saturates sockmap_queue_limit (or the node's bound){fast} steps aside back to \
         {start} and stays there"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legs_keep_the_planes_that_carried_bytes_in_order_and_add_up() {
        let mut legs = Legs::default();
        assert_eq!(legs.to_string(), "-");
        // Refused untouched: not a plane the tunnel used.
        legs.push(Mode::Sockmap, (0, 0), false);
        legs.push(Mode::Splice, (10, 20), false);
        // Promoted, refused by sockmap at once: splice goes on, one leg.
        legs.push(Mode::Sockmap, (0, 0), false);
        legs.push(Mode::Splice, (5, 5), false);
        legs.push(Mode::Sockmap, (100, 200), false);
        // The plane it ended on counts even with nothing carried.
        legs.push(Mode::Copy, (0, 0), true);
        assert_eq!(legs.to_string(), "splice:15/25,sockmap:100/200,copy:0/0");
        assert_eq!(legs.total(), (115, 225));
    }

    #[test]
    fn a_cause_names_its_kind_and_a_fixed_reason() {
        assert_eq!((Cause::Refused.kind(), Cause::Refused.reason()), ("fallback", "refused"));
        let demoted = Cause::Demoted("queue_limit");
        assert_eq!((demoted.kind(), demoted.reason()), ("demotion", "queue_limit"));
        let promoted = Cause::Promoted("small_messages");
        assert_eq!((promoted.kind(), promoted.reason()), ("promotion", "small_messages"));
    }

    async fn a_tunnel() -> Tunnel {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let client = TcpStream::connect(addr).await.unwrap();
        let (backend, _) = listener.accept().await.unwrap();
        Tunnel {
            client,
            backend,
            to_backend: Bytes::new(),
            to_client: Bytes::new(),
            idle_timeout: Duration::from_secs(1),
            drain: CancellationToken::new(),
            promote: None,
        }
    }

    /// A tunnel's task holds its plane's relay future for the tunnel's whole
    /// life, so that future must be only the box of the plane's own future,
    /// not the largest plane's state inline (2.3 KiB per tunnel before).
    #[tokio::test]
    async fn a_relay_future_is_small_whatever_the_plane() {
        let t = a_tunnel().await;
        let plane = Plane::Copy(copy::CopyPlane::new(&Settings::default()));
        let planes =
            DataPlanes { chain: vec![plane], promotion: None, stream: stream::StreamRelay::new(4096), ktls: None };
        let relay = planes.relay(t, |_| {});
        // The box of the first plane's future (which took the tunnel) and
        // the caller's closure: not the tunnel itself (it was kept beside
        // the box before, 264 B), nor the box twice (72 B before).
        let inline_state = 56;
        assert!(
            std::mem::size_of_val(&relay) <= inline_state,
            "DataPlanes::relay future is {} bytes (at most {inline_state} expected)",
            std::mem::size_of_val(&relay)
        );
    }

    /// What an idle copy or splice tunnel keeps for its whole life is the
    /// pair driver's future (boxed by [`Plane::relay`]): two movers, the
    /// idle timer, the drain wait and the sockets, but not the tunnel
    /// itself once per call level beside them (1,344 B before, three
    /// copies of it).
    #[tokio::test]
    async fn the_pair_drivers_future_keeps_the_tunnel_once() {
        let t = a_tunnel().await;
        let tunnel = std::mem::size_of::<Tunnel>();
        let plane = copy::CopyPlane::new(&Settings::default());
        let relay = plane.relay(t);
        let size = std::mem::size_of_val(&relay);
        assert!(size <= 800, "the copy plane's relay future is {size} bytes (a tunnel is {tunnel})");
    }
}
