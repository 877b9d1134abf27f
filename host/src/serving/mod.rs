//! Connections and requests: the server, the request path, routing to apps, admission to an
//! app's instances, the access log and max-requests.

pub mod access_log;
pub mod admission;
pub mod handler;
pub mod max_requests;
pub mod router;
pub mod server;
pub mod tls;
