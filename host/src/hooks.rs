//! gunicorn's server hooks as named lifecycle events: each is a line in the log with its name and
//! facts (pids, counts), so the events a gunicorn config logged are still there.

/// Records one lifecycle event.
pub fn event(name: &str, facts: &[(&str, String)]) {
    let facts = facts
        .iter()
        .map(|(key, value)| format!(" {key}={value}"))
        .collect::<String>();
    tracing::info!("hook {name}{facts}");
}
