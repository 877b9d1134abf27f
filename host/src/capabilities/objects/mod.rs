//! `host:capabilities/objects`: object storage with S3's multipart uploads, on a local
//! directory (`local.rs`, the embedded default) or any S3 API (`s3.rs`). Both apply S3's rules
//! with the same answers, so an app behaves the same on a laptop and in production; both keep
//! each app under its own prefix.

mod local;
mod s3;

use anyhow::{Context, Result};
use wasmtime::component::Resource;
use wasmtime_wasi::p2::DynInputStream;

use crate::capabilities::CapabilityView;
use crate::capabilities::host::capabilities::objects::{Host, ObjectError, ObjectInfo, PartInfo};
use crate::capabilities::part_buffer::PartBuffers;

pub use local::LocalStore;
pub use s3::S3Store;

pub const MAX_KEY_LENGTH: usize = 1024;
pub const MAX_PART_NUMBER: u32 = 10_000;
pub const MIN_PART_SIZE: u64 = 5 << 20;
pub const MAX_PART_SIZE: u64 = 5 << 30;
/// The most objects one listing returns (S3's page): a listing is gathered in host memory
/// before the guest gets it, so it is bounded rather than as long as the bucket.
pub const MAX_LISTED: usize = 1000;

pub type ObjectResult<T> = Result<T, ObjectError>;

pub use crate::settings::storage::{S3Location, S3Settings, Storage};

/// One app's object store.
pub enum ObjectStore {
    Local(LocalStore),
    S3(Box<S3Store>),
}

/// `$call` on the store, whichever it is: both offer the same methods.
macro_rules! on_store {
    ($self:expr, $store:ident => $call:expr) => {
        match $self {
            ObjectStore::Local($store) => $call,
            ObjectStore::S3($store) => $call,
        }
    };
}

impl ObjectStore {
    async fn create_multipart(&self, key: &str) -> ObjectResult<String> {
        check_key(key)?;
        on_store!(self, store => store.create_multipart(key).await)
    }

    async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: u32,
        source: DynInputStream,
        length: u64,
    ) -> ObjectResult<PartInfo> {
        check_key(key)?;
        check_part(number, length)?;
        on_store!(self, store => store.upload_part(key, upload_id, number, source, length).await)
    }

    async fn list_parts(&self, key: &str, upload_id: &str) -> ObjectResult<Vec<PartInfo>> {
        check_key(key)?;
        on_store!(self, store => store.list_parts(key, upload_id).await)
    }

    async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        parts: Vec<PartInfo>,
    ) -> ObjectResult<ObjectInfo> {
        check_key(key)?;
        let stored = self.list_parts(key, upload_id).await?;
        check_completion(&parts, &stored)?;
        on_store!(self, store => store.complete_multipart(key, upload_id, &parts).await)
    }

    async fn abort_multipart(&self, key: &str, upload_id: &str) -> ObjectResult<()> {
        check_key(key)?;
        on_store!(self, store => store.abort_multipart(key, upload_id).await)
    }

    async fn put(&self, key: &str, data: Vec<u8>) -> ObjectResult<ObjectInfo> {
        check_key(key)?;
        on_store!(self, store => store.put(key, data).await)
    }

    async fn get(
        &self,
        key: &str,
        start: u64,
        length: Option<u64>,
    ) -> ObjectResult<(ObjectInfo, DynInputStream)> {
        check_key(key)?;
        on_store!(self, store => store.get(key, start, length).await)
    }

    async fn head(&self, key: &str) -> ObjectResult<Option<ObjectInfo>> {
        check_key(key)?;
        on_store!(self, store => store.head(key).await)
    }

    async fn delete(&self, key: &str) -> ObjectResult<()> {
        check_key(key)?;
        on_store!(self, store => store.delete(key).await)
    }

    async fn list(&self, prefix: &str) -> ObjectResult<Vec<ObjectInfo>> {
        if prefix.len() > MAX_KEY_LENGTH {
            return Err(ObjectError::InvalidKey(format!(
                "a prefix is at most {MAX_KEY_LENGTH} bytes"
            )));
        }
        let listed = on_store!(self, store => store.list(prefix, MAX_LISTED).await)?;
        if listed.len() > MAX_LISTED {
            return Err(ObjectError::InvalidKey(format!(
                "{prefix:?}: more than {MAX_LISTED} objects have this prefix, the most one listing returns; list by longer prefixes"
            )));
        }
        Ok(listed)
    }
}

impl ObjectStore {
    /// The uploads (key, upload id) with no activity since `cutoff`, as the store dates them.
    pub async fn idle_uploads(
        &self,
        cutoff: std::time::SystemTime,
    ) -> ObjectResult<Vec<(String, String)>> {
        on_store!(self, store => store.idle_uploads(cutoff).await)
    }

