//! A whole part held while it is checked (a verified download) or sent (an S3 upload, which
//! must be replayable for retries): in memory up to `--part-buffer`, in an unnamed-on-close
//! temporary file under the data directory beyond it, so memory stays bounded whatever the
//! part size.

use std::io::SeekFrom;
use std::path::Path;

use anyhow::{Context, Result};
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncSeekExt, AsyncWriteExt};

use crate::capabilities::streams::CHUNK;

pub enum PartBuffer {
    Memory(BytesMut),
    File {
        temporary: tempfile::NamedTempFile,
        writer: tokio::fs::File,
    },
}

/// A buffer once all its bytes are in.
pub enum Filled {
    Memory(Bytes),
    File(tempfile::NamedTempFile),
}

impl PartBuffer {
    /// A buffer for a part of `size` bytes, spilling into `spill_dir`, which `make_spill_dir`
    /// made when the app's capabilities were set up.
    pub fn new(size: u64, memory_limit: u64, spill_dir: &Path) -> Result<PartBuffer> {
        if size <= memory_limit {
            return Ok(PartBuffer::Memory(BytesMut::with_capacity(size as usize)));
        }
        let temporary = tempfile::Builder::new()
            .prefix("part-")
            .tempfile_in(spill_dir)
            .with_context(|| format!("cannot create a part file in {}", spill_dir.display()))?;
        let writer = tokio::fs::File::from_std(
            temporary
                .reopen()
                .context("cannot open the part file for writing")?,
        );
        Ok(PartBuffer::File { temporary, writer })
    }

    pub async fn write(&mut self, bytes: &[u8]) -> Result<()> {
        match self {
            PartBuffer::Memory(memory) => memory.extend_from_slice(bytes),
            PartBuffer::File { writer, .. } => writer
                .write_all(bytes)
                .await
                .context("cannot write the part file")?,
        }
        Ok(())
    }

    pub async fn finish(self) -> Result<Filled> {
        match self {
            PartBuffer::Memory(memory) => Ok(Filled::Memory(memory.freeze())),
            PartBuffer::File {
                temporary,
                mut writer,
            } => {
                writer.flush().await.context("cannot write the part file")?;
                Ok(Filled::File(temporary))
            }
        }
    }
}

/// Where part buffers beyond `--part-buffer` spill, for verified reads and S3 uploads.
pub fn spill_dir(data_dir: &Path) -> std::path::PathBuf {
    data_dir.join("tmp")
}

/// Makes the directory part files spill into, once, rather than on every spill.
pub async fn make_spill_dir(spill_dir: &Path) -> Result<()> {
    tokio::fs::create_dir_all(spill_dir)
        .await
        .with_context(|| format!("cannot create {}", spill_dir.display()))
}

impl Filled {
    /// Reads bytes `from..to` of the part.
    pub fn reader(self, from: u64, to: u64) -> Result<PartReader> {
        Ok(match self {
            Filled::Memory(bytes) => {
                let to = (to as usize).min(bytes.len());
                let from = (from as usize).min(to);
                PartReader::Memory(bytes.slice(from..to))
            }
            Filled::File(temporary) => PartReader::File {
                file: None,
                from,
                remaining: to.saturating_sub(from),
                temporary,
            },
        })
    }
}

/// The bytes of a filled buffer, a chunk at a time.
pub enum PartReader {
    Memory(Bytes),
    File {
        file: Option<tokio::fs::File>,
        from: u64,
        remaining: u64,
        temporary: tempfile::NamedTempFile,
    },
}

impl PartReader {
    pub fn empty() -> PartReader {
        PartReader::Memory(Bytes::new())
    }

    pub async fn next_chunk(&mut self) -> Result<Option<Bytes>> {
        match self {
            PartReader::Memory(bytes) if bytes.is_empty() => Ok(None),
            PartReader::Memory(bytes) => Ok(Some(bytes.split_to(bytes.len().min(CHUNK)))),
            PartReader::File { remaining: 0, .. } => Ok(None),
            PartReader::File {
                file,
                from,
                remaining,
                temporary,
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
                let mut chunk = vec![0u8; (*remaining).min(CHUNK as u64) as usize];
                reader
                    .read_exact(&mut chunk)
                    .await
                    .context("cannot read the part file")?;
                *remaining -= chunk.len() as u64;
                Ok(Some(Bytes::from(chunk)))
            }
        }
    }
}
