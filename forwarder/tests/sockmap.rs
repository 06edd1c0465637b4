//! The sockmap data plane through its library API: loopback socket pairs,
//! a `Tunnel`, `SockmapPlane::relay`. Every test is skipped, saying why,
//! when `sockmap::probe()` says this build or kernel cannot run the plane.

use upsplice::config::DataPlaneConfig;
use upsplice::dataplane::sockmap::{self, SockmapPlane};

fn plane() -> Option<SockmapPlane> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    if let Err(why) = sockmap::probe() {
        eprintln!("SKIPPED: sockmap unavailable: {why}");
        return None;
    }
    Some(SockmapPlane::new(&DataPlaneConfig::default()).expect("sockmap plane starts"))
}

#[test]
fn starts_and_self_tests() {
    let Some(plane) = plane() else { return };
    let (up, down) = plane.bytes_relayed();
    assert!(
        up >= 14 && down >= 24,
        "self-test bytes counted: {up} {down}"
    );
}