    /// Aborts an upload; whether it was still there.
    pub async fn abort_if_there(&self, key: &str, upload_id: &str) -> ObjectResult<bool> {
        match on_store!(self, store => store.abort_multipart(key, upload_id).await) {
            Ok(()) => Ok(true),
            Err(ObjectError::NoSuchUpload) => Ok(false),
            Err(error) => Err(error),
        }
    }
}

/// The app's object store, as the settings say.
pub async fn for_app(
    storage: &Storage,
    s3: &S3Settings,
    data_dir: &std::path::Path,
    app: &str,
    master_key: &[u8; 32],
    buffers: std::sync::Arc<PartBuffers>,
) -> Result<ObjectStore> {
    Ok(match storage {
        Storage::Local(root) => {
            let root = root.clone().unwrap_or_else(|| data_dir.join("apps"));
            ObjectStore::Local(
                LocalStore::new(root.join(app))
                    .await
                    .context("cannot set up the local object store")?,
            )
        }
        Storage::S3(location) => ObjectStore::S3(Box::new(
            S3Store::new(location, s3, app, master_key, buffers)
                .await
                .context("cannot set up the S3 client")?,
        )),
    })
}

/// A key every backend can store: S3's limits, and segments a file system can hold.
pub fn check_key(key: &str) -> ObjectResult<()> {
    let invalid = |why: &str| Err(ObjectError::InvalidKey(format!("{key:?}: {why}")));
    if key.is_empty() {
        return invalid("a key cannot be empty");
    }
    if key.len() > MAX_KEY_LENGTH {
        return invalid("a key is at most 1024 bytes");
    }
    for segment in key.split('/') {
        match segment {
            "" => return invalid("a key's /-separated segments cannot be empty"),
            "." | ".." => return invalid("a key's segments cannot be . or .."),
            _ => {}
        }
    }
    if key.chars().any(char::is_control) {
        return invalid("a key cannot hold control characters");
    }
    Ok(())
}

fn check_part(number: u32, length: u64) -> ObjectResult<()> {
    if !(1..=MAX_PART_NUMBER).contains(&number) {
        return Err(ObjectError::InvalidPart(format!(
            "part number {number}: part numbers go from 1 to {MAX_PART_NUMBER}"
        )));
    }
    if length > MAX_PART_SIZE {
        return Err(ObjectError::InvalidPart(format!(
            "part {number} is {length} bytes: a part is at most 5 GiB"
        )));
    }
    Ok(())
}

/// S3's rules for completing an upload, checked before the storage is asked, so both backends
/// give the same answer.
fn check_completion(parts: &[PartInfo], stored: &[PartInfo]) -> ObjectResult<()> {
    if parts.is_empty() {
        return Err(ObjectError::InvalidPart(
            "an upload is completed with at least one part".to_owned(),
        ));
    }
    for pair in parts.windows(2) {
        if pair[0].number >= pair[1].number {
            return Err(ObjectError::InvalidPart(
                "parts are listed in ascending order of number, each once".to_owned(),
            ));
        }
    }
    for part in parts {
        let Some(found) = stored.iter().find(|s| s.number == part.number) else {
            return Err(ObjectError::InvalidPart(format!(
                "part {} was not uploaded",
                part.number
            )));
        };
        if found.etag != part.etag {
            return Err(ObjectError::InvalidPart(format!(
                "part {} changed since it was listed (its etag is now {})",
                part.number, found.etag
            )));
        }
    }
    let last = parts.len() - 1;
    for part in &parts[..last] {
        let size = stored
            .iter()
            .find(|s| s.number == part.number)
            .map_or(part.size, |s| s.size);
        if size < MIN_PART_SIZE {
            return Err(ObjectError::InvalidPart(format!(
                "part {} is {size} bytes: every part but the last must be at least 5 MiB (S3's rule)",
                part.number
            )));
        }
    }
    Ok(())
}

/// Reads exactly `length` bytes of a stream, a chunk at a time, failing when the stream is
/// shorter or longer.
pub struct Exact<'a> {
    source: &'a mut DynInputStream,
    length: u64,
    read: u64,
    checked_end: bool,
}

impl<'a> Exact<'a> {
    pub fn new(source: &'a mut DynInputStream, length: u64) -> Exact<'a> {
        Exact {
            source,
            length,
            read: 0,
            checked_end: false,
        }
    }

    /// The next chunk, `None` once all `length` bytes were read and the stream ended there.
    pub async fn next(&mut self) -> ObjectResult<Option<bytes::Bytes>> {
        use crate::capabilities::streams::{CHUNK, read_chunk};
        if self.read < self.length {
            let want = (self.length - self.read).min(CHUNK as u64) as usize;
            return match read_chunk(self.source, want).await {
                Ok(Some(bytes)) if bytes.len() > want => Err(too_long(self.length)),
                Ok(Some(bytes)) => {
                    self.read += bytes.len() as u64;
                    Ok(Some(bytes))
                }
                Ok(None) => Err(ObjectError::LengthMismatch(format!(
                    "the stream ended after {} of {} bytes",
                    self.read, self.length
                ))),
                Err(error) => Err(ObjectError::SourceFailed(format!("{error:#}"))),
            };
        }
        if self.checked_end {
            return Ok(None);
        }
        // The stream must end here: more bytes mean the length was wrong.
        self.checked_end = true;
        match read_chunk(self.source, 1).await {
            Ok(None) => Ok(None),
            Ok(Some(_)) => Err(too_long(self.length)),
            Err(error) => Err(ObjectError::SourceFailed(format!("{error:#}"))),
        }
    }
}

fn too_long(length: u64) -> ObjectError {
    ObjectError::LengthMismatch(format!("the stream holds more than {length} bytes"))
}

impl Host for CapabilityView<'_> {
    async fn create_multipart(&mut self, key: String) -> wasmtime::Result<ObjectResult<String>> {
        Ok(self.app.objects.create_multipart(&key).await)
    }

