//! The machine's monotonic clock (`CLOCK_MONOTONIC`), read directly: it is the same in every
//! process, so a time one process writes (a heartbeat, a log line) is read by another.
//! `std::time::Instant` reads the same clock but does not show its value.

use std::time::Duration;

/// Now, as the kernel gives it (what `futimens` takes).
pub fn now() -> libc::timespec {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: CLOCK_MONOTONIC is always available on Linux; `now` is a valid out pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now
}

/// A time of this clock as the time since it started.
pub fn as_duration(time: libc::timespec) -> Duration {
    Duration::new(
        time.tv_sec.max(0) as u64,
        time.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

/// Now, as the time since the clock started.
pub fn since_start() -> Duration {
    as_duration(now())
}
