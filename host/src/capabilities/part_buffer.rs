//! A whole part held while it is checked (a verified download) or sent (an S3 upload, which
//! must be replayable for retries): in memory up to `--part-buffer` when a memory slot is free,
//! else in a temporary file under the data directory's `tmp/` (a spill file), so memory stays
//! bounded whatever the part size. In memory, a part checked on its way through is held in
//! reused chunks (`chunk_pool`), and a part sent whole in one buffer of its size.
//!
//! No slot is ever waited for, and none is held while the host waits on someone else:
//! - a memory slot is taken only if one is free now (else the part goes to a spill file), and
//!   only if the app holds less than its share of them in this worker;
//! - a part in memory keeps its slot for at most `HOLD` of waiting on whoever fills it (a
//!   client's body) and `HOLD` after it is ready for whoever reads it (a client's download);
//!   past that its bytes move to a spill file and the slot is given back;
//! - spill files count against `--spill-limit` (host-wide MiB, and the app's share of it in
//!   this worker); a part that finds neither a memory slot nor room on disk is refused at once
//!   with an error that says so, rather than waiting on what other clients hold.

use std::collections::VecDeque;
use std::io::SeekFrom;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::capabilities::chunk_pool::{self, Chunk};
use crate::capabilities::host_semaphores::{Bound, HostSemaphores, Slot};
use crate::capabilities::streams::CHUNK;

/// How long a part in memory may keep its slot while the host waits on the other side.
pub const HOLD: Duration = Duration::from_secs(1);

const MIB: u64 = 1 << 20;

/// The part buffers of one app in a worker.
pub struct PartBuffers {
    slots: Option<HostSemaphores>,
    memory_limit: u64,
    spill_dir: PathBuf,
    /// The app's share, in this worker, of the memory slots ...
    memory_share: Arc<Semaphore>,
    /// ... and of `--spill-limit`, in MiB.
    spill_share: Arc<Semaphore>,
    spill_share_mib: u32,
}

/// What a buffer holds of the bounds: the app's share and the host-wide slot, given back on drop.
struct Hold {
    _app: OwnedSemaphorePermit,
    _host: Option<Slot>,
}

impl PartBuffers {
    /// An app's buffers: parts up to `memory_limit` (`--part-buffer`) in memory, with at most
    /// `memory_share` of them and `spill_share_mib` MiB of spill files at once in this worker.
    pub fn new(
        slots: Option<HostSemaphores>,
        memory_limit: u64,
        spill_dir: PathBuf,
        memory_share: u32,
        spill_share_mib: u32,
    ) -> Arc<PartBuffers> {
        Arc::new(PartBuffers {
            slots,
            memory_limit,
            spill_dir,
            memory_share: Arc::new(Semaphore::new(memory_share.max(1) as usize)),
            spill_share: Arc::new(Semaphore::new(spill_share_mib as usize)),
            spill_share_mib,
        })
    }

    /// A buffer for a part of `size` bytes read back a chunk at a time: in memory if it fits and
    /// a slot is free now, else a spill file if there is room, else an error that says neither
    /// was free.
    pub fn buffer(self: &Arc<Self>, size: u64) -> Result<PartBuffer> {
        self.buffer_in(size, false)
    }

    /// As `buffer`, for a part taken whole (`Filled::whole`): in memory, one buffer of its size.
    pub fn whole_buffer(self: &Arc<Self>, size: u64) -> Result<PartBuffer> {
        self.buffer_in(size, true)
    }

    fn buffer_in(self: &Arc<Self>, size: u64, whole: bool) -> Result<PartBuffer> {
        let store = match self.memory_hold(size) {
            Some(hold) => Store::Memory {
                // Within `--part-buffer`, so the size fits in memory.
                bytes: if whole {
                    InMemory::Whole(BytesMut::with_capacity(size as usize))
                } else {
                    InMemory::Chunks(Vec::new())
                },
                hold,
                until: Instant::now() + HOLD,
            },
            None => Store::File(self.spill_file(size)?),
        };
        Ok(PartBuffer {
            owner: Arc::clone(self),
            size,
            store,
        })
    }

