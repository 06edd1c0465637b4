//! Route services, gorouter's way: a request on a route bound to a route
//! service goes to that service first, with a token only the
//! foundation's routers can read; the service calls back through a
//! router, which checks the token and forwards to the app.
//!
//! * [`token`]: the token (`X-CF-Proxy-Signature` / `-Metadata`), sealed
//!   and opened in gorouter's format;
//! * [`services`]: where each route service is (its URL resolved into a
//!   pool, dialled over TLS);
//! * the decision for one request is `handshake::route_service`.

pub mod services;
pub mod token;

use std::sync::Arc;

pub use services::{Service, ServiceError, Services};
pub use token::{query_unescape, Keys, Sealed, Signed, TokenError, FORWARDED_URL, METADATA, SIGNATURE};

use crate::config::Config;
use crate::upstream::Registry;

/// Route services as one snapshot has them: the keys (derived once per
/// config: deliberately slow) and the services' pools.
pub struct RouteServices {
    pub keys: Keys,
    pub services: Services,
}

impl RouteServices {
    /// None when `[route_services]` has no key (disabled).
    pub fn new(config: &Config, registry: &Arc<Registry>) -> Result<Option<RouteServices>, crate::tls::TlsError> {
        let rs = &config.route_services;
        let Some(key) = rs.key.as_deref() else { return Ok(None) };
        let tls = crate::tls::client::route_service_config(rs.ca.as_deref())?;
        Ok(Some(RouteServices {
            keys: Keys::derive(key, rs.previous_key.as_deref()),
            services: Services::new(tls, config.backends.clone(), registry.clone()),
        }))
    }
}
