//! How many guest instances run at once in a worker, and what happens to the rest: they wait
//! in a bounded queue, first come first served, and are turned away (503) when the queue is
//! full or when they have waited longer than the timeout.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::metrics::AppMetrics;

pub struct Admission {
    running: Arc<Semaphore>,
    waiting: AtomicUsize,
    queue_limit: usize,
    max_wait: Option<Duration>,
    metrics: AppMetrics,
}

/// A permit to run, held until the guest instance is gone.
pub type Permit = OwnedSemaphorePermit;

#[derive(Debug, PartialEq, Eq)]
pub enum Busy {
    QueueFull { queue_limit: usize },
    WaitedTooLong { waited: Duration },
}

impl std::fmt::Display for Busy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Busy::QueueFull { queue_limit } => write!(
                f,
                "server busy: all instances are running and {queue_limit} requests are already waiting (--worker-connections)"
            ),
            Busy::WaitedTooLong { waited } => write!(
                f,
                "server busy: no instance became free within {}s (--timeout)",
                waited.as_secs_f64()
            ),
        }
    }
}

impl Admission {
    pub fn new(
        concurrency: usize,
        queue_limit: usize,
        max_wait: Option<Duration>,
        metrics: AppMetrics,
    ) -> Admission {
        Admission {
            running: Arc::new(Semaphore::new(concurrency)),
            waiting: AtomicUsize::new(0),
            queue_limit,
            max_wait,
            metrics,
        }
    }

    pub async fn admit(&self) -> Result<Permit, Busy> {
        if let Ok(permit) = Arc::clone(&self.running).try_acquire_owned() {
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.queue_limit {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            self.metrics.busy();
            return Err(Busy::QueueFull {
                queue_limit: self.queue_limit,
            });
        }
        let _waiting = WaitingGuard(&self.waiting, &self.metrics);
        self.metrics.queued();
        let acquire = Arc::clone(&self.running).acquire_owned();
        let permit = match self.max_wait {
            Some(max_wait) => tokio::time::timeout(max_wait, acquire).await.map_err(|_| {
                self.metrics.busy();
                Busy::WaitedTooLong { waited: max_wait }
            })?,
            None => acquire.await,
        };
        // The semaphore is never closed.
        Ok(permit.expect("admission semaphore closed"))
    }

    #[cfg(test)]
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Acquire)
    }
}

struct WaitingGuard<'a>(&'a AtomicUsize, &'a AppMetrics);

impl Drop for WaitingGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
        self.1.dequeued();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queue_is_bounded_and_waits_are_timed() {
        let admission = Arc::new(Admission::new(
            1,
            1,
            Some(Duration::from_millis(50)),
            AppMetrics::detached(),
        ));
        let running = admission.admit().await.unwrap();
        let waiter = tokio::spawn({
            let admission = Arc::clone(&admission);
            async move { admission.admit().await.map(drop) }
        });
        while admission.waiting() == 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            admission.admit().await.unwrap_err(),
            Busy::QueueFull { queue_limit: 1 }
        );
        assert!(matches!(
            waiter.await.unwrap(),
            Err(Busy::WaitedTooLong { .. })
        ));
        drop(running);
        assert!(admission.admit().await.is_ok());
    }
}
