//! The NATS connection and the task that owns the table: one loop takes
//! the messages, the connection's events, the prune timer and the flush
//! timer that hands a burst of changes to the routing table at most every
//! [`FLUSH_EVERY`].

use std::collections::{HashMap, HashSet};
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::{ConnectOptions, Event, ServerAddr};
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot};

use super::message::{self, Bad, Registration};
use super::start::Start;
use super::table::{self, Table, View};
use super::Status;
use crate::config::Nats;
use crate::metrics;
use crate::state::Shared;

/// Messages the NATS client buffers for the router's subscription.
const SUBSCRIPTION_CAPACITY: usize = 262_144;

/// A burst of registrations reaches the routing table in one rebuild per
/// this, not one per message.
const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// A dropped message is logged at most once per reason per this.
const LOG_EVERY: Duration = Duration::from_secs(10);

pub(super) async fn run(
    cfg: Nats,
    shared: Arc<Shared>,
    status: Arc<Status>,
    mut views: mpsc::Receiver<oneshot::Sender<View>>,
) {
    let m = &metrics::get().nats;
    let (tx, mut events) = mpsc::unbounded_channel();
    let mut opts = ConnectOptions::new()
        .name("upsplice")
        // A burst of registrations (a foundation's route emitters after a
        // NATS restart: 100,000 at once) must not overflow the client's
        // buffer while the table is rebuilt: async-nats's default (65,536)
        // dropped ~12 % of a flat-out refresh of 100,000 in the scale
        // benchmark. Drops that still happen are counted.
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(move |event| {
            let tx = tx.clone();
            async move {
                let _ = tx.send(event);
            }
        });
    if let Some(token) = &cfg.token {
        opts = opts.token(token.clone());
    }
    if let Some(tls) = &cfg.tls {
        opts = opts.add_root_certificates(tls.ca.clone()).require_tls(true);
    }
    let servers: Result<Vec<ServerAddr>, _> = cfg.servers.iter().map(|s| ServerAddr::from_str(s)).collect();
    let client = match servers {
        Ok(servers) => opts.connect(servers).await,
        Err(e) => {
            tracing::error!("[nats] servers: {e}; no routes from NATS");
            return;
        }
    };
    let client = match client {
        Ok(client) => client,
        Err(e) => {
            tracing::error!("[nats]: cannot start the client: {e}; no routes from NATS");
            return;
        }
    };
    let mut sub = match client.subscribe("router.*").await {
        Ok(sub) => sub,
        Err(e) => {
            tracing::error!("[nats]: cannot subscribe to router.*: {e}; no routes from NATS");
            return;
        }
    };
    let start = Start::new(&cfg);
    let start_json = bytes::Bytes::from(start.to_json());
    tracing::info!(id = %start.id, hosts = ?start.hosts, "NATS: subscribed to router.*");

    let mut table = Table::default();
    let mut dropped = Throttle::default();
    let mut skipped = Skipped::default();
    let mut connected = false;
    let mut ever_connected = false;
    let mut disconnected_while_suspended = false;
    let mut prune = tokio::time::interval(cfg.prune_stale_droplets_interval);
    prune.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut flush = tokio::time::interval(FLUSH_EVERY);
    flush.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            msg = sub.next() => {
                let Some(msg) = msg else {
                    tracing::error!("NATS: the router.* subscription ended; routes from NATS stay as they are");
                    return;
                };
                match msg.subject.as_str() {
                    subject @ ("router.register" | "router.unregister") => {
                        let kind = subject.trim_start_matches("router.");
                        m.message(kind);
                        match message::parse(&msg.payload) {
                            Err(bad) => dropped.log(subject, &bad),
                            Ok(reg) if kind == "register" => {
                                // Only a tls_port endpoint needs the snapshot (its client config).
                                let taken = match reg.endpoint.tls {
                                    false => Ok(None),
                                    true => table::tls_target(&reg.endpoint, shared.snapshot().backend_tls()),
                                };
                                match taken {
                                    Ok(_) => table.register(&reg, Instant::now()),
                                    Err(reason) => skipped.count(reason, &reg),
                                }
                            }
                            Ok(reg) => table.unregister(&reg),
                        }
                    }
                    "router.greet" => {
                        m.message("greet");
                        if let Some(reply) = msg.reply {
                            if let Err(e) = client.publish(reply, start_json.clone()).await {
                                tracing::warn!("NATS: cannot answer router.greet: {e}");
                            }
                        }
                    }
                    _ => {}
                }
            }
            Some(event) = events.recv() => match event {
                Event::Connected => {
                    connected = true;
                    m.connected.set(1);
                    if ever_connected {
                        m.reconnects.inc();
                    }
                    ever_connected = true;
                    if std::mem::take(&mut disconnected_while_suspended) {
                        table.touch_all(Instant::now());
                    }
                    match client.publish("router.start", start_json.clone()).await {
                        Ok(()) => {
                            status.ready_at.get_or_init(|| Instant::now() + cfg.start_response_delay_interval);
                            tracing::info!(id = %start.id, "NATS: connected; router.start published");
                        }
                        Err(e) => tracing::warn!("NATS: connected, but router.start could not be published: {e}"),
                    }
                }
                Event::Disconnected => {
                    connected = false;
                    m.connected.set(0);
                    disconnected_while_suspended = cfg.suspend_pruning_if_nats_unavailable;
                    tracing::warn!(
                        suspend_pruning = cfg.suspend_pruning_if_nats_unavailable,
                        "NATS: disconnected; reconnecting"
                    );
                }
                Event::SlowConsumer(_) => {
                    // One event per message dropped (while async-nats's own
                    // event queue has room: a lower bound).
                    m.dropped.inc();
                    let n = m.dropped.get();
                    if n.is_power_of_two() {
                        tracing::warn!(
                            dropped = n,
                            "NATS: messages dropped: the router fell behind (registrations return with their next refresh)"
                        );
                    }
                }
                other => tracing::info!("NATS: {other}"),
            },
            _ = prune.tick() => {
                if connected || !cfg.suspend_pruning_if_nats_unavailable {
                    let pruned = table.prune(Instant::now(), cfg.droplet_stale_threshold);
                    if pruned > 0 {
                        m.pruned.inc_by(pruned as u64);
                        tracing::info!(pruned, left = table.len(), "NATS: pruned stale endpoints");
                    }
                }
            }
            _ = flush.tick() => {
                let snap = shared.snapshot();
                if table.is_dirty(&snap.config) {
                    // Each flush costs what changed; a burst (the first
                    // round of registrations, a reload) can take a while:
                    // other tasks move off this worker meanwhile.
                    tokio::task::block_in_place(|| {
                        let (changes, addrs) = table.changes(&snap.config, snap.backend_tls(), &shared.registry);
                        shared.registry.learn(&addrs.added, &addrs.removed);
                        let shadowed = shared.learn(changes);
                        m.shadowed.set(shadowed as i64);
                    });
                    m.endpoints.set(table.len() as i64);
                    m.routes.set(table.uris() as i64);
                }
            }
            Some(reply) = views.recv() => {
                let _ = reply.send(table.view());
            }
        }
    }
}

