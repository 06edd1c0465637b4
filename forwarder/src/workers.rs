//! The threads that accept and serve connections (`[runtime]`).
//!
//! **Per core** (the default, `work_stealing = false`): `workers` threads,
//! each a tokio current-thread runtime with a listening socket of its own
//! per listener, bound together with `SO_REUSEPORT` so that the kernel
//! spreads new connections over them by their addresses. A worker serves
//! each connection it accepted, and the tunnel after it, on its own thread
//! for the connection's whole life, as HAProxy's and nginx's threads do: a
//! task woken by a socket runs on the thread whose reactor saw the socket,
//! and no thread is woken to steal work from another. Planes that keep
//! threads of their own (uring's workers, sockmap's events thread) wake a
//! tunnel's task across threads as before.
//!
//! **Shared** (`work_stealing = true`): one tokio multi-thread scheduler of
//! `workers` threads, one socket per listener; an idle thread is woken to
//! steal a task another thread's reactor made ready. It spreads a few busy
//! connections over the cores better, and pays a thread wake-up (a futex)
//! for that on ~0.6–0.8 of every relayed message at 20,000 msg/s
//! (docs/performance.md, "Workers per core").
//!
//! The router's own tasks (signals, drain, `/metrics`, NATS, health
//! checks) run on the main runtime either way.

use std::cell::Cell;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::thread::JoinHandle;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::runtime::{Builder, Handle, Runtime};
use tokio_util::sync::CancellationToken;

use crate::config;

