//! gorouter's start message (`RouterStart`), published as `router.start`
//! and answered to `router.greet`: route emitters register all their
//! routes when they see it, and re-register every
//! `minimumRegisterIntervalInSeconds`.

use std::net::{IpAddr, UdpSocket};

use serde::Serialize;

use crate::config::Nats;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Start {
    /// `"<index>-<uuid>"`, one uuid for the process's life.
    pub id: String,
    /// This node's addresses.
    pub hosts: Vec<String>,
    pub minimum_register_interval_in_seconds: u64,
    pub prune_threshold_in_seconds: u64,
}

impl Start {
    pub fn new(cfg: &Nats) -> Start {
        Start {
            id: format!("{}-{}", cfg.index, uuid::Uuid::new_v4()),
            hosts: local_ip(cfg).into_iter().map(|ip| ip.to_string()).collect(),
            minimum_register_interval_in_seconds: cfg.start_response_delay_interval.as_secs(),
            prune_threshold_in_seconds: cfg.droplet_stale_threshold.as_secs(),
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("the start message serializes")
    }
}

/// The address this node reaches its first NATS server from (as
/// gorouter's localip does it: a UDP socket "connected" there, no packet
/// sent).
fn local_ip(cfg: &Nats) -> Option<IpAddr> {
    let server = cfg.servers.first()?;
    let rest = server.split_once("://").map_or(server.as_str(), |(_, r)| r);
    let host_port = rest.rsplit('@').next()?.split('/').next()?;
    let (host, port) = host_port.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().ok()?;
    let bind = if host.contains(':') { "[::]:0" } else { "0.0.0.0:0" };
    let socket = UdpSocket::bind(bind).ok()?;
    socket.connect((host, port)).ok()?;
    Some(socket.local_addr().ok()?.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gorouter_field_names_and_values() {
        let cfg: Nats = toml::from_str("servers = [\"nats://u:p@127.0.0.1:4222\"]\nindex = 3").unwrap();
        let start = Start::new(&cfg);
        let v: serde_json::Value = serde_json::from_slice(&start.to_json()).unwrap();
        assert!(v["id"].as_str().unwrap().starts_with("3-"), "{v}");
        assert_eq!(v["hosts"], serde_json::json!(["127.0.0.1"]));
        assert_eq!(v["minimumRegisterIntervalInSeconds"], 5);
        assert_eq!(v["pruneThresholdInSeconds"], 120);
    }
}
