//! The master's private directory in `--worker-tmp-dir` (`/dev/shm` by default, which every
//! local user may write): `host-<master pid>-<random>`, made with mode 0700 under a name
//! nobody can guess before it exists, holding the workers' heartbeat and metrics files.
//! Another local user can neither read those files nor plant one under a name a worker is about
//! to use; a file planted in `--worker-tmp-dir` itself is never opened.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

use crate::private_fs;

const PREFIX: &str = "host-";

pub struct RunDir {
    dir: tempfile::TempDir,
    /// The `--worker-tmp-dir` it is in.
    parent: PathBuf,
}

impl RunDir {
    /// Makes the master's directory in `parent`, after removing those of masters that are gone.
    pub fn create(parent: &Path) -> Result<RunDir> {
        let meta = std::fs::metadata(parent)
            .with_context(|| format!("cannot use --worker-tmp-dir {}", parent.display()))?;
        if !meta.is_dir() {
            bail!("--worker-tmp-dir {} is not a directory", parent.display());
        }
        // In a directory others may write without the sticky bit, they could rename the
        // private directory away and put their own in its place.
        if meta.mode() & 0o022 != 0 && meta.mode() & libc::S_ISVTX == 0 {
            bail!(
                "--worker-tmp-dir {} may be written by other users (mode {:o}) and is not sticky: \
                 another local user could replace the host's files there; use a private \
                 directory or a sticky one such as /dev/shm or /tmp",
                parent.display(),
                meta.mode() & 0o7777
            );
        }
        remove_stale(parent);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{PREFIX}{}-", std::process::id()))
            .permissions(std::fs::Permissions::from_mode(private_fs::DIR_MODE))
            .tempdir_in(parent)
            .with_context(|| {
                format!(
                    "cannot create a private directory in --worker-tmp-dir {}",
                    parent.display()
                )
            })?;
        check_private(dir.path())?;
        Ok(RunDir {
            dir,
            parent: parent.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The `--worker-tmp-dir` this directory is in.
    pub fn parent(&self) -> &Path {
        &self.parent
    }
}

/// Refuses a directory that is not the host user's alone: a worker checks the directory the
/// master named before it creates its files there.
pub fn check_private(dir: &Path) -> Result<()> {
    let meta = std::fs::symlink_metadata(dir)
        .with_context(|| format!("cannot look at {}", dir.display()))?;
    if !meta.is_dir() || meta.uid() != private_fs::effective_uid() || meta.mode() & 0o077 != 0 {
        bail!(
            "{} is not the host's private directory (uid {}, mode {:o})",
            dir.display(),
            meta.uid(),
            meta.mode() & 0o7777
        );
    }
    Ok(())
}

/// Removes the directories of this user's masters that are gone (killed before they could
/// remove their own).
fn remove_stale(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.strip_prefix(PREFIX))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, _)| pid.parse::<i32>().ok())
            .filter(|&pid| pid > 0)
        else {
            continue;
        };
        let ours = entry.metadata().is_ok_and(|meta| {
            meta.is_dir() && !meta.is_symlink() && meta.uid() == private_fs::effective_uid()
        });
        // SAFETY: signal 0 only checks whether the process exists.
        let gone = unsafe { libc::kill(pid, 0) } == -1
            && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH);
        if ours && gone {
            match std::fs::remove_dir_all(entry.path()) {
                Ok(()) => tracing::info!(
                    "removed {}, left by a master that is gone",
                    entry.path().display()
                ),
                Err(error) => tracing::error!(
                    "cannot remove {}, left by a master that is gone: {error}",
                    entry.path().display()
                ),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_directory_is_private_and_a_dead_masters_is_removed() {
        let parent = tempfile::tempdir().unwrap();
        let stale = parent.path().join("host-999999999-abc");
        std::fs::create_dir(&stale).unwrap();
        std::fs::write(stale.join("host-metrics-1"), b"x").unwrap();
        let unrelated = parent.path().join("host-notes");
        std::fs::create_dir(&unrelated).unwrap();
        let run = RunDir::create(parent.path()).unwrap();
        assert_eq!(std::fs::metadata(run.path()).unwrap().mode() & 0o777, 0o700);
        check_private(run.path()).unwrap();
        assert!(!stale.exists());
        assert!(unrelated.exists());
        let path = run.path().to_owned();
        drop(run);
        assert!(!path.exists());
    }

    #[test]
    fn a_writable_directory_without_the_sticky_bit_is_refused() {
        let parent = tempfile::tempdir().unwrap();
        std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = RunDir::create(parent.path()).err().unwrap().to_string();
        assert!(error.contains("not sticky"), "{error}");
        std::fs::set_permissions(parent.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
        RunDir::create(parent.path()).unwrap();
    }
}