    async fn upload_part(
        &mut self,
        key: String,
        upload_id: String,
        number: u32,
        source: Resource<DynInputStream>,
        length: u64,
    ) -> wasmtime::Result<ObjectResult<PartInfo>> {
        let source = self.table.delete(source)?;
        Ok(self
            .app
            .objects
            .upload_part(&key, &upload_id, number, source, length)
            .await)
    }

    async fn upload_part_bytes(
        &mut self,
        key: String,
        upload_id: String,
        number: u32,
        data: Vec<u8>,
    ) -> wasmtime::Result<ObjectResult<PartInfo>> {
        let length = data.len() as u64;
        let source = crate::capabilities::streams::from_bytes(data.into());
        Ok(self
            .app
            .objects
            .upload_part(&key, &upload_id, number, source, length)
            .await)
    }

    async fn list_parts(
        &mut self,
        key: String,
        upload_id: String,
    ) -> wasmtime::Result<ObjectResult<Vec<PartInfo>>> {
        Ok(self.app.objects.list_parts(&key, &upload_id).await)
    }

    async fn complete_multipart(
        &mut self,
        key: String,
        upload_id: String,
        parts: Vec<PartInfo>,
    ) -> wasmtime::Result<ObjectResult<ObjectInfo>> {
        Ok(self
            .app
            .objects
            .complete_multipart(&key, &upload_id, parts)
            .await)
    }

    async fn abort_multipart(
        &mut self,
        key: String,
        upload_id: String,
    ) -> wasmtime::Result<ObjectResult<()>> {
        Ok(self.app.objects.abort_multipart(&key, &upload_id).await)
    }

    async fn put(
        &mut self,
        key: String,
        data: Vec<u8>,
    ) -> wasmtime::Result<ObjectResult<ObjectInfo>> {
        Ok(self.app.objects.put(&key, data).await)
    }

    async fn get(
        &mut self,
        key: String,
        start: u64,
        length: Option<u64>,
    ) -> wasmtime::Result<ObjectResult<(ObjectInfo, Resource<DynInputStream>)>> {
        let got = self.app.objects.get(&key, start, length).await;
        Ok(match got {
            Ok((info, stream)) => Ok((info, self.push_stream(stream)?)),
            Err(error) => Err(error),
        })
    }

    async fn head(&mut self, key: String) -> wasmtime::Result<ObjectResult<Option<ObjectInfo>>> {
        Ok(self.app.objects.head(&key).await)
    }

    async fn delete(&mut self, key: String) -> wasmtime::Result<ObjectResult<()>> {
        Ok(self.app.objects.delete(&key).await)
    }

    async fn list_objects(
        &mut self,
        prefix: String,
    ) -> wasmtime::Result<ObjectResult<Vec<ObjectInfo>>> {
        Ok(self.app.objects.list(&prefix).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_rules() {
        assert!(check_key("files/42/data.bin").is_ok());
        assert!(check_key("").is_err());
        assert!(check_key("../other-app/x").is_err());
        assert!(check_key("a//b").is_err());
        assert!(check_key("/absolute").is_err());
        assert!(check_key(&"x".repeat(1025)).is_err());
    }

    #[test]
    fn storage_takes_local_paths_and_s3_urls() {
        assert_eq!(Storage::parse("local").unwrap(), Storage::Local(None));
        assert_eq!(
            Storage::parse("s3://bucket/some/prefix/").unwrap(),
            Storage::S3(S3Location {
                bucket: "bucket".into(),
                prefix: "some/prefix/".into()
            })
        );
        assert!(Storage::parse("s3:///x").is_err());
        assert!(Storage::parse("gs://bucket").is_err());
    }

    #[test]
    fn completion_follows_s3_rules() {
        let part = |number, size: u64| PartInfo {
            number,
            size,
            etag: format!("e{number}"),
        };
        let stored = vec![part(1, 5 << 20), part(2, 1), part(3, 7)];
        assert!(check_completion(&stored[..2], &stored).is_ok());
        assert!(check_completion(&stored, &stored).is_err()); // part 2 is small and not last
        assert!(check_completion(&[part(4, 1)], &stored).is_err());
        assert!(check_completion(&[], &stored).is_err());
    }
}
