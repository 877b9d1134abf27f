//! The local-directory object store, the embedded default. One directory per app:
//!
//! ```text
//! <root>/objects/<segment>/…/<segment>.o     an object put whole, a file: each key segment
//!                                            percent-encoded
//! <root>/objects/<segment>/…/<segment>.o/    an object completed from parts, a directory: the
//!                                            parts as they were stored (linked), and `manifest`
//! <root>/uploads/<upload id>/key             the key of an upload in progress
//! <root>/uploads/<upload id>/<n>.<etag>.part a stored part
//! <root>/tmp/<pid>/                          files being written, and objects being gathered,
//!                                            replaced or removed, by each process
//! ```
//!
//! Encoding every `.` in a segment keeps the `.o` suffix unambiguous, so `a` and `a/b` can both
//! be objects, as in S3. Every file is written under `tmp/`, synced, then renamed into place:
//! a part or object is visible only once all its bytes are stored, whatever crashes.
//!
//! A completed upload's parts become its object as they are: hard-linked into a directory with a
//! manifest naming them in order, which is renamed into place, and only then is the upload removed,
//! so a crash on the way loses nothing. Joining the parts into one file wrote every byte a second
//! time (on Lenzeye's upload, 13% of a worker's CPU, and half of the disk writes). An object takes
//! the place of the one it replaces in one `renameat2(RENAME_EXCHANGE)`, which hands the replaced
//! one back under the new one's temporary name, so it is removed by whoever replaced it and by
//! nobody else, and a reader finds one whole object or the other, never none.

