//! HTTP concerns in front of the guest: gunicorn's request limits, trusted proxy headers, and
//! the answers the host gives itself when it cannot or will not run the guest, request
//! bodies the guest left unread, response bodies the guest could not finish, and clients that
//! stop reading them.

pub mod answers;
pub mod cut;
pub mod drain;
pub mod forwarded;
pub mod limits;
pub mod write_stall;
