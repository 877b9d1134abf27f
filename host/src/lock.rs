//! Locks taken whatever became of an earlier holder. The host's mutexes guard data a panic
//! cannot leave half-changed (a file handle, counters, a map of idle connections, a time), so
//! a holder that panicked is no reason for every later request to panic too.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// The guard of `mutex`, even if a holder panicked.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
