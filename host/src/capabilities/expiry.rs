//! Abandoned uploads removed after `--upload-expiry`, the role of an S3 lifecycle rule, on
//! both stores: an upload no part has reached for that long is aborted (its parts removed),
//! and the registry entries nothing was added to for that long and never finished are
//! discarded. Every worker runs the sweep for its apps, but one at a time across the host: a
//! worker claims an app's sweep by locking a file in the data directory whose time says when
//! the last sweep ran.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use crate::capabilities::AppCapabilities;

/// Sweeps `app` every tenth of `expiry`, within these bounds.
const SHORTEST_INTERVAL: Duration = Duration::from_secs(1);
const LONGEST_INTERVAL: Duration = Duration::from_secs(3600);

/// Sweeps the app's abandoned uploads for as long as the worker's runtime lives.
pub fn sweep_abandoned_uploads(
    data_dir: &Path,
    app: &str,
    capabilities: Arc<AppCapabilities>,
    expiry: Duration,
) {
    let interval = (expiry / 10).clamp(SHORTEST_INTERVAL, LONGEST_INTERVAL);
    let stamp = data_dir.join("expiry").join(app);
    let app = app.to_owned();
    tokio::spawn(async move {
        loop {
            // Spread over the interval, so workers started together do not all try at once.
            let jitter = (crate::random::random_u64() % 1000) as f64 / 1000.0;
            tokio::time::sleep(interval.mul_f64(0.5 + jitter)).await;
            match claim(&stamp, interval) {
                Ok(Some(claimed)) => {
                    sweep(&app, &capabilities, expiry).await;
                    drop(claimed);
                }
                Ok(None) => {}
                Err(error) => tracing::warn!("app `{app}`: {error:#}"),
            }
        }
    });
}

async fn sweep(app: &str, capabilities: &AppCapabilities, expiry: Duration) {
    let Some(cutoff) = SystemTime::now().checked_sub(expiry) else {
        return;
    };
    let seconds = expiry.as_secs_f64();
    match capabilities.objects.abort_idle_uploads(cutoff).await {
        Ok(0) => {}
        Ok(aborted) => tracing::info!(
            "app `{app}`: aborted {aborted} upload(s) no part reached for {seconds} s (--upload-expiry)"
        ),
        Err(error) => tracing::warn!(
            "app `{app}`: cannot remove the uploads abandoned for {seconds} s: {error}"
        ),
    }
    match capabilities.registry.discard_idle(cutoff).await {
        Ok(0) => {}
        Ok(discarded) => tracing::info!(
            "app `{app}`: discarded {discarded} unfinished registry entr(y/ies) unused for {seconds} s (--upload-expiry)"
        ),
        Err(error) => tracing::warn!(
            "app `{app}`: cannot discard the registry entries abandoned for {seconds} s: {error}"
        ),
    }
}

/// The app's sweep, if no other worker is running it and none ran it within `interval`: the
/// stamp file, locked until it is dropped.
fn claim(stamp: &Path, interval: Duration) -> Result<Option<File>> {
    let dir = stamp.parent().unwrap_or(Path::new("."));
    crate::private_fs::create_dir_all(dir)?;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(stamp)
        .with_context(|| format!("cannot open {}", stamp.display()))?;
    if file.try_lock().is_err() {
        return Ok(None);
    }
    let last = file
        .metadata()
        .and_then(|metadata| metadata.modified())
        .with_context(|| format!("cannot read the time of {}", stamp.display()))?;
    let now = SystemTime::now();
    // A new stamp file has the time it was made: its first sweep waits one interval more.
    if now.duration_since(last).unwrap_or_default() < interval.mul_f64(0.9) {
        return Ok(None);
    }
    file.set_modified(now)
        .with_context(|| format!("cannot set the time of {}", stamp.display()))?;
    Ok(Some(file))
}
