//! How the master hands its settings (the master key and the database URLs among them) to the
//! processes it starts, workers and `host prepare`, without putting them where other processes
//! see them. The settings are written to an anonymous memory file (memfd), sealed, and
//! inherited as descriptor 3; the child reads it once at start and closes it, so nothing it
//! starts later (a hook command) inherits it. An environment variable would be inherited by
//! every hook command and is readable in `/proc/<pid>/environ` for the process's whole life; a
//! pipe would need a writer thread once the settings outgrow its buffer; a file, even 0600 and
//! removed after reading, would leave the key on disk if the child died before reading it.
//!
//! Children also lose the environment variables the master may have read secrets from
//! (`HOST_MASTER_KEY`, `DATABASE_URL`, …): they get the settings from the memfd only.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use anyhow::{Context, Result, bail};

use crate::settings::Settings;

/// The descriptor a child finds its settings at.
pub const SETTINGS_FD: i32 = 3;

/// Variables the master may take secrets from, which no process it starts gets:
/// `HOST_CMD_ARGS` may carry `--database-url` or `--master-key` too.
pub const SECRET_VARIABLES: [&str; 4] = [
    "HOST_MASTER_KEY",
    "DATABASE_URL",
    "HOST_DATABASE_URL",
    "HOST_CMD_ARGS",
];

/// The settings, written for one child.
pub struct SettingsFile {
    file: File,
}

impl SettingsFile {
    pub fn new(settings: &Settings) -> Result<SettingsFile> {
        let json = serde_json::to_vec(settings).context("cannot serialise the settings")?;
        // SAFETY: the name is a NUL-terminated string; the flags are valid.
        let fd = unsafe {
            libc::memfd_create(
                c"host-settings".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error())
                .context("cannot create a memory file for the settings");
        }
        // SAFETY: memfd_create returned a new descriptor that nothing else owns.
        let mut file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.write_all(&json)
            .context("cannot write the settings to a memory file")?;
        // Sealed: the child reads exactly what the master wrote.
        let seals =
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
        // SAFETY: fcntl on a descriptor `file` owns.
        if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
            return Err(std::io::Error::last_os_error()).context("cannot seal the settings");
        }
        Ok(SettingsFile { file })
    }

    pub fn as_raw_fd(&self) -> i32 {
        self.file.as_raw_fd()
    }
}

/// In a child: reads the settings the master passed at `SETTINGS_FD`, and closes it.
pub fn read_inherited() -> Result<Settings> {
    // SAFETY: fcntl(F_GETFD) only asks whether the descriptor is open.
    if unsafe { libc::fcntl(SETTINGS_FD, libc::F_GETFD) } < 0 {
        bail!("`host worker` and `host prepare` are started by `host serve`, not by hand");
    }
    // SAFETY: the master placed the settings' memory file at SETTINGS_FD and nothing else in
    // this process uses that descriptor; `file` closes it when it is dropped below.
    let mut file = File::from(unsafe { OwnedFd::from_raw_fd(SETTINGS_FD) });
    let mut json = Vec::new();
    file.seek(SeekFrom::Start(0))
        .and_then(|_| file.read_to_end(&mut json))
        .context("cannot read the settings the master passed")?;
    drop(file);
    serde_json::from_slice(&json).context("the master passed unreadable settings")
}

/// Takes the variables of `SECRET_VARIABLES` out of a child's environment.
pub fn without_secrets(command: &mut std::process::Command) -> &mut std::process::Command {
    for name in SECRET_VARIABLES {
        command.env_remove(name);
    }
    command
}
