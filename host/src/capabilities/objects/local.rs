//! The local-directory object store, the embedded default. One directory per app:
//!
//! ```text
//! <root>/objects/<segment>/…/<segment>.o     an object: each key segment percent-encoded
//! <root>/uploads/<upload id>/key             the key of an upload in progress
//! <root>/uploads/<upload id>/<n>.<etag>.part a stored part
//! <root>/tmp/<pid>/                          files being written, by each process
//! ```
//!
//! Encoding every `.` in a segment keeps the `.o` suffix unambiguous, so `a` and `a/b` can both
//! be objects, as in S3. Every file is written under `tmp/`, synced, then renamed into place:
//! a part or object is visible only once all its bytes are stored, whatever crashes.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use tokio::io::AsyncWriteExt;
use wasmtime_wasi::p2::DynInputStream;

use super::{Exact, ObjectResult};
use crate::capabilities::host::capabilities::objects::{ObjectError, ObjectInfo, PartInfo};
use crate::capabilities::streams::{CHUNK, Next, Produce, Produced};
use crate::capabilities::{blocking, chunk_pool};

const OBJECT_SUFFIX: &str = ".o";
const PART_SUFFIX: &str = ".part";
/// The longest file name most file systems take.
const MAX_FILE_NAME: usize = 255;

pub struct LocalStore {
    root: PathBuf,
    /// This process's directory under `<root>/tmp`, made with the store.
    tmp: PathBuf,
}

fn unavailable(what: &str, error: impl std::fmt::Display) -> ObjectError {
    ObjectError::Unavailable(format!("{what}: {error}"))
}

impl LocalStore {
    /// The store at `root`, with its `tmp/` made now rather than on every write.
    pub async fn new(root: PathBuf) -> anyhow::Result<LocalStore> {
        let tmp = crate::capabilities::scratch_dir(&LocalStore::tmp_dir(&root));
        crate::private_fs::create_dir_all_async(&tmp)
            .await
            .with_context(|| format!("cannot create {}", tmp.display()))?;
        Ok(LocalStore { root, tmp })
    }

    /// Where the store at `root` writes files before they are renamed into place.
    pub fn tmp_dir(root: &Path) -> PathBuf {
        root.join("tmp")
    }

    fn objects(&self) -> PathBuf {
        self.root.join("objects")
    }

    fn object_path(&self, key: &str) -> ObjectResult<PathBuf> {
        let mut path = self.objects();
        let segments: Vec<&str> = key.split('/').collect();
        for (index, segment) in segments.iter().enumerate() {
            let mut name = encode_segment(segment);
            if index + 1 == segments.len() {
                name.push_str(OBJECT_SUFFIX);
            }
            if name.len() > MAX_FILE_NAME {
                return Err(ObjectError::InvalidKey(format!(
                    "{key:?}: the segment {segment:?} is too long for the local store ({} bytes encoded, at most {MAX_FILE_NAME})",
                    name.len()
                )));
            }
            path.push(name);
        }
        Ok(path)
    }

