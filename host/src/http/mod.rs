//! HTTP concerns in front of the guest: gunicorn's request limits, trusted proxy headers, and
//! the answers the host gives itself when it cannot or will not run the guest.

pub mod answers;
pub mod forwarded;
pub mod limits;
