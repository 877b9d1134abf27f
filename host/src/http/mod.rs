//! HTTP concerns in front of the guest: gunicorn's request limits, trusted proxy headers, and
//! the answers the host gives itself when it cannot or will not run the guest, request
//! bodies the guest left unread, response bodies the guest could not finish, and clients that
//! stop reading them; and what a listener does when an accept fails.

pub mod answers;
pub mod cut;
pub mod drain;
pub mod forwarded;
pub mod limits;
pub mod write_stall;

/// Out of file descriptors or a similar passing condition: wait a little rather than spin.
pub async fn accept_failed(error: std::io::Error) {
    tracing::warn!("accept failed: {error}");
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
}
