//! Abandoned uploads removed after `--upload-expiry`, the role of an S3 lifecycle rule, on
//! both stores: an upload no part has reached for that long is aborted (its parts removed),
//! and the registry entries nothing was added to for that long and never finished are
//! discarded. Every worker runs the sweep for its apps, but one at a time across the host: a
//! worker claims an app's sweep by locking a file in the data directory whose time says when
//! the last sweep ran.
//!
//! A store's dates are not trusted alone: moto, the S3 API server of the tests, dates every
//! upload's start 2010, and an upload with no part yet would be aborted at once. The stamp file
//! also holds when the host first saw each idle upload, and an upload is aborted only once the
//! store says it is idle and the host has seen it so for the expiry: between one and two
//! expiries after its last part.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{Context, Result};

use crate::capabilities::hmac_registry::unix_seconds;
use crate::capabilities::{AppCapabilities, blocking};

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
            let stamp = stamp.clone();
            match blocking(move || claim(&stamp, interval)).await {
                Ok(Some(claimed)) => sweep(&app, &capabilities, expiry, claimed).await,
                Ok(None) => {}
                Err(error) => tracing::warn!("app `{app}`: {error:#}"),
            }
        }
    });
}

async fn sweep(app: &str, capabilities: &AppCapabilities, expiry: Duration, stamp: File) {
    let now = SystemTime::now();
    let Some(cutoff) = now.checked_sub(expiry) else {
        return;
    };
    let seconds = expiry.as_secs_f64();
    match abort_idle_uploads(capabilities, stamp, now, cutoff).await {
        Ok(0) => {}
        Ok(aborted) => tracing::info!(
            "app `{app}`: aborted {aborted} upload(s) no part reached for {seconds} s (--upload-expiry)"
        ),
        Err(error) => tracing::warn!(
            "app `{app}`: cannot remove the uploads abandoned for {seconds} s: {error:#}"
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

/// Aborts the uploads the store says are idle since `cutoff` and the host has seen idle since
/// then too (`sightings`, in the stamp file: upload id → seconds since the epoch).
async fn abort_idle_uploads(
    capabilities: &AppCapabilities,
    mut stamp: File,
    now: SystemTime,
    cutoff: SystemTime,
) -> Result<usize> {
    let (mut stamp, text) = blocking(move || {
        let mut text = String::new();
        stamp.rewind()?;
        stamp.read_to_string(&mut text)?;
        Ok::<_, std::io::Error>((stamp, text))
    })
    .await
    .context("cannot read the expiry stamp")?;
    // An unreadable record (a host before this one left none) starts again from now.
    let seen_before: BTreeMap<String, i64> = serde_json::from_str(&text).unwrap_or_default();
    let idle = capabilities
        .objects
        .idle_uploads(cutoff)
        .await
        .map_err(|error| anyhow::anyhow!("{error:?}"))?;
    let mut sightings = BTreeMap::new();
    let mut aborted = 0;
    for (key, upload_id) in idle {
        let first_seen = seen_before
            .get(&upload_id)
            .copied()
            .unwrap_or_else(|| unix_seconds(now));
        if first_seen < unix_seconds(cutoff) {
            let removed = capabilities.objects.abort_if_there(&key, &upload_id).await;
            aborted += usize::from(removed.map_err(|error| anyhow::anyhow!("{error:?}"))?);
        } else {
            sightings.insert(upload_id, first_seen);
        }
    }
    let text = serde_json::to_string(&sightings).context("cannot record the idle uploads")?;
    blocking(move || {
        stamp.set_len(0)?;
        stamp.rewind()?;
        stamp.write_all(text.as_bytes())
    })
    .await
    .context("cannot write the expiry stamp")?;
    Ok(aborted)
}

/// The app's sweep, if no other worker is running it and none ran it within `interval`: the
/// stamp file, locked until it is dropped.
fn claim(stamp: &Path, interval: Duration) -> Result<Option<File>> {
    let dir = stamp.parent().unwrap_or(Path::new("."));
    crate::private_fs::create_dir_all(dir)?;
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
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