    fn memory_hold(&self, size: u64) -> Option<Hold> {
        if size > self.memory_limit {
            return None;
        }
        let app = Arc::clone(&self.memory_share).try_acquire_owned().ok()?;
        let host = match self.slots {
            Some(slots) => Some(slots.try_take(Bound::Buffers)?),
            None => None,
        };
        Some(Hold {
            _app: app,
            _host: host,
        })
    }

    /// A new spill file with room for `size` bytes taken from `--spill-limit`.
    fn spill_file(&self, size: u64) -> Result<SpillFile> {
        let mib = u32::try_from(size.div_ceil(MIB).max(1)).unwrap_or(u32::MAX);
        let full = || {
            anyhow!(
                "no part buffer is free for a part of {size} bytes: the memory buffers \
                 (--encrypt-concurrency × --part-buffer) are in use, and so is the room for \
                 spill files (--spill-limit; this app's share in a worker is {} MiB); try again",
                self.spill_share_mib
            )
        };
        let app = Arc::clone(&self.spill_share)
            .try_acquire_many_owned(mib)
            .map_err(|_| full())?;
        let host = match self.slots {
            Some(slots) => Some(
                slots
                    .try_take_units(Bound::SpilledMib, mib)
                    .ok_or_else(full)?,
            ),
            None => None,
        };
        let temporary = tempfile::Builder::new()
            .prefix("part-")
            .tempfile_in(&self.spill_dir)
            .with_context(|| {
                format!("cannot create a part file in {}", self.spill_dir.display())
            })?;
        let writer = tokio::fs::File::from_std(
            temporary
                .reopen()
                .context("cannot open the part file for writing")?,
        );
        Ok(SpillFile {
            temporary,
            writer,
            hold: Hold {
                _app: app,
                _host: host,
            },
        })
    }
}

/// A part being filled.
pub struct PartBuffer {
    owner: Arc<PartBuffers>,
    size: u64,
    store: Store,
}

enum Store {
    Memory {
        bytes: InMemory,
        hold: Hold,
        /// When the slot must be given back if the part is still being filled.
        until: Instant,
    },
    File(SpillFile),
}

/// A part's bytes in memory.
enum InMemory {
    /// Filled in order; a new chunk is taken when the last one is full.
    Chunks(Vec<Chunk>),
    /// One buffer of the part's size, for a part taken whole.
    Whole(BytesMut),
}

impl InMemory {
    fn slices(&self) -> Vec<&[u8]> {
        match self {
            InMemory::Chunks(chunks) => chunks.iter().map(|chunk| chunk.as_ref()).collect(),
            InMemory::Whole(bytes) => vec![&bytes[..]],
        }
    }
}

struct SpillFile {
    temporary: tempfile::NamedTempFile,
    writer: tokio::fs::File,
    hold: Hold,
}

impl SpillFile {
    async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.writer
            .write_all(bytes)
            .await
            .context("cannot write the part file")
    }
}

impl PartBuffer {
    /// Awaits `work`, the next bytes from whoever fills the part: a part in memory keeps its
    /// slot for at most `HOLD` of filling, then moves to a spill file and gives the slot back.
    pub async fn wait_for<T>(&mut self, work: impl Future<Output = T>) -> Result<T> {
        let mut work = std::pin::pin!(work);
        if let Store::Memory { until, .. } = &self.store {
            match tokio::time::timeout_at(*until, &mut work).await {
                Ok(output) => return Ok(output),
                Err(_) => self.spill().await?,
            }
        }
        Ok(work.await)
    }