use std::collections::VecDeque;
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
/// In an object completed from parts: a line `<size> <file name>` for each part, in order.
const MANIFEST: &str = "manifest";
/// How often a read starts again when the object it began to read was replaced under it.
const READ_ATTEMPTS: usize = 4;
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
        let name = part_file_name(number, &etag);
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
        let path = self.object_path(key)?;
        self.make_parents(key, &path).await?;
        // The object is gathered under `tmp/` from links to the parts, so the upload stays
        // whole until the object is in place: a crash or a failure on the way loses nothing.
        let assembled = self.tmp.join(format!(
            "object-{}",
            random_token().map_err(|e| unavailable("no randomness for a file name", e))?
        ));
        let names: Vec<(u32, String)> = parts
            .iter()
            .map(|part| (part.number, part_file_name(part.number, &part.etag)))
            .collect();
        let (upload, object, tmp) = (dir.clone(), assembled.clone(), self.tmp.clone());
        let gathered = blocking(move || gather_object(&upload, &object, &names, &tmp)).await;
        let stored = match gathered {
            Ok(stored) => stored,
            Err(error) => {
                let _ = tokio::fs::remove_dir_all(&assembled).await;
                // Completed or aborted since its directory was found.
                if !tokio::fs::try_exists(&dir).await.unwrap_or(true) {
                    return Err(ObjectError::NoSuchUpload);
                }
                return Err(unavailable("cannot complete the upload", error));
            }
        };
        let (from, to) = (assembled.clone(), path);
        if let Err(error) = blocking(move || put_in_place(&from, &to)).await {
            let _ = tokio::fs::remove_dir_all(&assembled).await;
            return Err(unavailable("cannot store the object", error));
        }
        // The object holds the parts now; the upload's own names for them go.
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => {}
            // Completed at once by another call, which removed it.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            // The object is stored all the same; what is left expires with idle uploads.
            Err(error) => tracing::warn!(
                upload = %dir.display(),
                "cannot remove a completed upload: {error}"
            ),
        }
        // What was stored, even if another call has replaced or removed it since.
        Ok(info(key, &stored))
    }

    /// Makes the directories `path`, the place of `key`, is in.
    async fn make_parents(&self, key: &str, path: &Path) -> ObjectResult<()> {
        if let Some(parent) = path.parent() {
            crate::private_fs::create_dir_all_async(parent)
                .await
                .map_err(|e| {
                    ObjectError::InvalidKey(format!("{key:?}: cannot be stored here ({e})"))
                })?;
        }
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
        let path = self.object_path(key)?;
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
        let metadata = file
            .metadata()
            .await
            .map_err(|e| unavailable("cannot write the object", e))?;
        let stored = Stored {
            size: metadata.len(),
            modified: metadata
                .modified()
                .map_err(|e| unavailable("cannot write the object", e))?,
        };
        self.make_parents(key, &path).await?;
        // From here the file is put_in_place's to remove: it holds the replaced object.
        let from = temporary
            .into_temp_path()
            .keep()
            .map_err(|e| unavailable("cannot store the object", e.error))?;
        let written = from.clone();
        if let Err(error) = blocking(move || put_in_place(&from, &path)).await {
            let _ = tokio::fs::remove_file(written).await;
            return Err(unavailable("cannot store the object", error));
        }
        Ok(info(key, &stored))
    }

    pub async fn get(
        &self,
        key: &str,
        start: u64,
        length: Option<u64>,
    ) -> ObjectResult<(ObjectInfo, DynInputStream)> {
        let path = self.object_path(key)?;
        let (stored, files) = blocking(move || open_object(&path))
            .await
            .map_err(|e| unavailable("cannot read the object", e))?
            .ok_or(ObjectError::NotFound)?;
        let info = info(key, &stored);
        if start > info.size {
            return Err(ObjectError::InvalidRange);
        }
        let remaining = length.map_or(info.size - start, |length| length.min(info.size - start));
        Ok((
            info,
            Produced::boxed(FileChunks::new(files, start, remaining)),
        ))
    }

    pub async fn head(&self, key: &str) -> ObjectResult<Option<ObjectInfo>> {
        let path = self.object_path(key)?;
        let stored = blocking(move || Stored::read(&path))
            .await
            .map_err(|e| unavailable("cannot read the object", e))?;
        Ok(stored.map(|stored| info(key, &stored)))
    }

    pub async fn delete(&self, key: &str) -> ObjectResult<()> {
        let path = self.object_path(key)?;
        let taken = self.tmp.join(format!(
            "deleted-{}",
            random_token().map_err(|e| unavailable("no randomness for a file name", e))?
        ));
        // Taken out of its place in one rename, whatever replaces it meanwhile; then removed.
        blocking(move || match std::fs::rename(&path, &taken) {
            Ok(()) => remove_entry(&taken),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(error) => Err(error),
        })
        .await
        .map_err(|e| unavailable("cannot delete the object", e))
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
                // A segment never holds a `.`: a name ending in `.o` is an object, file or
                // directory, and any other directory a segment of longer keys.
                if let Some(segment) = name.strip_suffix(OBJECT_SUFFIX).and_then(decode_segment) {
                    let key = format!("{key_prefix}{segment}");
                    if key.starts_with(prefix) {
                        let path = entry.path();
                        // None: deleted since the directory was read.
                        if let Some(stored) = blocking(move || Stored::read(&path))
                            .await
                            .map_err(|e| unavailable("cannot list the objects", e))?
                        {
                            found.push(info(&key, &stored));
                        }
                    }
                    continue;
                }
                let kind = entry
                    .file_type()
                    .await
                    .map_err(|e| unavailable("cannot list the objects", e))?;
                if kind.is_dir()
                    && let Some(segment) = decode_segment(&name)
                {
                    pending.push((entry.path(), format!("{key_prefix}{segment}/")));
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

/// What `head` and `list` tell of a stored object.
struct Stored {
    size: u64,
    modified: SystemTime,
}

impl Stored {
    /// The object at `path`, if there is one there.
    fn read(path: &Path) -> std::io::Result<Option<Stored>> {
        Ok(retry_if_replaced(|| read_object(path, false))?.map(|(stored, _)| stored))
    }
}

/// The object at `path` and its files, opened, each with its length, in order. A file stays
/// readable once open, whatever replaces or removes the object.
type ObjectFiles = Vec<(std::fs::File, u64)>;

fn open_object(path: &Path) -> std::io::Result<Option<(Stored, ObjectFiles)>> {
    retry_if_replaced(|| read_object(path, true))
}

/// Reads an object's size and time and, if `open`, opens its files.
fn read_object(path: &Path, open: bool) -> std::io::Result<Option<(Stored, ObjectFiles)>> {
    // Opened before its size is read, so the size is that of the file that will be read.
    let file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error),
    };
    let metadata = file.metadata()?;
    if !metadata.is_dir() {
        let files = match open {
            true => vec![(file, metadata.len())],
            false => Vec::new(),
        };
        let stored = Stored {
            size: metadata.len(),
            modified: metadata.modified()?,
        };
        return Ok(Some((stored, files)));
    }
    let manifest = std::fs::File::open(path.join(MANIFEST))?;
    let modified = manifest.metadata()?.modified()?;
    let (mut size, mut files) = (0, Vec::new());
    for line in std::io::read_to_string(manifest)?.lines() {
        let part = line
            .split_once(' ')
            .and_then(|(length, name)| Some((length.parse::<u64>().ok()?, name)))
            .filter(|(_, name)| !name.contains('/'));
        let Some((length, name)) = part else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "{} has a line it cannot read: {line:?}",
                    path.join(MANIFEST).display()
                ),
            ));
        };
        size += length;
        if open {
            files.push((std::fs::File::open(path.join(name))?, length));
        }
    }
    Ok(Some((Stored { size, modified }, files)))
}

