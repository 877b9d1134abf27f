//! Whether a worker has been without connections for a while: what `--idle-recycle` waits for
//! before it replaces a worker that grew during a burst.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::lock::lock;

/// The connections a worker has open, and since when it has none.
#[derive(Default)]
pub struct Quiet {
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Default)]
struct State {
    open: usize,
    /// When the last connection closed; `None` while one is open, and before the first.
    since: Option<Instant>,
}

/// An open connection, counted until it is dropped.
pub struct Open(Arc<Quiet>);

impl Quiet {
    pub fn opened(self: &Arc<Self>) -> Open {
        let mut state = lock(&self.state);
        state.open += 1;
        state.since = None;
        let first = state.open == 1;
        drop(state);
        // Only the first connection and the last one's end change what the waiters wait for:
        // under load, connections come and go without waking them.
        if first {
            self.changed.notify_waiters();
        }
        Open(Arc::clone(self))
    }

    /// Resolves once no connection has been open for `quiet` (never before the first one).
    pub async fn lasted(&self, quiet: Duration) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            // Registered before the state is read, so no change in between is missed.
            changed.as_mut().enable();
            let since = lock(&self.state).since;
            match since {
                Some(since) if since.elapsed() >= quiet => return,
                Some(since) => {
                    tokio::select! {
                        () = tokio::time::sleep_until(since + quiet) => {}
                        () = changed => {}
                    }
                }
                None => changed.await,
            }
        }
    }

    /// Resolves once a connection opens.
    pub async fn busy(&self) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if lock(&self.state).open > 0 {
                return;
            }
            changed.await;
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        let mut state = lock(&self.0.state);
        state.open -= 1;
        let last = state.open == 0;
        if last {
            state.since = Some(Instant::now());
        }
        drop(state);
        if last {
            self.0.changed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn quiet_is_counted_from_the_last_connection_closed() {
        let quiet = Arc::new(Quiet::default());
        let tick = Duration::from_millis(50);
        let lasted = |wait: Duration| {
            let quiet = Arc::clone(&quiet);
            async move { tokio::time::timeout(wait, quiet.lasted(tick)).await.is_ok() }
        };
        assert!(!lasted(4 * tick).await, "quiet before any connection");
        let first = quiet.opened();
        let other = quiet.opened();
        drop(first);
        assert!(!lasted(4 * tick).await, "quiet with a connection open");
        drop(other);
        let started = Instant::now();
        assert!(lasted(20 * tick).await);
        assert!(started.elapsed() >= tick);
        let waiting = tokio::spawn({
            let quiet = Arc::clone(&quiet);
            async move { quiet.busy().await }
        });
        tokio::time::sleep(tick).await;
        assert!(!waiting.is_finished());
        let _open = quiet.opened();
        tokio::time::timeout(20 * tick, waiting)
            .await
            .unwrap()
            .unwrap();
    }
}
