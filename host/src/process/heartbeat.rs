//! Worker heartbeats, as gunicorn's `WorkerTmp`: the master creates an unlinked file (0600) per
//! worker in its private directory of `--worker-tmp-dir` (`run_dir`) and hands its descriptor
//! to the worker, which stamps the file's times with the monotonic clock from its event loop;
//! the master reads them back to see how long the worker has been silent. A stuck event loop
//! stops the stamps whatever the cause.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};

use crate::clock;

pub struct Heartbeat {
    file: File,
}

impl Heartbeat {
    /// A new heartbeat file, already stamped, in `dir`.
    pub fn create(dir: &Path) -> Result<Heartbeat> {
        let file = tempfile::tempfile_in(dir).with_context(|| {
            format!(
                "cannot create a heartbeat file in {} (--worker-tmp-dir)",
                dir.display()
            )
        })?;
        let heartbeat = Heartbeat { file };
        heartbeat
            .beat()
            .context("cannot stamp the heartbeat file")?;
        Ok(heartbeat)
    }

    /// The worker's end, from the descriptor the master passed.
    pub fn from_fd(fd: OwnedFd) -> Heartbeat {
        Heartbeat {
            file: File::from(fd),
        }
    }

    pub fn beat(&self) -> std::io::Result<()> {
        let now = clock::now();
        let times = [now, now];
        // SAFETY: the descriptor is open for the life of `self.file`; `times` is two timespecs.
        let rc = unsafe { libc::futimens(self.file.as_raw_fd(), times.as_ptr()) };
        if rc == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }

    /// The worker says it is leaving on its own (`--max-requests`): the file's mode goes to 0,
    /// and the master starts a replacement without waiting for the exit.
    pub fn mark_retiring(&self) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        self.file
            .set_permissions(std::fs::Permissions::from_mode(0o000))
    }

    pub fn is_retiring(&self) -> bool {
        use std::os::unix::fs::PermissionsExt;
        self.file
            .metadata()
            .is_ok_and(|meta| meta.permissions().mode() & 0o777 == 0)
    }

    /// How long since the last beat.
    pub fn silence(&self) -> std::io::Result<Duration> {
        // SAFETY: fstat writes into the zeroed struct it is given.
        let mut stat: libc::stat = unsafe { std::mem::zeroed() };
        if unsafe { libc::fstat(self.file.as_raw_fd(), &mut stat) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let stamp = Duration::new(
            stat.st_mtime.max(0) as u64,
            stat.st_mtime_nsec.clamp(0, 999_999_999) as u32,
        );
        Ok(clock::since_start().saturating_sub(stamp))
    }

    pub fn as_raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}

/// Takes ownership of an inherited descriptor.
///
/// # Safety
/// `fd` must be open, owned by nobody else in this process, and not used again by the caller.
pub unsafe fn owned_fd(fd: i32) -> OwnedFd {
    unsafe { OwnedFd::from_raw_fd(fd) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn silence_grows_until_the_next_beat() {
        let heartbeat = Heartbeat::create(&std::env::temp_dir()).unwrap();
        std::thread::sleep(Duration::from_millis(30));
        assert!(heartbeat.silence().unwrap() >= Duration::from_millis(25));
        heartbeat.beat().unwrap();
        assert!(heartbeat.silence().unwrap() < Duration::from_millis(25));
        assert!(!heartbeat.is_retiring());
        heartbeat.mark_retiring().unwrap();
        assert!(heartbeat.is_retiring());
    }
}
