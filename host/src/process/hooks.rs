//! gunicorn's server hooks as named lifecycle events: each is a line in the log with its name and
//! facts (pids, counts), and can run a shell command from the config file's `[hooks]` table, with
//! the facts in its environment (`HOST_HOOK=post_fork HOST_HOOK_PID=1234 …`) and without the
//! variables secrets may come from (`handoff::SECRET_VARIABLES`).

use std::collections::BTreeMap;
use std::sync::OnceLock;

static COMMANDS: OnceLock<BTreeMap<String, String>> = OnceLock::new();

/// Sets the commands hooks run; once per process.
pub fn install(commands: BTreeMap<String, String>) {
    let _ = COMMANDS.set(commands);
}

/// Records one lifecycle event, and runs its command if one is configured.
pub fn event(name: &str, facts: &[(&str, String)]) {
    let shown = facts
        .iter()
        .map(|(key, value)| format!(" {key}={value}"))
        .collect::<String>();
    tracing::info!("hook {name}{shown}");
    let Some(command) = COMMANDS.get().and_then(|commands| commands.get(name)) else {
        return;
    };
    let mut process = std::process::Command::new("/bin/sh");
    // The master key and the database URL are not the command's business.
    crate::process::handoff::without_secrets(&mut process)
        .arg("-c")
        .arg(command)
        .env("HOST_HOOK", name)
        .stdin(std::process::Stdio::null());
    for (key, value) in facts {
        process.env(format!("HOST_HOOK_{}", key.to_ascii_uppercase()), value);
    }
    match process.spawn() {
        // A hook must never hold up the master: it is reaped by a thread of its own.
        Ok(mut child) => {
            let name = name.to_owned();
            std::thread::spawn(move || match child.wait() {
                Ok(status) if !status.success() => {
                    tracing::warn!("hook {name} command failed: {status}")
                }
                Err(error) => tracing::warn!("hook {name} command: {error}"),
                Ok(_) => {}
            });
        }
        Err(error) => tracing::warn!("hook {name}: cannot run its command: {error}"),
    }
}
