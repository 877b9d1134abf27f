//! Connections and requests: the server, the request path, routing to apps, admission to an
//! app's instances, the access log, max-requests and the quiet that --idle-recycle waits for.

pub mod access_log;
pub mod admission;
pub mod handler;
pub mod max_requests;
pub mod quiet;
pub mod router;
pub mod server;
pub mod tls;
