//! Chunks of `CHUNK` bytes, reused. The bytes the capabilities move pass through chunks (a part
//! held while its MAC is checked, a chunk being encrypted, a read of a stored file), and the
//! allocator gives freed memory back to the kernel at once (`allocator.rs`), so a new buffer
//! costs a page fault per 4 KiB written to it: on Lenzeye's path those faults were 17% of a
//! worker's CPU, most of them in the buffers of verified downloads.
//!
//! A chunk is mapped memory of its own rather than the allocator's: it goes back to the pool
//! when the last `Bytes` made of it is dropped, and to the kernel, at once and whichever thread
//! drops it, when the pool is full or trimmed. The pool keeps at most `KEPT` free chunks, none
//! that has waited `STALE` (`trim`, from the worker, while it has connections) and none once
//! the worker has no connection (`release`): a worker at rest holds what it did without the
//! pool, and workers whose bursts end at different times do not keep chunks for one another's
//! peak. A chunk is made only when none is free, so a worker's chunks never outnumber those its
//! stages held at once at their peak.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use memmap2::MmapMut;

use crate::capabilities::streams::CHUNK;
use crate::lock::lock;

/// The most free chunks kept: 32 MiB, about what four downloads' verified 10 MiB parts hand on
/// to each other (keeping 32 left a quarter more page faults on Lenzeye's path).
const KEPT: usize = 128;

/// How long a free chunk waits for a stage before it goes back to the kernel: a stream hands
/// its chunks on within microseconds, a verified part within a few milliseconds.
pub const STALE: Duration = Duration::from_millis(100);

static POOL: Pool = Pool::new();

/// An empty chunk, reused if one is free.
pub fn take() -> std::io::Result<Chunk> {
    POOL.take()
}

/// Gives back to the kernel the free chunks that have waited `STALE`.
pub fn trim() {
    POOL.trim(STALE);
}

/// Gives every free chunk back to the kernel.
pub fn release() {
    POOL.trim(Duration::ZERO);
}

/// Up to `CHUNK` bytes, the first `len` of them in use.
pub struct Chunk {
    /// Taken back by the pool when the chunk is dropped.
    memory: Option<MmapMut>,
    len: usize,
    pool: &'static Pool,
}

impl Chunk {
    fn memory(&self) -> &[u8] {
        self.memory.as_deref().unwrap_or_default()
    }

    fn memory_mut(&mut self) -> &mut [u8] {
        self.memory.as_deref_mut().unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len == CHUNK
    }

    /// Appends what fits of `bytes`; how many bytes that was.
    pub fn append(&mut self, bytes: &[u8]) -> usize {
        let take = (CHUNK - self.len).min(bytes.len());
        let start = self.len;
        self.memory_mut()[start..start + take].copy_from_slice(&bytes[..take]);
        self.len += take;
        take
    }

    /// The first `len` bytes (at most `CHUNK`), zeroed, to be read into: a chunk may have held
    /// another app's bytes, and a short read must not pass them on.
    pub fn filled(&mut self, len: usize) -> &mut [u8] {
        self.len = len.min(CHUNK);
        let len = self.len;
        let bytes = &mut self.memory_mut()[..len];
        bytes.fill(0);
        bytes
    }

    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// The bytes in use, which go back to the pool once every `Bytes` of them is dropped.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        &self.memory()[..self.len]
    }
}

impl AsMut<[u8]> for Chunk {
    fn as_mut(&mut self) -> &mut [u8] {
        let len = self.len;
        &mut self.memory_mut()[..len]
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        let mut free = lock(&self.pool.free);
        if free.len() < KEPT
            && let Some(memory) = self.memory.take()
        {
            // The most recently used is taken first; the longest waiting is trimmed first.
            free.push_back((memory, Instant::now()));
        }
    }
}

struct Pool {
    /// Free chunks, and since when each is free.
    free: Mutex<VecDeque<(MmapMut, Instant)>>,
}

impl Pool {
    const fn new() -> Pool {
        Pool {
            free: Mutex::new(VecDeque::new()),
        }
    }

    fn take(&'static self) -> std::io::Result<Chunk> {
        let free = lock(&self.free).pop_back();
        let memory = match free {
            Some((memory, _)) => memory,
            None => MmapMut::map_anon(CHUNK)?,
        };
        Ok(Chunk {
            memory: Some(memory),
            len: 0,
            pool: self,
        })
    }

    fn trim(&self, waited: Duration) {
        let mut stale = Vec::new();
        {
            let mut free = lock(&self.free);
            while free
                .front()
                .is_some_and(|(_, since)| since.elapsed() >= waited)
            {
                stale.extend(free.pop_front());
            }
        }
        // Unmapped outside the lock.
        drop(stale);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_chunk_is_reused_once_its_last_bytes_are_dropped_and_given_back_once_stale() {
        let pool: &'static Pool = Box::leak(Box::new(Pool::new()));
        let address = |chunk: &Chunk| chunk.memory().as_ptr();
        let mut chunk = pool.take().unwrap();
        assert_eq!(
            chunk.append(&vec![7; CHUNK + 1]),
            CHUNK,
            "a chunk takes what fits"
        );
        assert!(chunk.is_full());
        chunk.truncate(5);
        let first = address(&chunk);
        let bytes = chunk.freeze();
        assert_eq!(&bytes[..], &[7; 5]);
        let slice = bytes.slice(1..3);
        drop(bytes);
        // A slice still holds the chunk: a new take gets another one.
        let other = pool.take().unwrap();
        assert_ne!(address(&other), first);
        drop(slice);
        let mut again = pool.take().unwrap();
        assert_eq!(address(&again), first);
        assert_eq!(again.as_ref(), b"", "a chunk taken again is empty");
        assert_eq!(
            again.filled(3),
            &[0, 0, 0],
            "and none of its earlier bytes are read back"
        );
        drop(again);
        drop(other);
        assert_eq!(lock(&pool.free).len(), 2);
        // Past `KEPT` free chunks, the rest go back to the kernel.
        let many: Vec<Chunk> = (0..KEPT + 3).map(|_| pool.take().unwrap()).collect();
        drop(many);
        assert_eq!(lock(&pool.free).len(), KEPT);
        pool.trim(Duration::from_secs(3600));
        assert_eq!(lock(&pool.free).len(), KEPT, "none has waited an hour");
        std::thread::sleep(Duration::from_millis(20));
        let recent = pool.take().unwrap();
        drop(recent);
        pool.trim(Duration::from_millis(10));
        assert_eq!(
            lock(&pool.free).len(),
            1,
            "only the chunk used again was kept"
        );
        pool.trim(Duration::ZERO);
        assert!(lock(&pool.free).is_empty());
    }
}
