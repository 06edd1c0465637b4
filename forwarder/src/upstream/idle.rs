//! A backend's idle keep-alive connections, ready for the next request.
//!
//! The newest is reused first (the likeliest to be alive); the oldest goes
//! first when one must make room. Before a connection is handed out, a
//! non-blocking peek tells whether the backend closed it meanwhile (EOF)
//! or sent bytes nobody asked for: either way it is closed and skipped.
//! The registry's sweep closes expired and dead ones, so no socket stays
//! in CLOSE_WAIT much past `[backends] idle_conn_timeout`.

use std::collections::VecDeque;
use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::socket::{recv, MsgFlags};
use tokio::net::TcpStream;

struct Idle {
    stream: TcpStream,
    expires: Instant,
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

    /// Keeps `stream` until `expires`, unless `cap` are kept already:
    /// then it is handed back (the caller closes it).
    pub fn put(&self, stream: TcpStream, expires: Instant, cap: usize) -> Result<(), TcpStream> {
        let mut conns = self.lock();
        if conns.len() >= cap {
            return Err(stream);
        }
        conns.push_back(Idle { stream, expires });
        Ok(())
    }

    /// The newest idle connection that is unexpired and alive; the ones
    /// found expired or dead on the way are closed.
    pub fn take_live(&self, now: Instant) -> Option<TcpStream> {
        let mut closed = Vec::new();
        let found = {
            let mut conns = self.lock();
            loop {
                match conns.pop_back() {
                    None => break None,
                    Some(idle) if idle.expires > now && is_live(&idle.stream) => break Some(idle.stream),
                    Some(idle) => closed.push(idle.stream),
                }
            }
        };
        // Closed outside the lock.
        drop(closed);
        found
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
fn is_live(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 1];
    matches!(recv(stream.as_raw_fd(), &mut byte, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT), Err(Errno::EAGAIN))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    use super::*;

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
        list.put(good, later, 8).unwrap();
        list.put(closed, later, 8).unwrap();
        list.put(chatty, later, 8).unwrap();
        drop(closed_peer);
        chatty_peer.write_all(b"HTTP/1.1 408 Request Timeout\r\n\r\n").await.unwrap();
        settle().await;
        let got = list.take_live(Instant::now()).expect("the live one");
        assert_eq!(got.local_addr().unwrap().port(), good_port);
        assert!(list.is_empty(), "the dead ones were closed on the way");
        assert!(list.take_live(Instant::now()).is_none());
    }

    #[tokio::test]
    async fn expired_ones_are_not_reused_and_the_sweep_closes_them() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let now = Instant::now();
        let list = IdleList::default();
        let (a, _pa) = pair(&l).await;
        let (b, _pb) = pair(&l).await;
        let (c, pc) = pair(&l).await;
        list.put(a, now + Duration::from_millis(10), 8).unwrap();
        list.put(b, now + Duration::from_secs(60), 8).unwrap();
        list.put(c, now + Duration::from_secs(60), 8).unwrap();
        drop(pc);
        settle().await;
        // a expired, c's backend closed it: both go; b stays.
        assert_eq!(list.sweep(now + Duration::from_secs(1)), 2);
        assert_eq!(list.len(), 1);
        assert!(list.take_live(now + Duration::from_secs(61)).is_none(), "expired by then");
        assert!(list.is_empty());
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
        list.put(a, later, 2).unwrap();
        list.put(b, later, 2).unwrap();
        assert!(list.put(c, later, 2).is_err(), "over the cap: handed back");
        assert!(list.evict_oldest());
        assert_eq!(list.take_live(Instant::now()).unwrap().local_addr().unwrap().port(), b_port);
        assert!(!list.evict_oldest());
    }
}
