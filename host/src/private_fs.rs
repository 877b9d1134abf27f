//! Files and directories that only the host's user may reach, whatever the umask: the data
//! directory and everything the host makes under it (directories 0700, files 0600), and the
//! checks that a directory the host trusts (the compile cache, the run directory) cannot be
//! written by another local user.

use std::fs::{DirBuilder, Metadata, OpenOptions};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, Result, bail};

/// The mode of the host's directories and files. The umask can only take bits away from these.
pub const DIR_MODE: u32 = 0o700;
pub const FILE_MODE: u32 = 0o600;

/// Makes `path` and its missing parents with mode 0700, and takes group and other access away
/// from `path` itself if it already existed with them (an older host made it 0755).
pub fn create_dir_all(path: &Path) -> Result<()> {
    create_missing_dirs(path)?;
    tighten(path, DIR_MODE)
}

/// Makes `path` and its missing parents with mode 0700, leaving an existing one as it is.
pub fn create_missing_dirs(path: &Path) -> Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
        .with_context(|| format!("cannot create {}", path.display()))
}

/// `create_dir_all` for async code: what the stores make under the data directory per request.
pub async fn create_dir_all_async(path: &Path) -> std::io::Result<()> {
    tokio::fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)
        .await
}

/// Makes an SQLite database file 0600 before SQLite opens it, so that the `-wal` and `-shm`
/// files it creates next to it get the same mode (SQLite gives them the database file's), and
/// takes group and other access away from those already there.
pub fn sqlite_files(database: &Path) -> Result<()> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(FILE_MODE)
        .custom_flags(libc::O_NOFOLLOW)
        .open(database)
        .with_context(|| format!("cannot create {}", database.display()))?;
    tighten(database, FILE_MODE)?;
    for suffix in ["-wal", "-shm", "-journal"] {
        let mut name = database.as_os_str().to_owned();
        name.push(suffix);
        let companion = Path::new(&name);
        if companion.exists() {
            tighten(companion, FILE_MODE)?;
        }
    }
    Ok(())
}

/// Sets `mode` on `path` if it is the host user's and allows more than that.
fn tighten(path: &Path, mode: u32) -> Result<()> {
    let meta = std::fs::symlink_metadata(path)
        .with_context(|| format!("cannot look at {}", path.display()))?;
    if meta.uid() == effective_uid() && meta.mode() & 0o777 & !mode != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
            .with_context(|| format!("cannot make {} private", path.display()))?;
        tracing::info!(
            "made {} private: mode {:o} (was {:o})",
            path.display(),
            mode,
            meta.mode() & 0o777
        );
    }
    Ok(())
}

pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Why another local user could change what is at `meta`, if they could: it belongs to
/// someone other than the host's user or root, or group or others may write it. `sticky_ok`
/// accepts a world-writable directory with the sticky bit (`/tmp`), where nobody may rename or
/// remove another user's entries.
pub fn writable_by_others(meta: &Metadata, sticky_ok: bool) -> Option<String> {
    let owner = meta.uid();
    if owner != effective_uid() && owner != 0 {
        return Some(format!(
            "it belongs to uid {owner}, not to this host's user (uid {})",
            effective_uid()
        ));
    }
    let mode = meta.mode() & 0o7777;
    let sticky = mode & libc::S_ISVTX != 0;
    if mode & 0o022 != 0 && !(sticky_ok && sticky) {
        return Some(format!("group or others may write it (mode {:o})", mode));
    }
    None
}

/// Refuses a directory the host takes code or counters from if another local user could
/// place or replace its entries: the directory itself must be the host user's (or root's) and
/// writable by nobody else, and so must every directory above it, unless sticky.
pub fn check_trusted_dir(dir: &Path, what: &str) -> Result<()> {
    let real = dir
        .canonicalize()
        .with_context(|| format!("cannot resolve {what} {}", dir.display()))?;
    let mut sticky_ok = false;
    for current in std::iter::successors(Some(real.as_path()), |path| path.parent()) {
        let meta = std::fs::metadata(current)
            .with_context(|| format!("cannot look at {}", current.display()))?;
        if !meta.is_dir() {
            bail!("{what} {} is not a directory", current.display());
        }
        if let Some(reason) = writable_by_others(&meta, sticky_ok) {
            if current == real {
                bail!(
                    "{what} {} is not private: {reason}; another local user could place files there",
                    dir.display()
                );
            }
            bail!(
                "{what} {} is not private: {reason} holds it ({}), so another local user could replace it",
                dir.display(),
                current.display()
            );
        }
        sticky_ok = true;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::symlink_metadata(path).unwrap().mode() & 0o777
    }

    #[test]
    fn directories_and_databases_are_private_whatever_they_were() {
        let root = tempfile::tempdir().unwrap();
        let nested = root.path().join("a/b");
        create_dir_all(&nested).unwrap();
        assert_eq!(mode(&root.path().join("a")), 0o700);
        assert_eq!(mode(&nested), 0o700);
        std::fs::set_permissions(&nested, std::fs::Permissions::from_mode(0o755)).unwrap();
        create_dir_all(&nested).unwrap();
        assert_eq!(mode(&nested), 0o700);

        let database = nested.join("app.sqlite");
        let wal = nested.join("app.sqlite-wal");
        std::fs::write(&wal, b"").unwrap();
        std::fs::set_permissions(&wal, std::fs::Permissions::from_mode(0o644)).unwrap();
        sqlite_files(&database).unwrap();
        assert_eq!(mode(&database), 0o600);
        assert_eq!(mode(&wal), 0o600);
    }

    #[test]
    fn a_directory_others_may_write_is_not_trusted() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("cache");
        create_dir_all(&dir).unwrap();
        check_trusted_dir(&dir, "the cache").unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = check_trusted_dir(&dir, "the cache")
            .unwrap_err()
            .to_string();
        assert!(error.contains("mode 777"), "{error}");
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let error = check_trusted_dir(&dir, "the cache")
            .unwrap_err()
            .to_string();
        assert!(error.contains("could replace it"), "{error}");
    }
}
