//! Values as settings take them and print them: sizes, seconds, counts, `KEY=VALUE` pairs,
//! and URLs with their passwords hidden.

use std::time::Duration;

use anyhow::{Result, bail};

/// The most workers, threads, connections or slots any count setting may ask for: far past
/// what a machine serves, and within what the host's semaphores and pools can count.
const MAX_COUNT: usize = 1_000_000;

/// Refuses a count of none, or one past what the host can hold.
pub(crate) fn check_count(flag: &str, count: usize) -> Result<()> {
    if count == 0 {
        bail!("{flag} must be at least 1");
    }
    if count > MAX_COUNT {
        bail!("{flag} {count} is more than the {MAX_COUNT} a host can hold");
    }
    Ok(())
}

/// The most a System V semaphore counts (`SEMVMX`): the host-wide slots and the MiB of
/// `--spill-limit` are counted by them.
pub const MAX_SEMAPHORE_UNITS: u32 = 32767;

pub(crate) fn seconds_or_off(seconds: f64) -> Option<Duration> {
    (seconds > 0.0).then(|| Duration::from_secs_f64(seconds))
}

pub fn parse_env_pair(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

/// The longest duration a setting takes: about 31 years, so that a deadline computed from it
/// (`now + timeout`) never overflows, which would panic where it is computed.
const MAX_SECONDS: f64 = 1e9;

pub(crate) fn parse_seconds(text: &str) -> Result<f64, String> {
    let seconds: f64 = text
        .trim()
        .parse()
        .map_err(|_| format!("expected a number of seconds such as 30 or 0.5, got {text:?}"))?;
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!(
            "expected a non-negative number of seconds, got {text:?}"
        ));
    }
    if seconds > MAX_SECONDS {
        return Err(format!(
            "expected at most {MAX_SECONDS} seconds (about 31 years; 0 is off), got {text:?}"
        ));
    }
    Ok(seconds)
}

pub fn parse_size(text: &str) -> Result<u64, String> {
    let size = text
        .trim()
        .parse::<bytesize::ByteSize>()
        .map(|size| size.as_u64())
        .map_err(|_| format!("expected a size such as 16MiB, 512MB or 1GiB, got {text:?}"))?;
    // bytesize saturates a size past u64 at its largest value, which would be read as a
    // limit of 16 EiB.
    if size == u64::MAX {
        return Err(format!("{text:?} is past the largest size, 16 EiB"));
    }
    Ok(size)
}

/// A size as people write it: `16 MiB` when it is a whole number of MiB.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (unit, name) in UNITS {
        if bytes >= unit && bytes.is_multiple_of(unit) && (unit > 1 << 10 || bytes < 1 << 20) {
            return format!("{} {name}", bytes / unit);
        }
    }
    for (unit, name) in UNITS {
        if bytes >= unit {
            return format!("{:.1} {name}", bytes as f64 / unit as f64);
        }
    }
    format!("{bytes} bytes")
}

/// A database URL fit for a log line: the password replaced.
pub fn redacted_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &url[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_and_print_as_people_write_them() {
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("1GiB"), Ok(1 << 30));
        assert_eq!(parse_size("64MB"), Ok(64_000_000));
        assert!(parse_size("lots").is_err());
        // Past u64 bytesize saturates; that must not read as a 16 EiB limit.
        assert!(parse_size("99999999EiB").is_err());
        assert_eq!(human_size(16 << 20), "16 MiB");
        assert_eq!(human_size(3 << 29), "1536 MiB");
        assert_eq!(human_size(16512 << 10), "16.1 MiB");
        assert_eq!(human_size(18812 << 10), "18.4 MiB");
        assert_eq!(human_size(512 << 10), "512 KiB");
    }

    #[test]
    fn seconds_past_31_years_are_refused_rather_than_overflowing_a_deadline() {
        assert_eq!(parse_seconds("1e9"), Ok(1e9));
        assert!(parse_seconds("1e19").is_err());
        assert!(parse_seconds("1e20").is_err());
        assert!(parse_seconds("inf").is_err());
    }
}