/// 100 ms after the first failed attempt, doubling up to 5 s.
fn reconnect_delay(attempts: usize) -> Duration {
    Duration::from_millis(100u64 << attempts.min(6)).min(Duration::from_secs(5))
}

/// Logs a dropped message at most once per reason per [`LOG_EVERY`],
/// saying how many more were dropped for it since; counts every one.
#[derive(Default)]
struct Throttle {
    last: HashMap<&'static str, (Instant, u64)>,
}

impl Throttle {
    fn log(&mut self, subject: &str, bad: &Bad) {
        let reason = bad.reason();
        metrics::get().nats.bad(reason);
        let now = Instant::now();
        match self.last.get_mut(reason) {
            Some((at, more)) if now.duration_since(*at) < LOG_EVERY => *more += 1,
            entry => {
                let more = entry.map_or(0, |(_, more)| *more);
                tracing::warn!(reason, "NATS: {subject} dropped: {bad} ({more} more dropped for this reason before)");
                self.last.insert(reason, (now, 0));
            }
        }
    }
}

/// Endpoints of valid registrations that cannot be taken (a `tls_port`
/// the router cannot dial): each counted, each reason logged once.
#[derive(Default)]
struct Skipped {
    told: HashSet<&'static str>,
}

impl Skipped {
    fn count(&mut self, reason: &'static str, reg: &Registration) {
        metrics::get().nats.skipped(reason);
        if !self.told.insert(reason) {
            return;
        }
        let why = match reason {
            "no_backend_tls_ca" => "[backend_tls] ca is not set (the CA its certificate must chain to)",
            "no_server_cert_domain_san" => "it names no server_cert_domain_san (the name its certificate must carry)",
            _ => "its server_cert_domain_san is no DNS name or IP address",
        };
        tracing::warn!(
            reason,
            endpoint = %reg.endpoint.addr,
            "NATS: an endpoint with a tls_port is not taken: {why}; others like it are only counted \
             (upsplice_nats_endpoints_skipped_total)"
        );
    }
}
