//! Routes from NATS, the way gorouter takes them (its mbus/subscriber.go):
//! `router.register` / `router.unregister` add and remove endpoints,
//! `router.greet` is answered with the start message, `router.start` is
//! published at start and after every reconnect, stale endpoints are
//! pruned. The routes go into the one routing table beside the config's
//! ([`crate::state::Shared::learn`]).
//!
//! - `message`: the registration message, parsed and checked;
//! - `table`: the endpoints by URI, pruning, the routes handed over;
//! - `start`: the start message;
//! - `client`: the connection, the subscription and the task that owns
//!   the table.

mod client;
pub mod message;
mod start;
mod table;

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

pub use self::table::View;
use crate::config::Nats;
use crate::state::Shared;

/// What the admin endpoint sees of the NATS task.
pub struct Status {
    /// When `/healthz` may answer 200: `start_response_delay_interval`
    /// after the first `router.start` was published.
    ready_at: OnceLock<Instant>,
    /// Asks the task for its table, for `/routes`.
    views: mpsc::Sender<oneshot::Sender<View>>,
}

impl Status {
    /// The first `router.start` was published and the routes' emitters
    /// have had `start_response_delay_interval` to answer it.
    pub fn ready(&self) -> bool {
        self.ready_at.get().is_some_and(|&at| Instant::now() >= at)
    }

    /// Every URI learned from NATS with its endpoints (None: the task ended).
    pub async fn view(&self) -> Option<View> {
        let (tx, rx) = oneshot::channel();
        self.views.send(tx).await.ok()?;
        rx.await.ok()
    }
}

/// Starts the NATS task: it connects (retrying while no server answers),
/// subscribes and keeps the learned routes in `shared`'s table.
pub fn spawn(cfg: Nats, shared: Arc<Shared>) -> Arc<Status> {
    let (views, requests) = mpsc::channel(4);
    let status = Arc::new(Status { ready_at: OnceLock::new(), views });
    tokio::spawn(client::run(cfg, shared, status.clone(), requests));
    status
}