    /// Moves the bytes so far to a spill file, giving back the memory slot; without room on
    /// disk the part stays in memory (still within the slots) and is tried again a `HOLD` later.
    async fn spill(&mut self) -> Result<()> {
        let Store::Memory { bytes, until, .. } = &mut self.store else {
            return Ok(());
        };
        let Ok(mut file) = self.owner.spill_file(self.size) else {
            *until = Instant::now() + HOLD;
            return Ok(());
        };
        for slice in bytes.slices() {
            file.write(slice).await?;
        }
        self.store = Store::File(file);
        Ok(())
    }

    pub async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        match &mut self.store {
            Store::Memory {
                bytes: InMemory::Whole(memory),
                ..
            } => memory.extend_from_slice(bytes),
            Store::Memory {
                bytes: InMemory::Chunks(chunks),
                ..
            } => {
                let mut rest = bytes;
                while !rest.is_empty() {
                    match chunks.last_mut() {
                        Some(last) if !last.is_full() => {
                            let taken = last.append(rest);
                            rest = &rest[taken..];
                        }
                        _ => chunks.push(chunk_pool::take().context("no memory for a part")?),
                    }
                }
            }
            Store::File(file) => file.write(bytes).await?,
        }
        Ok(())
    }

    pub async fn finish(self) -> Result<Filled> {
        let content = match self.store {
            Store::Memory { bytes, hold, .. } => Content::Memory(
                match bytes {
                    InMemory::Chunks(chunks) => chunks.into_iter().map(Chunk::freeze).collect(),
                    InMemory::Whole(bytes) => vec![bytes.freeze()],
                },
                hold,
            ),
            Store::File(mut file) => {
                file.writer
                    .flush()
                    .await
                    .context("cannot write the part file")?;
                Content::File(file.temporary, file.hold)
            }
        };
        Ok(Filled {
            owner: self.owner,
            content,
        })
    }
}

/// A buffer once all its bytes are in.
pub struct Filled {
    owner: Arc<PartBuffers>,
    content: Content,
}

enum Content {
    Memory(Vec<Bytes>, Hold),
    File(tempfile::NamedTempFile, Hold),
}

/// Where a filled part's bytes are, for a consumer that takes them whole (an S3 request body).
pub enum Whole<'a> {
    Memory(Bytes),
    File(&'a Path),
}

impl Filled {
    /// The part whole: made with `whole_buffer`, a part in memory is in one buffer already.
    pub fn whole(&self) -> Whole<'_> {
        match &self.content {
            Content::Memory(chunks, _) => Whole::Memory(match chunks.as_slice() {
                [] => Bytes::new(),
                [one] => one.clone(),
                many => many.concat().into(),
            }),
            Content::File(temporary, _) => Whole::File(temporary.path()),
        }
    }

    /// Reads bytes `from..to` of the part. A part in memory is moved to a spill file if it is
    /// not all read within `HOLD`, so a reader that stalls does not keep a memory slot.
    pub fn reader(self, from: u64, to: u64) -> PartReader {
        match self.content {
            Content::Memory(chunks, hold) => {
                let remaining = Arc::new(Mutex::new(Remaining::Memory {
                    chunks: slice(chunks, from, to),
                    _hold: Some(hold),
                }));
                let watchdog = tokio::spawn(spill_if_unread(
                    Arc::downgrade(&remaining),
                    self.owner,
                    Instant::now() + HOLD,
                ))
                .abort_handle();
                PartReader {
                    remaining,
                    watchdog: Some(watchdog),
                }
            }
            Content::File(temporary, hold) => PartReader {
                remaining: Arc::new(Mutex::new(Remaining::File {
                    file: None,
                    from,
                    remaining: to.saturating_sub(from),
                    temporary,
                    _hold: hold,
                })),
                watchdog: None,
            },
        }
    }
}

