//! `--reload`: the master watches the files a reload reads again (each app's component, the
//! config file, the TLS certificate and keys, every `--reload-extra-file`) and reloads as on HUP once a changed file has been
//! quiet for a moment, so a build that writes a component in pieces causes one reload, of the
//! finished file.
//!
//! The directories holding the files are watched rather than the files, because a build or an
//! editor often replaces a file by renaming another over it, which a watch on the old file
//! would not see.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use notify::event::{AccessKind, AccessMode};
use notify::{Event, EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::settings::Settings;

/// How long a changed file must stay unchanged before it is reloaded.
const QUIET: Duration = Duration::from_millis(500);

pub struct Reloader {
    changes: mpsc::UnboundedReceiver<Result<PathBuf, notify::Error>>,
    /// Files changed since the last reload, and when the last change came: kept here rather
    /// than in `changed`'s future, which the master's loop drops and makes again on every turn.
    pending: BTreeSet<PathBuf>,
    last_change: Option<tokio::time::Instant>,
    /// Watches while it lives.
    _watcher: RecommendedWatcher,
}

impl Reloader {
    /// A watch over the files `settings` reload on, or `None` without `--reload`.
    pub fn watch(settings: &Settings) -> Result<Option<Reloader>> {
        if !settings.reload {
            return Ok(None);
        }
        let files: BTreeSet<PathBuf> = settings
            .apps
            .iter()
            .map(|app| app.component.clone())
            .chain(settings.config_file.clone())
            .chain(settings.reload_extra_files.iter().cloned())
            .chain(settings.tls.iter().flat_map(|tls| tls.files().cloned()))
            .map(|file| absolute(&file))
            .collect::<Result<_>>()?;
        let (sender, changes) = mpsc::unbounded_channel();
        let watched = files.clone();
        let mut watcher = notify::recommended_watcher(move |event: notify::Result<Event>| {
            let changed = match event {
                // A file closed after writing changed; other accesses (the reload's own reads
                // among them) change nothing.
                Ok(event)
                    if matches!(event.kind, EventKind::Access(access)
                        if access != AccessKind::Close(AccessMode::Write)) =>
                {
                    return;
                }
                Ok(event) => event.paths,
                Err(error) => {
                    let _ = sender.send(Err(error));
                    return;
                }
            };
            for path in changed.into_iter().filter(|path| watched.contains(path)) {
                let _ = sender.send(Ok(path));
            }
        })
        .context("--reload: cannot watch files")?;
        let directories: BTreeSet<&Path> = files.iter().filter_map(|file| file.parent()).collect();
        for directory in directories {
            watcher
                .watch(directory, RecursiveMode::NonRecursive)
                .with_context(|| format!("--reload: cannot watch {}", directory.display()))?;
        }
        tracing::info!(
            "reload: watching {}",
            files
                .iter()
                .map(|file| file.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(Some(Reloader {
            changes,
            pending: BTreeSet::new(),
            last_change: None,
            _watcher: watcher,
        }))
    }

    /// The watched files that changed, once none has changed for `QUIET`. Cancel-safe.
    pub async fn changed(&mut self) -> Vec<PathBuf> {
        loop {
            let next = match self.last_change {
                None => self.changes.recv().await,
                Some(last) => {
                    match tokio::time::timeout_at(last + QUIET, self.changes.recv()).await {
                        Ok(next) => next,
                        Err(_) => {
                            self.last_change = None;
                            return std::mem::take(&mut self.pending).into_iter().collect();
                        }
                    }
                }
            };
            match next {
                Some(Ok(path)) => {
                    self.pending.insert(path);
                    self.last_change = Some(tokio::time::Instant::now());
                }
                Some(Err(error)) => tracing::error!("reload: the file watch failed: {error}"),
                // The watching thread is gone: no change will come again.
                None => return std::future::pending().await,
            }
        }
    }
}

/// `file` as the watcher names it: its directory made absolute and resolved, its name kept (the
/// file itself may be a link a build replaces).
fn absolute(file: &Path) -> Result<PathBuf> {
    let name = file
        .file_name()
        .with_context(|| format!("--reload: {} names no file", file.display()))?;
    let directory = match file.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let directory = directory
        .canonicalize()
        .with_context(|| format!("--reload: cannot watch {}", directory.display()))?;
    Ok(directory.join(name))
}
