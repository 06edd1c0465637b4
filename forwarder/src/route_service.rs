//! Route services, gorouter's way: a request on a route bound to a route
//! service goes to that service first, with a token only the
//! foundation's routers can read; the service calls back through a
//! router, which checks the token and forwards to the app.
//!
//! * [`token`]: the token (`X-CF-Proxy-Signature` / `-Metadata`), sealed
//!   and opened in gorouter's format;
//! * the decision for one request is `handshake::route_service`.

pub mod token;

pub use token::{Keys, Sealed, Signed, TokenError, FORWARDED_URL, METADATA, SIGNATURE};
