//! HTTP concerns in front of the guest: gunicorn's request limits, trusted proxy headers, and
//! the answers the host gives itself when it cannot or will not run the guest, request
//! bodies the guest left unread, and response bodies the guest could not finish.

pub mod answers;
pub mod cut;
pub mod drain;
pub mod forwarded;
pub mod limits;