/// `read` again while it finds an object replaced under it; the object that took its place is
/// whole, so the next attempt reads that one.
fn retry_if_replaced<T>(read: impl Fn() -> std::io::Result<T>) -> std::io::Result<T> {
    let mut attempt = 1;
    loop {
        match read() {
            Err(error) if replaced_under(&error) && attempt < READ_ATTEMPTS => attempt += 1,
            result => return result,
        }
    }
}

/// What reading an object's files meets when the object is replaced or removed meanwhile:
/// its directory gone, or a file in its place.
fn replaced_under(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
    )
}

fn info(key: &str, stored: &Stored) -> ObjectInfo {
    let modified = stored
        .modified
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    ObjectInfo {
        key: key.to_owned(),
        size: stored.size,
        // As web servers do for files: changes whenever the object is replaced.
        etag: format!("{:x}-{:x}", stored.size, modified.as_nanos()),
        modified: modified.as_secs(),
    }
}

/// Makes the directory `object` of the parts `names` of the upload in `upload`, in order, with
/// their manifest. A part is linked, not copied; on a file system without hard links, copied.
/// `tmp` is where the manifest is written first.
fn gather_object(
    upload: &Path,
    object: &Path,
    names: &[(u32, String)],
    tmp: &Path,
) -> std::io::Result<Stored> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .mode(crate::private_fs::DIR_MODE)
        .create(object)?;
    let (mut manifest, mut size) = (String::new(), 0);
    for (number, name) in names {
        let cannot = |e: std::io::Error| {
            std::io::Error::new(e.kind(), format!("cannot read part {number}: {e}"))
        };
        let (part, linked) = (upload.join(name), object.join(name));
        match std::fs::hard_link(&part, &linked) {
            Ok(()) => {}
            Err(error) if links_unsupported(&error) => {
                let mut copy = std::fs::File::create_new(&linked)?;
                std::io::copy(&mut std::fs::File::open(&part).map_err(cannot)?, &mut copy)?;
                copy.sync_data()?;
            }
            Err(error) => return Err(cannot(error)),
        }
        let length = std::fs::metadata(&linked).map_err(cannot)?.len();
        manifest.push_str(&format!("{length} {name}\n"));
        size += length;
    }
    let mut file = tempfile::Builder::new()
        .prefix("manifest-")
        .tempfile_in(tmp)?;
    file.write_all(manifest.as_bytes())?;
    file.as_file().sync_data()?;
    let modified = file.as_file().metadata()?.modified()?;
    file.persist(object.join(MANIFEST)).map_err(|e| e.error)?;
    Ok(Stored { size, modified })
}

