//! HTTP concerns in front of the guest: gunicorn's request limits, trusted proxy headers, and
//! the answers the host gives itself when it cannot or will not run the guest, and request
//! bodies the guest left unread.

pub mod answers;
pub mod drain;
pub mod forwarded;
pub mod limits;
