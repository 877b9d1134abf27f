//! `--max-requests` and `--max-requests-jitter`: a worker is replaced after serving its share.

use std::sync::atomic::{AtomicU64, Ordering};

use tokio::sync::Notify;

use crate::random::random_u64;

/// Counts a worker's requests and says when it has served its share.
pub struct MaxRequests {
    served: AtomicU64,
    limit: u64,
    reached: Notify,
}

impl MaxRequests {
    /// gunicorn's formula: `max_requests + randint(0, jitter)`, both ends inclusive; `None` when
    /// `max_requests` is 0 (never replaced).
    pub fn new(max_requests: u64, jitter: u64) -> Option<MaxRequests> {
        if max_requests == 0 {
            return None;
        }
        let extra = if jitter == 0 {
            0
        } else {
            random_u64() % (jitter + 1)
        };
        Some(MaxRequests {
            served: AtomicU64::new(0),
            limit: max_requests.saturating_add(extra),
            reached: Notify::new(),
        })
    }

    pub fn count_request(&self) {
        if self.served.fetch_add(1, Ordering::AcqRel) + 1 == self.limit {
            tracing::info!("Autorestarting worker after current request.");
            self.reached.notify_one();
        }
    }

    /// Resolves once the worker has served its share.
    pub async fn reached(&self) {
        self.reached.notified().await
    }
}