    /// The upload's directory, if `upload_id` is an upload of `key`.
    async fn upload_dir(&self, key: &str, upload_id: &str) -> ObjectResult<PathBuf> {
        if upload_id.len() != 32 || !upload_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ObjectError::NoSuchUpload);
        }
        let dir = self.root.join("uploads").join(upload_id);
        match tokio::fs::read_to_string(dir.join("key")).await {
            Ok(stored) if stored == key => Ok(dir),
            Ok(_) => Err(ObjectError::NoSuchUpload),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                Err(ObjectError::NoSuchUpload)
            }
            Err(error) => Err(unavailable("cannot read the upload", error)),
        }
    }

    /// A new file under `tmp/`, removed if it is dropped before being renamed into place.
    fn temporary(&self) -> ObjectResult<tempfile::NamedTempFile> {
        tempfile::Builder::new()
            .prefix("write-")
            .tempfile_in(&self.tmp)
            .map_err(|e| {
                unavailable(
                    &format!("cannot create a file in {}", self.tmp.display()),
                    e,
                )
            })
    }

    pub async fn create_multipart(&self, key: &str) -> ObjectResult<String> {
        self.object_path(key)?;
        let upload_id =
            random_token().map_err(|e| unavailable("no randomness for an upload id", e))?;
        let dir = self.root.join("uploads").join(&upload_id);
        crate::private_fs::create_dir_all_async(&dir)
            .await
            .map_err(|e| unavailable("cannot create the upload", e))?;
        let written = async {
            let temporary = self.temporary()?;
            tokio::fs::write(temporary.path(), key)
                .await
                .map_err(|e| unavailable("cannot create the upload", e))?;
            temporary
                .persist(dir.join("key"))
                .map_err(|e| unavailable("cannot create the upload", e))
        };
        if let Err(error) = written.await {
            // A full disk, say: no directory stays behind that no upload id reaches.
            let _ = tokio::fs::remove_dir_all(&dir).await;
            return Err(error);
        }
        Ok(upload_id)
    }

    pub async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        mut source: DynInputStream,
        length: u64,
    ) -> ObjectResult<PartInfo> {
        let dir = self.upload_dir(key, upload_id).await?;
        let temporary = self.temporary()?;
        let file = Arc::new(
            temporary
                .reopen()
                .map_err(|e| unavailable("cannot write the part", e))?,
        );
        let mut bytes = Exact::new(&mut source, length);
        while let Some(chunk) = bytes.next().await? {
            let file = Arc::clone(&file);
            blocking(move || (&*file).write_all(&chunk))
                .await
                .map_err(|e| unavailable("cannot write the part", e))?;
        }
        blocking(move || file.sync_data())
            .await
            .map_err(|e| unavailable("cannot write the part", e))?;
        // Names this write of the part: the registry checks it against what it recorded.
        let etag = random_token().map_err(|e| unavailable("no randomness for an etag", e))?;
        let name = format!("{number:05}.{etag}{PART_SUFFIX}");
        temporary
            .persist(dir.join(&name))
            .map_err(|e| unavailable("cannot store the part", e))?;
        // The part is in place; earlier copies of the same number go.
        for (other, path) in part_files(&dir).await? {
            if other.number == number && other.etag != etag {
                let _ = tokio::fs::remove_file(path).await;
            }
        }
        Ok(PartInfo {
            number,
            size: length,
            etag,
        })
    }

    pub async fn list_parts(&self, key: &str, upload_id: &str) -> ObjectResult<Vec<PartInfo>> {
        let dir = self.upload_dir(key, upload_id).await?;
        let mut parts: Vec<PartInfo> = Vec::new();
        for (part, _) in part_files(&dir).await? {
            // Two files of one number only if a write crashed between its rename and the
            // clean-up: the newest is the one that was stored last (part_files sorts by age).
            parts.retain(|kept| kept.number != part.number);
            parts.push(part);
        }
        parts.sort_by_key(|part| part.number);
        Ok(parts)
    }

    pub async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: &[PartInfo],
    ) -> ObjectResult<ObjectInfo> {
        let dir = self.upload_dir(key, upload_id).await?;
        let temporary = self.temporary()?;
        let mut object = temporary
            .reopen()
            .map_err(|e| unavailable("cannot write the object", e))?;
        let paths: Vec<(u32, PathBuf)> = parts
            .iter()
            .map(|part| {
                let name = format!("{:05}.{}{PART_SUFFIX}", part.number, part.etag);
                (part.number, dir.join(name))
            })
            .collect();
        // One blocking task for the whole join: `std::io::copy` between files is a
        // `copy_file_range` in the kernel, where an async copy would hand every 8 KiB to a
        // blocking thread and back.
        blocking(move || {
            for (number, path) in paths {
                let mut part = std::fs::File::open(&path).map_err(|e| {
                    std::io::Error::new(e.kind(), format!("cannot read part {number}: {e}"))
                })?;
                std::io::copy(&mut part, &mut object)?;
            }
            object.sync_data()
        })
        .await
        .map_err(|e| unavailable("cannot write the object", e))?;
        self.place(temporary, key).await?;
        tokio::fs::remove_dir_all(&dir)
            .await
            .map_err(|e| unavailable("cannot remove the finished upload", e))?;
        self.head(key).await?.ok_or(ObjectError::NotFound)
    }

    /// Renames a written file into the place of `key`.
    async fn place(&self, temporary: tempfile::NamedTempFile, key: &str) -> ObjectResult<()> {
        let path = self.object_path(key)?;
        if let Some(parent) = path.parent() {
            crate::private_fs::create_dir_all_async(parent)
                .await
                .map_err(|e| {
                    ObjectError::InvalidKey(format!("{key:?}: cannot be stored here ({e})"))
                })?;
        }
        temporary
            .persist(&path)
            .map_err(|e| unavailable("cannot store the object", e))?;
        Ok(())
    }

    pub async fn abort_multipart(&self, key: &str, upload_id: &str) -> ObjectResult<()> {
        let dir = self.upload_dir(key, upload_id).await?;
        tokio::fs::remove_dir_all(&dir)
            .await
            .map_err(|e| unavailable("cannot remove the upload", e))
    }

    /// The uploads (key, upload id) with no activity since `cutoff`: their directory, which
    /// every stored part is renamed into, last changed before it.
    pub async fn idle_uploads(&self, cutoff: SystemTime) -> ObjectResult<Vec<(String, String)>> {
        let failed = |e| unavailable("cannot list the uploads", e);
        let mut entries = match tokio::fs::read_dir(self.root.join("uploads")).await {
            Ok(entries) => entries,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(error) => return Err(failed(error)),
        };
        let mut idle = Vec::new();
        while let Some(entry) = entries.next_entry().await.map_err(failed)? {
            let changed = match entry.metadata().await {
                Ok(metadata) => metadata.modified().map_err(failed)?,
                // Completed or aborted since the directory was read.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => return Err(failed(error)),
            };
            if changed >= cutoff {
                continue;
            }
            let upload_id = entry.file_name().to_string_lossy().into_owned();
            match tokio::fs::read_to_string(entry.path().join("key")).await {
                Ok(key) => idle.push((key, upload_id)),
                // An upload whose creation failed before its key was in place (a host before
                // this one left those), or one just removed: nothing can reach it.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                    match tokio::fs::remove_dir_all(entry.path()).await {
                        Ok(()) => {}
                        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                        Err(error) => return Err(failed(error)),
                    }
                }
                Err(error) => return Err(failed(error)),
            }
        }
        Ok(idle)
    }

    pub async fn put(&self, key: &str, data: Vec<u8>) -> ObjectResult<ObjectInfo> {
        self.object_path(key)?;
        let temporary = self.temporary()?;
        let mut file = tokio::fs::File::from_std(
            temporary
                .reopen()
                .map_err(|e| unavailable("cannot write the object", e))?,
        );
        file.write_all(&data)
            .await
            .map_err(|e| unavailable("cannot write the object", e))?;
        file.sync_data()
            .await
            .map_err(|e| unavailable("cannot write the object", e))?;
        self.place(temporary, key).await?;
        self.head(key).await?.ok_or(ObjectError::NotFound)
    }

    pub async fn get(
        &self,
        key: &str,
        start: u64,
        length: Option<u64>,
    ) -> ObjectResult<(ObjectInfo, DynInputStream)> {
        let path = self.object_path(key)?;
        let file = match blocking(move || std::fs::File::open(&path)).await {
            Ok(file) => file,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(ObjectError::NotFound);
            }
            Err(error) => return Err(unavailable("cannot read the object", error)),
        };
        let metadata = file
            .metadata()
            .map_err(|e| unavailable("cannot read the object", e))?;
        let info = info(key, &metadata);
        if start > info.size {
            return Err(ObjectError::InvalidRange);
        }
        let remaining = length.map_or(info.size - start, |length| length.min(info.size - start));
        Ok((
            info,
            Produced::boxed(FileChunks {
                file: Arc::new(file),
                position: start,
                remaining,
            }),
        ))
    }

    pub async fn head(&self, key: &str) -> ObjectResult<Option<ObjectInfo>> {
        match tokio::fs::metadata(self.object_path(key)?).await {
            Ok(metadata) => Ok(Some(info(key, &metadata))),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(unavailable("cannot read the object", error)),
        }
    }

    pub async fn delete(&self, key: &str) -> ObjectResult<()> {
        match tokio::fs::remove_file(self.object_path(key)?).await {
            Ok(()) => Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(unavailable("cannot delete the object", error)),
        }
    }

    /// The objects under `prefix` by key; it stops past `limit` of them.
    pub async fn list(&self, prefix: &str, limit: usize) -> ObjectResult<Vec<ObjectInfo>> {
        // Walk only below the directory the prefix's whole segments name.
        let (directory_part, _) = prefix.rsplit_once('/').unwrap_or(("", prefix));
        let mut start = self.objects();
        let mut key_prefix = String::new();
        if !directory_part.is_empty() {
            for segment in directory_part.split('/') {
                start.push(encode_segment(segment));
                key_prefix.push_str(segment);
                key_prefix.push('/');
            }
        }
        let mut found = Vec::new();
        let mut pending = vec![(start, key_prefix)];
        while let Some((dir, key_prefix)) = pending.pop() {
            if found.len() > limit {
                break;
            }
            let mut entries = match tokio::fs::read_dir(&dir).await {
                Ok(entries) => entries,
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
                Err(error) => return Err(unavailable("cannot list the objects", error)),
            };
            while let Some(entry) = entries
                .next_entry()
                .await
                .map_err(|e| unavailable("cannot list the objects", e))?
            {
                if found.len() > limit {
                    break;
                }
                let name = entry.file_name().to_string_lossy().into_owned();
                let kind = entry
                    .file_type()
                    .await
                    .map_err(|e| unavailable("cannot list the objects", e))?;
                if kind.is_dir() {
                    if let Some(segment) = decode_segment(&name) {
                        pending.push((entry.path(), format!("{key_prefix}{segment}/")));
                    }
                } else if let Some(segment) =
                    name.strip_suffix(OBJECT_SUFFIX).and_then(decode_segment)
                {
                    let key = format!("{key_prefix}{segment}");
                    if key.starts_with(prefix) {
                        match entry.metadata().await {
                            Ok(metadata) => found.push(info(&key, &metadata)),
                            // Deleted since the directory was read.
                            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                            Err(error) => {
                                return Err(unavailable("cannot list the objects", error));
                            }
                        }
                    }
                }
            }
        }
        found.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(found)
    }
}

