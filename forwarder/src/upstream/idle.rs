//! A backend's idle keep-alive connections, ready for the next request.
//!
//! The newest is reused first (the likeliest to be alive); the oldest goes
//! first when one must make room. Before a connection is handed out, the
//! reactor (and, when it saw something arrive, a non-blocking peek) tells
//! whether the backend closed it meanwhile (EOF) or sent bytes nobody
//! asked for: either way it is closed and skipped.
//! The registry's sweep closes expired and dead ones, so no socket stays
//! in CLOSE_WAIT much past `[backends] idle_conn_timeout`. A TLS
//! connection is only handed out for the same TLS ([`Target::same_as`]):
//! the same CAs, client certificate and server name.
//!
//! Each connection remembers its home: the worker thread whose reactor
//! watches it ([`crate::workers`]). A request takes one of its own
//! worker's first, and another worker's only when its own has none (a
//! connect costs more than a wake across threads): a foreign one makes
//! every read and write of the request wake the task from the other
//! thread. Measured, before the preference: keep-alive requests through
//! the copy plane cost 25 % more router CPU with per-core workers
//! (docs/performance.md, "Workers per core").

use std::collections::VecDeque;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use nix::sys::socket::{recv, MsgFlags};
use tokio::io::Interest;

use super::stream::BackendStream;
use crate::tls::client::Target;

struct Idle {
    stream: BackendStream,
    tls: Option<Arc<Target>>,
    /// The worker whose reactor watches it (None: not a per-core worker).
    home: Option<usize>,
    expires: Instant,
}

impl Idle {
    fn serves(&self, tls: Option<&Target>) -> bool {
        match (&self.tls, tls) {
            (None, None) => true,
            (Some(mine), Some(wanted)) => mine.same_as(wanted),
            _ => false,
        }
    }
}

/// Idle connections to one backend.
#[derive(Default)]
pub struct IdleList {
    conns: Mutex<VecDeque<Idle>>,
}

impl std::fmt::Debug for IdleList {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IdleList({})", self.len())
    }
}

impl IdleList {
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Idle>> {
        self.conns.lock().expect("idle list lock")
    }

    /// Keeps `stream` (made with `tls`, watched by worker `home`) until
    /// `expires`, unless `cap` are kept already: then it is handed back
    /// (the caller closes it).
    pub fn put(
        &self,
        stream: BackendStream,
        tls: Option<Arc<Target>>,
        home: Option<usize>,
        expires: Instant,
        cap: usize,
    ) -> Result<(), BackendStream> {
        let mut conns = self.lock();
        if conns.len() >= cap {
            return Err(stream);
        }
        conns.push_back(Idle { stream, tls, home, expires });
        Ok(())
    }

    /// The newest idle connection made with `tls` that is unexpired and
    /// alive, of worker `here`'s own if there is one, else of another's;
    /// with its home. The ones found expired or dead on the way are
    /// closed, the ones made with another TLS are left.
    pub fn take_live(
        &self,
        now: Instant,
        tls: Option<&Target>,
        here: Option<usize>,
    ) -> Option<(BackendStream, Option<usize>)> {
        let mut closed = Vec::new();
        let found = {
            let mut conns = self.lock();
            // The newest usable one of another worker, if none of ours.
            let mut foreign: Option<usize> = None;
            let mut i = conns.len();
            loop {
                if i == 0 {
                    break foreign.and_then(|f| conns.remove(f));
                }
                i -= 1;
                let idle = &conns[i];
                let usable = idle.expires > now && is_live(&idle.stream);
                if usable && !idle.serves(tls) {
                    continue;
                }
                if usable && idle.home != here {
                    foreign = foreign.or(Some(i));
                    continue;
                }
                let idle = conns.remove(i).expect("index within the list");
                if usable {
                    break Some(idle);
                }
                // Removed below the foreign one found: it moved down.
                foreign = foreign.map(|f| f - 1);
                closed.push(idle.stream);
            }
        };
        // Closed outside the lock.
        drop(closed);
        found.map(|idle| (idle.stream, idle.home))
    }

    /// Closes the expired and the dead; returns how many.
    pub fn sweep(&self, now: Instant) -> usize {
        let closed: Vec<Idle> = {
            let mut conns = self.lock();
            let (keep, close): (VecDeque<Idle>, VecDeque<Idle>) =
                conns.drain(..).partition(|idle| idle.expires > now && is_live(&idle.stream));
            *conns = keep;
            close.into()
        };
        closed.len()
    }

    /// Closes the oldest one to make room; false when there is none.
    pub fn evict_oldest(&self) -> bool {
        let oldest = self.lock().pop_front();
        oldest.is_some()
    }

    /// Closes every one (the backend left the config, or reuse was turned off).
    pub fn clear(&self) -> usize {
        let all: Vec<Idle> = self.lock().drain(..).collect();
        all.len()
    }
}