/// At `until`, moves what is left of a part in memory to a spill file, giving its slot back.
async fn spill_if_unread(
    remaining: Weak<Mutex<Remaining>>,
    owner: Arc<PartBuffers>,
    until: Instant,
) {
    tokio::time::sleep_until(until).await;
    let Some(remaining) = remaining.upgrade() else {
        return;
    };
    let mut remaining = remaining.lock().await;
    let Remaining::Memory { chunks, .. } = &*remaining else {
        return;
    };
    let left: usize = chunks.iter().map(Bytes::len).sum();
    if left == 0 {
        return;
    }
    let spilled = async {
        let mut file = owner.spill_file(left as u64)?;
        for chunk in chunks {
            file.write(chunk).await?;
        }
        file.writer
            .flush()
            .await
            .context("cannot write the part file")?;
        anyhow::Ok(Remaining::File {
            file: None,
            from: 0,
            remaining: left as u64,
            temporary: file.temporary,
            _hold: file.hold,
        })
    };
    match spilled.await {
        Ok(spilled) => *remaining = spilled,
        // Without room on disk the part stays in memory, within the memory slots.
        Err(error) => tracing::debug!("a part read slowly stays in memory: {error:#}"),
    }
}

/// The bytes of a filled buffer, a chunk at a time.
pub struct PartReader {
    remaining: Arc<Mutex<Remaining>>,
    watchdog: Option<tokio::task::AbortHandle>,
}

enum Remaining {
    Memory {
        chunks: VecDeque<Bytes>,
        _hold: Option<Hold>,
    },
    File {
        file: Option<tokio::fs::File>,
        from: u64,
        remaining: u64,
        temporary: tempfile::NamedTempFile,
        _hold: Hold,
    },
}

impl Drop for PartReader {
    fn drop(&mut self) {
        if let Some(watchdog) = &self.watchdog {
            watchdog.abort();
        }
    }
}

impl PartReader {
    pub fn empty() -> PartReader {
        PartReader {
            remaining: Arc::new(Mutex::new(Remaining::Memory {
                chunks: VecDeque::new(),
                _hold: None,
            })),
            watchdog: None,
        }
    }

    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        let mut remaining = self.remaining.lock().await;
        match &mut *remaining {
            Remaining::Memory { chunks, .. } => Ok(match chunks.front_mut() {
                None => None,
                Some(front) if front.len() > CHUNK => Some(front.split_to(CHUNK)),
                Some(_) => chunks.pop_front(),
            }),
            Remaining::File { remaining: 0, .. } => Ok(None),
            Remaining::File {
                file,
                from,
                remaining,
                temporary,
                ..
            } => {
                if file.is_none() {
                    let mut opened = tokio::fs::File::from_std(
                        temporary.reopen().context("cannot read the part file")?,
                    );
                    opened
                        .seek(SeekFrom::Start(*from))
                        .await
                        .context("cannot read the part file")?;
                    *file = Some(opened);
                }
                let Some(reader) = file.as_mut() else {
                    return Ok(None);
                };
                let want = (*remaining).min(CHUNK as u64) as usize;
                let mut chunk = chunk_pool::take().context("cannot read the part file")?;
                reader
                    .read_exact(chunk.filled(want))
                    .await
                    .context("cannot read the part file")?;
                *remaining -= want as u64;
                Ok(Some(chunk.freeze()))
            }
        }
    }
}

/// Bytes `from..to` of a part held as `chunks`.
fn slice(chunks: Vec<Bytes>, from: u64, to: u64) -> VecDeque<Bytes> {
    let mut start = 0u64;
    let mut kept = VecDeque::new();
    for chunk in chunks {
        let end = start + chunk.len() as u64;
        let (a, b) = (from.clamp(start, end), to.clamp(start, end));
        if a < b {
            kept.push_back(chunk.slice((a - start) as usize..(b - start) as usize));
        }
        start = end;
    }
    kept
}

/// Where part buffers beyond `--part-buffer` spill, for verified reads and S3 uploads.
pub fn spill_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("tmp")
}

/// Makes the directory part files spill into, once, rather than on every spill.
pub async fn make_spill_dir(spill_dir: &Path) -> Result<()> {
    crate::private_fs::create_dir_all_async(spill_dir)
        .await
        .with_context(|| format!("cannot create {}", spill_dir.display()))
}