/// The stored parts of an upload with their paths, oldest first.
async fn part_files(dir: &Path) -> ObjectResult<Vec<(PartInfo, PathBuf)>> {
    let mut entries = tokio::fs::read_dir(dir)
        .await
        .map_err(|e| unavailable("cannot list the parts", e))?;
    let mut parts = Vec::new();
    while let Some(entry) = entries
        .next_entry()
        .await
        .map_err(|e| unavailable("cannot list the parts", e))?
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some((number, etag)) = name
            .strip_suffix(PART_SUFFIX)
            .and_then(|stem| stem.split_once('.'))
        else {
            continue;
        };
        let Ok(number) = number.parse::<u32>() else {
            continue;
        };
        let metadata = match entry.metadata().await {
            Ok(metadata) => metadata,
            // Replaced by a write of the same part since the directory was read.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(unavailable("cannot list the parts", error)),
        };
        let modified = metadata.modified().ok();
        parts.push((
            modified,
            PartInfo {
                number,
                size: metadata.len(),
                etag: etag.to_owned(),
            },
            entry.path(),
        ));
    }
    parts.sort_by_key(|(modified, _, _)| *modified);
    Ok(parts
        .into_iter()
        .map(|(_, part, path)| (part, path))
        .collect())
}

fn info(key: &str, metadata: &std::fs::Metadata) -> ObjectInfo {
    let modified = metadata
        .modified()
        .ok()
        .and_then(|time| time.duration_since(UNIX_EPOCH).ok())
        .unwrap_or_default();
    ObjectInfo {
        key: key.to_owned(),
        size: metadata.len(),
        // As web servers do for files: changes whenever the object is replaced.
        etag: format!("{:x}-{:x}", metadata.len(), modified.as_nanos()),
        modified: modified.as_secs(),
    }
}