/// An idle connection is alive when reading it would block: nothing
/// arrived, not even EOF. Bytes (an unsolicited response) or EOF or an
/// error mean it cannot carry a request.
///
/// tokio's reactor is asked first, which costs no syscall: tokio forgets a
/// stream's read readiness after a read that came back short or would
/// block (the last read of a response, as a rule), and the reactor sets it
/// again when anything arrives. Only a stream it reports readable (or
/// left readable by a read that filled its buffer) is peeked at, and a
/// peek that would block clears that readiness for the next time; that is
/// `try_io`, which (unlike `poll_read_ready`) answers from the readiness
/// alone, whatever the calling task's cooperative budget: a spent budget
/// made `poll_read_ready` say "not ready" for a connection the backend had
/// closed. The reactor learns of an event a moment after the kernel; a
/// close in that moment is the race every reuse has anyway (the backend
/// may close just after a peek, too), which the caller's retry of a
/// request that may go twice covers. Before, every reuse peeked: one
/// `recv` per keep-alive request that could only return EAGAIN.
fn is_live(stream: &BackendStream) -> bool {
    let tcp = stream.tcp();
    let mut byte = [0u8; 1];
    let peek = tcp.try_io(Interest::READABLE, || {
        recv(tcp.as_raw_fd(), &mut byte, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT).map_err(io::Error::from)
    });
    matches!(peek, Err(e) if e.kind() == io::ErrorKind::WouldBlock)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// The newest live one for `tls`, as a request off the per-core
    /// workers takes it.
    fn take(list: &IdleList, now: Instant, tls: Option<&Target>) -> Option<BackendStream> {
        list.take_live(now, tls, None).map(|(stream, _)| stream)
    }

    /// A connected pair: (the router's side, the backend's side).
    async fn pair(l: &TcpListener) -> (TcpStream, TcpStream) {
        let c = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (s, _) = l.accept().await.unwrap();
        (c, s)
    }

    /// Waits until the kernel has what the peer sent (loopback is fast,
    /// but not synchronous).
    async fn settle() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    #[tokio::test]
    async fn takes_the_newest_live_one_and_skips_closed_or_chatty_ones() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let later = Instant::now() + Duration::from_secs(60);
        let list = IdleList::default();
        let (good, _good_peer) = pair(&l).await;
        let good_port = good.local_addr().unwrap().port();
        let (closed, closed_peer) = pair(&l).await;
        let (chatty, mut chatty_peer) = pair(&l).await;
        list.put(good.into(), None, None, later, 8).unwrap();
        list.put(closed.into(), None, None, later, 8).unwrap();
        list.put(chatty.into(), None, None, later, 8).unwrap();
        drop(closed_peer);
        chatty_peer.write_all(b"HTTP/1.1 408 Request Timeout\r\n\r\n").await.unwrap();
        settle().await;
        let got = take(&list, Instant::now(), None).expect("the live one");
        assert_eq!(got.tcp().local_addr().unwrap().port(), good_port);
        assert!(list.is_empty(), "the dead ones were closed on the way");
        assert!(take(&list, Instant::now(), None).is_none());
    }

    /// The reactor answers for a connection whose last read drained it;
    /// one left readable by a read that filled its buffer is peeked at
    /// once, which clears that readiness.
    #[tokio::test]
    async fn a_drained_connection_is_live_without_a_peek_and_bytes_still_show() {
        use std::task::{Context, Waker};

        use tokio::io::AsyncReadExt;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (mut mine, mut peer) = pair(&l).await;
        peer.write_all(b"0123456789").await.unwrap();
        let mut buf = [0u8; 10];
        mine.read_exact(&mut buf).await.unwrap();
        let stream = BackendStream::from(mine);
        let mut cx = Context::from_waker(Waker::noop());
        assert!(stream.tcp().poll_read_ready(&mut cx).is_ready(), "a read that filled its buffer leaves it readable");
        assert!(is_live(&stream));
        assert!(stream.tcp().poll_read_ready(&mut cx).is_pending(), "the peek that would block cleared it");
        assert!(is_live(&stream), "then the reactor alone answers");
        peer.write_all(b"HTTP/1.1 408 Request Timeout\r\n\r\n").await.unwrap();
        settle().await;
        assert!(!is_live(&stream), "bytes nobody asked for");
    }

    #[tokio::test]
    async fn expired_ones_are_not_reused_and_the_sweep_closes_them() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let now = Instant::now();
        let list = IdleList::default();
        let (a, _pa) = pair(&l).await;
        let (b, _pb) = pair(&l).await;
        let (c, pc) = pair(&l).await;
        list.put(a.into(), None, None, now + Duration::from_millis(10), 8).unwrap();
        list.put(b.into(), None, None, now + Duration::from_secs(60), 8).unwrap();
        list.put(c.into(), None, None, now + Duration::from_secs(60), 8).unwrap();
        drop(pc);
        settle().await;
        // a expired, c's backend closed it: both go; b stays.
        assert_eq!(list.sweep(now + Duration::from_secs(1)), 2);
        assert_eq!(list.len(), 1);
        assert!(take(&list, now + Duration::from_secs(61), None).is_none(), "expired by then");
        assert!(list.is_empty());
    }

    #[tokio::test]
    async fn a_connection_serves_only_the_tls_it_was_made_with() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let later = Instant::now() + Duration::from_secs(60);
        let config = Arc::new(
            rustls::ClientConfig::builder_with_provider(crate::tls::provider())
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        );
        let target = |name: &str| {
            let server_name = crate::tls::client::server_name(name).unwrap();
            Arc::new(Target { config: config.clone(), server_name })
        };
        let list = IdleList::default();
        let (plain, _pp) = pair(&l).await;
        let (tls, _pt) = pair(&l).await;
        let (plain_port, tls_port) = (plain.local_addr().unwrap().port(), tls.local_addr().unwrap().port());
        list.put(plain.into(), None, None, later, 8).unwrap();
        list.put(tls.into(), Some(target("a.internal")), None, later, 8).unwrap();
        // Another name: nothing; the same config and name: the TLS one.
        assert!(take(&list, Instant::now(), Some(&target("b.internal"))).is_none());
        assert_eq!(list.len(), 2, "the others are left, not closed");
        let got = take(&list, Instant::now(), Some(&target("a.internal"))).unwrap();
        assert_eq!(got.tcp().local_addr().unwrap().port(), tls_port);
        assert!(take(&list, Instant::now(), Some(&target("a.internal"))).is_none());
        // A plain request never gets a TLS connection, and the reverse.
        let got = take(&list, Instant::now(), None).unwrap();
        assert_eq!(got.tcp().local_addr().unwrap().port(), plain_port);
    }

    #[tokio::test]
    async fn keeps_at_most_cap_and_evicts_the_oldest() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let later = Instant::now() + Duration::from_secs(60);
        let list = IdleList::default();
        let (a, _pa) = pair(&l).await;
        let (b, _pb) = pair(&l).await;
        let (c, _pc) = pair(&l).await;
        let b_port = b.local_addr().unwrap().port();
        list.put(a.into(), None, None, later, 2).unwrap();
        list.put(b.into(), None, None, later, 2).unwrap();
        assert!(list.put(c.into(), None, None, later, 2).is_err(), "over the cap: handed back");
        assert!(list.evict_oldest());
        assert_eq!(take(&list, Instant::now(), None).unwrap().tcp().local_addr().unwrap().port(), b_port);
        assert!(!list.evict_oldest());
    }

    /// A worker takes its own idle connections first, even an older one,
    /// and another worker's only when it has none; the home goes along.
    #[tokio::test]
    async fn a_worker_takes_its_own_first_and_another_s_only_when_it_has_none() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let later = Instant::now() + Duration::from_secs(60);
        let list = IdleList::default();
        let (mine, _pm) = pair(&l).await;
        let (theirs, _pt) = pair(&l).await;
        let (closed, closed_peer) = pair(&l).await;
        let (mine_port, theirs_port) = (mine.local_addr().unwrap().port(), theirs.local_addr().unwrap().port());
        list.put(mine.into(), None, Some(0), later, 8).unwrap();
        list.put(theirs.into(), None, Some(1), later, 8).unwrap();
        list.put(closed.into(), None, Some(0), later, 8).unwrap();
        drop(closed_peer);
        settle().await;
        let (got, home) = list.take_live(Instant::now(), None, Some(0)).unwrap();
        assert_eq!((got.tcp().local_addr().unwrap().port(), home), (mine_port, Some(0)), "its own, though older");
        assert_eq!(list.len(), 1, "the dead one was closed on the way, the foreign one left");
        let (got, home) = list.take_live(Instant::now(), None, Some(0)).unwrap();
        assert_eq!((got.tcp().local_addr().unwrap().port(), home), (theirs_port, Some(1)), "none of its own left");
        assert!(list.take_live(Instant::now(), None, Some(0)).is_none());
    }

    /// A dead connection closed below the foreign one found does not make
    /// the take hand out the wrong one.
    #[tokio::test]
    async fn a_foreign_one_is_found_again_after_dead_ones_below_it_go() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let later = Instant::now() + Duration::from_secs(60);
        let list = IdleList::default();
        let (dead1, p1) = pair(&l).await;
        let (dead2, p2) = pair(&l).await;
        let (theirs, _pt) = pair(&l).await;
        let theirs_port = theirs.local_addr().unwrap().port();
        list.put(dead1.into(), None, Some(0), later, 8).unwrap();
        list.put(dead2.into(), None, Some(0), later, 8).unwrap();
        list.put(theirs.into(), None, Some(1), later, 8).unwrap();
        drop((p1, p2));
        settle().await;
        let (got, _) = list.take_live(Instant::now(), None, Some(0)).unwrap();
        assert_eq!(got.tcp().local_addr().unwrap().port(), theirs_port);
        assert!(list.is_empty());
    }
}
