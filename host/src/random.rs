//! Randomness for spreading things out: `--max-requests-jitter`, request-id seeds.

/// A random number for spreading things out (jitter, request-id seeds); not for secrets. The
/// clock stands in if the system has no randomness to give.
pub fn random_u64() -> u64 {
    getrandom::u64().unwrap_or_else(|_| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
            ^ u64::from(std::process::id())
    })
}