fn encode_segment(segment: &str) -> String {
    let mut encoded = String::with_capacity(segment.len());
    for byte in segment.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'~') {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

fn decode_segment(name: &str) -> Option<String> {
    let bytes = name.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = name.get(index + 1..index + 3)?;
            decoded.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            decoded.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(decoded).ok()
}

/// An object's bytes, read a chunk at a time straight into the (reused) buffer that is passed on.
struct FileChunks {
    file: Arc<std::fs::File>,
    position: u64,
    remaining: u64,
}

/// The most read from a file at once.
const READ_CHUNK: u64 = CHUNK as u64;

impl Produce for FileChunks {
    async fn next(mut self) -> (Self, Next) {
        if self.remaining == 0 {
            return (self, Ok(None));
        }
        let (file, position) = (Arc::clone(&self.file), self.position);
        let want = self.remaining.min(READ_CHUNK) as usize;
        let read = blocking(move || {
            use std::os::unix::fs::FileExt;
            let mut chunk = chunk_pool::take()?;
            let read = file.read_at(chunk.filled(want), position)?;
            chunk.truncate(read);
            Ok::<_, std::io::Error>(chunk)
        })
        .await;
        let next = match read {
            Ok(chunk) if chunk.is_empty() => {
                Err(anyhow::anyhow!("the object is shorter than it was"))
            }
            Ok(chunk) => {
                self.position += chunk.len() as u64;
                self.remaining -= chunk.len() as u64;
                Ok(Some(chunk.freeze()))
            }
            Err(error) => Err(anyhow::Error::from(error).context("cannot read the object")),
        };
        (self, next)
    }
}

fn random_token() -> Result<String, getrandom::Error> {
    let mut token = [0u8; 16];
    getrandom::fill(&mut token)?;
    Ok(hex::encode(token))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_round_trip_and_dots_are_encoded() {
        for segment in ["plain", "with space", "dots.and.o", "ünï", "%25"] {
            let encoded = encode_segment(segment);
            assert!(!encoded.contains('.'), "{encoded}");
            assert_eq!(decode_segment(&encoded).as_deref(), Some(segment));
        }
    }
}