thread_local! {
    /// The index of the per-core worker this thread is (None elsewhere).
    static WORKER: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The per-core worker the calling thread is, if it is one: the reactor
/// that watches a socket made here. The keep-alive pool uses it to hand a
/// request a backend connection its own worker watches.
pub fn current() -> Option<usize> {
    WORKER.with(Cell::get)
}

/// A listening socket's accept queue: deep, for handshake bursts.
const BACKLOG: i32 = 4096;

/// Where connections are served.
pub enum Workers {
    /// The main runtime's work-stealing scheduler.
    Shared,
    /// Threads of their own, one current-thread runtime each.
    PerCore { workers: Vec<Worker>, exit: CancellationToken },
}

/// One worker thread of [`Workers::PerCore`].
pub struct Worker {
    handle: Handle,
    thread: Option<JoinHandle<()>>,
}

impl Workers {
    /// The runtime `run` drives: in shared mode it is the one connections
    /// are served on (`workers` threads); per core it only carries the
    /// router's own tasks (one thread; the NATS client's table flush moves
    /// off it with `block_in_place`, which needs a multi-thread runtime).
    pub fn main_runtime(cfg: &config::Runtime) -> io::Result<Runtime> {
        let threads = if cfg.work_stealing { cfg.worker_count() } else { 1 };
        Builder::new_multi_thread().worker_threads(threads).enable_all().build()
    }

    /// Starts the worker threads (none in shared mode).
    pub fn start(cfg: &config::Runtime) -> io::Result<Workers> {
        if cfg.work_stealing {
            return Ok(Workers::Shared);
        }
        let exit = CancellationToken::new();
        let mut workers = Vec::with_capacity(cfg.worker_count());
        for i in 0..cfg.worker_count() {
            match Worker::start(i, exit.clone()) {
                Ok(w) => workers.push(w),
                Err(e) => {
                    // The ones already running stop (Drop) before the error goes up.
                    drop(Workers::PerCore { workers, exit });
                    return Err(e);
                }
            }
        }
        Ok(Workers::PerCore { workers, exit })
    }

    /// How many listening sockets each listener needs: one per worker, or
    /// one shared.
    pub fn sockets_per_listener(&self) -> usize {
        match self {
            Workers::Shared => 1,
            Workers::PerCore { workers, .. } => workers.len(),
        }
    }

    /// Registers listening socket `i` of a listener with the reactor of the
    /// worker that will accept on it (shared: the main runtime's; called
    /// inside it). Done before anything is served, so that no socket the
    /// kernel spreads connections to goes unwatched.
    pub fn adopt(&self, i: usize, socket: std::net::TcpListener) -> io::Result<tokio::net::TcpListener> {
        match self {
            Workers::Shared => tokio::net::TcpListener::from_std(socket),
            Workers::PerCore { workers, .. } => {
                let _in_worker = workers[i % workers.len()].handle.enter();
                tokio::net::TcpListener::from_std(socket)
            }
        }
    }

    /// Runs `task` on the worker that owns listening socket `i` of a
    /// listener (shared: on the main runtime).
    pub fn spawn<F>(&self, i: usize, task: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match self {
            Workers::Shared => tokio::spawn(task),
            Workers::PerCore { workers, .. } => workers[i % workers.len()].handle.spawn(task),
        }
    }
}

impl Worker {
    /// Worker `i`: a thread running its current-thread runtime until `exit`.
    fn start(i: usize, exit: CancellationToken) -> io::Result<Worker> {
        let runtime = Builder::new_current_thread().enable_all().build()?;
        let handle = runtime.handle().clone();
        let thread = std::thread::Builder::new().name(format!("upsplice-w{i}")).spawn(move || {
            WORKER.with(|w| w.set(Some(i)));
            runtime.block_on(exit.cancelled());
            // Tasks still there (idle keep-alive connections, a tunnel
            // the drain deadline already reset) are dropped, not waited on.
            runtime.shutdown_background();
        })?;
        Ok(Worker { handle, thread: Some(thread) })
    }
}

impl Drop for Workers {
    /// Stops the worker threads once the router is done with them (after
    /// the drain, or when it failed to start).
    fn drop(&mut self) {
        if let Workers::PerCore { workers, exit } = self {
            exit.cancel();
            for w in workers {
                if let Some(thread) = w.thread.take() {
                    let _ = thread.join();
                }
            }
        }
    }
}

/// Binds `n` listening sockets on `addr` (non-blocking, for tokio). One is
/// bound as before, without `SO_REUSEPORT`; several share the address
/// with it, after a check that nothing else listens there: `SO_REUSEPORT`
/// alone would let a second router started by mistake (same user) share
/// the port silently instead of failing to bind.
pub fn bind(addr: SocketAddr, n: usize) -> io::Result<Vec<std::net::TcpListener>> {
    let socket = |reuse_port: bool| -> io::Result<Socket> {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        s.set_reuse_address(true)?;
        if reuse_port {
            s.set_reuse_port(true)?;
        }
        s.set_nonblocking(true)?;
        Ok(s)
    };
    if n > 1 && addr.port() != 0 {
        // Nothing else may listen on the address: a socket without
        // SO_REUSEPORT cannot bind beside a listening one.
        socket(false)?.bind(&addr.into())?;
    }
    let mut bound = Vec::with_capacity(n);
    let mut at = addr;
    for _ in 0..n.max(1) {
        let s = socket(n > 1)?;
        s.bind(&at.into())?;
        s.listen(BACKLOG)?;
        let listener: std::net::TcpListener = s.into();
        // Port 0: the others join the port the kernel gave the first.
        at = listener.local_addr()?;
        bound.push(listener);
    }
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_shares_one_port_and_refuses_an_address_in_use() {
        let group = bind("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let port = group[0].local_addr().unwrap().port();
        assert!(group.iter().all(|l| l.local_addr().unwrap().port() == port), "one port for the group");
        // Another router on the same port: refused, though the group
        // itself has SO_REUSEPORT.
        let again = bind(group[0].local_addr().unwrap(), 2);
        assert_eq!(again.err().map(|e| e.kind()), Some(io::ErrorKind::AddrInUse));
        let single = bind(group[0].local_addr().unwrap(), 1);
        assert_eq!(single.err().map(|e| e.kind()), Some(io::ErrorKind::AddrInUse));
    }

    #[test]
    fn a_single_socket_is_bound_without_reuse_port() {
        let one = bind("127.0.0.1:0".parse().unwrap(), 1).unwrap();
        assert_eq!(one.len(), 1);
        let s = socket2::SockRef::from(&one[0]);
        assert!(!s.reuse_port().unwrap());
    }

    #[test]
    fn each_worker_runs_what_is_spawned_on_it_on_its_own_thread() {
        let cfg = config::Runtime { workers: 2, work_stealing: false };
        let workers = Workers::start(&cfg).unwrap();
        assert_eq!(workers.sockets_per_listener(), 2);
        let rt = Builder::new_current_thread().build().unwrap();
        let names: Vec<String> = rt.block_on(async {
            let mut names = Vec::new();
            for i in 0..2 {
                let h = workers.spawn(i, async { std::thread::current().name().unwrap_or("").to_owned() });
                names.push(h.await.unwrap());
            }
            names
        });
        assert_eq!(names, ["upsplice-w0", "upsplice-w1"]);
        let homes: Vec<Option<usize>> = rt.block_on(async {
            let mut homes = Vec::new();
            for i in 0..2 {
                homes.push(workers.spawn(i, async { current() }).await.unwrap());
            }
            homes
        });
        assert_eq!(homes, [Some(0), Some(1)]);
        assert_eq!(current(), None, "not a worker");
        drop(workers);
    }
}
