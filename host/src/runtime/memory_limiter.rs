//! The per-instance memory cap.
//!
//! wasmtime's `StoreLimits` caps each linear memory on its own; a component can have several,
//! so this limiter caps their sum. It also remembers a refusal, because a refused `memory.grow`
//! only returns -1 to the guest, which then fails in its own way (Rust aborts with
//! `unreachable`): without the record, the host could only report a generic trap.

use wasmtime::{ResourceLimiter, Result};

use crate::metrics::AppMetrics;

/// Table elements an instance may grow to; far above what compilers emit, low enough that a
/// runaway `table.grow` loop is stopped before it costs real memory.
const TABLE_ELEMENT_LIMIT: usize = 1 << 20;

pub struct MemoryLimiter {
    limit: usize,
    in_use: usize,
    refused: Option<usize>,
    /// The app's memory in use, across its instances.
    metrics: AppMetrics,
}

impl MemoryLimiter {
    pub fn new(limit: u64, metrics: AppMetrics) -> MemoryLimiter {
        MemoryLimiter {
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
            in_use: 0,
            refused: None,
            metrics,
        }
    }

    /// The total the guest asked for when it was refused, if it ever was.
    pub fn refused(&self) -> Option<usize> {
        self.refused
    }

    /// Forgets a refusal: a kept instance that lived through one (its guest handled it) starts
    /// its next request with a clean record, so a later failure is not blamed on it.
    pub fn forget_refusal(&mut self) {
        self.refused = None;
    }

    /// Linear memory the instance holds now, all memories together.
    pub fn in_use(&self) -> usize {
        self.in_use
    }
}

/// The instance's memory goes with it, however its request ended.
impl Drop for MemoryLimiter {
    fn drop(&mut self) {
        self.metrics.memory_released(self.in_use as u64);
    }
}

impl ResourceLimiter for MemoryLimiter {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> Result<bool> {
        let total = self.in_use.saturating_sub(current).saturating_add(desired);
        if total > self.limit {
            self.refused = Some(total);
            return Ok(false);
        }
        self.metrics
            .memory_grew(total.saturating_sub(self.in_use) as u64);
        self.in_use = total;
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> Result<bool> {
        Ok(desired <= TABLE_ELEMENT_LIMIT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_the_sum_of_all_memories() {
        let mut limiter = MemoryLimiter::new(10, AppMetrics::detached());
        assert!(limiter.memory_growing(0, 6, None).unwrap()); // first memory
        assert!(limiter.memory_growing(0, 4, None).unwrap()); // second memory
        assert!(!limiter.memory_growing(4, 5, None).unwrap()); // would make 11
        assert_eq!(limiter.refused(), Some(11));
        assert_eq!(limiter.in_use(), 10);
    }
}
