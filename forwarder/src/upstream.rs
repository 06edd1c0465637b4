//! Backend pools: balancing and connecting with a timeout and failover.
//!
//! A request tries each backend of its pool at most once, starting with the
//! one the balancer picks; a backend that refuses or times out is counted in
//! `upsplice_backend_connect_failures_total{pool}` and the next one is tried.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;

use crate::config::{self, Balance};

/// One backend and the connections it carries now (for least_conn).
#[derive(Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    active: AtomicUsize,
}

/// A pool of backends, shared by all connections routed to it.
#[derive(Debug)]
pub struct Pool {
    pub name: String,
    pub backends: Vec<Arc<Backend>>,
    balance: Balance,
    next: AtomicUsize,
}

/// Holds a backend's active count up while a connection to it lives.
#[derive(Debug)]
pub struct BackendGuard(Arc<Backend>);

impl BackendGuard {
    pub fn addr(&self) -> SocketAddr {
        self.0.addr
    }
}

impl Drop for BackendGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Why no backend could be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("pool {0:?} has no backends")]
    NoBackends(String),
    #[error("every backend of pool {pool:?} failed; last: {last}")]
    AllFailed { pool: String, last: String },
}

impl Pool {
    pub fn new(cfg: &config::Pool) -> Pool {
        Pool {
            name: cfg.name.clone(),
            backends: cfg
                .backends
                .iter()
                .map(|&addr| Arc::new(Backend { addr, active: AtomicUsize::new(0) }))
                .collect(),
            balance: cfg.balance,
            next: AtomicUsize::new(0),
        }
    }

    /// The order in which this request tries the backends.
    fn order(&self) -> Vec<Arc<Backend>> {
        let n = self.backends.len();
        let start = match self.balance {
            Balance::RoundRobin => self.next.fetch_add(1, Ordering::Relaxed) % n,
            Balance::LeastConn => {
                // Ties go round robin so equal backends share the load.
                let offset = self.next.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|i| (i + offset) % n)
                    .min_by_key(|&i| self.backends[i].active.load(Ordering::Relaxed))
                    .unwrap_or(0)
            }
        };
        (0..n).map(|i| self.backends[(start + i) % n].clone()).collect()
    }

    /// Connects to one backend, trying each at most once.
    pub async fn connect(&self, timeout: Duration) -> Result<(TcpStream, BackendGuard), ConnectError> {
        if self.backends.is_empty() {
            return Err(ConnectError::NoBackends(self.name.clone()));
        }
        let mut last = String::new();
        for backend in self.order() {
            backend.active.fetch_add(1, Ordering::Relaxed);
            let guard = BackendGuard(backend.clone());
            match connect_one(backend.addr, timeout).await {
                Ok(stream) => return Ok((stream, guard)),
                Err(e) => {
                    tracing::warn!(pool = %self.name, backend = %backend.addr, "backend connect failed: {e}");
                    crate::metrics::connect_failure(&self.name);
                    last = format!("{}: {e}", backend.addr);
                }
            }
        }
        Err(ConnectError::AllFailed { pool: self.name.clone(), last })
    }
}

async fn connect_one(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = tokio::time::timeout(timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {timeout:?}")))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(balance: Balance, n: u16) -> Pool {
        Pool::new(&config::Pool {
            name: "p".into(),
            backends: (0..n).map(|i| SocketAddr::from(([127, 0, 0, 1], 9000 + i))).collect(),
            balance,
            check: None,
        })
    }

    #[test]
    fn round_robin_rotates_and_covers_every_backend() {
        let p = pool(Balance::RoundRobin, 3);
        let firsts: Vec<u16> = (0..6).map(|_| p.order()[0].addr.port()).collect();
        assert_eq!(firsts, vec![9000, 9001, 9002, 9000, 9001, 9002]);
        let mut all: Vec<u16> = p.order().iter().map(|b| b.addr.port()).collect();
        all.sort();
        assert_eq!(all, vec![9000, 9001, 9002]);
    }

    #[test]
    fn least_conn_prefers_the_idlest() {
        let p = pool(Balance::LeastConn, 3);
        p.backends[0].active.store(5, Ordering::Relaxed);
        p.backends[1].active.store(1, Ordering::Relaxed);
        p.backends[2].active.store(3, Ordering::Relaxed);
        assert_eq!(p.order()[0].addr.port(), 9001);
    }

    #[tokio::test]
    async fn fails_over_to_the_next_backend() {
        let live = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dead_addr = dead.local_addr().unwrap();
        drop(dead);
        let p = Pool::new(&config::Pool {
            name: "p".into(),
            backends: [dead_addr, live.local_addr().unwrap()].into_iter().collect(),
            balance: Balance::RoundRobin,
            check: None,
        });
        let (_s, guard) = p.connect(Duration::from_secs(1)).await.unwrap();
        assert_eq!(guard.addr(), live.local_addr().unwrap());
        let (_s, guard) = p.connect(Duration::from_secs(1)).await.unwrap();
        assert_eq!(guard.addr(), live.local_addr().unwrap());
    }
}