/// The file of part `number` as stored with `etag`: numbers padded, so names sort by number.
fn part_file_name(number: u32, etag: &str) -> String {
    format!("{number:05}.{etag}{PART_SUFFIX}")
}

/// A file system that does not make hard links (FAT, some network and FUSE ones).
fn links_unsupported(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EPERM | libc::EOPNOTSUPP | libc::EMLINK)
    )
}

/// Puts the object at `from` (a file or a directory) in the place `to`, in one step, and
/// removes what was there.
fn put_in_place(from: &Path, to: &Path) -> std::io::Result<()> {
    let mut attempt = 1;
    loop {
        match rename_with_flags(from, to, libc::RENAME_NOREPLACE) {
            Ok(()) => return Ok(()),
            Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(error) if unsupported(&error) => return put_in_place_in_two_steps(from, to),
            Err(error) => return Err(error),
        }
        match rename_with_flags(from, to, libc::RENAME_EXCHANGE) {
            // `from` now holds the replaced object, and nobody else knows of it.
            Ok(()) => return remove_replaced(from),
            // Removed since: the place is free again.
            Err(error)
                if error.kind() == std::io::ErrorKind::NotFound && attempt < READ_ATTEMPTS =>
            {
                attempt += 1;
            }
            Err(error) => return Err(error),
        }
    }
}

/// For a file system without `renameat2`'s flags: the replaced object is moved aside first, so
/// a reader may find no object for that moment.
fn put_in_place_in_two_steps(from: &Path, to: &Path) -> std::io::Result<()> {
    let mut aside = from.as_os_str().to_owned();
    aside.push(".replaced");
    let aside = PathBuf::from(aside);
    let replaced = match std::fs::rename(to, &aside) {
        Ok(()) => true,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => false,
        Err(error) => return Err(error),
    };
    if let Err(error) = std::fs::rename(from, to) {
        if replaced {
            let _ = std::fs::rename(&aside, to);
        }
        return Err(error);
    }
    match replaced {
        true => remove_replaced(&aside),
        false => Ok(()),
    }
}

/// Removes a replaced object. Failing leaves it in this process's `tmp/`, which the next start
/// clears: the new object is in place either way.
fn remove_replaced(path: &Path) -> std::io::Result<()> {
    if let Err(error) = remove_entry(path) {
        tracing::warn!(path = %path.display(), "cannot remove a replaced object: {error}");
    }
    Ok(())
}

/// Removes the file or directory at `path`.
fn remove_entry(path: &Path) -> std::io::Result<()> {
    match std::fs::symlink_metadata(path)?.is_dir() {
        true => std::fs::remove_dir_all(path),
        false => std::fs::remove_file(path),
    }
}

fn rename_with_flags(from: &Path, to: &Path, flags: libc::c_uint) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c_path = |path: &Path| {
        std::ffi::CString::new(path.as_os_str().as_bytes())
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
    };
    let (from, to) = (c_path(from)?, c_path(to)?);
    // SAFETY: both paths are NUL-terminated strings that outlive the call.
    let result = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from.as_ptr(),
            libc::AT_FDCWD,
            to.as_ptr(),
            flags,
        )
    };
    match result {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// A file system, or a kernel, that does not know `renameat2`'s flags.
fn unsupported(error: &std::io::Error) -> bool {
    matches!(error.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS))
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

/// An object's bytes, read a chunk at a time straight into the (reused) buffer that is passed
/// on, from its files in order.
struct FileChunks {
    /// Each file left to read, with where to read it from and how much of it is left.
    files: VecDeque<(Arc<std::fs::File>, u64, u64)>,
}

impl FileChunks {
    /// The `remaining` bytes from `start` of the object made of `files`.
    fn new(files: ObjectFiles, mut start: u64, mut remaining: u64) -> FileChunks {
        let mut wanted = VecDeque::new();
        for (file, length) in files {
            if start >= length {
                start -= length;
                continue;
            }
            if remaining == 0 {
                break;
            }
            let take = (length - start).min(remaining);
            wanted.push_back((Arc::new(file), start, take));
            remaining -= take;
            start = 0;
        }
        FileChunks { files: wanted }
    }
}

/// The most read from a file at once.
const READ_CHUNK: u64 = CHUNK as u64;

impl Produce for FileChunks {
    async fn next(mut self) -> (Self, Next) {
        let Some((file, position, remaining)) = self.files.front_mut() else {
            return (self, Ok(None));
        };
        let (file, at) = (Arc::clone(file), *position);
        let want = (*remaining).min(READ_CHUNK) as usize;
        let read = blocking(move || {
            use std::os::unix::fs::FileExt;
            let mut chunk = chunk_pool::take()?;
            let read = file.read_at(chunk.filled(want), at)?;
            chunk.truncate(read);
            Ok::<_, std::io::Error>(chunk)
        })
        .await;
        let next = match read {
            Ok(chunk) if chunk.is_empty() => {
                Err(anyhow::anyhow!("the object is shorter than it was"))
            }
            Ok(chunk) => {
                *position += chunk.len() as u64;
                *remaining -= chunk.len() as u64;
                if *remaining == 0 {
                    self.files.pop_front();
                }
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
    use crate::capabilities::streams;

    async fn read_all(mut stream: DynInputStream) -> Vec<u8> {
        let mut read = Vec::new();
        while let Some(chunk) = streams::read_chunk(&mut stream, streams::CHUNK)
            .await
            .expect("the object reads")
        {
            read.extend_from_slice(&chunk);
        }
        read
    }

    /// A store in a new directory, removed when the directory is dropped.
    async fn new_store() -> (tempfile::TempDir, LocalStore) {
        let dir = tempfile::tempdir().expect("a directory");
        let store = LocalStore::new(dir.path().to_path_buf())
            .await
            .expect("a store");
        (dir, store)
    }

    /// Stores `parts` as one upload of `key`, completed.
    async fn complete(store: &LocalStore, key: &str, parts: &[&[u8]]) -> ObjectInfo {
        let upload = store.create_multipart(key).await.expect("an upload");
        let mut stored = Vec::new();
        for (index, part) in parts.iter().enumerate() {
            let source = streams::from_bytes(bytes::Bytes::copy_from_slice(part));
            let number = u32::try_from(index + 1).expect("a few parts");
            let length = part.len() as u64;
            stored.push(
                store
                    .upload_part(key, &upload, number, source, length)
                    .await
                    .expect("a part"),
            );
        }
        store
            .complete_multipart(key, &upload, &stored)
            .await
            .expect("completed")
    }

    /// Every file under `dir`, as paths relative to it.
    fn files_under(dir: &Path) -> Vec<String> {
        let mut found = Vec::new();
        let mut pending = vec![dir.to_path_buf()];
        while let Some(next) = pending.pop() {
            for entry in std::fs::read_dir(&next).expect("a directory").flatten() {
                match entry.file_type().expect("a type").is_dir() {
                    true => pending.push(entry.path()),
                    false => found.push(
                        entry
                            .path()
                            .strip_prefix(dir)
                            .expect("below dir")
                            .display()
                            .to_string(),
                    ),
                }
            }
        }
        found.sort();
        found
    }

    #[tokio::test]
    async fn a_completed_upload_keeps_its_parts_and_reads_as_one_object() {
        let (dir, store) = new_store().await;
        let parts: [&[u8]; 3] = [b"first part ", b"", b"and the second"];
        let whole = parts.concat();
        let info = complete(&store, "a/b", &parts).await;
        assert_eq!(info.size, whole.len() as u64);
        // No copy: the parts are the object's files, and the upload is gone.
        assert!(dir.path().join("objects/a/b.o").is_dir());
        for (start, length) in [
            (0, None),
            (3, Some(10)),
            (11, Some(0)),
            (11, None),
            (5, Some(100)),
        ] {
            let (_, stream) = store.get("a/b", start, length).await.expect("a range");
            let end = length.map_or(whole.len(), |length| {
                (start + length).min(whole.len() as u64) as usize
            });
            assert_eq!(
                read_all(stream).await,
                &whole[start as usize..end],
                "{start} {length:?}"
            );
        }
        let listed: Vec<_> = store
            .list("a/", 10)
            .await
            .expect("a listing")
            .into_iter()
            .map(|info| (info.key, info.size))
            .collect();
        assert_eq!(listed, [("a/b".to_owned(), whole.len() as u64)]);
        assert_eq!(
            store.head("a/b").await.expect("head").map(|info| info.etag),
            Some(info.etag.clone())
        );

        // A reader that has begun keeps the object it began, whatever replaces it; the new
        // one has a new etag.
        let (_, before) = store.get("a/b", 0, None).await.expect("the object");
        let put = store
            .put("a/b", b"put whole".to_vec())
            .await
            .expect("replaced");
        assert_ne!(put.etag, info.etag);
        assert_eq!(read_all(before).await, whole);
        let (_, stream) = store.get("a/b", 0, None).await.expect("the object");
        assert_eq!(read_all(stream).await, b"put whole");
        let (_, before) = store.get("a/b", 0, None).await.expect("the object");
        complete(&store, "a/b", &[b"again"]).await;
        assert_eq!(read_all(before).await, b"put whole");
        let (_, stream) = store.get("a/b", 0, None).await.expect("the object");
        assert_eq!(read_all(stream).await, b"again");

        store.delete("a/b").await.expect("deleted");
        assert!(store.head("a/b").await.expect("head").is_none());
        // Nothing left behind: no upload, no replaced object, no manifest.
        assert_eq!(files_under(dir.path()), Vec::<String>::new());
    }

    /// Writers replacing and removing one key at once, with readers beside them: every read
    /// gets one whole object, and what is replaced or removed is gone afterwards.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn racing_replacements_leave_whole_objects_and_nothing_behind() {
        let (dir, store) = new_store().await;
        let store = Arc::new(store);
        let versions: Vec<Vec<u8>> = (0..8u8).map(|n| vec![n; 3000 + usize::from(n)]).collect();
        let mut tasks = tokio::task::JoinSet::new();
        for (index, version) in versions.iter().cloned().enumerate() {
            let store = Arc::clone(&store);
            tasks.spawn(async move {
                for round in 0..10 {
                    match (index + round) % 3 {
                        0 => drop(store.put("key", version.clone()).await.expect("put")),
                        1 => drop(
                            complete(&store, "key", &[&version[..1000], &version[1000..]]).await,
                        ),
                        _ => store.delete("key").await.expect("deleted"),
                    }
                }
            });
        }
        for _ in 0..4 {
            let (store, versions) = (Arc::clone(&store), versions.clone());
            tasks.spawn(async move {
                for _ in 0..40 {
                    match store.get("key", 0, None).await {
                        Ok((info, stream)) => {
                            let read = read_all(stream).await;
                            assert_eq!(read.len() as u64, info.size);
                            assert!(
                                versions.contains(&read),
                                "a read of {} mixed bytes",
                                read.len()
                            );
                        }
                        Err(ObjectError::NotFound) => {}
                        Err(error) => panic!("a read failed: {error:?}"),
                    }
                }
            });
        }
        while let Some(done) = tasks.join_next().await {
            done.expect("no task failed");
        }
        store.delete("key").await.expect("deleted");
        assert_eq!(files_under(dir.path()), Vec::<String>::new());
    }

    /// A completion that fails on the way, or that a crash cuts short, leaves the upload as
    /// it was: completed afterwards, it gives the whole object, and nothing is left behind.
    #[tokio::test]
    async fn a_completion_cut_short_loses_nothing() {
        let (dir, store) = new_store().await;
        let upload = store.create_multipart("k").await.expect("an upload");
        let mut parts = Vec::new();
        for (number, bytes) in [(1, b"one "), (2, b"two ")] {
            let source = streams::from_bytes(bytes::Bytes::from_static(bytes));
            parts.push(
                store
                    .upload_part("k", &upload, number, source, 4)
                    .await
                    .expect("a part"),
            );
        }
        // A part the upload does not have: refused once some parts are gathered.
        let mut wrong = parts.clone();
        wrong.push(PartInfo {
            number: 3,
            size: 4,
            etag: "missing".to_owned(),
        });
        let refused = store.complete_multipart("k", &upload, &wrong).await;
        assert!(
            matches!(refused, Err(ObjectError::Unavailable(ref message)) if message.contains("part 3")),
            "{refused:?}"
        );
        // A crash after the object was gathered, before it was in place.
        let upload_dir = store.upload_dir("k", &upload).await.expect("the upload");
        let names: Vec<(u32, String)> = parts
            .iter()
            .map(|part| (part.number, part_file_name(part.number, &part.etag)))
            .collect();
        gather_object(
            &upload_dir,
            &store.tmp.join("object-cut"),
            &names,
            &store.tmp,
        )
        .expect("gathered");
        assert!(store.head("k").await.expect("head").is_none());

        let info = store
            .complete_multipart("k", &upload, &parts)
            .await
            .expect("completed");
        assert_eq!(info.size, 8);
        let (_, stream) = store.get("k", 0, None).await.expect("the object");
        assert_eq!(read_all(stream).await, b"one two ");
        std::fs::remove_dir_all(store.tmp.join("object-cut")).expect("what the crash left");
        store.delete("k").await.expect("deleted");
        assert_eq!(files_under(dir.path()), Vec::<String>::new());
    }

    /// The path a file system without `renameat2`'s flags takes (tmpfs and ext4 have them, so
    /// the store's own tests never reach it): a file or a directory of parts over nothing, over
    /// a file and over a directory, with nothing left aside.
    #[test]
    fn without_renameat2_flags_an_object_still_replaces_another_whole() {
        let dir = tempfile::tempdir().expect("a directory");
        let to = dir.path().join("key.o");
        let file = |name: &str, content: &str| {
            let path = dir.path().join(name);
            std::fs::write(&path, content).expect("written");
            path
        };
        let parts = |name: &str, content: &str| {
            let path = dir.path().join(name);
            std::fs::create_dir(&path).expect("a directory");
            std::fs::write(path.join("00001.e.part"), content).expect("written");
            std::fs::write(
                path.join(MANIFEST),
                format!("{} 00001.e.part\n", content.len()),
            )
            .expect("written");
            path
        };
        let read = |path: &Path| {
            let (stored, files) = read_object(path, true)
                .expect("readable")
                .expect("an object");
            let mut bytes = Vec::new();
            for (mut file, _) in files {
                std::io::Read::read_to_end(&mut file, &mut bytes).expect("read");
            }
            assert_eq!(stored.size, bytes.len() as u64);
            String::from_utf8(bytes).expect("text")
        };

        put_in_place_in_two_steps(&file("first", "one"), &to).expect("placed");
        assert_eq!(read(&to), "one");
        put_in_place_in_two_steps(&parts("second", "two"), &to).expect("placed");
        assert_eq!(read(&to), "two");
        put_in_place_in_two_steps(&parts("third", "three"), &to).expect("placed");
        assert_eq!(read(&to), "three");
        put_in_place_in_two_steps(&file("fourth", "four"), &to).expect("placed");
        assert_eq!(read(&to), "four");
        assert_eq!(files_under(dir.path()), ["key.o"]);
    }

    #[test]
    fn segments_round_trip_and_dots_are_encoded() {
        for segment in ["plain", "with space", "dots.and.o", "ünï", "%25"] {
            let encoded = encode_segment(segment);
            assert!(!encoded.contains('.'), "{encoded}");
            assert_eq!(decode_segment(&encoded).as_deref(), Some(segment));
        }
    }
}
